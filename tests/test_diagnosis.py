"""The diagnosis library (issue 14): where a board's outputs first diverge, and the seed article's
failure modes, each from a planted case with real models, real converters and real interpreters.

TensorFlow never loads into this process: models are trained and converted by the harness's own
workers (harness.model, harness.quantize, harness.quant_debug), and the two models the harness
cannot make from a suite (a GELU activation, a bicubic upsampling saved as a .keras file) by a
subprocess with a timeout. The board is host TFLM here (the virtual board runs the same kernels);
a real board's tensors are the lead's test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from harness.board.costmodel import ChipConfig, estimate_latency
from harness.compare import accuracy, predicted_classes
from harness.diagnosis import (CalibrationEvidence, Diagnosis, DivergenceReport, PreprocessingEvidence,
                               arena_too_small, calibration_problem, diagnose_divergence, divergence_diagnosis,
                               host_tensors, keras_layers, pick_sample, preprocessing_mismatch, render_markdown,
                               render_text, slow, tensors_to_read, unsupported_op_at_build,
                               unsupported_op_at_conversion)
from harness.diagnosis.base import num
from harness.errors import ConversionError, ModelTooLargeError, UnsupportedOpError
from harness.firmware import MemoryBudget, arena_size_for
from harness.layers import LayerSpec
from harness.reference import model_io, run_reference
from harness.report import CaseResult, LayerTiming
from harness.tflite_model import inspect_model
from harness.tflm import open_interpreter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
KWS = SHARED / "mlperf-tiny" / "kws_ref_model.tflite"
PERSON = SHARED / "tflm-examples" / "person_detect.tflite"
needs_shared = pytest.mark.skipif(not KWS.is_file(), reason="needs ../shared/models")
TRAINING = {"epochs": 8, "batch_size": 16, "learning_rate": 0.002, "seed": 0}
CLASSES = ("yes", "no", "silence")


def spec(class_name: str, **config) -> LayerSpec:
    return LayerSpec(class_name, types.MappingProxyType(config))


def host_outputs(model: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized outputs, predicted classes) of float inputs `x` on host TFLM."""
    input_quant, output_quant, _ = model_io(model)
    outputs = output_quant.dequantize(run_reference(model, input_quant.quantize(x)).tflm_outputs)
    return outputs, predicted_classes(outputs)


def show(name: str, diagnosis: Diagnosis | None) -> None:
    """The text a user sees, in the test log (the report quotes it)."""
    print(f"\n--- {name}\n" + render_text([diagnosis] if diagnosis else [], case_id=name))


# --- A. where outputs diverge --------------------------------------------------------------------

@pytest.fixture(scope="module")
def kws_sample() -> tuple[np.ndarray, dict, dict | None, str]:
    if not KWS.is_file():
        pytest.skip("needs ../shared/models")
    input_quant, _, _ = model_io(KWS)
    sample = np.random.default_rng(0).integers(-128, 128, size=input_quant.shape).astype(np.int8)
    tflm, litert, note = host_tensors(KWS, sample)
    return sample, tflm, litert, note


@needs_shared
def test_tensors_to_read_are_every_ops_outputs_in_execution_order():
    info = inspect_model(KWS.read_bytes())
    assert tensors_to_read(KWS) == tuple(op.outputs[0] for op in info.ops) == tuple(range(22, 35))


@needs_shared
def test_a_board_that_is_host_tflm_agrees_on_every_op_with_litert_present(kws_sample):
    sample, tflm, litert, note = kws_sample
    assert litert is not None and note == ""
    report = diagnose_divergence(KWS, 4, sample, tflm, tolerance_lsb=1, esp_nn=True, host=(tflm, litert, note))
    assert report.first_vs_tflm is None and report.first_vs_litert is None
    assert [layer.op_index for layer in report.layers] == list(range(13))
    assert all(layer.vs_tflm_max_lsb == 0 and layer.vs_litert_max_lsb is not None for layer in report.layers)
    assert report.text == "every op's output (13 ops) agrees with host TFLM and LiteRT within 1 LSB on sample 4"
    assert divergence_diagnosis(report) is None


