"""The model and quantize stages with the settings issue 13 adds: models from `layers:` and from
the user's Keras files, int8 per channel and per tensor, random calibration, int16x8 (with the
TFLM kernel check) and quantization-aware training. Real workers, real converters, host TFLM.

Trained models are shared through module-scoped fixtures: each worker start costs TensorFlow's
import (~8 s here).
"""

from __future__ import annotations

import dataclasses
import os
import types
from pathlib import Path

import numpy as np
import pytest

from harness.errors import ConversionError, TrainingError, UnsupportedOpError
from harness.layers import LayerSpec
from harness.model import ModelSource, TrainedModel, load_trained, train
from harness.quantize import QuantSettings, qat_schedule, quantize
from harness.tflite_model import inspect_model
from harness.tflm import open_interpreter

TRAINING = {"epochs": 8, "batch_size": 16, "learning_rate": 0.002, "seed": 0}
VENDOR = Path(__file__).resolve().parents[2] / "shared" / "vendor" / "esp-tflite-micro"


def spec(class_name: str, line: int = 0, **config) -> LayerSpec:
    return LayerSpec(class_name, types.MappingProxyType(config), line)


@pytest.fixture(scope="module")
def keywords(tmp_path_factory) -> Path:
    """The seed article's keyword data (yes, no, silence), 160 samples a class: generated here."""
    from harness.datasets import load_dataset

    data = load_dataset("keywords", {"words": "yes,no", "samples_per_class": 160}, seed=0)
    path = tmp_path_factory.mktemp("keywords") / "data.npz"
    np.savez(path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
             labels=np.array(data.labels), task=np.array(data.task), source=np.array(data.source))
    return path


@pytest.fixture(scope="module")
def kws(keywords, tmp_path_factory) -> TrainedModel:
    """The seed keyword CNN, written as a suite's `layers:` (the zoo's own list), trained."""
    from harness import zoo

    layers = zoo.layer_specs("keyword_cnn", {}, num_outputs=3, output_activation="softmax")
    source = ModelSource("layers", "kws", layers=layers)
    return train(source, TRAINING, keywords, tmp_path_factory.mktemp("kws"), where="test", dataset_name="keywords")


@pytest.fixture(scope="module")
def tf_keras():
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tf_keras as keras

    return keras


def _host_accuracy(tflite: Path, npz: Path) -> float:
    from harness.compare import accuracy
    from harness.reference import model_io, run_reference

    input_quant, output_quant, _ = model_io(tflite)
    with np.load(npz) as data:
        x, y = data["x_test"], data["y_test"]
    run = run_reference(tflite, input_quant.quantize(x))
    return accuracy(output_quant.dequantize(run.tflm_outputs), y)


def _weight_scales(flatbuffer: bytes) -> list[tuple[str, int, int]]:
    """(op, output channels, weight scales) of every conv and fully connected op."""
    info = inspect_model(flatbuffer)
    found = []
    for op in info.ops:
        if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            weights = info.tensors[op.inputs[1]]
            channels = weights.shape[-1] if op.name == "DEPTHWISE_CONV_2D" else weights.shape[0]
            found.append((op.name, channels, len(weights.scales)))
    return found


# --- the model stage -----------------------------------------------------------------------------

def test_a_layers_model_trains_and_leaves_a_whole_keras_model_and_its_predictions(kws, keywords):
    from harness.compare import accuracy

    assert kws.model_path.name == "model.keras" and kws.model_path.is_file()
    assert kws.source.describe() == "layers:8" and kws.trained and kws.train_seconds > 0
    assert kws.input_shape == (49, 10, 1) and kws.num_outputs == 3 and kws.output_activation == "softmax"
    predictions = np.load(kws.float_predictions_path)
    with np.load(keywords) as data:
        assert predictions.shape == (len(data["x_test"]), 3)
        assert kws.float_accuracy == accuracy(predictions, data["y_test"]) > 0.6
    assert load_trained(kws.model_path.parent, kws.source) == kws
    assert ModelSource.from_job(kws.source.to_job()) == kws.source


