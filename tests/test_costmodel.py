"""harness.board.costmodel: the paths esp-nn and TFLM take, the fit to the kernel tables, the
held-out whole-model points, the ceilings, and the directions every configuration change must
move the estimate in."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import tflite_micro

from harness.board.costmodel import (
    ESP_NN_OPS,
    PIE_PEAK_MACS_PER_CYCLE,
    STATED_ERROR,
    STATED_ERROR_REFERENCE,
    ChipConfig,
    LatencyEstimate,
    estimate_latency,
    person_detect_graph,
)
from harness.board.costmodel.mobilenet_v3 import mobilenet_v3_small_tflite
from harness.board.costmodel.validation import kernel_points, model_points
from harness.tflite_model import ModelInfo, OpInfo, TensorInfo, inspect_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_MODELS = sorted((SHARED / "models").glob("*/*.tflite")) if SHARED.is_dir() else []
PERSON_DETECT = SHARED / "models" / "tflm-examples" / "person_detect.tflite"
VERSIONS = ("1.1.2", "1.2.3")
# The bar for a whole model nobody fitted the constants to.
HELD_OUT_BAR = 0.25


@pytest.fixture(scope="session")
def mobilenet_v3() -> ModelInfo:
    """MobileNetV3-Small 224 int8 built with tf-keras and quantized (once per cache, ~30 s)."""
    return inspect_model(mobilenet_v3_small_tflite(REPO / ".tinyhil-cache").read_bytes())


# --- fit and validation -------------------------------------------------------------------------

def test_the_fitted_kernel_rows_are_reproduced() -> None:
    points = [p for p in kernel_points() if p.role == "fitted"]
    assert len(points) >= 25
    table = "\n".join(f"{p.esp_nn_version} {p.name}: {p.published:,.0f} vs {p.estimated:,.0f} ({p.error:+.1%})"
                       for p in points)
    print(table)
    assert all(abs(p.error) <= 0.25 for p in points), table


def test_held_out_whole_models_land_within_the_bar(mobilenet_v3: ModelInfo) -> None:
    points = model_points(mobilenet_v3)
    held_out = [p for p in points if p.role == "held out"]
    # person_detect twice (PSRAM, SRAM) and MobileNetV3-Small with ESP-NN, for both esp-nn
    # versions, and MobileNetV3-Small on the reference kernels.
    assert len(held_out) == 7
    assert [p.name for p in points if p.role == "fitted"] == ["person_detect, reference kernels"]
    report = "\n".join(f"{p.name} (esp-nn {p.esp_nn_version or 'none'}): published {p.published:,.1f} ms, "
                        f"estimated {p.estimated:,.1f} ms, {p.error:+.1%}" for p in points)
    print(report)
    with_esp_nn = [p for p in held_out if p.esp_nn_version]
    assert len(with_esp_nn) == 6 and all(abs(p.error) <= HELD_OUT_BAR for p in with_esp_nn), report
    # The bar is not met without esp-nn: the two published reference-kernel figures cost
    # 43% apart per MAC once the kernels' structure is counted, and only one may be fitted
    # (docs/board-model.md). That estimate carries its own, larger stated error; it must hold.
    (reference,) = [p for p in held_out if not p.esp_nn_version]
    assert abs(reference.error) <= STATED_ERROR_REFERENCE, report


def test_the_stated_errors_are_the_largest_held_out_errors_rounded_up(mobilenet_v3: ModelInfo) -> None:
    held_out = [p for p in model_points(mobilenet_v3) if p.role == "held out"]
    for stated, group in ((STATED_ERROR, [p for p in held_out if p.esp_nn_version]),
                          (STATED_ERROR_REFERENCE, [p for p in held_out if not p.esp_nn_version])):
        largest = max(abs(p.error) for p in group)
        # The band an estimate carries must cover its held-out points, and not be padded.
        assert largest <= stated < largest + 0.05, (stated, largest)
    estimate = estimate_latency(person_detect_graph(), ChipConfig())
    assert estimate.relative_error == STATED_ERROR
    assert estimate.cost_model == "fitted to published timings (esp-nn 1.1.2)"
    reference = estimate_latency(person_detect_graph(), ChipConfig(esp_nn=False))
    assert reference.relative_error == STATED_ERROR_REFERENCE
    assert reference.cost_model == "fitted to published timings (reference kernels)"
    # A float model runs TFLM's reference kernels whatever the build.
    assert estimate_latency(inspect_model(SINE_FLOAT.read_bytes()), ChipConfig()).relative_error == \
        STATED_ERROR_REFERENCE


@pytest.mark.skipif(not PERSON_DETECT.is_file(), reason="shared person_detect.tflite absent")
def test_person_detect_graph_matches_the_real_model() -> None:
    real = inspect_model(PERSON_DETECT.read_bytes())
    built = person_detect_graph()

    def work(info: ModelInfo) -> list[tuple]:
        return [(op.name, op.macs, op.elements, op.bytes_in, op.bytes_out, op.weight_bytes, op.stride, op.padding,
                 op.window) for op in info.ops]

    assert work(built) == work(real)
    for config in _all_configs():
        assert estimate_latency(built, config).total_cycles == estimate_latency(real, config).total_cycles


# --- hand-built graphs --------------------------------------------------------------------------

def _tensor(index: int, shape: tuple[int, ...], dtype: str = "int8",
            constant: bool = False, zero_point: int = -128) -> TensorInfo:
    itemsize = {"int8": 1, "int16": 2, "int32": 4, "float32": 4}[dtype]
    return TensorInfo(index=index, name=f"t{index}", shape=shape, dtype=dtype, scales=(),
                      zero_points=(zero_point,) if dtype == "int8" and not constant else (), quantized_dimension=0,
                      nbytes=math.prod(shape) * itemsize, is_constant=constant)


def _single_op(name: str, tensors: list[TensorInfo], macs: int, **geometry) -> ModelInfo:
    *inputs, output = tensors
    op = OpInfo(index=0, name=name, is_custom=False, inputs=tuple(t.index for t in inputs),
                outputs=(output.index,), macs=macs, elements=math.prod(output.shape),
                bytes_in=sum(t.nbytes for t in inputs), bytes_out=output.nbytes,
                weight_bytes=sum(t.nbytes for t in inputs if t.is_constant), **geometry)
    return ModelInfo(size_bytes=0, ops=(op,), tensors=tuple(tensors), inputs=(0,),
                     outputs=(output.index,), weight_bytes=op.weight_bytes, subgraph_count=1,
                     description="")



# --- paths --------------------------------------------------------------------------------------

def _conv(in_hw: int, in_c: int, out_c: int, kernel: int, stride: int = 1, padding: str = "SAME",
          dilation: int = 1, zero_point: int = -128) -> ModelInfo:
    out_hw = -(-in_hw // stride) if padding == "SAME" else (in_hw - kernel) // stride + 1
    tensors = [_tensor(0, (1, in_hw, in_hw, in_c), zero_point=zero_point),
               _tensor(1, (out_c, kernel, kernel, in_c), constant=True),
               _tensor(2, (out_c,), "int32", constant=True), _tensor(3, (1, out_hw, out_hw, out_c))]
    return _single_op("CONV_2D", tensors, macs=out_hw * out_hw * out_c * kernel * kernel * in_c,
                      stride=(stride, stride), padding=padding, dilation=(dilation, dilation))


def _depthwise(in_hw: int, channels: int, kernel: int, multiplier: int = 1, stride: int = 1) -> ModelInfo:
    out_hw, out_c = -(-in_hw // stride), channels * multiplier
    tensors = [_tensor(0, (1, in_hw, in_hw, channels)), _tensor(1, (1, kernel, kernel, out_c), constant=True),
               _tensor(2, (out_c,), "int32", constant=True), _tensor(3, (1, out_hw, out_hw, out_c))]
    return _single_op("DEPTHWISE_CONV_2D", tensors, macs=out_hw * out_hw * out_c * kernel * kernel,
                      stride=(stride, stride), padding="SAME")


def _path(model: ModelInfo, version: str, esp_nn: bool = True) -> str:
    (op,) = estimate_latency(model, ChipConfig(esp_nn=esp_nn, esp_nn_version=version)).ops
    return op.path


@pytest.mark.parametrize("model,expected", [
    # esp_nn_conv_esp32s3.c: 1x1, stride 1, no padding, channels a multiple of 8.
    (_conv(10, 64, 64, 1), {"1.1.2": "conv_1x1_mult8", "1.2.3": "conv_1x1_mult8"}),
    # Other channel counts: 1.1.2 pads them to 8 and runs the same routine; 1.2.3 has a C path.
    (_conv(10, 12, 16, 1), {"1.1.2": "conv_1x1_mult8", "1.2.3": "conv_1x1_c"}),
    # A 3x3 over 3 channels: rows padded to 16 lanes in 1.1.2, im2col in 1.2.3.
    (_conv(32, 3, 16, 3, stride=2), {"1.1.2": "conv_filter_aligned", "1.2.3": "conv_im2col"}),
    (_conv(14, 64, 64, 3), {"1.1.2": "conv_filter_aligned", "1.2.3": "conv_filter_aligned"}),
    # A strided 1x1 is no longer "1x1" to esp-nn.
    (_conv(14, 64, 64, 1, stride=2), {"1.1.2": "conv_filter_aligned", "1.2.3": "conv_filter_aligned"}),
    (_depthwise(18, 16, 3), {"1.1.2": "dw_mult1_3x3_s8", "1.2.3": "dw_mult1_3x3_s8"}),
    # 24 channels: not a multiple of 16, so 16-bit in 1.1.2, padded to 16 in 1.2.3.
    (_depthwise(18, 24, 3), {"1.1.2": "dw_mult1_3x3_s16", "1.2.3": "dw_mult1_3x3_s8_chpad16"}),
    # A 5x5 with multiplier 1 (MobileNetV3): plain C in 1.1.2, assembly in 1.2.3.
    (_depthwise(14, 96, 5), {"1.1.2": "dw_mult1_c", "1.2.3": "dw_mult1_s16"}),
    (_depthwise(12, 4, 5, multiplier=8), {"1.1.2": "dw_mult8_s16", "1.2.3": "dw_mult8_s16"}),
    (_depthwise(12, 4, 3, multiplier=4), {"1.1.2": "dw_mult4_s16", "1.2.3": "dw_mult4_s16"}),
    (_depthwise(12, 6, 3), {"1.1.2": "dw_c_unrolled", "1.2.3": "dw_mult1_chpad8_s16"}),
], ids=["1x1", "1x1-odd-channels", "3x3x3-stride2", "3x3x64", "1x1-stride2", "dw3x3x16", "dw3x3x24",
        "dw5x5x96", "dw5x5-mult8", "dw3x3-mult4", "dw3x3x6"])
def test_each_esp_nn_version_picks_the_path_its_dispatch_picks(model: ModelInfo, expected: dict[str, str]) -> None:
    for version in VERSIONS:
        assert _path(model, version) == f"esp-nn-{version}/{expected[version]}"
        assert _path(model, version, esp_nn=False).startswith("tflm-reference/")


def test_dilated_grouped_and_int16_convs_follow_the_wrapper() -> None:
    # conv.cc:181 calls esp-nn only for int8 with dilation 1; int16 is always reference.
    assert _path(_conv(16, 16, 16, 3, dilation=2), "1.2.3") == "tflm-reference/conv_2d"
    int16 = _single_op("CONV_2D", [
        _tensor(0, (1, 8, 8, 16), "int16"), _tensor(1, (32, 1, 1, 16), constant=True),
        _tensor(2, (32,), "int32", constant=True), _tensor(3, (1, 8, 8, 32), "int16")], macs=8 * 8 * 32 * 16)
    assert _path(int16, "1.1.2") == "tflm-reference/conv_2d"
    # A grouped conv: 1.2.3 runs esp-nn's ANSI C (its S3 path would be wrong); 1.1.2 calls its
    # S3 kernel regardless, as its dispatch does.
    grouped = _single_op("CONV_2D", [
        _tensor(0, (1, 8, 8, 16)), _tensor(1, (32, 3, 3, 8), constant=True),
        _tensor(2, (32,), "int32", constant=True), _tensor(3, (1, 8, 8, 32))], macs=8 * 8 * 32 * 3 * 3 * 8,
        padding="SAME")
    assert _path(grouped, "1.2.3") == "esp-nn-1.2.3/conv_grouped_ansi"
    assert _path(grouped, "1.1.2") == "esp-nn-1.1.2/conv_filter_aligned"


def test_ops_the_wrappers_do_not_take_run_reference_kernels(mobilenet_v3: ModelInfo) -> None:
    paths = {(op.name, op.path) for op in estimate_latency(mobilenet_v3, ChipConfig(esp_nn_version="1.2.3")).ops}
    names = {name for name, _ in paths}
    assert {"HARD_SWISH", "MEAN", "MUL", "ADD"} <= names
    for name, path in paths:
        if name in ("HARD_SWISH", "MEAN"):
            assert path.startswith("tflm-reference/"), (name, path)
    # Squeeze-and-excite multiplies [1,H,W,C] by [1,1,1,C]: a broadcast, which the MUL wrapper
    # leaves to TFLM; the residual ADDs have equal shapes and go to esp-nn.
    assert ("MUL", "tflm-reference/mul_broadcast") in paths
    assert ("ADD", "esp-nn-1.2.3/add_s8") in paths


# --- ceilings -----------------------------------------------------------------------------------

def _models_to_walk(extra: list[tuple[str, ModelInfo]]) -> list[tuple[str, ModelInfo]]:
    models = [("person_detect (built)", person_detect_graph()), ("sine_float", inspect_model(SINE_FLOAT.read_bytes()))]
    models += [(path.stem, inspect_model(path.read_bytes())) for path in SHARED_MODELS]
    return models + extra


def _assert_under_ceilings(name: str, info: ModelInfo) -> int:
    """The counted cycles of every layer, before the ceiling could hold them back, are within
    the path's ceiling (and the PIE peak): `clamped` says whether the count got there alone."""
    checked = 0
    for config in _all_configs():
        for op in estimate_latency(info, config).ops:
            assert op.cycles > 0
            assert not op.clamped, (name, config, op)
            assert op.macs_per_cycle <= PIE_PEAK_MACS_PER_CYCLE
            if op.macs and op.ceiling is not None:
                assert op.ceiling <= PIE_PEAK_MACS_PER_CYCLE, (name, op)
                assert op.macs_per_cycle <= op.ceiling * (1 + 1e-9), (name, config, op)
                checked += 1
    return checked