@needs_shared
def test_a_perturbed_op_is_named_first_with_its_kernel_and_later_ops_are_reported(kws_sample):
    """Simulates a board whose op 5 computes wrongly (its error then reaching op 8): the diagnosis
    names op 5, its esp-nn kernel, the LSB and the share, and still lists the ops after it."""
    sample, tflm, litert, note = kws_sample
    board = dict(tflm)
    for op, step in ((5, 37), (8, 3)):
        tensor = 22 + op
        values = board[tensor].astype(np.int32).copy()
        values.flat[::2] = np.clip(values.flat[::2] + step, -128, 127)
        board[tensor] = values.astype(np.int8)
    report = diagnose_divergence(KWS, 0, sample, board, tolerance_lsb=1, esp_nn=True, host=(tflm, litert, note))
    first = report.first_vs_tflm
    assert (first.op_index, first.op_name, first.kernel, first.tensor_index) == (5, "DEPTHWISE_CONV_2D", "esp-nn", 27)
    assert first.vs_tflm_max_lsb == 37 and 0.3 < first.vs_tflm_share <= 0.5 and first.elements == 8000
    assert report.first_vs_litert.op_index == 5
    later = {layer.op_index: layer for layer in report.layers if layer.op_index > 5}
    assert set(later) == set(range(6, 13)) and later[8].vs_tflm_max_lsb == 3 and later[6].vs_tflm_max_lsb == 0
    assert report.text.startswith("op 5 (DEPTHWISE_CONV_2D, esp-nn) is the first to diverge on sample 0: up to 37 LSB "
                                  "from host TFLM on ")
    print("\n" + report.text)
    diagnosis = divergence_diagnosis(report)
    assert diagnosis.kind == "divergence" and "op 5 (DEPTHWISE_CONV_2D, esp-nn kernel)" in diagnosis.title
    assert "later ops differ too" in diagnosis.evidence[1]
    assert DivergenceReport.from_json(report.to_json()) == report
    without = diagnose_divergence(KWS, 0, sample, board, tolerance_lsb=1, esp_nn=False, host=(tflm, litert, note))
    assert without.first_vs_tflm.kernel == "reference"
    # A tolerance of 37 LSB lets both through.
    assert diagnose_divergence(KWS, 0, sample, board, tolerance_lsb=37, esp_nn=True,
                               host=(tflm, litert, note)).first_vs_tflm is None


@pytest.mark.skipif(not PERSON.is_file(), reason="needs ../shared/models")
def test_litert_refusing_a_model_leaves_host_tflm_and_says_why():
    input_quant, _, _ = model_io(PERSON)
    sample = np.zeros(input_quant.shape, np.int8)
    tflm, litert, note = host_tensors(PERSON, sample)
    assert litert is None and note.startswith("LiteRT cannot run this model: ")
    report = diagnose_divergence(PERSON, 0, sample, tflm, tolerance_lsb=1, esp_nn=True, host=(tflm, litert, note))
    assert report.first_vs_tflm is None and all(layer.vs_litert_max_lsb is None for layer in report.layers)
    assert report.text.startswith("every op's output (31 ops) agrees with host TFLM within 1 LSB on sample 0; "
                                  "LiteRT cannot run")


def test_pick_sample_takes_the_furthest_sample_past_the_tolerance():
    reference = np.zeros((4, 3), np.int8)
    board = reference.copy()
    assert pick_sample(board, reference, 1) is None
    board[1, 0], board[2, 2] = 1, -5
    assert pick_sample(board, reference, 1) == 2
    assert pick_sample(board, reference, 5) is None
    floats = np.ones((3, 2), np.float32)
    assert pick_sample(floats + np.array([[0], [1e-7], [1e-3]], np.float32), floats, 1) == 2


# --- the trained models of the planted cases -----------------------------------------------------

@pytest.fixture(scope="module")
def mfcc(tmp_path_factory) -> dict[str, Path]:
    """The seed article's keyword data (yes, no, silence) as raw MFCCs, and standardized with the
    training split's statistics per coefficient ("training used dataset statistics")."""
    from harness.datasets import load_dataset
    from harness.datasets.keywords import MFCC_SCALE

    data = load_dataset("keywords", {"words": "yes,no", "samples_per_class": 100}, seed=0)
    raw_train, raw_test = data.x_train * MFCC_SCALE, data.x_test * MFCC_SCALE
    mean = raw_train.mean(axis=(0, 1, 3), keepdims=True)
    std = raw_train.std(axis=(0, 1, 3), keepdims=True)
    root = tmp_path_factory.mktemp("mfcc")
    common = {"y_train": data.y_train, "y_test": data.y_test, "labels": np.array(data.labels),
              "task": np.array(data.task), "source": np.array(data.source)}
    np.savez(root / "standardized.npz", x_train=(raw_train - mean) / std, x_test=(raw_test - mean) / std, **common)
    np.savez(root / "raw.npz", x_train=raw_train, x_test=raw_test, **common)
    return {"standardized": root / "standardized.npz", "raw": root / "raw.npz", "root": root}


