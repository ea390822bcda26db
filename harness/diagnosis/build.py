"""Failures before the first inference: a model the converter refuses (an op TFLite has no
builtin for), a model the firmware cannot run (an op TFLite Micro has no kernel for), and a
tensor arena too small for the model."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from ..firmware import MemoryBudget, arena_size_for
from ..layers import REFUSED_LAYERS
from ..tflite_model import ModelInfo
from .base import Diagnosis, nbytes

# --- arena ---------------------------------------------------------------------------------------

# The texts an arena failure arrives with: the board's boot error (ARENA_ALLOCATION_FAILED, from
# firmware/components/tinyhil/src/model_runner.cpp or the virtual board), host TFLM's
# ModelTooLargeError (harness/tflm.py) and the firmware planner's refusal (harness/firmware.py).
_ARENA_FAILURE = re.compile(r"ARENA_ALLOCATION_FAILED|AllocateTensors\(\) (?:failed|cannot run)|"
                            r"for the tensor arena failed|tensor arena of \d+ bytes does not fit|"
                            r"MicroAllocator::Create failed|MicroResourceVariables::Create")
_ARENA_GIVEN = re.compile(r"(\d+)-byte arena|heap_caps_malloc\((\d+)\)|tensor arena of (\d+) bytes")


def arena_too_small(error_text: str, *, arena_needed: int | None, arena_given: int | None = None,
                    arena_in_psram: bool | None = None, memory: MemoryBudget | None = None) -> Diagnosis | None:
    """The board (or host TFLM) could not allocate the tensor arena. `arena_needed` is host
    TFLM's allocation for the model (reference.model_io, HostInterpreter.arena_used); the bytes
    given are read from the error when not passed. Says where the arena fits: SRAM, PSRAM, or
    nowhere on this board. None when the error is not an arena failure."""
    if not _ARENA_FAILURE.search(error_text or ""):
        return None
    memory = memory or MemoryBudget()
    if arena_given is None:
        match = _ARENA_GIVEN.search(error_text)
        arena_given = int(next(group for group in match.groups() if group)) if match else None
    facts = [f"the board: {' '.join(error_text.split())[:300]}"]
    given = f"; the firmware gave {nbytes(arena_given)}" if arena_given is not None else ""
    where = "" if arena_in_psram is None else f" in {'PSRAM' if arena_in_psram else 'internal SRAM'}"
    if arena_needed is None:
        facts.append(f"the arena needed is unknown (host TFLM could not allocate the model){given}{where}")
        return Diagnosis("arena", "The tensor arena is too small for the model", tuple(facts),
                         "let tinyhil size the arena from host TFLM's allocation (the default), or give the model "
                         "fewer or smaller activations")
    wanted = arena_size_for(arena_needed)
    facts.append(f"TFLite Micro needs {nbytes(arena_needed)} for this model (host TFLM's allocation; "
                 f"{nbytes(wanted)} with the firmware's margin for the chip's allocator){given}{where}")
    sram, psram = memory.sram_arena_budget, memory.psram_bytes
    if wanted <= sram:
        fits = f"it fits internal SRAM ({nbytes(sram)} left for the arena)"
        suggestion = f"give the arena {wanted:,} bytes: `board.arena: auto` sizes and places it so (SRAM here)"
    elif wanted <= psram:
        fits = (f"it does not fit internal SRAM ({nbytes(sram)} left for the arena) but fits PSRAM "
                f"({nbytes(psram)})")
        suggestion = (f"put the arena in PSRAM (`board.arena: auto` or `psram`) with {wanted:,} bytes; PSRAM is "
                      f"slower, so a model with smaller activations is the faster fix")
    else:
        fits = f"it fits neither internal SRAM ({nbytes(sram)} for the arena) nor PSRAM ({nbytes(psram)})"
        suggestion = ("make the activations smaller: a smaller input, fewer channels in the early layers, or "
                      "striding/pooling sooner; this board cannot hold them")
    facts.append(fits)
    title = ("The tensor arena is too small for the model" if arena_given is None or arena_given < arena_needed
             else "The tensor arena could not be allocated where it was placed")
    return Diagnosis("arena", title, tuple(facts), suggestion)


# --- unsupported ops -----------------------------------------------------------------------------

# TensorFlow ops the converter leaves out of builtins-only models, with the Keras layer that
# usually makes them and what TFLite Micro runs instead. Checked against TF 2.21 where a test
# converts the layer (tests/test_diagnosis.py: ResizeBicubic).
TF_OP_ALTERNATIVES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "ResizeBicubic": ("UpSampling2D or Resizing with interpolation 'bicubic'",
                      "interpolation 'nearest' (RESIZE_NEAREST_NEIGHBOR) or 'bilinear' (RESIZE_BILINEAR), both "
                      "run by TFLite Micro"),
    "ResizeArea": ("Resizing with interpolation 'area'", "interpolation 'nearest' or 'bilinear'"),
    "Erf": ("activation 'gelu' (exact)", "relu or swish"),
    "Gelu": ("activation 'gelu'", "relu or swish"),
    "Bucketize": ("Discretization", "bucket the values in the preprocessing, before the model"),
    "StringToHashBucketFast": ("Hashing / StringLookup", "turn strings into numbers before the model"),
    "TensorListReserve": ("GRU or SimpleRNN (a while loop over a tensor list)", "LSTM (UNIDIRECTIONAL_SEQUENCE_LSTM)"),
    "TensorListFromTensor": ("GRU or SimpleRNN (a while loop over a tensor list)", "LSTM (UNIDIRECTIONAL_SEQUENCE_LSTM)"),
    "RandomUniform": ("a random augmentation layer (RandomFlip, RandomRotation, ...)",
                      "augment the training data instead, or remove the layer before export"),
    "StatelessRandomUniformV2": ("a random augmentation layer (RandomFlip, RandomRotation, ...)",
                                 "augment the training data instead, or remove the layer before export"),
    "Einsum": ("EinsumDense or attention", "Dense layers"),
})

# TFLite builtins that esp-tflite-micro 1.3.8 has no kernel for (harness/firmware.py:
# RESOLVER_METHODS lists what it has), with the Keras layer that makes them and the alternative.
TFLM_OP_ALTERNATIVES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "BUCKETIZE": ("Keras Discretization", "bucket the values in the preprocessing, before the model"),
    "GELU": ("activation 'gelu'", "relu or swish"),
    "HASHTABLE_LOOKUP": ("StringLookup / IntegerLookup", "map the values to indices before the model"),
    "RANDOM_UNIFORM": ("a random augmentation layer", "remove augmentation layers before export"),
    "RANDOM_STANDARD_NORMAL": ("GaussianNoise or a random layer kept in the graph",
                               "remove training-only random layers before export"),
    "RFFT2D": ("tf.signal.stft / rfft inside the model", "compute the spectrogram or FFT in the preprocessing"),
    "COMPLEX_ABS": ("tf.signal.stft inside the model", "compute the spectrogram in the preprocessing"),
    "ONE_HOT": ("CategoryEncoding / tf.one_hot", "encode in the preprocessing"),
    "REDUCE_PROD": ("a product over an axis", "a sum of logarithms, or remove it"),
    "UNIDIRECTIONAL_SEQUENCE_RNN": ("SimpleRNN", "LSTM (UNIDIRECTIONAL_SEQUENCE_LSTM)"),
    "BIDIRECTIONAL_SEQUENCE_LSTM": ("Bidirectional(LSTM)", "one LSTM"),
    "CONV_3D": ("Conv3D", "Conv2D"),
})

_TF_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op|"
                    r"failed to legalize operation 'tf\.(\w+)'|TF Select ops: ([\w, ]+)")
# loc(... fused["ResizeBicubic:", callsite("sequential_1/resizing/resize/ResizeBicubic@__inference_...
_LOCATION = re.compile(r'fused\["(\w+):", (?:callsite\()?"([^"@]+)@')
# harness/tflm.py, the virtual board: "TFLite Micro has no kernel for op GELU";
# the firmware: "op GELU (subgraph 0, operator 1) is not registered in the firmware's op resolver";
# harness/firmware.py: "TFLite Micro (esp-tflite-micro 1.3.8) has no kernel for op(s) GELU, ...";
# harness/tflm.py for int16x8: "op 1 (REDUCE_MAX) has no int16 kernel in esp-tflite-micro 1.3.8".
_NO_KERNEL = re.compile(r"has no kernel for op(?:\(s\))? ([A-Z0-9_]+(?:, [A-Z0-9_]+)*)")
_NOT_REGISTERED = re.compile(r"op ([A-Za-z0-9_]+) \(subgraph (\d+), operator (\d+)\) is not registered")
_NO_INT16 = re.compile(r"op (\d+) \(([A-Z0-9_]+)\) has no int16 kernel")


def keras_layers(model_path: Path) -> dict[str, str]:
    """Layer name -> class name of a saved .keras model, read from its config.json (no TensorFlow):
    what `unsupported_op_at_conversion` maps the converter's locations onto. Empty when the file
    is not a .keras archive."""
    try:
        with zipfile.ZipFile(model_path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return {}
    found: dict[str, str] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            if "class_name" in node and isinstance(node.get("config"), dict) and "name" in node["config"]:
                found.setdefault(str(node["config"]["name"]), str(node["class_name"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(config.get("config", {}))
    return found


def unsupported_op_at_conversion(error_text: str, keras_layer_names: Mapping[str, str] | Sequence[str] = ()
                                 ) -> Diagnosis | None:
    """The TFLite converter refused an op: which TensorFlow op, which Keras layer made it (from the
    location the converter's log carries), and what to use instead where it is known. Pass the
    converter's whole output (a worker's log): the locations are on its stderr, not in the
    exception. `keras_layer_names`: the model's layer names (name -> class, or a list of names)."""
    text = error_text or ""
    ops: list[str] = []
    for match in _TF_OP.finditer(text):
        for group in match.groups():
            for name in (group or "").split(","):
                if name.strip() and name.strip() not in ops:
                    ops.append(name.strip())
    if not ops:
        return None
    classes = dict(keras_layer_names) if isinstance(keras_layer_names, Mapping) else \
        {name: "" for name in keras_layer_names}
    layers: dict[str, str] = {}
    for op_name, path in _LOCATION.findall(text):
        if op_name in ops and op_name not in layers:
            segments = path.split("/")
            named = [segment for segment in segments[1:] if segment in classes]
            layers[op_name] = named[0] if named else (segments[1] if len(segments) > 2 else "")
    facts, alternatives = [], []
    for op_name in ops:
        layer = layers.get(op_name, "")
        layer_class = classes.get(layer, "")
        made_by = (f"layer '{layer}'{f' ({layer_class})' if layer_class else ''}" if layer
                   else "a layer the converter's log does not locate")
        facts.append(f"TensorFlow op {op_name}, made by {made_by}, has no TFLite builtin (the converter asks for "
                     f"TF Select, which TFLite Micro does not have)")
        if layer_class in REFUSED_LAYERS:
            alternatives.append(f"{layer_class}: {REFUSED_LAYERS[layer_class]}")
        elif op_name in TF_OP_ALTERNATIVES:
            usual, instead = TF_OP_ALTERNATIVES[op_name]
            alternatives.append(f"{op_name} ({usual}): use {instead}")
    subject = next((f"layer '{layers[op]}'" for op in ops if layers.get(op)), f"op {ops[0]}")
    suggestion = "; ".join(alternatives) if alternatives else \
        "replace that layer with one on docs/suites.md's list of layers TFLite Micro runs"
    return Diagnosis("unsupported-op", f"The model does not convert: {subject} becomes an op TFLite has no "
                     f"builtin for", tuple(facts), suggestion)


