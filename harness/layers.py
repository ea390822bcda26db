"""Keras layers a suite may list under `layers:`, checked without TensorFlow and built by Keras's
own deserialization.

A suite's model is a Keras Sequential model written layer by layer, `- Conv2D: {filters: 8,
kernel_size: 3}`. Suite validation imports this module, so nothing here imports TensorFlow at
module level. The allow-list is what TFLite Micro runs after conversion: tests/test_layers.py
builds models that together use every allowed layer and activation, converts them to int8 and
int16x8 and runs them on host TFLM. A layer that is not on it is refused before anything trains,
with what to use instead where there is an answer.

Safety: the user names classes, never code. Classes come from the allow-list, arguments are plain
YAML values, and nested `{class_name, config}` objects are taken only for initializers,
regularizers and constraints, from Keras's built-in names; Keras's deserializer imports a module
only when a config carries a `module` key, which these checks never let through.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SuiteError


@dataclass(frozen=True)
class LayerSpec:
    class_name: str                  # a Keras layer class, e.g. "Conv2D"
    config: Mapping[str, Any]        # its arguments, plain YAML values
    line: int = 0                    # the suite line, for errors

    def to_job(self) -> dict[str, Any]:
        return {"class_name": self.class_name, "config": _jsonable(self.config), "line": self.line}

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> LayerSpec:
        return cls(job["class_name"], types.MappingProxyType(dict(job["config"])), int(job.get("line", 0)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


_CONV = "fused with the activation"
ALLOWED_LAYERS: Mapping[str, str] = types.MappingProxyType({
    # 2D (images, spectrograms)
    "Conv2D": f"CONV_2D ({_CONV})",
    "DepthwiseConv2D": f"DEPTHWISE_CONV_2D ({_CONV})",
    "SeparableConv2D": "DEPTHWISE_CONV_2D + CONV_2D",
    "MaxPooling2D": "MAX_POOL_2D",
    "AveragePooling2D": "AVERAGE_POOL_2D",
    "GlobalAveragePooling2D": "MEAN",
    "GlobalMaxPooling2D": "REDUCE_MAX (int8 only: TFLite Micro has no int16 REDUCE_MAX)",
    "ZeroPadding2D": "PAD",
    "Cropping2D": "STRIDED_SLICE",
    "UpSampling2D": "RESIZE_NEAREST_NEIGHBOR",
    # 1D (sequences, spectra): the converter turns these into their 2D ops with a unit dimension
    "Conv1D": "CONV_2D between RESHAPEs (or EXPAND_DIMS/SQUEEZE)",
    "MaxPooling1D": "MAX_POOL_2D between RESHAPEs",
    "AveragePooling1D": "AVERAGE_POOL_2D between RESHAPEs",
    "GlobalAveragePooling1D": "MEAN",
    "GlobalMaxPooling1D": "REDUCE_MAX (int8 only: TFLite Micro has no int16 REDUCE_MAX)",
    "ZeroPadding1D": "PAD",
    # recurrent: the model is converted with a fixed batch of 1, which makes tf-keras emit the fused op
    "LSTM": "UNIDIRECTIONAL_SEQUENCE_LSTM (int8 only: the converter has no 16x8 LSTM)",
    # dense, shape and activation layers
    "Dense": f"FULLY_CONNECTED ({_CONV})",
    "Flatten": "RESHAPE",
    "Reshape": "RESHAPE",
    "Permute": "TRANSPOSE",
    "BatchNormalization": "folded into the preceding Conv/Dense weights; else MUL + ADD",
    "ReLU": "RELU, RELU6 with max_value: 6 (or fused into the preceding op)",
    "LeakyReLU": "LEAKY_RELU",
    "PReLU": "PRELU (int8 only: the converter has no 16x8 PReLU)",
    "Activation": "the activation's op (see ALLOWED_ACTIVATIONS)",
    "Softmax": "SOFTMAX",
    # training only: removed by the converter
    "Dropout": "nothing (training only)",
    "SpatialDropout1D": "nothing (training only)",
    "SpatialDropout2D": "nothing (training only)",
    "GaussianNoise": "nothing (training only)",
})

_MERGE = ("merges several inputs, and a Sequential model has one path: give a functional model as "
          "`keras: model.keras`")
REFUSED_LAYERS: Mapping[str, str] = types.MappingProxyType({
    "LayerNormalization": "TFLite Micro has no kernel for the ops it converts to (per-sample mean and "
                          "variance, RSQRT on int8): use BatchNormalization, which the converter folds into "
                          "the preceding Conv/Dense",
    "GroupNormalization": "TFLite Micro has no kernel for it: use BatchNormalization (folded into the conv)",
    "UnitNormalization": "converts to L2 normalisation over arbitrary axes, not run by TFLite Micro: use "
                         "BatchNormalization",
    "Normalization": "a preprocessing layer that must be adapted to data: declare the normalization once under "
                     "the data set's `preprocessing:`, which feeds training, calibration and the board alike",
    "Rescaling": "declare the scaling under the data set's `preprocessing:`, so the board is fed the same inputs",
    "GRU": "converts to a while loop of ops TFLite Micro does not run: use LSTM (UNIDIRECTIONAL_SEQUENCE_LSTM)",
    "SimpleRNN": "converts to a while loop of ops TFLite Micro does not run: use LSTM",
    "RNN": "a generic recurrent wrapper converts to a while loop TFLite Micro does not run: use LSTM",
    "ConvLSTM1D": "not convertible to TFLite Micro ops: use Conv1D layers followed by an LSTM",
    "ConvLSTM2D": "not convertible to TFLite Micro ops: use Conv2D layers, Reshape, then an LSTM",
    "Bidirectional": "TFLite Micro has no bidirectional sequence LSTM: use one LSTM",
    "TimeDistributed": "wraps another layer, which Sequential layer lists do not nest: apply Conv1D/Dense to the "
                       "sequence directly (Dense acts on the last axis)",
    "Lambda": "runs Python code, which a suite may not name: use the layers listed here, or give a model file as "
              "`keras:` (Lambda layers are refused there too)",
    "Attention": "attention converts to BATCH_MATMUL and dynamic shapes TFLite Micro does not run: use LSTM or "
                 "convolutions",
    "AdditiveAttention": "attention is not run by TFLite Micro: use LSTM or convolutions",
    "MultiHeadAttention": "attention (batched matmuls, dynamic shapes) is not run by TFLite Micro: use LSTM or "
                          "convolutions",
    "Embedding": "takes integer token ids, while data sets give float features: not for tinyhil's data sets",
    "Conv3D": "TFLite Micro has no 3D convolution: use Conv2D",
    "MaxPooling3D": "TFLite Micro has no 3D pooling: use MaxPooling2D",
    "AveragePooling3D": "TFLite Micro has no 3D pooling: use AveragePooling2D",
    "Conv2DTranspose": "not on the verified list (TRANSPOSE_CONV): use UpSampling2D followed by Conv2D",
    "InputLayer": "the input shape comes from the data set: leave the input layer out",
    "Add": _MERGE, "Concatenate": _MERGE, "Multiply": _MERGE, "Average": _MERGE, "Subtract": _MERGE,
    "Maximum": _MERGE, "Minimum": _MERGE, "Dot": _MERGE,
})

# What `activation:` may name; each runs in int8 and int16 (swish as LOGISTIC + MUL, hard_sigmoid
# as MUL, MINIMUM and RELU). tf-keras has no "relu6" activation name: use a ReLU layer with
# max_value: 6.
ALLOWED_ACTIVATIONS: frozenset[str] = frozenset({"linear", "relu", "sigmoid", "tanh", "softmax", "swish",
                                                 "hard_sigmoid"})
_REFUSED_ACTIVATIONS = {
    "gelu": "TFLite Micro has no GELU kernel: use relu or swish",
    # Measured (TF 2.21): even with int8-only ops requested, the converter keeps ELU in float
    # between DEQUANTIZE and QUANTIZE, so an "int8" model would run a float op on the chip.
    "elu": "the converter keeps ELU in float inside an int8 model (DEQUANTIZE, ELU, QUANTIZE): use relu or "
           "LeakyReLU",
    "selu": "converts to ops TFLite Micro runs only in float: use elu or relu",
    "softplus": "TFLite Micro has no kernel for it in int8: use relu",
    "softsign": "TFLite Micro has no kernel for it in int8: use tanh",
    "mish": "converts to ops TFLite Micro runs only in float: use swish",
    "exponential": "TFLite Micro's EXP has no int8 kernel: use sigmoid or softmax",
    "relu6": "tf-keras has no activation of that name: add a `ReLU: {max_value: 6}` layer",
}

# Nested `{class_name: ..., config: {...}}` objects Keras takes for these arguments, by built-in name.
_NESTED_OBJECTS = {
    "_initializer": frozenset({"Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal",
                               "VarianceScaling", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform",
                               "LecunNormal", "LecunUniform", "Orthogonal", "Identity"}),
    "_regularizer": frozenset({"L1", "L2", "L1L2", "OrthogonalRegularizer"}),
    "_constraint": frozenset({"MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "RadialConstraint"}),
}
# Arguments that would make the model something other than a float Sequential model on the data
# set's input.
_REFUSED_ARGUMENTS = {
    "input_shape": "the input shape comes from the data set",
    "batch_input_shape": "the input shape comes from the data set",
    "batch_size": "the batch size is the suite's `training: batch_size`",
    "input_dim": "the input shape comes from the data set",
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def _plain_problem(value: Any, path: str, depth: int = 0) -> str | None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, (list, tuple)) and depth < 4:
        for index, item in enumerate(value):
            problem = _plain_problem(item, f"{path}[{index}]", depth + 1)
            if problem:
                return problem
        return None
    return (f"{path} must be a plain value (number, string, true/false, null or a list of them); "
            f"found {type(value).__name__} {value!r:.80}")


def _nested_problem(key: str, value: Mapping[str, Any]) -> str | None:
    allowed = next((names for suffix, names in _NESTED_OBJECTS.items() if key.endswith(suffix)), None)
    if allowed is None:
        return (f"argument '{key}' must be a plain value (number, string, true/false, null or a list); a mapping "
                f"is taken only for *_initializer, *_regularizer and *_constraint arguments")
    if set(value) - {"class_name", "config"} or not isinstance(value.get("class_name"), str):
        return (f"argument '{key}' must be a name such as 'he_normal', or {{class_name: <name>, config: {{...}}}} "
                f"with nothing else; found keys {sorted(map(str, value))}")
    if value["class_name"] not in allowed:
        return f"argument '{key}': class '{value['class_name']}' is not one of Keras's: {', '.join(sorted(allowed))}"
    config = value.get("config", {})
    if not isinstance(config, Mapping):
        return f"argument '{key}': config must be a mapping of plain values"
    for name, item in config.items():
        problem = _plain_problem(item, f"argument '{key}'.config.{name}")
        if problem:
            return problem
    return None


def layer_problem(spec: LayerSpec) -> str | None:
    """What is wrong with one layer of a suite's `layers:` (the caller adds file:line), or None."""
    name = spec.class_name
    if name in REFUSED_LAYERS:
        return f"not supported: {REFUSED_LAYERS[name]}"
    if name not in ALLOWED_LAYERS:
        return (f"'{name}' is not on the list of layers TFLite Micro runs after conversion: "
                f"{', '.join(sorted(ALLOWED_LAYERS))}")
    if not isinstance(spec.config, Mapping):
        return f"its arguments must be a mapping; found {type(spec.config).__name__}"
    for key, value in spec.config.items():
        if not isinstance(key, str) or not _IDENTIFIER.match(key):
            return f"argument name {key!r} is not an identifier"
        if key in _REFUSED_ARGUMENTS:
            return f"argument '{key}' is not taken: {_REFUSED_ARGUMENTS[key]}"
        if key == "activation":
            if value is None:
                continue
            if not isinstance(value, str):
                return f"activation must be a name, one of {', '.join(sorted(ALLOWED_ACTIVATIONS))}; found {value!r:.80}"
            if value in _REFUSED_ACTIVATIONS:
                return f"activation '{value}' is not supported: {_REFUSED_ACTIVATIONS[value]}"
            if value not in ALLOWED_ACTIVATIONS:
                return (f"activation '{value}' is not one TFLite Micro runs after conversion; use one of "
                        f"{', '.join(sorted(ALLOWED_ACTIVATIONS))}")
            continue
        if key == "name":
            if not isinstance(value, str) or not _IDENTIFIER.match(value):
                return f"name {value!r:.80} must be an identifier (letters, digits, _; at most 64)"
            continue
        if key == "dtype" and value not in (None, "float32"):
            return f"dtype {value!r:.40} is not taken: models are trained in float32 and quantized by the variants"
        if isinstance(value, Mapping):
            problem = _nested_problem(key, value)
        else:
            problem = _plain_problem(value, f"argument '{key}'")
        if problem:
            return problem
    return None