def test_the_worker_refuses_a_last_layer_that_is_not_the_classes(keywords, tmp_path):
    layers = (spec("Flatten"), spec("Dense", 12, units=5, activation="softmax"))
    with pytest.raises(TrainingError, match=r"the last layer gives 5 outputs; data set 'keywords' has 3 classes "
                                            r"\(yes, no, silence\): set units: 3"):
        train(ModelSource("layers", "wide", layers=layers), TRAINING, keywords, tmp_path, where="suite.yaml:12",
              dataset_name="keywords")


def test_shape_and_class_mismatches_name_both_sides(tf_keras):
    from harness.model import check_fits_data

    keras = tf_keras
    labels = ["yes", "no", "silence"]
    model = keras.Sequential([keras.Input((40, 10, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(TrainingError, match=r"the model takes inputs of shape \[40, 10, 1\]; data set 'keywords' "
                                            r"gives samples of shape \[49, 10, 1\]"):
        check_fits_data(model, (49, 10, 1), labels, "keywords", "keras")
    two = keras.Sequential([keras.Input((49, 10, 1)), keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(TrainingError, match=r"gives 2 outputs; data set 'keywords' has 3 classes .*: pair the "
                                            r"model with the data set it was trained on"):
        check_fits_data(two, (49, 10, 1), labels, "keywords", "keras")
    one = keras.Sequential([keras.Input((128,)), keras.layers.Dense(1)])
    with pytest.raises(TrainingError, match="needs activation: sigmoid"):
        check_fits_data(one, (128,), ["normal", "fault"], "vibration", "layers")
    assert check_fits_data(two, (49, 10, 1), ["a", "b"], "x", "keras") == (2, "linear")
    sigmoid = keras.Sequential([keras.Input((128,)), keras.layers.Dense(1, activation="sigmoid")])
    assert check_fits_data(sigmoid, (128,), ["normal", "fault"], "vibration", "layers") == (1, "sigmoid")


def _article_model(keras):
    # The seed article's keyword model, as a user would have trained and saved it.
    layers = keras.layers
    return keras.Sequential([keras.Input((49, 10, 1)), layers.Conv2D(8, (3, 3), activation="relu"),
                             layers.MaxPooling2D((2, 2)), layers.Flatten(), layers.Dense(3, activation="softmax")],
                            name="users_model")


def test_users_keras_files_are_used_as_given_or_fine_tuned(tf_keras, keywords, tmp_path):
    keras = tf_keras
    keras.utils.set_random_seed(1)
    model = _article_model(keras)
    with np.load(keywords) as data:
        model.compile("adam", "sparse_categorical_crossentropy")
        model.fit(data["x_train"], data["y_train"], epochs=3, verbose=0)
        expected = model.predict(data["x_test"], verbose=0)
    model.save(tmp_path / "users.keras")
    model.save(tmp_path / "users.h5")

    given = train(ModelSource("keras", "mine", keras_path=tmp_path / "users.keras"), TRAINING, keywords,
                  tmp_path / "given", where="test", dataset_name="keywords")
    assert not given.trained and given.train_seconds == 0 and given.output_activation == "softmax"
    assert np.allclose(np.load(given.float_predictions_path), expected, atol=1e-5)
    tuned = train(ModelSource("keras", "mine", keras_path=tmp_path / "users.h5", fine_tune=True), TRAINING,
                  keywords, tmp_path / "tuned", where="test", dataset_name="keywords")
    assert tuned.trained and tuned.train_seconds > 0
    assert not np.allclose(np.load(tuned.float_predictions_path), expected, atol=1e-3)
    tflite = quantize(given, QuantSettings("int8", 20), keywords, tmp_path / "q" / "model.tflite",
                      training=TRAINING, seed=0, where="test")
    assert abs(_host_accuracy(tflite, keywords) - given.float_accuracy) < 0.1


def test_a_savedmodel_directory_loads_and_files_that_are_not_models_are_named(tf_keras, tmp_path):
    from harness.model import load_keras_file

    keras = tf_keras
    model = _article_model(keras)
    model.save(tmp_path / "saved", save_format="tf")
    loaded = load_keras_file(keras, tmp_path / "saved")
    assert [type(layer).__name__ for layer in loaded.layers] == [type(layer).__name__ for layer in model.layers]

    model.save_weights(tmp_path / "weights.h5")
    (tmp_path / "model.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(32))
    (tmp_path / "notes.keras").write_text("not a model")
    (tmp_path / "empty").mkdir()
    cases = {"weights.h5": "an HDF5 file without a model config (found ",
             "model.tflite": "is a TFLite flatbuffer, not a Keras model: give it as `tflite:`",
             "notes.keras": "is not a Keras model: it starts with bytes 6e 6f 74",
             "empty": "is a directory without saved_model.pb"}
    for name, expected in cases.items():
        with pytest.raises(TrainingError) as failure:
            load_keras_file(keras, tmp_path / name)
        assert str(tmp_path / name) in str(failure.value) and expected in str(failure.value)


def test_lambda_layers_in_keras_files_are_refused_without_running_them(tf_keras, tmp_path):
    from harness.model import load_keras_file

    keras = tf_keras
    marker = tmp_path / "ran"
    # The function leaves a mark each time Keras calls it (building, and deserializing the layer).
    mark = str(marker)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: (open(mark, "a").close(), x * 2)[1]),
                              keras.layers.Dense(2)])
    model.save(tmp_path / "lambda.keras")
    model.save(tmp_path / "lambda.h5")
    assert marker.exists()
    marker.unlink()
    for name in ("lambda.keras", "lambda.h5"):
        with pytest.raises(TrainingError, match="has a Lambda layer, which would run Python code"):
            load_keras_file(keras, tmp_path / name)
    assert not marker.exists()


# --- the quantize stage --------------------------------------------------------------------------

def test_per_tensor_weights_have_one_scale_per_tensor(kws, keywords, tmp_path):
    from harness.quantize import quantize_many

    channel, tensor = tmp_path / "c.tflite", tmp_path / "t.tflite"  # both in one worker
    assert quantize_many(kws, [(QuantSettings("int8", 50), channel), (QuantSettings("int8", 50, per_channel=False),
                                                                      tensor)],
                         keywords, tmp_path, training=TRAINING, seed=0, where="test") == {}
    per_channel, per_tensor = _weight_scales(channel.read_bytes()), _weight_scales(tensor.read_bytes())
    assert [op for op, _, _ in per_channel] == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert [(op, scales) for op, _, scales in per_tensor] == [(op, 1) for op, _, _ in per_tensor]
    conv = [(channels, scales) for op, channels, scales in per_channel if op == "CONV_2D"]
    assert conv == [(8, 8), (16, 16)]
    assert _host_accuracy(tensor, keywords) > 0.6


def test_random_calibration_uses_seeded_standard_normal_inputs(kws, keywords, tmp_path):
    """The seed article's representative_dataset (np.random.randn): the input's int8 range is the
    range of the random samples, not of the data."""
    from harness.quantize import calibration_inputs
    from harness.reference import model_io

    settings = QuantSettings("int8", 50, "random")
    steps: list[str] = []
    tflite = quantize(kws, settings, keywords, tmp_path / "r" / "model.tflite", training=TRAINING, seed=3,
                      where="test", progress=steps.append)
    assert steps == ["converting", "calibrating on 50 samples"]
    with np.load(keywords) as data:
        random = calibration_inputs(settings, data["x_train"], 3)
        train_samples = calibration_inputs(QuantSettings("int8", 50), data["x_train"], 3)
    assert random.shape == (50, 49, 10, 1) and abs(random.mean()) < 0.05 and abs(random.std() - 1) < 0.05
    assert np.array_equal(random, calibration_inputs(settings, np.zeros((5, 49, 10, 1)), 3))
    low, high = min(random.min(), 0.0), max(random.max(), 0.0)
    input_quant, _, _ = model_io(tflite)
    assert input_quant.dtype == "int8"
    assert input_quant.scale == pytest.approx((high - low) / 255, rel=1e-3)
    data_range = max(train_samples.max(), 0) - min(train_samples.min(), 0)
    assert abs(data_range / 255 - input_quant.scale) > 0.05 * input_quant.scale


@pytest.fixture(scope="module")
def kws_int16(kws, keywords, tmp_path_factory) -> tuple[Path, list[str]]:
    steps: list[str] = []
    tflite = quantize(kws, QuantSettings("int16x8", 50), keywords, tmp_path_factory.mktemp("int16") / "model.tflite",
                      training=TRAINING, seed=0, where="test", progress=steps.append)
    return tflite, steps


def test_int16x8_has_int16_io_and_runs_on_host_tflm(kws_int16, keywords):
    tflite, steps = kws_int16
    assert steps == ["converting", "calibrating on 50 samples"]
    info = inspect_model(tflite.read_bytes())
    assert [info.tensors[i].dtype for i in info.inputs + info.outputs] == ["int16", "int16"]
    weights = [info.tensors[op.inputs[1]].dtype for op in info.ops if op.name in ("CONV_2D", "FULLY_CONNECTED")]
    assert weights == ["int8"] * 4
    assert _host_accuracy(tflite, keywords) > 0.6


def test_int16x8_dense_weights_are_per_tensor_because_esp_tflite_micro_ignores_their_channels(kws_int16):
    """esp-tflite-micro 1.3.8's esp-nn FULLY_CONNECTED runs int16 inputs through the per-tensor
    reference kernel whatever the weight scales; the converter's default per-channel 16x8 dense
    weights came off the virtual board (which runs those kernels) up to 1003 LSB from both host
    references, on every sample. Convolutions keep their per-channel scales (their int16 kernel
    reads them), and a per-channel int16 dense layer is refused with the reason."""
    from harness import tflm

    flatbuffer = kws_int16[0].read_bytes()
    scales = _weight_scales(flatbuffer)
    assert [count for op, _, count in scales if op == "FULLY_CONNECTED"] == [1, 1]
    assert all(count == channels for op, channels, count in scales if op == "CONV_2D")
    info = inspect_model(flatbuffer)
    dense = next(op for op in info.ops if op.name == "FULLY_CONNECTED")
    assert tflm.int16_kernel_problem(info, dense) == ""
    per_channel = info.tensors[dense.inputs[1]]
    widened = dataclasses.replace(info, tensors=tuple(
        dataclasses.replace(tensor, scales=tuple(per_channel.scales) * per_channel.shape[0])
        if tensor is per_channel else tensor for tensor in info.tensors))
    assert "ignores per-channel quantization" in tflm.int16_kernel_problem(widened, dense)


def test_int16x8_refuses_an_op_without_an_int16_kernel_naming_it(tf_keras, keywords, tmp_path):
    """GlobalMaxPooling2D becomes REDUCE_MAX, which TFLite Micro runs in int8 and float only."""
    keras = tf_keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((49, 10, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.GlobalMaxPooling2D(), keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "model.keras")
    trained = TrainedModel(ModelSource("keras", "gmp", keras_path=tmp_path / "model.keras"), tmp_path / "model.keras",
                           (49, 10, 1), 3, "softmax", 0.0, int(model.count_params()), 0.0, {},
                           tmp_path / "unused.npy", trained=False)
    with pytest.raises(ConversionError, match=r"op 1 \(REDUCE_MAX\) has no int16 kernel in esp-tflite-micro 1\.3\.8.*"
                                              r"quantize this model as int8"):
        quantize(trained, QuantSettings("int16x8", 20), keywords, tmp_path / "q" / "model.tflite",
                 training=TRAINING, seed=0, where="suite.yaml:30")
    assert not (tmp_path / "q" / "model.tflite").exists()


def test_host_tflm_check_names_the_failing_op_too(tf_keras, tmp_path):
    """Past the 1.3.8 table, host TFLM's own refusal ("Node REDUCE_MAX (number 1) failed to
    invoke") is turned into the same error: shown by checking a model with the table bypassed."""
    import tensorflow as tf

    from harness import tflm
    from harness.quantize import convert, with_fixed_batch

    keras = tf_keras
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.GlobalMaxPooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    calibration = np.random.default_rng(0).standard_normal((8, 8, 8, 1)).astype(np.float32)
    flatbuffer = convert(tf, with_fixed_batch(keras, model, [8, 8, 1]), QuantSettings("int8", 8), calibration)
    settings = QuantSettings("int16x8", 8)
    with pytest.raises(UnsupportedOpError, match=r"op 1 \(REDUCE_MAX\) has no int16 kernel"):
        convert(tf, with_fixed_batch(keras, model, [8, 8, 1]), settings, calibration)
    original = tflm.INT16_OPS_ESP_TFLM
    try:
        tflm.INT16_OPS_ESP_TFLM = original | {"REDUCE_MAX"}
        with pytest.raises(UnsupportedOpError, match=r"op 1 \(REDUCE_MAX\) cannot run in int16 on TFLite Micro "
                                                     r"\(Only float32 and int8 types are supported\.\)"):
            convert(tf, with_fixed_batch(keras, model, [8, 8, 1]), settings, calibration)
    finally:
        tflm.INT16_OPS_ESP_TFLM = original
    assert open_interpreter(flatbuffer, 1 << 20).input_details[0]["dtype"] == np.int8


def test_an_int16_kernel_that_refuses_to_prepare_is_named(tf_keras):
    """Seen on the seed MobileNetV2 at initialisation: activations so small that TFLM's int16 CONV_2D
    cannot represent its RELU6 bound (kernel_util.cc: no_integer_overflow_from_quantization), so
    AllocateTensors() fails. Here the conv's weights are 1e-12 to get there in a small model."""
    import tensorflow as tf

    from harness.quantize import convert, with_fixed_batch

    keras = tf_keras
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.ReLU(max_value=6),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    kernel, bias = model.layers[0].get_weights()
    model.layers[0].set_weights([np.full_like(kernel, 1e-12), bias])
    calibration = np.random.default_rng(0).standard_normal((8, 8, 8, 1)).astype(np.float32)
    with pytest.raises(UnsupportedOpError, match=r"op 0 \(CONV_2D\) cannot be prepared in int16 on TFLite Micro "
                                                 r"\(.*no_integer_overflow_from_quantization was not true.*\): "
                                                 r"quantize this model as int8"):
        convert(tf, with_fixed_batch(keras, model, [8, 8, 1]), QuantSettings("int16x8", 8), calibration)


@pytest.mark.parametrize("layers, op", [((("LSTM", {"units": 4}),), "UNIDIRECTIONAL_SEQUENCE_LSTM"),
                                        ((("Flatten", {}), ("PReLU", {})), "PRELU")])
def test_int16x8_names_ops_the_converter_cannot_quantize_to_16x8(tf_keras, layers, op):
    import tensorflow as tf

    from harness.layers import build_sequential
    from harness.quantize import convert, with_fixed_batch

    keras = tf_keras
    specs = [spec(name, **config) for name, config in layers] + [spec("Dense", units=3, activation="softmax")]
    model = with_fixed_batch(keras, build_sequential(keras, specs, input_shape=(6, 3)), [6, 3])
    calibration = np.random.default_rng(0).standard_normal((4, 6, 3)).astype(np.float32)
    with pytest.raises(UnsupportedOpError, match=rf"no 16x8 quantization for op {op}: quantize this model as int8"):
        convert(tf, model, QuantSettings("int16x8", 4), calibration)


@pytest.mark.skipif(not VENDOR.is_dir(), reason="needs ../shared/vendor/esp-tflite-micro")
def test_the_int16_op_table_is_what_esp_tflite_micro_1_3_8_builds():
    """Re-read from the vendored sources: every op in the table has an int16 case in the kernel the
    component compiles (the ESP-NN wrapper where there is one); the ops the allowed layers become
    that are left out have none."""
    from harness.tflm import ESP_TFLM_VERSION, INT16_OPS_ESP_TFLM

    assert f'version: "{ESP_TFLM_VERSION}"' in (VENDOR / "idf_component.yml").read_text()
    kernels = VENDOR / "tensorflow" / "lite" / "micro" / "kernels"
    files = {"CONV_2D": "esp_nn/conv.cc", "DEPTHWISE_CONV_2D": "esp_nn/depthwise_conv.cc",
             "FULLY_CONNECTED": "esp_nn/fully_connected.cc", "MAX_POOL_2D": "esp_nn/pooling.cc",
             "AVERAGE_POOL_2D": "esp_nn/pooling.cc", "SOFTMAX": "esp_nn/softmax.cc", "ADD": "esp_nn/add.cc",
             "MUL": "esp_nn/mul.cc", "MEAN": "reduce_common.cc", "SUM": "reduce_common.cc",
             "LOGISTIC": "logistic.cc", "TANH": "tanh.cc", "UNIDIRECTIONAL_SEQUENCE_LSTM": "unidirectional_sequence_lstm.cc",
             "RELU": "activations.cc", "RELU6": "activations.cc", "LEAKY_RELU": "leaky_relu.cc", "PRELU": "prelu.cc",
             "PAD": "pad.cc", "PADV2": "pad.cc", "TRANSPOSE": "transpose.cc", "STRIDED_SLICE": "strided_slice.cc",
             "EXPAND_DIMS": "expand_dims.cc", "RESIZE_NEAREST_NEIGHBOR": "resize_nearest_neighbor.cc",
             "QUANTIZE": "quantize_common.cc", "DEQUANTIZE": "dequantize_common.cc", "MINIMUM": "maximum_minimum.cc",
             "MAXIMUM": "maximum_minimum.cc"}
    type_agnostic = {"RESHAPE", "SQUEEZE"}
    assert set(files) | type_agnostic == INT16_OPS_ESP_TFLM
    for op, name in files.items():
        assert "kTfLiteInt16" in (kernels / name).read_text(), f"{op}: no int16 case in {name}"
    for name in ("reshape.cc", "reshape_common.cc", "squeeze.cc"):
        assert "kTfLiteInt8" not in (kernels / name).read_text()  # copies bytes, whatever the type
    for op, name in {"ELU": "elu.cc", "HARD_SWISH": "hard_swish.cc"}.items():
        assert op not in INT16_OPS_ESP_TFLM and "kTfLiteInt16" not in (kernels / name).read_text()
    # REDUCE_MAX shares reduce_common.cc with MEAN: its min/max helper has no int16 case.
    text = (kernels / "reduce_common.cc").read_text()
    min_max = text[text.index("TfLiteStatus EvalMinMaxHelper"):text.index("TfLiteStatus PrepareMinMaxHelper")]
    assert "kTfLiteInt8" in min_max and "kTfLiteInt16" not in min_max and "REDUCE_MAX" not in INT16_OPS_ESP_TFLM


def test_quantization_aware_training_fine_tunes_then_converts_to_full_int8(kws, keywords, tmp_path):
    steps: list[str] = []
    epochs, rate = qat_schedule(TRAINING)
    assert (epochs, rate) == (3, pytest.approx(0.0002))
    tflite = quantize(kws, QuantSettings("int8", 50, qat=True), keywords, tmp_path / "model.tflite",
                      training=TRAINING, seed=0, where="test", progress=steps.append)
    assert steps == ["converting", "epoch 1/3", "epoch 2/3", "epoch 3/3", "calibrating on 50 samples"]
    info = inspect_model(tflite.read_bytes())
    assert [info.tensors[i].dtype for i in info.inputs + info.outputs] == ["int8", "int8"]
    assert {op.name for op in info.ops} <= {"CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"}
    assert _host_accuracy(tflite, keywords) > 0.6


def test_quantization_aware_training_names_the_layer_tfmot_cannot_wrap(tf_keras, keywords, tmp_path):
    keras = tf_keras
    model = keras.Sequential([keras.Input((49, 10)), keras.layers.LSTM(4, name="memory"),
                              keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "model.keras")
    trained = TrainedModel(ModelSource("keras", "lstm", keras_path=tmp_path / "model.keras"), tmp_path / "model.keras",
                           (49, 10), 3, "softmax", 0.0, int(model.count_params()), 0.0, {}, tmp_path / "unused.npy")
    flat = tmp_path / "flat.npz"
    with np.load(keywords) as data:
        np.savez(flat, **{key: data[key] for key in data.files if key not in ("x_train", "x_test")},
                 x_train=data["x_train"][..., 0], x_test=data["x_test"][..., 0])
    with pytest.raises(ConversionError, match=r"quantization-aware training \(tfmot\) cannot wrap layer 'memory' "
                                              r"\(LSTM\).*qat: false"):
        quantize(trained, QuantSettings("int8", 20, qat=True), flat, tmp_path / "q" / "model.tflite",
                 training=TRAINING, seed=0, where="test")


BATCHED = """\
suite: batched
defaults:
  training: {epochs: 1, batch_size: 16, learning_rate: 0.002, seed: 0}
  eval_samples: 8
models:
  - name: prelu
    layers:
      - Flatten: {}
      - Dense: {units: 8}
      - PReLU: {}
      - Dense: {units: 3, activation: softmax}
    dataset: {name: keywords, options: {samples_per_class: 20}}
    variants: [{quantization: int8, calibration_samples: 20}, {quantization: int16x8, calibration_samples: 20},
               {quantization: float32}]
"""


def test_variants_of_a_model_convert_in_one_worker_and_a_failure_stays_its_own(tmp_path):
    """The three variants convert in one worker (TensorFlow loads once); int16x8 fails there (the
    converter has no 16x8 PReLU), is converted again alone, and its row says why, as it would
    have had it been converted alone from the start; the other two are cached and pass."""
    import subprocess
    import sys

    from harness.report import read_results

    suite = tmp_path / "suites" / "batched.yaml"
    suite.parent.mkdir()
    suite.write_text(BATCHED)
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), f"--results-dir={tmp_path / 'r'}",
                           f"--cache-dir={tmp_path / 'c'}", "--run-id=b"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=900, check=False)
    _, rows = read_results(tmp_path / "r" / "batched" / "b")
    status = {row.variant: (row.status, row.error) for row in rows}
    assert status["int8"][0] == status["float32"][0] == "passed", (status, done.stderr[-2000:])
    assert status["int16x8"][0] == "error"
    assert "no 16x8 quantization for op PRELU: quantize this model as int8" in status["int16x8"][1]
    log = (tmp_path / "r" / "logs" / "b.log").read_text()
    assert "converting 3 variants of prelu in one worker: int8, int16x8, float32" in log
    assert "prelu[int16x8] did not convert beside the others" in log
    # Converted once together, then only the failed one alone: two conversion workers, not three.
    assert "converting prelu[int16x8]" in log
    assert "converting prelu[int8]" not in log and "converting prelu[float32]" not in log