def unsupported_op_at_build(error_text: str, model: ModelInfo | None = None) -> Diagnosis | None:
    """The firmware (or host TFLM) has no kernel for an op of the model: the TFLM op name, the
    operator index (from the board's text, else looked up in `model`), and the alternative where
    known. None when the error is not about a missing kernel."""
    text = error_text or ""
    found: list[tuple[str, list[int]]] = []
    registered = _NOT_REGISTERED.search(text)
    int16 = _NO_INT16.search(text)
    if registered:
        found.append((registered.group(1), [int(registered.group(3))]))
    elif int16:
        found.append((int16.group(2), [int(int16.group(1))]))
    else:
        match = _NO_KERNEL.search(text)
        if not match:
            return None
        for name in match.group(1).split(", "):
            indices = [op.index for op in model.ops if op.name == name] if model is not None else []
            found.append((name, indices))
    facts, alternatives = [], []
    for name, indices in found:
        where = (f"operator {', '.join(map(str, indices))} of the main graph" if indices else "an operator")
        if int16:
            facts.append(f"{where} is {name}, which has no int16 kernel in esp-tflite-micro 1.3.8")
            alternatives.append("quantize this model as int8")
            continue
        facts.append(f"{where} is {name}, which TFLite Micro (esp-tflite-micro 1.3.8, the firmware's) has no "
                     f"kernel for")
        if name in TFLM_OP_ALTERNATIVES:
            usual, instead = TFLM_OP_ALTERNATIVES[name]
            alternatives.append(f"{name} comes from {usual}: {instead}")
    facts.append(f"the error: {' '.join(text.split())[:240]}")
    suggestion = "; ".join(alternatives) if alternatives else \
        "replace the layer that becomes this op with one on docs/suites.md's list of layers TFLite Micro runs"
    names = ", ".join(name for name, _ in found)
    return Diagnosis("unsupported-op", f"The firmware cannot run op {names}", tuple(facts), suggestion)