def test_no_layer_of_the_shared_models_beats_its_path_ceiling(mobilenet_v3: ModelInfo) -> None:
    checked = sum(_assert_under_ceilings(name, info)
                  for name, info in _models_to_walk([("mobilenet_v3_small", mobilenet_v3)]))
    assert checked > 1000


def test_no_layer_of_the_seed_suite_beats_its_path_ceiling(seed_quick_runs) -> None:
    root, first, _ = seed_quick_runs
    rows = json.loads((root / "results" / "seed" / "first" / "results.json").read_text())["results"]
    models = {row["model_path"] for row in rows if row.get("model_path")}
    assert len(models) == len(rows) >= 10          # every variant of the five architectures
    checked = sum(_assert_under_ceilings(path, inspect_model(Path(path).read_bytes())) for path in sorted(models))
    assert checked > 0


def test_deep_convolutions_pay_for_rereading_their_filter() -> None:
    # The issue: 3x3 convs over 16-64 channels came out at 1.6-2.5 MAC/cycle from one per-MAC
    # rate. Their path (conv_filter_aligned) reads the whole filter again for every output pixel:
    # from flash, what outgrows the cache is fetched again each time.
    (deep,) = estimate_latency(_conv(14, 64, 64, 3), ChipConfig(tensors_in_psram=False)).ops
    (in_sram,) = estimate_latency(_conv(14, 64, 64, 3), ChipConfig(tensors_in_psram=False,
                                                                   weights_in_flash=False)).ops
    assert deep.cycles > 3 * in_sram.cycles
    assert deep.macs_per_cycle < 1.24 < in_sram.macs_per_cycle < in_sram.ceiling