LAYERS = (spec("Conv2D", filters=8, kernel_size=3, strides=2, activation="relu"), spec("Flatten"),
          spec("Dense", units=3, activation="softmax"))


def _train_and_convert(mfcc, name: str, variants: dict):
    from harness.model import ModelSource, train
    from harness.quantize import quantize_many

    root = mfcc["root"] / name
    trained = train(ModelSource("layers", name, layers=LAYERS), TRAINING, mfcc[name], root / "model",
                    where="test", dataset_name="keywords")
    outputs = {key: root / f"{key}.tflite" for key in variants}
    failed = quantize_many(trained, [(settings, outputs[key]) for key, settings in variants.items()], mfcc[name],
                           root / "convert", training=TRAINING, seed=0, where="test")
    assert not failed, failed
    return trained, outputs


@pytest.fixture(scope="module")
def standardized_model(mfcc):
    from harness.quantize import QuantSettings

    return _train_and_convert(mfcc, "standardized", {"int8": QuantSettings("int8", 100),
                                                     "float32": QuantSettings("float32")})


@pytest.fixture(scope="module")
def raw_model(mfcc):
    from harness.quantize import QuantSettings

    return _train_and_convert(mfcc, "raw", {"train": QuantSettings("int8", 100),
                                            "random": QuantSettings("int8", 100, "random")})


# --- B. preprocessing ----------------------------------------------------------------------------

def test_inputs_scaled_as_the_seed_articles_device_did_are_diagnosed_with_numbers(mfcc, standardized_model):
    """Planted: trained on standardized MFCCs, fed `x / 255` of the raw MFCCs."""
    _, models = standardized_model
    data = np.load(mfcc["standardized"])
    raw_test = np.load(mfcc["raw"])["x_test"]
    input_quant, _, _ = model_io(models["int8"])
    device_inputs = raw_test / 255.0
    _, predicted = host_outputs(models["int8"], device_inputs)
    diagnosis = preprocessing_mismatch(PreprocessingEvidence(predicted, data["y_test"], device_inputs, input_quant,
                                                             data["x_train"], CLASSES))
    show("planted: x / 255 against standardized training", diagnosis)
    assert diagnosis.kind == "preprocessing" and diagnosis.title == "Preprocessing differs between training and the board"
    evidence = "\n".join(diagnosis.evidence)
    assert "for 100% of the 60 samples; 33% of them are that class" in evidence
    assert "x narrower" in evidence and "of the [" in evidence and "the input quantization represents" in evidence
    assert "`preprocessing:`" in diagnosis.suggestion

    # The same model fed what training saw: no diagnosis.
    _, predicted = host_outputs(models["int8"], data["x_test"])
    assert accuracy(np.eye(3)[predicted], data["y_test"]) > 0.8
    assert preprocessing_mismatch(PreprocessingEvidence(predicted, data["y_test"], data["x_test"], input_quant,
                                                        data["x_train"], CLASSES)) is None


def test_each_preprocessing_rule_fires_alone(mfcc, standardized_model):
    """Collapse alone, range alone, saturation alone: each rule is one evidence line."""
    _, models = standardized_model
    data = np.load(mfcc["standardized"])
    input_quant, _, _ = model_io(models["int8"])
    labels, x_test, x_train = data["y_test"], data["x_test"], data["x_train"]
    right = np.asarray(labels)
    collapsed = np.full_like(labels, 2)
    only_collapse = preprocessing_mismatch(PreprocessingEvidence(collapsed, labels, x_test, input_quant, x_train, CLASSES))
    assert only_collapse.title == "The board's predictions collapse to one class" and \
        "look like the training inputs" in only_collapse.evidence[1]
    # Saturation: the same data scaled up 3x keeps its predictions right here (labels passed as
    # predictions) but a quarter of its values clip at the int8 limits; training's do not.
    saturated = preprocessing_mismatch(PreprocessingEvidence(right, labels, 3 * x_test, input_quant, x_train, CLASSES))
    assert any("of the quantized inputs are at -128 or 127 (training inputs:" in line for line in saturated.evidence)
    # One class being common in the labels is not a collapse.
    assert preprocessing_mismatch(PreprocessingEvidence(collapsed, collapsed, x_test, input_quant, x_train)) is None


