"""The built-in architectures a suite can name, with the parameters each accepts.

Building imports tf-keras lazily: suite validation reads `ARCHITECTURES` without loading
TensorFlow. Every builder takes `batch_size`, because the converter needs a fixed batch of 1 to
emit TFLM-runnable ops for recurrent layers (UNIDIRECTIONAL_SEQUENCE_LSTM).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Param:
    name: str
    type: type | tuple[type, ...]
    default: Any
    help: str


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    params: tuple[Param, ...]
    build: Callable[..., Any]  # (keras, input_shape, num_outputs, output_activation, batch_size, **params)

    def defaults(self) -> dict[str, Any]:
        return {param.name: param.default for param in self.params}


def _head(keras, x, num_outputs: int, activation: str):
    return keras.layers.Dense(num_outputs, activation=activation, name="logits")(x)


def _keyword_cnn(keras, input_shape, num_outputs, activation, batch_size, filters1, filters2, dense, dropout):
    # The seed article's model, layer for layer.
    inputs = keras.Input(shape=input_shape, batch_size=batch_size)
    x = keras.layers.Conv2D(filters1, (3, 3), activation="relu")(inputs)
    x = keras.layers.MaxPooling2D((2, 2))(x)
    x = keras.layers.Conv2D(filters2, (3, 3), activation="relu")(x)
    x = keras.layers.MaxPooling2D((2, 2))(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(dense, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, _head(keras, x, num_outputs, activation), name="keyword_cnn")


def _anomaly_cnn1d(keras, input_shape, num_outputs, activation, batch_size, filters1, filters2, kernel, dense):
    # The seed article's vibration model: 1D convolutions over FFT bins.
    inputs = keras.Input(shape=input_shape, batch_size=batch_size)
    x = keras.layers.Reshape((input_shape[0], 1))(inputs) if len(input_shape) == 1 else inputs
    x = keras.layers.Conv1D(filters1, kernel, activation="relu")(x)
    x = keras.layers.MaxPooling1D(2)(x)
    x = keras.layers.Conv1D(filters2, kernel, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(dense, activation="relu")(x)
    return keras.Model(inputs, _head(keras, x, num_outputs, activation), name="anomaly_cnn1d")


def _mobilenet_v2(keras, input_shape, num_outputs, activation, batch_size, alpha):
    inputs = keras.Input(shape=input_shape, batch_size=batch_size)
    backbone = keras.applications.MobileNetV2(input_shape=input_shape, alpha=alpha, include_top=False,
                                              weights=None, pooling="avg")
    x = backbone(inputs)
    return keras.Model(inputs, _head(keras, x, num_outputs, activation), name="mobilenet_v2")


def _lstm(keras, input_shape, num_outputs, activation, batch_size, hidden):
    inputs = keras.Input(shape=input_shape, batch_size=batch_size)
    x = keras.layers.LSTM(hidden)(inputs)
    return keras.Model(inputs, _head(keras, x, num_outputs, activation), name="lstm")


def _ds_cnn(keras, input_shape, num_outputs, activation, batch_size, filters, blocks):
    # MLPerf Tiny's keyword-spotting DS-CNN shape: a strided stem, then depthwise-separable blocks.
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, batch_size=batch_size)
    x = layers.Conv2D(filters, (10, 4), strides=(2, 2), padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    for _ in range(blocks):
        x = layers.DepthwiseConv2D((3, 3), padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(filters, (1, 1), use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, _head(keras, x, num_outputs, activation), name="ds_cnn")


ARCHITECTURES: Mapping[str, Architecture] = types.MappingProxyType({
    arch.name: arch for arch in (
        Architecture("keyword_cnn", "Two conv + max-pool stages and a dense layer (the seed article's KWS CNN)", (
            Param("filters1", int, 8, "filters of the first conv"),
            Param("filters2", int, 16, "filters of the second conv"),
            Param("dense", int, 32, "units of the hidden dense layer"),
            Param("dropout", (int, float), 0.5, "dropout before the classifier"),
        ), _keyword_cnn),
        Architecture("anomaly_cnn1d", "1D CNN over FFT bins with global average pooling (seed article)", (
            Param("filters1", int, 16, "filters of the first conv"),
            Param("filters2", int, 32, "filters of the second conv"),
            Param("kernel", int, 5, "kernel size of both convs"),
            Param("dense", int, 16, "units of the hidden dense layer"),
        ), _anomaly_cnn1d),
        Architecture("mobilenet_v2", "Keras MobileNetV2 trained from scratch", (
            Param("alpha", (int, float), 0.35, "width multiplier"),
        ), _mobilenet_v2),
        Architecture("lstm", "One LSTM layer and a dense classifier", (
            Param("hidden", int, 32, "LSTM units"),
        ), _lstm),
        Architecture("ds_cnn", "Depthwise-separable CNN (MLPerf Tiny KWS style)", (
            Param("filters", int, 64, "channels of every block"),
            Param("blocks", int, 4, "depthwise-separable blocks"),
        ), _ds_cnn),
    )
})


# Keras' BatchNormalization keeps moving statistics with momentum 0.99 (0.999 inside MobileNetV2);
# on data sets of a few thousand samples, training ends after a few hundred steps, long before
# such averages reach the data, and the converted model (which uses them) predicts at chance.
BATCHNORM_MOMENTUM = 0.9


def _all_layers(layer):
    for child in getattr(layer, "layers", ()):
        yield child
        yield from _all_layers(child)


def build(name: str, params: Mapping[str, Any], *, input_shape: tuple[int, ...], num_outputs: int,
          output_activation: str, batch_size: int | None = None):
    """A fresh tf-keras model; import this only in a process that may load TensorFlow."""
    import tf_keras as keras

    arch = ARCHITECTURES[name]
    merged = {**arch.defaults(), **params}
    model = arch.build(keras, tuple(input_shape), num_outputs, output_activation, batch_size, **merged)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BATCHNORM_MOMENTUM
    return model