def test_a_filter_outgrowing_the_cache_costs_more_smoothly() -> None:
    # One more output channel must not multiply the estimate (a filter just past a threshold).
    previous = None
    for out_c in range(40, 100):
        (op,) = estimate_latency(_conv(28, 32, out_c, 3), ChipConfig(tensors_in_psram=False)).ops
        if previous is not None:
            assert previous.cycles < op.cycles < 1.25 * previous.cycles, (out_c, previous, op)
        previous = op


def test_a_batch_costs_its_batches() -> None:
    # The wrappers call esp-nn once per batch (conv.cc, depthwise_conv.cc, pooling.cc).
    def batch(n: int) -> ModelInfo:
        return _single_op("CONV_2D", [
            _tensor(0, (n, 16, 16, 32)), _tensor(1, (32, 3, 3, 32), constant=True),
            _tensor(2, (32,), "int32", constant=True), _tensor(3, (n, 16, 16, 32))],
            macs=n * 16 * 16 * 32 * 9 * 32, padding="SAME")
    for config in (ChipConfig(), ChipConfig(esp_nn=False)):
        (one,) = estimate_latency(batch(1), config).ops
        (four,) = estimate_latency(batch(4), config).ops
        assert four.cycles == pytest.approx(4 * one.cycles, rel=0.05)
        assert four.macs_per_cycle == pytest.approx(one.macs_per_cycle, rel=0.05)