# --- B. calibration ------------------------------------------------------------------------------

def test_random_calibration_is_diagnosed_with_the_worst_layers_and_the_verdict(mfcc, raw_model):
    """Planted: raw MFCCs (c0 down to about -87) calibrated on standard-normal inputs, the seed
    article's own representative_dataset. Per-layer error from TensorFlow's QuantizationDebugger."""
    from harness.quant_debug import calibration_verdict, layer_errors
    from harness.quantize import QuantSettings

    trained, models = raw_model
    data = np.load(mfcc["raw"])
    float_accuracy = accuracy(np.load(trained.float_predictions_path), data["y_test"])
    scores = {key: accuracy(host_outputs(path, data["x_test"])[0], data["y_test"]) for key, path in models.items()}
    errors = layer_errors(trained.model_path, QuantSettings("int8", 100, "random"), mfcc["raw"], seed=0,
                          workdir=mfcc["root"] / "debug")
    verdict = calibration_verdict([(100, scores["random"])], "random")
    evidence = CalibrationEvidence("int8", float_accuracy, scores["random"], len(data["y_test"]), 100, "random",
                                   layer_errors=errors, verdict=verdict)
    diagnosis = calibration_problem(evidence)
    show("planted: random calibration", diagnosis)
    assert diagnosis.kind == "calibration"
    assert diagnosis.evidence[0].startswith(f"int8 accuracy {100 * scores['random']:.0f}% against the float model's ")
    assert "calibrated on 100 random standard-normal inputs" == diagnosis.evidence[1]
    worst = max(errors, key=lambda error: error.rmse_per_scale)
    assert f"loses most: op {worst.op_index} ({worst.op_name}" in diagnosis.evidence[2]
    assert diagnosis.evidence[-1].startswith("calibration verdict: no N tried is enough")
    assert "`calibration_source: train`" in diagnosis.suggestion
    # Calibrated on training samples, the same model is within the threshold: no diagnosis.
    assert float_accuracy - scores["train"] <= 0.02
    assert calibration_problem(replace(evidence, quantized_accuracy=scores["train"], calibration_source="train",
                                       layer_errors=(), verdict=None)) is None
    # The threshold is a parameter.
    drop = 100 * (float_accuracy - scores["random"])
    assert calibration_problem(evidence, threshold_points=drop + 0.1) is None


# --- B. arena ------------------------------------------------------------------------------------

