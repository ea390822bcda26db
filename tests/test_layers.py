"""Keras layers in suites (harness/layers.py) and the zoo's layer lists (harness/zoo.py).

The allow-list is checked for real: Sequential models that together use every allowed layer and
activation are built through `build_sequential`, converted with the quantize stage's converter
settings (int8, and int16x8 where TFLM has the kernels) and run on host TFLite Micro.
"""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

from harness.layers import (
    ALLOWED_ACTIVATIONS,
    ALLOWED_LAYERS,
    REFUSED_LAYERS,
    LayerSpec,
    build_sequential,
    layer_problem,
)


def spec(class_name: str, line: int = 0, **config) -> LayerSpec:
    return LayerSpec(class_name, types.MappingProxyType(config), line)


# --- pure checks ---------------------------------------------------------------------------------

def test_layer_normalization_is_refused_with_what_to_use_instead():
    problem = layer_problem(spec("LayerNormalization", axis=-1))
    assert problem and "not supported" in problem and "BatchNormalization" in problem and "folds" in problem


@pytest.mark.parametrize("class_name, instead", [("GRU", "LSTM"), ("SimpleRNN", "LSTM"), ("Bidirectional", "one LSTM"),
                                                 ("Lambda", "Python code"), ("MultiHeadAttention", "LSTM"),
                                                 ("Add", "keras:"), ("InputLayer", "data set")])
def test_refused_layers_say_why_and_what_instead(class_name, instead):
    problem = layer_problem(spec(class_name))
    assert problem.startswith("not supported: ") and instead in problem


def test_a_class_on_neither_list_names_the_allowed_ones():
    problem = layer_problem(spec("Conv2DFancy", filters=3))
    assert "'Conv2DFancy' is not on the list" in problem and "Conv2D, " in problem and "LSTM" in problem
    assert not set(ALLOWED_LAYERS) & set(REFUSED_LAYERS)


@pytest.mark.parametrize("config, expected", [
    ({"activation": "gelu"}, "activation 'gelu' is not supported: TFLite Micro has no GELU kernel"),
    ({"activation": "elu"}, "keeps ELU in float"),
    ({"activation": "cubic"}, "activation 'cubic' is not one TFLite Micro runs"),
    ({"activation": {"class_name": "ReLU"}}, "activation must be a name"),
    ({"name": "a b"}, "must be an identifier"),
    ({"name": "../x"}, "must be an identifier"),
    ({"input_shape": [4]}, "the input shape comes from the data set"),
    ({"dtype": "mixed_float16"}, "trained in float32"),
    ({"units": {"class_name": "X", "config": {}}}, "a mapping is taken only for *_initializer"),
    ({"kernel_initializer": {"class_name": "HeNormal", "module": "os", "config": {}}}, "with nothing else"),
    ({"kernel_initializer": {"class_name": "Evil", "config": {}}}, "class 'Evil' is not one of Keras's"),
    ({"kernel_regularizer": {"class_name": "L2", "config": {"l2": {"nested": 1}}}}, "must be a plain value"),
    ({"units": object()}, "must be a plain value"),
])
def test_arguments_must_be_plain_values_and_known_names(config, expected):
    problem = layer_problem(spec("Dense", **config))
    assert problem and expected in problem, problem


def test_plain_arguments_and_named_keras_objects_pass():
    assert layer_problem(spec("Dense", units=3, activation="softmax", name="head", use_bias=True,
                              kernel_initializer="he_normal", bias_initializer={"class_name": "Constant",
                                                                                "config": {"value": 0.1}},
                              kernel_regularizer={"class_name": "L2", "config": {"l2": 0.01}})) is None
    assert layer_problem(spec("Conv2D", filters=8, kernel_size=[3, 3], padding="same", activation=None)) is None