def test_empty_and_odd_operators_are_costed_without_failing() -> None:
    empty_conv = _single_op("CONV_2D", [
        _tensor(0, (1, 8, 8, 0)), _tensor(1, (16, 3, 3, 0), constant=True),
        _tensor(2, (16,), "int32", constant=True), _tensor(3, (1, 8, 8, 16))], macs=0, padding="SAME")
    empty_depthwise = _single_op("DEPTHWISE_CONV_2D", [
        _tensor(0, (1, 8, 8, 0)), _tensor(1, (1, 3, 3, 0), constant=True),
        _tensor(2, (0,), "int32", constant=True), _tensor(3, (1, 8, 8, 0))], macs=0, padding="SAME")
    empty_softmax = _single_op("SOFTMAX", [_tensor(0, (1, 0)), _tensor(1, (1, 0))], macs=0)
    one_d = _single_op("MUL", [_tensor(0, (7,)), _tensor(1, (7,)), _tensor(2, (7,))], macs=0)
    fp16 = _single_op("ADD", [_tensor(0, (4, 4), "int16"), _tensor(1, (4, 4), "int16"),
                              _tensor(2, (4, 4), "int16")], macs=0)
    for model in (empty_conv, empty_depthwise, empty_softmax, one_d, fp16):
        for config in (ChipConfig(), ChipConfig(esp_nn_version="1.2.3"), ChipConfig(esp_nn=False)):
            (op,) = estimate_latency(model, config).ops
            assert op.cycles > 0 and not op.clamped


