"""The debug build that keeps every tensor, read back through the board API, and the corrupt_op fault.

Real components throughout: the virtual board (a real process behind a real pseudo-terminal) runs
the firmware's own core built natively against the pinned esp-tflite-micro, or the Python engine;
its intermediate tensors are compared with host TFLM (the `tflite-micro` package) run with
`kPreserveAllTensors` on the same sample. Models come from ../shared/models (skipped without it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from harness import protocol as p
from harness.board import BoardTensor, VirtualBoard
from harness.board.faults import FaultPlan
from harness.board.virtual import VirtualBoardOptions
from harness.errors import BoardError, ModelTooLargeError, SuiteError
from harness.firmware import MemoryBudget, arena_size_for, plan_debug_firmware, plan_firmware
from harness.suite import load_suite
from harness.tflite_model import inspect_model
from harness.tflm import HostInterpreter, open_interpreter, preserved_arena_bytes

KWS = Path("models") / "mlperf-tiny" / "kws_ref_model.tflite"
PERSON = Path("models") / "tflm-examples" / "person_detect.tflite"
HOST_ARENA = 8 << 20


def _normal(model: Path):
    host = open_interpreter(model.read_bytes(), HOST_ARENA)
    return plan_firmware(model.stem, model, host.arena_used)


def _sample(model: Path, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sample = []
    for tensor in inspect_model(model.read_bytes()).input_tensors():
        dtype = np.dtype(tensor.dtype)
        if dtype.kind == "f":
            sample.append(rng.uniform(0.0, 6.0, size=tensor.shape).astype(dtype))
        else:
            limits = np.iinfo(dtype)
            sample.append(rng.integers(limits.min, limits.max, size=tensor.shape, endpoint=True, dtype=dtype))
    return sample


def _reference(model: Path, sample: list[np.ndarray]) -> HostInterpreter:
    """Host TFLM with every tensor preserved, after one invoke of `sample`."""
    host = open_interpreter(model.read_bytes(), HOST_ARENA, preserve_all_tensors=True)
    host.run(sample)
    return host


def _board(tmp_path: Path, engine: str, faults: FaultPlan = FaultPlan()) -> VirtualBoard:
    return VirtualBoard(tmp_path / "board", options=VirtualBoardOptions(emulate_link=False, engine=engine,
                                                                         faults=faults))


def _op_outputs(model: Path) -> list[int]:
    return [op.outputs[0] for op in inspect_model(model.read_bytes()).ops]


def _lsb(board: BoardTensor, reference: np.ndarray) -> np.ndarray:
    return np.abs(board.values.astype(np.int64) - reference.astype(np.int64))


@pytest.mark.parametrize("engine", ["native", "python"])
def test_every_op_output_of_the_debug_image_equals_host_tflm_bit_for_bit(request, shared_dir, tmp_path, engine):
    if engine == "native":
        request.getfixturevalue("vendor")
    model = shared_dir / KWS
    sample = _sample(model)
    indices = _op_outputs(model)
    info = inspect_model(model.read_bytes())
    with _board(tmp_path, engine) as board:
        info_on_board = board.load(plan_debug_firmware(_normal(model)))
        assert info_on_board.flags & p.FLAG_PRESERVES_TENSORS
        assert board.build.kind == engine
        tensors = board.read_tensors(sample, indices)
        outputs = board.infer(sample, profile=False).outputs
    host = _reference(model, sample)
    assert sorted(tensors) == sorted(indices)
    for index in indices:
        expected = host.interpreter.GetTensor(index, 0)["tensor_data"]
        tensor = tensors[index]
        assert tensor.index == index
        assert tensor.values.dtype == expected.dtype and tensor.values.shape == expected.shape
        assert np.array_equal(tensor.values, expected), f"tensor {index} differs from host TFLM"
        model_tensor = info.tensors[index]
        assert tensor.spec.scale == pytest.approx(model_tensor.scales[0], rel=1e-7)
        assert tensor.spec.zero_point == model_tensor.zero_points[0]
    # The last op's output is the model's output, as the normal path delivers it.
    assert np.array_equal(tensors[info.outputs[0]].values, outputs[0])


def test_the_normal_image_refuses_to_read_tensors_and_names_the_debug_build(vendor, shared_dir, tmp_path):
    model = shared_dir / KWS
    with _board(tmp_path, "native") as board:
        info = board.load(_normal(model))
        assert not info.flags & p.FLAG_PRESERVES_TENSORS
        with pytest.raises(BoardError, match="needs the debug build, which keeps every tensor"):
            board.read_tensors(_sample(model), _op_outputs(model)[:1])


def test_a_tensor_index_past_the_model_is_refused_with_the_count(vendor, shared_dir, tmp_path):
    model = shared_dir / KWS
    count = len(inspect_model(model.read_bytes()).tensors)
    with _board(tmp_path, "native") as board:
        board.load(plan_debug_firmware(_normal(model)))
        with pytest.raises(BoardError, match=rf"tensor {count} does not exist.*{count}"):
            board.read_tensors(_sample(model), [count])


@pytest.mark.parametrize("op", [3, 8])
def test_corrupt_op_changes_op_n_only_and_the_outputs_beyond_one_lsb(vendor, shared_dir, tmp_path, op):
    model = shared_dir / KWS
    sample = _sample(model)
    indices = _op_outputs(model)
    with _board(tmp_path, "native", FaultPlan(corrupt_op=op)) as board:
        board.load(plan_debug_firmware(_normal(model)))
        tensors = board.read_tensors(sample, indices)
        outputs = board.infer(sample, profile=False).outputs
    host = _reference(model, sample)
    for position, index in enumerate(indices):
        difference = _lsb(tensors[index], host.interpreter.GetTensor(index, 0)["tensor_data"])
        if position < op:
            assert difference.max() == 0, f"op {position}, before the corrupted op {op}, differs"
        elif position == op:
            # Every second element moved by exactly 32 LSB (firmware/host/corrupt_op.h), none lost.
            flat = difference.reshape(-1)
            assert set(flat[0::2].tolist()) == {32} and flat[1::2].max() == 0
    final = _lsb(BoardTensor(0, tensors[indices[-1]].spec, outputs[0]),
                 host.interpreter.get_output(0).reshape(outputs[0].shape))
    assert final.max() > 1, "the corrupted op must change the model's output beyond 1 LSB"


def test_corrupt_op_perturbs_a_float_model_on_the_normal_image(vendor, tmp_path, sine_model):
    sample = [np.array([[1.0]], dtype=np.float32)]
    expected = open_interpreter(sine_model.read_bytes(), HOST_ARENA).run(sample)[0]
    with _board(tmp_path, "native", FaultPlan(corrupt_op=0)) as board:
        board.load(_normal(sine_model))
        got = board.infer(sample, profile=False).outputs[0]
    assert abs(float(got.reshape(-1)[0]) - float(expected.reshape(-1)[0])) > 1e-3


def test_corrupt_op_past_the_last_operator_fails_at_boot_naming_both_numbers(vendor, shared_dir, tmp_path):
    model = shared_dir / KWS
    count = len(inspect_model(model.read_bytes()).ops)
    with _board(tmp_path, "native", FaultPlan(corrupt_op=count)) as board:
        with pytest.raises(BoardError, match=rf"corrupt_op {count}: the model's main graph has {count} operators"):
            board.load(_normal(model))


def test_the_python_engine_refuses_corrupt_op_and_names_the_native_build(shared_dir, tmp_path):
    model = shared_dir / KWS
    with _board(tmp_path, "python", FaultPlan(corrupt_op=2)) as board:
        with pytest.raises(BoardError, match="corrupt_op fault .*needs the native firmware build"):
            board.load(_normal(model))


def test_the_debug_arena_is_measured_and_larger_than_the_normal_one(shared_dir):
    model = shared_dir / KWS
    normal = _normal(model)
    preserved = preserved_arena_bytes(model.read_bytes())
    host = open_interpreter(model.read_bytes(), HOST_ARENA)
    assert preserved > 2 * host.arena_used  # every tensor in its own place instead of shared ones
    # The smallest arena the search found does hold the model in that mode, 16 bytes less does not.
    open_interpreter(model.read_bytes(), preserved, preserve_all_tensors=True)
    with pytest.raises(ModelTooLargeError):
        open_interpreter(model.read_bytes(), preserved - 32, preserve_all_tensors=True)
    debug = plan_debug_firmware(normal)
    assert debug.arena_size == arena_size_for(preserved) > normal.arena_size
    assert not debug.arena_in_psram and debug.preserve_all_tensors
    assert debug.firmware_id != normal.firmware_id
    assert replace(debug, preserve_all_tensors=False).firmware_id != debug.firmware_id


def test_the_debug_arena_goes_to_psram_when_the_sram_budget_cannot_hold_it(shared_dir):
    kws = shared_dir / KWS
    normal = _normal(kws)
    preserved = preserved_arena_bytes(kws.read_bytes())
    # An SRAM budget between the two arenas: the normal image stays in SRAM, the debug one moves.
    budget = MemoryBudget(sram_bytes=normal.arena_size + MemoryBudget().sram_reserved_bytes + 1024)
    small = replace(normal, memory=budget)
    assert arena_size_for(preserved) > budget.sram_arena_budget >= normal.arena_size
    assert plan_debug_firmware(small, preserved_arena_used=preserved).arena_in_psram
    # person_detect on the default budget: 96 KiB in SRAM normally, about 300 KiB with every tensor.
    person = _normal(shared_dir / PERSON)
    assert not person.arena_in_psram
    assert plan_debug_firmware(person).arena_in_psram
    tight = replace(normal, memory=replace(budget, psram_bytes=budget.sram_arena_budget))
    with pytest.raises(ModelTooLargeError, match=rf"needs a {arena_size_for(preserved)}-byte tensor arena .*SRAM "
                                                 rf"budget \({budget.sram_arena_budget} bytes\).*PSRAM "
                                                 rf"\({budget.sram_arena_budget} bytes\)"):
        plan_debug_firmware(tight, preserved_arena_used=preserved)


@pytest.mark.parametrize("engine", ["native", "python"])
def test_the_debug_image_boots_in_psram_and_reads_person_detect(request, shared_dir, tmp_path, engine):
    if engine == "native":
        request.getfixturevalue("vendor")
    model = shared_dir / PERSON
    debug = plan_debug_firmware(_normal(model))
    sample = _sample(model)
    last = _op_outputs(model)[-3:]
    with _board(tmp_path, engine) as board:
        info = board.load(debug)
        assert info.flags & p.FLAG_ARENA_IN_PSRAM and info.flags & p.FLAG_PRESERVES_TENSORS
        tensors = board.read_tensors(sample, last)
    host = _reference(model, sample)
    for index in last:
        assert np.array_equal(tensors[index].values, host.interpreter.GetTensor(index, 0)["tensor_data"])


def test_a_debug_arena_sized_for_the_normal_build_fails_at_boot_saying_so(vendor, shared_dir, tmp_path):
    model = shared_dir / KWS
    normal = _normal(model)
    starved = replace(plan_debug_firmware(normal), arena_size=normal.arena_size)
    with _board(tmp_path, "native") as board:
        with pytest.raises(ModelTooLargeError, match=rf"failed with a {normal.arena_size}-byte arena in the "
                                                     r"preserve-all-tensors debug build"):
            board.load(starved)


# --- the fault plan and the suite setting ---------------------------------------------------------

def test_fault_plan_corrupt_op_is_checked_active_and_round_trips():
    assert FaultPlan(corrupt_op=0).active and not FaultPlan().active
    assert FaultPlan.from_json(FaultPlan(corrupt_op=5).to_json()) == FaultPlan(corrupt_op=5)
    assert FaultPlan.from_json(FaultPlan().to_json()).corrupt_op is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="corrupt_op must be an operator index"):
            FaultPlan(corrupt_op=bad)


def _suite(tmp_path: Path, corrupt_op: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text("suite: tensors\n"
                    "board:\n"
                    "  faults:\n"
                    f"    corrupt_op: {corrupt_op}\n"
                    "models:\n"
                    "  - name: kws\n"
                    "    architecture: keyword_cnn\n"
                    "    dataset: {name: keywords}\n")
    return path


def test_a_suite_sets_corrupt_op_and_a_bad_value_names_its_line(tmp_path):
    assert load_suite(_suite(tmp_path, "3")).board.virtual.faults.corrupt_op == 3
    with pytest.raises(SuiteError) as negative:
        load_suite(_suite(tmp_path, "-1"))
    assert "corrupt_op must be an operator index (a non-negative integer), got -1" in negative.value.one_line()
    assert "suite.yaml:4" in negative.value.one_line()
    with pytest.raises(SuiteError) as boolean:
        load_suite(_suite(tmp_path, "true"))
    assert "board.faults.corrupt_op must be int, found bool" in boolean.value.one_line()
    assert "suite.yaml:4" in boolean.value.one_line()