def test_layers_module_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, harness.layers, harness.zoo; sys.exit('tensorflow' in sys.modules or 'tf_keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0


# --- zoo layer lists -----------------------------------------------------------------------------

def test_zoo_layer_lists_pass_the_suite_checks_and_carry_batchnorm_momentum():
    from harness import zoo

    for name in zoo.ARCHITECTURES:
        specs = zoo.layer_specs(name, {}, num_outputs=3, output_activation="softmax")
        if name == "mobilenet_v2":
            assert specs is None
            continue
        assert specs[-1] == spec("Dense", units=3, activation="softmax")
        assert [layer_problem(item) for item in specs] == [None] * len(specs), name
    ds_cnn = zoo.layer_specs("ds_cnn", {"blocks": 2}, num_outputs=2, output_activation="softmax")
    norms = [item for item in ds_cnn if item.class_name == "BatchNormalization"]
    assert len(norms) == 1 + 2 * 2 and all(item.config == {"momentum": zoo.BATCHNORM_MOMENTUM} for item in norms)


# --- Keras building and TFLM ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tf_keras_modules():
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf_keras as keras

    return tf, keras


def test_keyword_cnn_is_the_seed_articles_model(tf_keras_modules):
    from harness import zoo

    _, keras = tf_keras_modules
    layers = keras.layers
    article = keras.Sequential([  # ../shared/reference/seed-article.txt, its training code
        keras.Input((49, 10, 1)),
        layers.Conv2D(8, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(16, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Flatten(), layers.Dense(32, activation="relu"), layers.Dropout(0.5),
        layers.Dense(3, activation="softmax")])
    ours = zoo.build("keyword_cnn", {}, input_shape=(49, 10, 1), num_outputs=3, output_activation="softmax")

    def shape(model):
        return [(type(layer).__name__, {key: value for key, value in layer.get_config().items() if key != "name"})
                for layer in model.layers]

    assert shape(ours) == shape(article)


def test_a_keras_error_names_the_layer_its_class_and_suite_line(tf_keras_modules):
    from harness.errors import SuiteError

    _, keras = tf_keras_modules
    with pytest.raises(SuiteError, match=r"layer 1 \(Conv2D, suite line 14\): Keras cannot make it .*filters"):
        build_sequential(keras, [spec("Flatten"), spec("Conv2D", 14, kernel_size=3)], input_shape=(8, 8, 1))
    with pytest.raises(SuiteError, match=r"layer 0 \(Conv2D, suite line 9\) does not fit its input of shape "
                                         r"\(None, 4, 4, 1\)"):
        build_sequential(keras, [spec("Conv2D", 9, filters=2, kernel_size=7)], input_shape=(4, 4, 1))
    with pytest.raises(SuiteError, match=r"layer 0 \(LayerNormalization\): not supported"):
        build_sequential(keras, [spec("LayerNormalization")], input_shape=(4,))


# Three stacks that together use every allowed layer and activation. What has no int16 kernel in
# TFLite Micro (or no 16x8 quantization in the converter) is left out of the int16x8 variants,
# whose refusals tests/test_quantize.py checks.
STACK_2D = ((16, 16, 2), [
    spec("ZeroPadding2D", padding=1), spec("Conv2D", filters=4, kernel_size=3, activation="relu"),
    spec("BatchNormalization"), spec("ReLU", max_value=6),
    spec("DepthwiseConv2D", kernel_size=3, padding="same", activation="tanh"),
    spec("SeparableConv2D", filters=4, kernel_size=3, activation="sigmoid"),
    spec("MaxPooling2D", pool_size=2), spec("UpSampling2D", size=2), spec("Cropping2D", cropping=1),
    spec("AveragePooling2D", pool_size=2), spec("LeakyReLU", alpha=0.1), spec("PReLU"),
    spec("SpatialDropout2D", rate=0.1), spec("GaussianNoise", stddev=0.1), spec("Activation", activation="swish"),
    spec("Conv2D", filters=4, kernel_size=1, activation="hard_sigmoid"), spec("Permute", dims=[2, 1, 3]),
    spec("GlobalAveragePooling2D"), spec("Dense", units=8, activation="linear"), spec("Dropout", rate=0.2),
    spec("Dense", units=3), spec("Softmax")])
STACK_2D_MAX = ((8, 8, 1), [spec("Conv2D", filters=4, kernel_size=3), spec("GlobalMaxPooling2D"),
                            spec("Dense", units=3, activation="softmax")])
STACK_1D = ((32,), [
    spec("Reshape", target_shape=[-1, 1]), spec("ZeroPadding1D", padding=2),
    spec("Conv1D", filters=4, kernel_size=3, activation="relu"), spec("MaxPooling1D", pool_size=2),
    spec("AveragePooling1D", pool_size=2), spec("SpatialDropout1D", rate=0.1),
    spec("Conv1D", filters=4, kernel_size=3, activation="tanh"), spec("GlobalMaxPooling1D"), spec("Flatten"),
    spec("Dense", units=2, activation="softmax")])
STACK_1D_MEAN = ((16, 3), [spec("Conv1D", filters=4, kernel_size=3), spec("GlobalAveragePooling1D"),
                           spec("Dense", units=1, activation="sigmoid")])
STACK_LSTM = ((10, 3), [spec("LSTM", units=8), spec("Dense", units=3, activation="softmax")])
NO_INT16 = {"PReLU", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "LSTM"}

CASES = {"2d": STACK_2D, "2d-max": STACK_2D_MAX, "1d": STACK_1D, "1d-mean": STACK_1D_MEAN, "lstm": STACK_LSTM}


def _int16_variant(stack):
    """The stack without what has no int16 path; global max pooling becomes global average pooling."""
    shape, specs = stack
    average = {"GlobalMaxPooling1D": "GlobalAveragePooling1D", "GlobalMaxPooling2D": "GlobalAveragePooling2D"}
    return shape, [spec(average[item.class_name]) if item.class_name in average else item
                   for item in specs if item.class_name not in NO_INT16 - set(average)]


def test_the_stacks_use_every_allowed_layer_and_activation():
    used = {item.class_name for _, specs in CASES.values() for item in specs}
    assert used == set(ALLOWED_LAYERS)
    activations = {item.config.get("activation") for _, specs in CASES.values() for item in specs} - {None}
    assert activations == ALLOWED_ACTIVATIONS | {"softmax"}


@pytest.fixture(scope="module")
def converted(tf_keras_modules):
    """name -> (quantization, .tflite bytes), converted as the quantize stage does."""
    from harness.quantize import QuantSettings, convert, with_fixed_batch

    tf, keras = tf_keras_modules
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    out = {}
    for name, stack in CASES.items():
        for quantization in ("int8", "int16x8"):
            shape, specs = stack if quantization == "int8" else _int16_variant(stack)
            if quantization == "int16x8" and name == "lstm":
                continue  # nothing left: the LSTM itself has no 16x8 quantization (test_quantize.py)
            model = with_fixed_batch(keras, build_sequential(keras, specs, input_shape=shape), list(shape))
            calibration = rng.standard_normal((16, *shape)).astype(np.float32)
            out[f"{name}/{quantization}"] = convert(tf, model, QuantSettings(quantization, 16), calibration)
    return out


def test_every_allowed_layer_runs_on_host_tflm_in_int8_and_int16(converted):
    from harness.tflite_model import inspect_model
    from harness.tflm import open_interpreter

    assert len(converted) == 9
    rng = np.random.default_rng(1)
    for name, flatbuffer in converted.items():
        quantization = name.split("/")[1]
        dtype = "int8" if quantization == "int8" else "int16"
        info = inspect_model(flatbuffer)
        # Every activation tensor of the quantized graph is integer: no op falls back to float.
        floats = [op.name for op in info.ops
                  if any(info.tensors[i].dtype == "float32" for i in op.inputs + op.outputs if i >= 0)]
        assert not floats, f"{name}: ops with float tensors {floats}"
        host = open_interpreter(flatbuffer, 1 << 22, where=name)
        detail = host.input_details[0]
        assert np.dtype(detail["dtype"]) == np.dtype(dtype), name
        info16 = np.iinfo(dtype)
        sample = rng.integers(info16.min, info16.max, size=detail["shape"], endpoint=True).astype(dtype)
        output = host.run([sample])[0]
        assert output.dtype == np.dtype(dtype) and output.size in (1, 2, 3), name