@needs_shared
def test_an_arena_too_small_says_the_bytes_needed_given_and_where_it_fits():
    _, _, needed = model_io(KWS)
    with pytest.raises(ModelTooLargeError) as failure:
        open_interpreter(KWS.read_bytes(), 8 * 1024, where="kws[int8]")
    diagnosis = arena_too_small(failure.value.one_line(), arena_needed=needed)
    show("arena: 8 KiB for the MLPerf keyword model", diagnosis)
    wanted = arena_size_for(needed)
    assert diagnosis.kind == "arena" and diagnosis.title == "The tensor arena is too small for the model"
    assert f"TFLite Micro needs {needed:,} bytes" in diagnosis.evidence[1]
    assert "the firmware gave 8,192 bytes (8.0 KiB)" in diagnosis.evidence[1]
    assert diagnosis.evidence[2].startswith("it fits internal SRAM") and f"{wanted:,} bytes" in diagnosis.suggestion
    # The same need on a board with less SRAM goes to PSRAM; with neither large enough, nowhere.
    small = MemoryBudget(sram_bytes=65_536 + needed // 2, flash_app_bytes=1 << 21)
    assert "fits PSRAM" in arena_too_small(failure.value.one_line(), arena_needed=needed, memory=small).evidence[2]
    tiny = replace(small, psram_bytes=needed // 2)
    assert "fits neither" in arena_too_small(failure.value.one_line(), arena_needed=needed, memory=tiny).evidence[2]
    # The board's own text for a region too small: the bytes given are read from it.
    board = ("board refused kws[int8]: heap_caps_malloc(9437184) for the tensor arena failed: PSRAM has "
             "8388608 bytes free")
    placed = arena_too_small(board, arena_needed=needed, arena_in_psram=True)
    assert "the firmware gave 9,437,184 bytes" in placed.evidence[1]
    assert placed.title == "The tensor arena could not be allocated where it was placed"
    assert arena_too_small("board refused kws[int8]: TFLite Micro has no kernel for op GELU", arena_needed=needed) is None


# --- B. unsupported ops --------------------------------------------------------------------------

_MAKE_MODELS = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from harness.model import deterministic_tensorflow
    from harness.quantize import QuantSettings, convert, with_fixed_batch
    out = Path(sys.argv[1])
    tf, keras = deterministic_tensorflow(0, 1)
    calibration = np.random.default_rng(0).standard_normal((8, 8, 8, 1)).astype(np.float32)
    def probe(*middle):
        return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, padding="same"), *middle,
                                 keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")], name="probe")
    gelu = with_fixed_batch(keras, probe(keras.layers.Activation("gelu")), [8, 8, 1])
    (out / "gelu.tflite").write_bytes(convert(tf, gelu, QuantSettings("int8", 8), calibration))
    buckets = keras.Sequential([keras.Input((4,)), keras.layers.Discretization(bin_boundaries=[0.0, 1.0]),
                                keras.layers.Dense(3, activation="softmax")], name="buckets")
    (out / "discretization.tflite").write_bytes(convert(tf, with_fixed_batch(keras, buckets, [4]),
                                                       QuantSettings("int8", 8), calibration.reshape(8, -1)[:, :4]))
    probe(keras.layers.UpSampling2D(interpolation="bicubic")).save(out / "bicubic.keras")
""")


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory) -> Path:
    """Models with layers a suite's `layers:` refuses, made by TensorFlow in a subprocess."""
    from harness.isolated import TF_ENVIRONMENT

    out = tmp_path_factory.mktemp("unsupported")
    done = subprocess.run([sys.executable, "-c", _MAKE_MODELS, str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **TF_ENVIRONMENT}, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_a_conversion_failure_names_the_keras_layer_and_the_alternative(unsupported, mfcc):
    """A real TF 2.21 refusal, through the quantize worker the harness runs: UpSampling2D with
    bicubic interpolation becomes tf.ResizeBicubic, which has no TFLite builtin."""
    from harness.model import ModelSource, TrainedModel
    from harness.quantize import QuantSettings, quantize

    keras_file = unsupported / "bicubic.keras"
    names = keras_layers(keras_file)
    # Keras numbers layer names per process (up_sampling2d, up_sampling2d_1, ...): read, not assumed.
    layer = next(name for name, kind in names.items() if kind == "UpSampling2D")
    assert sorted(names.values()) == ["Conv2D", "Dense", "Flatten", "InputLayer", "UpSampling2D"]
    model = TrainedModel(ModelSource("keras", "probe", keras_path=keras_file), keras_file, (8, 8, 1), 3, "softmax",
                         0.0, 0, 0.0, {}, unsupported / "unused.npy", trained=False)
    with pytest.raises(ConversionError) as failure:
        quantize(model, QuantSettings("int8", 8), mfcc["standardized"], unsupported / "q" / "model.tflite",
                 training=TRAINING, seed=0, where="suite.yaml:12")
    # The exception names the TF op; the converter's log (the error's details) locates the layer.
    diagnosis = unsupported_op_at_conversion(f"{failure.value.message}\n{failure.value.details}",
                                             keras_layers(keras_file))
    show("conversion: UpSampling2D(interpolation='bicubic')", diagnosis)
    assert diagnosis.kind == "unsupported-op"
    assert diagnosis.title == f"The model does not convert: layer '{layer}' becomes an op TFLite has no builtin for"
    assert diagnosis.evidence[0].startswith(f"TensorFlow op ResizeBicubic, made by layer '{layer}' (UpSampling2D)")
    assert "interpolation 'nearest' (RESIZE_NEAREST_NEIGHBOR) or 'bilinear'" in diagnosis.suggestion
    # Without the log, the op is still named, and the layer is not guessed.
    alone = unsupported_op_at_conversion(failure.value.message, {})
    assert "op ResizeBicubic" in alone.title and "does not locate" in alone.evidence[0]
    assert unsupported_op_at_conversion("TFLite converter failed: out of memory", {}) is None


@pytest.mark.parametrize("model, op, index, alternative", [
    ("gelu.tflite", "GELU", 1, "relu or swish"),
    ("discretization.tflite", "BUCKETIZE", 1, "bucket the values in the preprocessing")])
def test_an_op_the_firmware_lacks_is_named_with_its_index_and_alternative(unsupported, model, op, index, alternative):
    flatbuffer = (unsupported / model).read_bytes()
    info = inspect_model(flatbuffer)
    assert info.ops[index].name == op
    with pytest.raises(UnsupportedOpError) as failure:
        open_interpreter(flatbuffer, 1 << 20, where="probe[int8]")
    diagnosis = unsupported_op_at_build(failure.value.one_line(), info)
    show(f"build: {op}", diagnosis)
    assert diagnosis.title == f"The firmware cannot run op {op}"
    assert diagnosis.evidence[0].startswith(f"operator {index} of the main graph is {op}, which TFLite Micro")
    assert alternative in diagnosis.suggestion
    # The chip firmware's own wording (model_runner.cpp) carries the operator index itself.
    chip = unsupported_op_at_build(f"board refused probe[int8]: op {op} (subgraph 0, operator {index}) is not "
                                   f"registered in the firmware's op resolver")
    assert chip.evidence[0] == diagnosis.evidence[0]
    assert unsupported_op_at_build("AllocateTensors() failed with a 8192-byte arena") is None


# --- B. slow -------------------------------------------------------------------------------------

def _row(model: Path, quantization: str, *, esp_nn: bool = True, arena_in_psram: bool = False,
         arena_size: int | None = None) -> CaseResult:
    """A virtual board's row: per-layer timings from the cost model, as the pipeline records them."""
    info = inspect_model(model.read_bytes())
    estimate = estimate_latency(info, ChipConfig(esp_nn=esp_nn, tensors_in_psram=arena_in_psram))
    layers = tuple(LayerTiming(op.index, op.name, op.cycles / estimate.cpu_mhz, op.cycles, op.macs, op.path,
                               op.ceiling) for op in estimate.ops)
    arena = arena_size or arena_size_for(model_io(model)[2])
    return CaseResult("suite", model.stem, quantization, f"{model.stem}[{quantization}]", quantization, "passed",
                      model_path=str(model), latency_kind="estimated", latency_median_ms=estimate.total_us / 1000,
                      cpu_mhz=240, esp_nn=esp_nn, esp_nn_version="1.1.2", arena_in_psram=arena_in_psram,
                      arena_size=arena, layers=layers)


def test_a_float32_model_is_slow_with_the_int8_speed_up(standardized_model):
    _, models = standardized_model
    int8, float32 = _row(models["int8"], "int8"), _row(models["float32"], "float32")
    diagnosis = slow(float32, int8_latency_ms=int8.latency_median_ms)
    show("slow: float32 beside its int8 row", diagnosis)
    speed_up = float32.latency_median_ms / int8.latency_median_ms
    assert diagnosis.kind == "slow" and diagnosis.evidence[0].startswith("the model is float32 (")
    assert f"{speed_up:.1f}x faster" in diagnosis.evidence[0] and speed_up > 2
    assert "quantize to int8" in diagnosis.suggestion and len(diagnosis.evidence) == 1
    assert not any(line.startswith("the model is float32") for line in (slow(int8) or Diagnosis("slow", "", (), "")).evidence)
    # An int8 row no faster than float (the seed LSTM: its time is in the LSTM's reference kernel)
    # does not make float32 the cause.
    same = slow(float32, int8_latency_ms=float32.latency_median_ms / 1.01)
    assert same is None or not any(line.startswith("the model is float32") for line in same.evidence), same


@pytest.mark.skipif(not PERSON.is_file(), reason="needs ../shared/models")
def test_reference_kernels_and_a_psram_arena_are_each_named():
    fast = _row(PERSON, "int8")
    assert slow(fast) is None                    # esp-nn, arena in SRAM, every heavy layer near its ceiling
    without_row = _row(PERSON, "int8", esp_nn=False)
    without = slow(without_row)
    show("slow: built without esp-nn", without)
    espnn_ops = [layer for layer in fast.layers if layer.path.startswith("esp-nn")]
    assert len(without.evidence) == 1 and without.evidence[0].startswith(
        f"the firmware is built without esp-nn ({num(without_row.latency_median_ms)} ms, estimated): {len(espnn_ops)} "
        f"ops esp-nn has kernels for (")
    assert f"with esp-nn the cost model estimates {fast.latency_median_ms:.3g} ms" in without.evidence[0]
    assert "`board.esp_nn: true`" in without.suggestion
    psram = slow(_row(PERSON, "int8", arena_in_psram=True))
    show("slow: arena in PSRAM", psram)
    assert len(psram.evidence) == 1 and "arena is in PSRAM though internal SRAM has 256.0 KiB for it" in \
        psram.evidence[0] and f"in SRAM the cost model estimates {fast.latency_median_ms:.3g} ms" in psram.evidence[0]
    assert "`board.arena: auto` or `sram`" in psram.suggestion
    # The same arena in PSRAM because it does not fit SRAM is no diagnosis.
    big = _row(PERSON, "int8", arena_in_psram=True, arena_size=MemoryBudget().sram_arena_budget + 1024)
    assert slow(big) is None


@needs_shared
def test_the_mlperf_keyword_models_first_conv_is_named_below_its_ceiling():
    """MLPerf Tiny's KWS model opens with a 10x4 conv over one channel: esp-nn's filter-aligned
    path pads each 4-tap row to 16 lanes, and that layer takes about half the model's cycles."""
    row = _row(KWS, "int8")
    diagnosis = slow(row)
    show("slow: MLPerf KWS", diagnosis)
    conv = row.layers[0]
    assert len(diagnosis.evidence) == 1 and diagnosis.evidence[0].startswith(
        f"op 0 (CONV_2D) does {conv.macs_per_cycle:.2f} MAC/cycle, {100 * conv.ceiling_efficiency:.1f}% of the ")
    assert "its path esp-nn-1.1.2/conv_filter_aligned reaches" in diagnosis.evidence[0]


def test_a_heavy_layer_far_below_its_paths_ceiling_is_named(standardized_model):
    """The planted model's first conv has one input channel: esp-nn's filter-aligned path pads each
    3-tap filter row to 16 lanes, so the layer runs far below that path's ceiling."""
    _, models = standardized_model
    row = _row(models["int8"], "int8")
    conv = row.layers[0]
    assert conv.op == "CONV_2D" and conv.ceiling_efficiency is not None
    diagnosis = slow(row)
    show("slow: a layer far below its path's ceiling", diagnosis)
    if conv.ceiling_efficiency >= 0.25:
        assert diagnosis is None
        pytest.fail(f"the planted conv reaches {conv.ceiling_efficiency:.0%} of its ceiling: not a slow layer")
    assert diagnosis.evidence[0].startswith(f"op 0 (CONV_2D) does {conv.macs_per_cycle:.2f} MAC/cycle")
    assert f"its path {conv.path} reaches" in diagnosis.evidence[0]


# --- C. rendering --------------------------------------------------------------------------------

def test_diagnoses_render_as_text_and_markdown_and_round_trip_through_json():
    diagnosis = Diagnosis("arena", "The tensor arena is too small for the model",
                          ("TFLite Micro needs 10 bytes | more", "it fits internal SRAM"), "give it 4,096 bytes")
    assert diagnosis.one_line() == ("The tensor arena is too small for the model: TFLite Micro needs 10 bytes | more; "
                                    "give it 4,096 bytes")
    assert Diagnosis.from_json(diagnosis.to_json()) == diagnosis
    text = render_text([diagnosis], case_id="kws[int8]")
    assert text.splitlines() == ["kws[int8]: 1 diagnosis", "  1. The tensor arena is too small for the model [arena]",
                                 "     - TFLite Micro needs 10 bytes | more", "     - it fits internal SRAM",
                                 "     what to do: give it 4,096 bytes"]
    assert render_text([], case_id="kws[int8]") == "kws[int8]: nothing to diagnose (no failure mode's evidence shows)\n"
    markdown = render_markdown([diagnosis], case_id="kws[int8]")
    assert markdown.startswith("### kws[int8]\n\n**The tensor arena is too small for the model** (arena)\n\n")
    assert "- TFLite Micro needs 10 bytes \\| more" in markdown and render_markdown([], case_id="x") == ""
    with pytest.raises(ValueError, match="diagnosis kind 'speed'"):
        Diagnosis("speed", "", (), "")
