"""Per-layer quantization error (TensorFlow's QuantizationDebugger, in a worker) and the
calibration verdict.

One model for the TensorFlow tests: the seed keyword CNN's layers (the zoo's list) trained for six
epochs on scikit-learn's digits at 16x16, with the pixel counts 0..16 as they are in the data
(no preprocessing): inputs far from the standard normal that random calibration assumes. Module
fixtures share it; each worker start costs TensorFlow's import (~8 s here).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from harness.errors import ConversionError
from harness.model import ModelSource, TrainedModel, train
from harness.quant_debug import (
    LayerError,
    calibration_verdict,
    errors_from_json,
    errors_to_json,
    layer_errors,
    match_ops,
    weight_mismatch,
    worst_layers,
)
from harness.quantize import QuantSettings
from harness.tflite_model import inspect_model

TRAINING = {"epochs": 6, "batch_size": 32, "learning_rate": 0.002, "seed": 0}
CALIBRATED = QuantSettings("int8", 50)
PER_TENSOR = QuantSettings("int8", 50, per_channel=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from harness.datasets import load_dataset

    data = load_dataset("digits", {"image_size": 16, "channels": 1, "samples_per_class": 80}, seed=0)
    path = tmp_path_factory.mktemp("digits") / "data.npz"
    # The loader scales the 0..16 pixel counts to 0..1; undone, so the inputs span 0..16.
    np.savez(path, x_train=data.x_train * 16, y_train=data.y_train, x_test=data.x_test * 16, y_test=data.y_test,
             labels=np.array(data.labels), task=np.array(data.task), source=np.array(data.source))
    return path


@pytest.fixture(scope="module")
def cnn(digits, tmp_path_factory) -> TrainedModel:
    from harness import zoo

    layers = zoo.layer_specs("keyword_cnn", {}, num_outputs=10, output_activation="softmax")
    return train(ModelSource("layers", "kws", layers=layers), TRAINING, digits, tmp_path_factory.mktemp("cnn"),
                 where="test", dataset_name="digits")


@pytest.fixture(scope="module")
def stage_models(cnn, digits, tmp_path_factory):
    """The quantize stage's own .tflite of the variant the debugger looks at, and of the same
    variant with per-tensor weights (one worker)."""
    from harness.quantize import quantize_many

    work = tmp_path_factory.mktemp("stage")
    channel, tensor = work / "channel.tflite", work / "tensor.tflite"
    assert quantize_many(cnn, [(CALIBRATED, channel), (PER_TENSOR, tensor)], digits, work, training=TRAINING,
                         seed=0, where="test") == {}
    return inspect_model(channel.read_bytes()), inspect_model(tensor.read_bytes())


@pytest.fixture(scope="module")
def stage_model(stage_models):
    return stage_models[0]


@pytest.fixture(scope="module")
def train_errors(cnn, digits, tmp_path_factory) -> tuple[LayerError, ...]:
    return layer_errors(cnn.model_path, CALIBRATED, digits, seed=0, workdir=tmp_path_factory.mktemp("debug"))


# --- per-layer error, real TensorFlow ------------------------------------------------------------

def test_every_op_of_the_stage_model_has_its_error_under_its_index(train_errors, stage_model, cnn):
    assert cnn.float_accuracy > 0.5
    ops = stage_model.ops
    assert [op.name for op in ops] == ["CONV_2D", "MAX_POOL_2D", "CONV_2D", "MAX_POOL_2D", "RESHAPE",
                                       "FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX"]
    # Every op's output is int8 here, so every op is a quantized layer with its own row.
    assert [error.op_index for error in train_errors] == [op.index for op in ops]
    for error, op in zip(train_errors, ops):
        out = stage_model.tensors[op.outputs[0]]
        assert (error.op_name, error.tensor_name, error.zero_point, error.elements) == \
            (op.name, out.name, out.zero_points[0], out.elements)
        assert error.scale == pytest.approx(out.scales[0], rel=1e-6)
        assert error.rmse_per_scale == pytest.approx(error.rmse / error.scale)
        assert 0 <= error.rmse <= error.max_abs_error + 1e-9
    # Calibrated on the data, the layers that compute lose about one rounding step, not more
    # (a uniform error of one step has an RMSE of 0.29 steps); pools and reshapes lose nothing.
    assert max(error.rmse_per_scale for error in train_errors) < 1.5
    assert all(error.rmse < 1e-5 for error in train_errors if error.op_name in ("MAX_POOL_2D", "RESHAPE"))


def test_random_calibration_on_data_far_from_normal_loses_many_steps(cnn, digits, train_errors, tmp_path):
    """The seed article's np.random.randn calibration on inputs 0..16: the input and first layers'
    ranges are the random samples', and the data's activations are clipped by them."""
    random = layer_errors(cnn.model_path, QuantSettings("int8", 50, "random"), digits, seed=0, debug_samples=32,
                          workdir=tmp_path)
    worst_random, worst_train = worst_layers(random, 1)[0], worst_layers(train_errors, 1)[0]
    assert worst_random.rmse_per_scale > 4 * worst_train.rmse_per_scale and worst_random.rmse_per_scale > 3
    # The first layer, whose input range missed the data: the debug samples reach the model
    # clipped to int8 as the board gets them. Fed as floats, the debugger's own rounding wraps
    # them around (np.int8 of 600 is 88) and the blame moved to a FULLY_CONNECTED layer.
    assert worst_random.op_name == "CONV_2D"
    assert (tmp_path / "quant_debug.log").is_file()
    job = json.loads((tmp_path / "quant_debug-job.json").read_text())
    assert job["settings"]["calibration_source"] == "random" and job["debug_samples"] == 32


def test_a_row_the_stage_model_does_not_have_gets_no_index(train_errors, stage_model):
    rows = [{"op_name": error.op_name, "scale": error.scale, "zero_point": error.zero_point,
             "elements": error.elements} for error in train_errors]
    assert match_ops(rows, stage_model) == [op.index for op in stage_model.ops]
    rows[2] = {**rows[2], "scale": rows[2]["scale"] * 1.01}  # a range the stage's op does not have
    rows.insert(0, {"op_name": "QUANTIZE", "scale": 0.1, "zero_point": 0, "elements": 256})
    assert match_ops(rows, stage_model) == [-1, 0, 1, -1, 3, 4, 5, 6, 7]


def test_per_tensor_weights_reach_the_debugger_as_they_reach_the_stage(cnn, digits, stage_models, tmp_path):
    """The worker refuses a debug model whose weights are quantized otherwise than the stage's
    (weight_mismatch); per-tensor weights pass it, so the debugger converted them per tensor."""
    channel, tensor = stage_models
    errors = layer_errors(cnn.model_path, PER_TENSOR, digits, seed=0, debug_samples=8, workdir=tmp_path)
    assert [error.op_index for error in errors] == [op.index for op in tensor.ops]
    pairs = [(op.outputs[0], op.index) for op in tensor.ops]
    assert weight_mismatch(tensor, tensor, pairs) is None
    assert weight_mismatch(tensor, channel, pairs) == (
        "the QuantizationDebugger's model quantizes the weights of op 0 (CONV_2D) with 1 scales, the quantize "
        "stage's with 8: it did not convert the variant as the stage does")


@pytest.mark.parametrize("settings, message", [
    (QuantSettings("int16x8", 50), "int8 variants only .*this variant is int16x8"),
    (QuantSettings("int8", 50, qat=True), "post-training int8 only: a quantization-aware trained variant"),
    (QuantSettings("float32"), "int8 variants only .*this variant is float32"),
    (QuantSettings("int8", 0), "int8 needs calibration_samples >= 1"),
])
def test_variants_the_debugger_does_not_cover_are_refused_before_any_worker(settings, message, tmp_path):
    with pytest.raises(ConversionError, match=f"^suite.yaml:4: .*{message}"):
        layer_errors(tmp_path / "missing.keras", settings, tmp_path / "missing.npz", where="suite.yaml:4",
                     workdir=tmp_path)
    assert not list(tmp_path.iterdir())  # no job was written: nothing started


# --- pure parts ----------------------------------------------------------------------------------

def _error(index: int, steps: float) -> LayerError:
    return LayerError(index, "CONV_2D", f"t{index}", 0.5, -128, steps * 0.5, steps, steps, 100)


def test_layer_errors_round_trip_through_json_and_sort_by_steps():
    errors = (_error(0, 0.3), _error(1, 7.0), _error(2, float("nan")), _error(3, 2.0))
    assert errors_from_json(json.loads(json.dumps(errors_to_json(errors))))[:2] == errors[:2]
    again = errors_from_json(json.loads(json.dumps(errors_to_json(errors))))
    assert math.isnan(again[2].rmse_per_scale) and again[3] == errors[3]
    assert [error.op_index for error in worst_layers(errors)] == [1, 3, 0]
    assert [error.op_index for error in worst_layers(errors, 10)] == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="needs rmse_per_scale"):
        LayerError.from_json({key: value for key, value in dataclasses.asdict(errors[0]).items()
                              if key != "rmse_per_scale"})


def test_the_smallest_n_within_one_point_of_the_largest_is_enough():
    verdict = calibration_verdict([(500, 0.945), (10, 0.80), (50, 0.935), (100, 0.95)], "train")
    assert verdict.tried == ((10, 0.80), (50, 0.935), (100, 0.95), (500, 0.945))
    assert verdict.enough == 50 and verdict.source == "train"
    assert verdict.text.startswith("50 training samples are enough (93.5% against 94.5% with 500")
    random = calibration_verdict([(50, 0.60), (500, 0.605)], "random")
    assert random.enough == 50 and random.text.startswith("50 random inputs are enough (60.0% against 60.5%")
    assert calibration_verdict([(50, 0.935), (500, 0.945)], "train", within=0.005).enough is None


def test_an_n_followed_by_a_larger_one_that_falls_short_is_not_enough():
    # 10 samples matched by luck; 50 falls two points short, so only 100 is both close and stable.
    verdict = calibration_verdict([(10, 0.94), (50, 0.92), (100, 0.94), (500, 0.945)], "train")
    assert verdict.enough == 100


def test_no_n_is_enough_when_only_one_was_tried_or_the_accuracy_still_rises():
    single = calibration_verdict([(200, 0.9)], "train")
    assert single.enough is None and single.text.startswith("no N tried is enough: only 200 training samples")
    rising = calibration_verdict([(50, 0.70), (100, 0.88), (500, 0.93)], "random")
    assert rising.enough is None
    assert rising.text.startswith("no N tried is enough: the accuracy still rises by 5.0 points from 100 to 500 "
                                  "(88.0% to 93.0%), so 500 random inputs may not be enough either")


def test_bad_points_are_refused():
    for points, source, message in [([], "train", "at least one"), ([(50, 0.9), (50, 0.8)], "train", "distinct"),
                                    ([(50, 93.5)], "train", "fractions"), ([(50, 0.9)], "val", "calibration source"),
                                    ([(50, float("nan"))], "train", "fractions")]:
        with pytest.raises(ValueError, match=message):
            calibration_verdict(points, source)
    with pytest.raises(ValueError, match="within is a fraction"):
        calibration_verdict([(50, 0.9)], "train", within=1)