def _where(index: int, spec: LayerSpec) -> str:
    return f"layer {index} ({spec.class_name}{f', suite line {spec.line}' if spec.line else ''})"


def build_sequential(keras, specs: Sequence[LayerSpec], *, input_shape: Sequence[int], batch_size: int | None = None,
                     name: str = "model"):
    """A tf-keras Sequential model of `specs` on inputs of `input_shape`, through Keras's own
    deserialization. Every spec is checked again (a job file is not a suite)."""
    model = keras.Sequential(name=name)
    model.add(keras.Input(shape=tuple(int(d) for d in input_shape), batch_size=batch_size))
    for index, spec in enumerate(specs):
        problem = layer_problem(spec)
        if problem:
            raise SuiteError(f"{_where(index, spec)}: {problem}")
        try:
            layer = keras.layers.deserialize({"class_name": spec.class_name, "config": _jsonable(spec.config)})
        except Exception as error:  # Keras raises TypeError/ValueError for bad arguments
            raise SuiteError(f"{_where(index, spec)}: Keras cannot make it from {dict(spec.config)}: "
                             f"{_keras_message(error)}") from error
        if layer is None or not isinstance(layer, keras.layers.Layer):
            raise SuiteError(f"{_where(index, spec)}: Keras made no layer of this class")
        try:
            model.add(layer)
        except Exception as error:
            raise SuiteError(f"{_where(index, spec)} does not fit its input of shape "
                             f"{tuple(model.output_shape)}: {_keras_message(error)}") from error
    return model


def _keras_message(error: Exception) -> str:
    text = " ".join(str(error).split())
    # tf-keras wraps the cause in "Error when deserializing class ... Exception encountered: <cause>"
    marker = "Exception encountered:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    return text[:300]
