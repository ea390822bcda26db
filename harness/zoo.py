"""The built-in architectures a suite can name, with the parameters each accepts.

Four of them are layer lists (`layer_specs`): the same Keras Sequential layers a suite could write
under `layers:`, built by the same code (harness/layers.py), so the seed suite reads as the seed
article's code does. MobileNetV2 is a nested Keras application and stays a builder.

Nothing here imports TensorFlow at module level: suite validation reads `ARCHITECTURES`. Every
build takes `batch_size`, because the converter needs a fixed batch of 1 to emit TFLM-runnable
ops for recurrent layers (UNIDIRECTIONAL_SEQUENCE_LSTM).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .layers import LayerSpec, build_sequential

# Keras' BatchNormalization keeps moving statistics with momentum 0.99 (0.999 inside MobileNetV2);
# on data sets of a few thousand samples, training ends after a few hundred steps, long before
# such averages reach the data, and the converted model (which uses them) predicts at chance.
# Zoo layer lists carry it in each BatchNormalization's config; a suite's own `layers:` get no
# hidden defaults.
BATCHNORM_MOMENTUM = 0.9


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
    # One of the two: the layers (with the head) of a Sequential model, or a builder.
    specs: Callable[..., tuple[LayerSpec, ...]] | None = None  # (num_outputs, output_activation, **params)
    builder: Callable[..., Any] | None = None  # (keras, input_shape, num_outputs, output_activation, batch_size, **params)

    def defaults(self) -> dict[str, Any]:
        return {param.name: param.default for param in self.params}


def _layer(class_name: str, **config: Any) -> LayerSpec:
    return LayerSpec(class_name, types.MappingProxyType(config))


def _head(num_outputs: int, activation: str) -> LayerSpec:
    return _layer("Dense", units=num_outputs, activation=activation)


def _batchnorm() -> LayerSpec:
    return _layer("BatchNormalization", momentum=BATCHNORM_MOMENTUM)


def _keyword_cnn(num_outputs, activation, filters1, filters2, dense, dropout):
    # The seed article's model, layer for layer.
    return (_layer("Conv2D", filters=filters1, kernel_size=[3, 3], activation="relu"),
            _layer("MaxPooling2D", pool_size=[2, 2]),
            _layer("Conv2D", filters=filters2, kernel_size=[3, 3], activation="relu"),
            _layer("MaxPooling2D", pool_size=[2, 2]),
            _layer("Flatten"),
            _layer("Dense", units=dense, activation="relu"),
            _layer("Dropout", rate=dropout),
            _head(num_outputs, activation))


def _anomaly_cnn1d(num_outputs, activation, filters1, filters2, kernel, dense):
    # The seed article's vibration model: 1D convolutions over FFT bins. Its Reshape((128, 1)) is
    # written with -1 so that any number of bins fits.
    return (_layer("Reshape", target_shape=[-1, 1]),
            _layer("Conv1D", filters=filters1, kernel_size=kernel, activation="relu"),
            _layer("MaxPooling1D", pool_size=2),
            _layer("Conv1D", filters=filters2, kernel_size=kernel, activation="relu"),
            _layer("GlobalAveragePooling1D"),
            _layer("Dense", units=dense, activation="relu"),
            _head(num_outputs, activation))


def _lstm(num_outputs, activation, hidden):
    return (_layer("LSTM", units=hidden), _head(num_outputs, activation))


def _ds_cnn(num_outputs, activation, filters, blocks):
    # MLPerf Tiny's keyword-spotting DS-CNN shape: a strided stem, then depthwise-separable blocks.
    stem = (_layer("Conv2D", filters=filters, kernel_size=[10, 4], strides=[2, 2], padding="same", use_bias=False),
            _batchnorm(), _layer("ReLU"))
    block = (_layer("DepthwiseConv2D", kernel_size=[3, 3], padding="same", use_bias=False), _batchnorm(),
             _layer("ReLU"),
             _layer("Conv2D", filters=filters, kernel_size=[1, 1], use_bias=False), _batchnorm(), _layer("ReLU"))
    return stem + block * blocks + (_layer("GlobalAveragePooling2D"), _head(num_outputs, activation))


def _mobilenet_v2(keras, input_shape, num_outputs, activation, batch_size, alpha):
    inputs = keras.Input(shape=input_shape, batch_size=batch_size)
    backbone = keras.applications.MobileNetV2(input_shape=input_shape, alpha=alpha, include_top=False,
                                              weights=None, pooling="avg")
    x = backbone(inputs)
    outputs = keras.layers.Dense(num_outputs, activation=activation, name="logits")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v2")


ARCHITECTURES: Mapping[str, Architecture] = types.MappingProxyType({
    arch.name: arch for arch in (
        Architecture("keyword_cnn", "Two conv + max-pool stages and a dense layer (the seed article's KWS CNN)", (
            Param("filters1", int, 8, "filters of the first conv"),
            Param("filters2", int, 16, "filters of the second conv"),
            Param("dense", int, 32, "units of the hidden dense layer"),
            Param("dropout", (int, float), 0.5, "dropout before the classifier"),
        ), specs=_keyword_cnn),
        Architecture("anomaly_cnn1d", "1D CNN over FFT bins with global average pooling (seed article)", (
            Param("filters1", int, 16, "filters of the first conv"),
            Param("filters2", int, 32, "filters of the second conv"),
            Param("kernel", int, 5, "kernel size of both convs"),
            Param("dense", int, 16, "units of the hidden dense layer"),
        ), specs=_anomaly_cnn1d),
        Architecture("mobilenet_v2", "Keras MobileNetV2 trained from scratch", (
            Param("alpha", (int, float), 0.35, "width multiplier"),
        ), builder=_mobilenet_v2),
        Architecture("lstm", "One LSTM layer and a dense classifier", (
            Param("hidden", int, 32, "LSTM units"),
        ), specs=_lstm),
        Architecture("ds_cnn", "Depthwise-separable CNN (MLPerf Tiny KWS style)", (
            Param("filters", int, 64, "channels of every block"),
            Param("blocks", int, 4, "depthwise-separable blocks"),
        ), specs=_ds_cnn),
    )
})


def layer_specs(name: str, params: Mapping[str, Any], *, num_outputs: int,
                output_activation: str) -> tuple[LayerSpec, ...] | None:
    """The architecture's layers, the Dense head included; None for a builder (mobilenet_v2)."""
    arch = ARCHITECTURES[name]
    if arch.specs is None:
        return None
    return arch.specs(num_outputs, output_activation, **{**arch.defaults(), **params})


def _all_layers(layer):
    for child in getattr(layer, "layers", ()):
        yield child
        yield from _all_layers(child)


def build(name: str, params: Mapping[str, Any], *, input_shape: tuple[int, ...], num_outputs: int,
          output_activation: str, batch_size: int | None = None):
    """A fresh tf-keras model; call only in a process that may load TensorFlow."""
    import tf_keras as keras

    specs = layer_specs(name, params, num_outputs=num_outputs, output_activation=output_activation)
    if specs is not None:
        return build_sequential(keras, specs, input_shape=input_shape, batch_size=batch_size, name=name)
    arch = ARCHITECTURES[name]
    model = arch.builder(keras, tuple(input_shape), num_outputs, output_activation, batch_size,
                         **{**arch.defaults(), **params})
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BATCHNORM_MOMENTUM
    return model