# --- directions ---------------------------------------------------------------------------------

# A float32 model that ships inside the tflite-micro package, so it is always present.
SINE_FLOAT = Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"

MODELS = _models_to_walk([])
MODEL_IDS = [name for name, _ in MODELS]


def _all_configs() -> list[ChipConfig]:
    return [ChipConfig(cpu_mhz=mhz, esp_nn=esp_nn, tensors_in_psram=tensors, weights_in_flash=flash,
                       esp_nn_version=version)
            for mhz, esp_nn, tensors, flash, version
            in itertools.product((160, 240), (True, False), (True, False), (True, False), VERSIONS)]


def _uses_esp_nn(info: ModelInfo) -> bool:
    return any(op.name in ESP_NN_OPS and info.tensors[op.inputs[0]].dtype == "int8" for op in info.ops)


@pytest.mark.parametrize("name,info", MODELS, ids=MODEL_IDS)
def test_esp_nn_is_faster_than_reference(name: str, info: ModelInfo) -> None:
    for tensors_in_psram, version in itertools.product((True, False), VERSIONS):
        fast = estimate_latency(info, ChipConfig(tensors_in_psram=tensors_in_psram, esp_nn_version=version))
        slow = estimate_latency(info, ChipConfig(esp_nn=False, tensors_in_psram=tensors_in_psram))
        if _uses_esp_nn(info):
            assert fast.total_us < slow.total_us
        else:
            assert fast.total_us == slow.total_us
        assert {op.kernel for op in slow.ops} == {"reference"}


