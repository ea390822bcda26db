"""The virtual board runs the firmware's own core: the protocol engine and model runner of
firmware/components/tinyhil, built natively against the pinned esp-tflite-micro and esp-nn
(../shared/vendor), behind a real pseudo-terminal and real pyserial. Its outputs must be bit-exact
with host TFLM (the `tflite-micro` package, an independent build) on every third-party model, for
both esp-nn versions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.board import VirtualBoard
from harness.board.native_firmware import default_native_cache
from harness.board.virtual import VirtualBoardOptions
from harness.errors import BoardError, UnsupportedOpError
from harness.firmware import CORE_DIR, plan_firmware, render_project
from harness.native_build import build_program
from harness.sources import ESP_NN_VERSIONS
from harness.tflite_model import inspect_model
from harness.tflm import open_interpreter

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = sorted((SHARED / "models").rglob("*.tflite")) if (SHARED / "models").is_dir() else []
SAMPLES = 12


def _firmware(model: Path, version: str, **settings):
    host = open_interpreter(model.read_bytes(), 8 << 20)
    return plan_firmware(model.stem, model, host.arena_used, esp_nn_version=version, **settings)


def _inputs(model: Path, count: int, seed: int) -> list[list[np.ndarray]]:
    info = inspect_model(model.read_bytes())
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = []
        for tensor in info.input_tensors():
            dtype = np.dtype(tensor.dtype)
            if dtype.kind == "f":
                sample.append(rng.standard_normal(tensor.shape).astype(dtype))
            else:
                limits = np.iinfo(dtype)
                sample.append(rng.integers(limits.min, limits.max, size=tensor.shape, endpoint=True, dtype=dtype))
        samples.append(sample)
    return samples


def _host_outputs(model: Path, samples) -> list[list[np.ndarray]]:
    host = open_interpreter(model.read_bytes(), 8 << 20)
    return [host.run(sample) for sample in samples]


def _board(tmp_path: Path, **options) -> VirtualBoard:
    return VirtualBoard(tmp_path / "board", options=VirtualBoardOptions(emulate_link=False, **options))


@pytest.mark.parametrize("version", ESP_NN_VERSIONS)
@pytest.mark.parametrize("model", MODELS, ids=[m.stem for m in MODELS])
def test_native_firmware_is_bit_exact_with_host_tflm_on_every_shared_model(vendor, tmp_path, model, version):
    samples = _inputs(model, SAMPLES, seed=len(model.name))
    expected = _host_outputs(model, samples)
    with _board(tmp_path, engine="native") as board:
        info = board.load(_firmware(model, version))
        assert board.build is not None and board.build.kind == "native"
        assert board.build.esp_nn == version and board.build.esp_tflite_micro == "1.3.8"
        assert info.latency_kind == "estimated"
        results = list(board.infer_many(samples))
    for index, (result, wanted) in enumerate(zip(results, expected)):
        for got, want in zip(result.outputs, wanted):
            np.testing.assert_array_equal(got.reshape(want.shape), want,
                                          err_msg=f"{model.name} sample {index}, esp-nn {version}")


@pytest.mark.skipif(not MODELS, reason="third-party models not available")
def test_both_esp_nn_versions_give_the_same_outputs_or_the_difference_is_reported(vendor, tmp_path):
    """The portable C kernels of 1.1.2 and 1.2.3 run through the same 1.3.8 wrappers. Where they
    disagree on a model the run must say so; here the comparison itself is the report."""
    differences = []
    for model in MODELS:
        samples = _inputs(model, 4, seed=7)
        outputs = {}
        for version in ESP_NN_VERSIONS:
            with _board(tmp_path / version, engine="native") as board:
                board.load(_firmware(model, version))
                outputs[version] = [np.concatenate([o.ravel() for o in r.outputs]) for r in board.infer_many(samples)]
        first, second = (outputs[v] for v in ESP_NN_VERSIONS)
        if any(not np.array_equal(a, b) for a, b in zip(first, second)):
            differences.append(model.name)
    assert differences == [], f"outputs differ between esp-nn {' and '.join(ESP_NN_VERSIONS)} on: {differences}"


def test_per_op_timings_are_the_cost_model_estimates_and_an_unprofiled_invoke_has_none(vendor, tmp_path, shared_dir):
    model = shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
    sample = _inputs(model, 1, seed=1)[0]
    with _board(tmp_path, engine="native") as board:
        board.load(_firmware(model, "1.1.2"))
        profiled = board.infer(sample, profile=True)
        plain = board.infer(sample, profile=False)
    ops = inspect_model(model.read_bytes()).ops
    assert len(profiled.op_us) == len(ops) and all(us > 0 for us in profiled.op_us)
    assert plain.op_us == () and plain.total_us == profiled.total_us  # the estimate does not vary


def test_without_the_pinned_sources_the_python_engine_runs_and_says_so(tmp_path, sine_model, monkeypatch):
    monkeypatch.setenv("TINYHIL_VENDOR_DIR", str(tmp_path / "no-vendor-here"))
    monkeypatch.setenv("TINYHIL_REGISTRY_URL", "off")  # nothing here reaches the real registry
    firmware = _firmware(sine_model, "1.1.2")
    with VirtualBoard(tmp_path / "board", options=VirtualBoardOptions(emulate_link=False),
                      build_root=tmp_path / "native-cache") as board:
        board.load(firmware)
        assert board.build.kind == "python" and "native build unavailable" in board.build.note
        assert board.infer([np.zeros((1, 1), np.float32)]).outputs[0].shape == (1, 1)
    with VirtualBoard(tmp_path / "board2", options=VirtualBoardOptions(emulate_link=False, engine="native"),
                      build_root=tmp_path / "native-cache") as board:
        with pytest.raises(BoardError, match="cannot build the firmware natively"):
            board.load(firmware)


def test_native_firmware_names_an_op_missing_from_its_resolver(vendor, tmp_path, shared_dir):
    """The runner checks every operator of every subgraph against the resolver at boot, so an op
    without a kernel is named with its place instead of being left to AllocateTensors' log."""
    model = shared_dir / "models" / "tflm-examples" / "hello_world_int8.tflite"
    firmware = _firmware(model, "1.1.2")
    patched = tmp_path / "patched.tflite"
    patched.write_bytes(_with_first_op_code(model.read_bytes(), 15))  # LSH_PROJECTION: no TFLM kernel
    with _board(tmp_path, engine="native") as board:
        with pytest.raises(UnsupportedOpError, match=r"LSH_PROJECTION \(subgraph 0, operator \d+\) is not registered"):
            board.load(plan_firmware("patched", patched, firmware.arena_size))