@pytest.mark.parametrize("name,info", MODELS, ids=MODEL_IDS)
def test_160_mhz_is_slower_than_240(name: str, info: ModelInfo) -> None:
    for psram, esp_nn in itertools.product((True, False), repeat=2):
        at_240 = estimate_latency(info, ChipConfig(240, esp_nn, psram))
        at_160 = estimate_latency(info, ChipConfig(160, esp_nn, psram))
        assert at_160.total_us > at_240.total_us
        # Compute is counted in cycles and stays put; only bus time shrinks in cycles.
        assert at_160.total_cycles <= at_240.total_cycles


@pytest.mark.parametrize("name,info", MODELS, ids=MODEL_IDS)
def test_psram_is_slower_than_sram(name: str, info: ModelInfo) -> None:
    for mhz, esp_nn in itertools.product((160, 240), (True, False)):
        sram = estimate_latency(info, ChipConfig(mhz, esp_nn, tensors_in_psram=False))
        psram = estimate_latency(info, ChipConfig(mhz, esp_nn, tensors_in_psram=True))
        assert psram.total_us >= sram.total_us
        in_sram = estimate_latency(info, ChipConfig(mhz, esp_nn, False, weights_in_flash=False))
        assert in_sram.total_us <= sram.total_us


def test_person_detect_kernels_and_arithmetic() -> None:
    info = person_detect_graph()
    estimate = estimate_latency(info, ChipConfig())
    assert isinstance(estimate, LatencyEstimate)
    kernels = {op.name: op.kernel for op in estimate.ops}
    assert kernels == {"DEPTHWISE_CONV_2D": "esp-nn", "CONV_2D": "esp-nn",
                       "AVERAGE_POOL_2D": "esp-nn", "RESHAPE": "reference", "SOFTMAX": "esp-nn"}
    assert [op.index for op in estimate.ops] == [op.index for op in info.ops]
    assert [op.macs for op in estimate.ops] == [op.macs for op in info.ops]
    assert estimate.total_cycles == estimate.overhead_cycles + sum(op.cycles for op in estimate.ops)
    assert estimate.total_us == pytest.approx(estimate.total_cycles / 240)
    assert len(estimate.op_us()) == len(info.ops)
    # The large 1x1 convs run several times faster per MAC than the 3x3 depthwise layers, whose
    # path requantizes 4 lanes at a time (ceiling 0.25 MAC/cycle).
    conv = [op for op in estimate.ops if op.name == "CONV_2D" and op.macs > 500_000]
    depthwise = [op for op in estimate.ops if op.name == "DEPTHWISE_CONV_2D"]
    assert min(op.macs_per_cycle for op in conv) > max(op.macs_per_cycle for op in depthwise)
    assert all(op.ceiling <= 0.25 for op in depthwise)


# --- more hand-built graphs ---------------------------------------------------------------------

def _fully_connected(dtype: str, depth: int = 256, units: int = 64) -> ModelInfo:
    bias_dtype = "float32" if dtype == "float32" else "int32"
    return _single_op("FULLY_CONNECTED", [
        _tensor(0, (1, depth), dtype), _tensor(1, (units, depth), dtype, constant=True),
        _tensor(2, (units,), bias_dtype, constant=True), _tensor(3, (1, units), dtype)],
        macs=depth * units)


def test_float32_runs_reference_kernels_and_is_costed() -> None:
    float_model = _fully_connected("float32")
    int8_model = _fully_connected("int8")
    chip = ChipConfig(esp_nn=True)
    (float_op,) = estimate_latency(float_model, chip).ops
    (int8_op,) = estimate_latency(int8_model, chip).ops
    (int8_reference,) = estimate_latency(int8_model, ChipConfig(esp_nn=False)).ops
    assert float_op.kernel == "reference" and int8_op.kernel == "esp-nn"
    assert float_op.cycles > int8_op.cycles
    # Same plain reference loop as int8, no SIMD: what person_detect's reference run costs per MAC
    # (about 60 cycles), plus four bytes of weight per MAC from flash.
    assert 20 <= float_op.cycles / float_op.macs <= 120
    assert float_op.cycles == pytest.approx(int8_reference.cycles, rel=0.5)


def test_float_model_runs_reference_kernels_everywhere() -> None:
    info = inspect_model(SINE_FLOAT.read_bytes())
    assert info.input_tensors()[0].dtype == "float32"
    estimate = estimate_latency(info, ChipConfig(esp_nn=True))
    assert {op.kernel for op in estimate.ops} == {"reference"}
    assert all(op.cycles > 0 for op in estimate.ops)


def test_few_channels_waste_simd_lanes() -> None:
    def pointwise(channels: int) -> ModelInfo:
        return _single_op("CONV_2D", [
            _tensor(0, (1, 16, 16, channels)), _tensor(1, (16, 1, 1, channels), constant=True),
            _tensor(2, (16,), "int32", constant=True), _tensor(3, (1, 16, 16, 16))],
            macs=16 * 16 * 16 * channels)

    (narrow,) = estimate_latency(pointwise(4), ChipConfig(tensors_in_psram=False)).ops
    (wide,) = estimate_latency(pointwise(64), ChipConfig(tensors_in_psram=False)).ops
    assert narrow.macs_per_cycle < wide.macs_per_cycle


def test_huge_conv_stays_under_the_pie_peak() -> None:
    model = _single_op("CONV_2D", [
        _tensor(0, (1, 1, 1, 4096)), _tensor(1, (4096, 1, 1, 4096), constant=True),
        _tensor(2, (4096,), "int32", constant=True), _tensor(3, (1, 1, 1, 4096))],
        macs=4096 * 4096)
    for config in _all_configs():
        (op,) = estimate_latency(model, config).ops
        assert 0 < op.macs_per_cycle <= PIE_PEAK_MACS_PER_CYCLE and not op.clamped


def test_custom_and_unknown_ops_are_costed() -> None:
    model = _single_op("SignalRfft", [_tensor(0, (480,), "int16"), _tensor(1, (514,), "int16")],
                       macs=0)
    (op,) = estimate_latency(model, ChipConfig()).ops
    assert op.kernel == "reference" and op.cycles > 0 and op.macs_per_cycle == 0.0


def test_invalid_clock_is_rejected() -> None:
    with pytest.raises(ValueError):
        ChipConfig(cpu_mhz=300)