def _with_first_op_code(data: bytes, builtin: int) -> bytes:
    """`data` with its first operator code changed to `builtin`, in place in the flatbuffer."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema_fb

    out = bytearray(data)
    code = schema_fb.Model.GetRootAs(data, 0).OperatorCodes(0)
    for vtable_slot, size in ((4, 1), (10, 4)):  # deprecated_builtin_code (int8), builtin_code (int32)
        offset = code._tab.Offset(vtable_slot)
        if offset:
            position = code._tab.Pos + offset
            out[position:position + size] = builtin.to_bytes(size, "little", signed=True)
    return bytes(out)


# Control flow (IF, WHILE: ops that only their bodies use) and a resource variable (VAR_HANDLE,
# CALL_ONCE), converted by TensorFlow's own converter in a child process.
_CONVERT = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf

class Branches(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    def __call__(self, x):
        y = tf.cond(tf.reduce_sum(x) > 0, lambda: tf.nn.relu(x) * 2.0, lambda: tf.tanh(x) - 1.0)
        _, z = tf.while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, v * 0.5 + 1.0), (tf.constant(0), y))
        return z

class Stateful(tf.Module):
    def __init__(self):
        self.total = tf.Variable(tf.zeros([1, 4]))
    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def __call__(self, x):
        self.total.assign_add(x)
        return self.total * 2.0

for name, module in (("control_flow", Branches()), ("stateful", Stateful())):
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    converter.experimental_enable_resource_variables = True
    with open(os.path.join(sys.argv[1], name + ".tflite"), "wb") as out:
        out.write(converter.convert())
"""


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    result = subprocess.run([sys.executable, "-c", _CONVERT, str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_control_flow_bodies_run_and_do_not_shift_the_main_graph_timings(vendor, tmp_path, converted):
    model = converted / "control_flow.tflite"
    info = inspect_model(model.read_bytes())
    assert set(info.all_op_types) - set(info.op_types) >= {"RELU", "TANH", "LESS"}  # only in the bodies
    rng = np.random.default_rng(3)
    samples = [[rng.standard_normal((1, 8)).astype(np.float32) + shift] for shift in (-2.0, 2.0, -0.1, 0.1)]
    expected = _host_outputs(model, samples)
    with _board(tmp_path, engine="native") as board:
        board.load(_firmware(model, "1.1.2"))
        assert board.op_names == tuple(op.name for op in info.ops)
        results = list(board.infer_many(samples))
    for result, wanted in zip(results, expected):
        np.testing.assert_array_equal(result.outputs[0], wanted[0])
        # One timing per operator of the main graph: the bodies' events belong to IF and WHILE.
        assert len(result.op_us) == len(info.ops)


def test_a_model_with_resource_variables_boots_and_starts_every_sample_from_zero(vendor, tmp_path, converted):
    model = converted / "stateful.tflite"
    assert "VAR_HANDLE" in inspect_model(model.read_bytes()).all_op_types
    samples = [[np.full((1, 4), value, np.float32)] for value in (1.0, 1.0, -3.0)]
    with _board(tmp_path, engine="native") as board:
        board.load(_firmware(model, "1.1.2"))
        outputs = [result.outputs[0] for result in board.infer_many(samples)]
    np.testing.assert_array_equal(np.concatenate(outputs), np.concatenate([o[0] for o in _host_outputs(model, samples)]))
    np.testing.assert_array_equal(outputs[0], outputs[1])  # no state leaks from one sample to the next


def test_corrupt_op_perturbs_the_main_graph_operator_once_not_body_operators_of_the_same_index(vendor, tmp_path,
                                                                                                  converted):
    """corrupt_op 2 is the IF of the main graph; the WHILE body that runs after it has an operator 2
    too (an ADD), invoked nested inside WHILE. Only the IF's output moves, once, and the loop then
    computes on it exactly: v -> v * 0.5 + 1, three times."""
    from harness.board.faults import FaultPlan
    from harness.firmware import plan_debug_firmware

    model = converted / "control_flow.tflite"
    info = inspect_model(model.read_bytes())
    assert [op.name for op in info.ops] == ["SUM", "GREATER", "IF", "WHILE"]
    sample = [np.linspace(-1.5, 2.0, 8, dtype=np.float32).reshape(1, 8)]
    host = open_interpreter(model.read_bytes(), 8 << 20, preserve_all_tensors=True)
    host.run(sample)
    if_output, while_output = info.ops[2].outputs[0], info.ops[3].outputs[1]
    with _board(tmp_path, engine="native", faults=FaultPlan(corrupt_op=2)) as board:
        board.load(plan_debug_firmware(_firmware(model, "1.1.2")))
        tensors = board.read_tensors(sample, [info.ops[0].outputs[0], if_output, while_output])
    np.testing.assert_array_equal(tensors[info.ops[0].outputs[0]].values,
                                  host.interpreter.GetTensor(info.ops[0].outputs[0], 0)["tensor_data"])
    expected = host.interpreter.GetTensor(if_output, 0)["tensor_data"].copy().reshape(-1)
    expected[0::2] = expected[0::2] + np.float32(0.5) * (np.abs(expected[0::2]) + np.float32(1.0))
    np.testing.assert_array_equal(tensors[if_output].values.reshape(-1), expected)
    for _ in range(3):
        expected = expected * np.float32(0.5) + np.float32(1.0)
    np.testing.assert_array_equal(tensors[while_output].values.reshape(-1), expected)


def test_corrupt_op_refuses_an_output_type_it_cannot_perturb(vendor, tmp_path, converted):
    from harness.board.faults import FaultPlan

    model = converted / "control_flow.tflite"
    with _board(tmp_path, engine="native", faults=FaultPlan(corrupt_op=3)) as board:
        with pytest.raises(BoardError, match=r"corrupt_op 3: output 0 of operator 3 \(WHILE\) is INT32; the fault "
                                             r"perturbs FLOAT32, INT8, UINT8 and INT16 outputs"):
            board.load(_firmware(model, "1.1.2"))


@pytest.fixture(scope="session")
def resolver_library(vendor):
    from harness.native_build import build_tflm
    from harness.sources import locate_sources

    cache = default_native_cache()
    return build_tflm(locate_sources("1.1.2", vendor_dir=vendor, cache_root=cache), esp_nn_optimized=True,
                      cache_root=cache)


def _resolver_check(tmp_path: Path, library, config_dir: Path, model: Path) -> str:
    program = build_program("resolver_check", (CORE_DIR / "src" / "model_runner.cpp",
                                               CORE_DIR / "src" / "tinyhil_protocol.cpp",
                                               REPO / "firmware" / "test" / "native" / "resolver_check.cpp"),
                            include_dirs=(config_dir, CORE_DIR / "include"), library=library,
                            cache_root=tmp_path / "programs")
    result = subprocess.run([str(program), str(model)], capture_output=True, text=True, timeout=60)
    return result.stdout.strip()


def test_generated_op_resolver_covers_every_op_of_every_subgraph(tmp_path, resolver_library, converted, shared_dir):
    models = [converted / "control_flow.tflite", converted / "stateful.tflite",
              *sorted((shared_dir / "models").rglob("*.tflite"))]
    for model in models:
        firmware = _firmware(model, "1.1.2")
        project = render_project(firmware, inspect_model(model.read_bytes()), tmp_path / "projects")
        answer = _resolver_check(tmp_path, resolver_library, project.directory / "src", model)
        assert answer.startswith("ok"), f"{model.name}: {answer}"


def test_a_resolver_of_the_main_graph_only_fails_at_boot_naming_the_body_op(tmp_path, resolver_library, converted):
    """The control for the test above: the old generator registered subgraph 0's ops only."""
    model = converted / "control_flow.tflite"
    firmware = _firmware(model, "1.1.2")
    project = render_project(firmware, inspect_model(model.read_bytes()), tmp_path / "projects")
    header = (project.directory / "src" / "model_config.h").read_text()
    main_graph_only = tmp_path / "main-graph-only"
    main_graph_only.mkdir()
    kept = [line for line in header.splitlines()
            if "resolver.Add" not in line or any(f"resolver.{m}()" in line for m in ("AddSum", "AddGreater", "AddIf",
                                                                                      "AddWhile"))]
    (main_graph_only / "model_config.h").write_text("\n".join(kept) + "\n")
    answer = _resolver_check(tmp_path, resolver_library, main_graph_only, model)
    assert "is not registered in the firmware's op resolver" in answer and "subgraph" in answer, answer


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, ...), or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and (fields := _stat(entry.name)) is not None and int(fields[1]) == pid]


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has ended; it only waits to be reaped


def test_the_native_firmware_dies_with_the_board_process_however_it_ends(vendor, tmp_path, shared_dir):
    model = shared_dir / "models" / "tflm-examples" / "hello_world_int8.tflite"
    with _board(tmp_path, engine="native") as board:
        board.load(_firmware(model, "1.1.2"))
        emulator = board._process.pid
        (firmware,) = _children(emulator)
        os.kill(emulator, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _running(firmware) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(firmware), "the native firmware outlived its board process"


def test_a_crash_of_the_native_firmware_is_reported_with_the_board_log(vendor, tmp_path, shared_dir):
    model = shared_dir / "models" / "tflm-examples" / "hello_world_int8.tflite"
    with VirtualBoard(tmp_path / "board", options=VirtualBoardOptions(emulate_link=False, engine="native"),
                      timeout_s=2.0) as board:
        board.load(_firmware(model, "1.1.2"))
        board.resync_budget_s = 3.0
        (firmware,) = _children(board._process.pid)
        # SIGKILL, not SIGSEGV: a core dump would make how long the process takes to die depend on
        # the machine's core_pattern.
        os.kill(firmware, signal.SIGKILL)
        with pytest.raises(BoardError, match=r"virtual board process exited.*native firmware crashed \(exit code -9\)"):
            board.infer(_inputs(model, 1, seed=0)[0])


def test_device_output_is_split_into_whole_frames_and_the_text_between_them():
    from harness import protocol as p
    from harness.board.virtual_device import split_device_output

    hello = p.encode_frame(p.MsgType.DEVICE_INFO, 3, b"\x01\x02")
    ack = p.encode_frame(p.MsgType.ACK, 4, b"\x04" + bytes(4))
    buffer = bytearray(b"boot text\r\n" + hello + ack[:5])
    assert split_device_output(buffer) == [(b"boot text\r\n", False), (hello, True)]
    assert buffer == ack[:5]  # an incomplete frame waits for the rest
    buffer += ack[5:] + b"tail" + p.SYNC[:1]
    assert split_device_output(buffer) == [(ack, True), (b"tail", False)]
    assert buffer == p.SYNC[:1]  # may start the next frame
