"""A suite's models: where each comes from (a zoo architecture, Keras layers, the user's Keras
model or .tflite file), the data set it is trained and judged on with its declared preprocessing,
and the quantization variants built from it."""

from __future__ import annotations

import itertools
import types
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from ..datasets import DATASETS
from ..datasets.preprocessing import PREPROCESSING_METHODS, Preprocessing
from ..errors import SuiteError, TinyhilError
from ..layers import LayerSpec, layer_problem
from ..quantize import CALIBRATION_SOURCES, QUANTIZATIONS
from ..tflite_model import inspect_model, read_model_file
from ..zoo import ARCHITECTURES
from .checks import (
    _check_esp_nn_version,
    _check_name,
    _Checker,
    _Map,
    _named_values,
    _Seq,
    _suite_path,
    _thresholds,
    _training,
)
from .spec import (
    INTEGER_QUANTIZATIONS,
    MATRIX_FIELDS,
    DatasetSpec,
    ModelSpec,
    Thresholds,
    Variant,
)

# Where a model comes from: exactly one of these per model.
MODEL_SOURCES = ("architecture", "layers", "keras", "tflite")
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
DEFAULT_CALIBRATION_SAMPLES = 100


def _tflite_file(check: _Checker, raw: str, what: str, node: _Map) -> Path:
    path = _suite_path(check, raw, what, node, "tflite")
    where = check.where(node, "tflite")
    resolved = "" if raw == str(path) else f" (resolved to {path})"
    try:
        if not path.exists():
            raise SuiteError(f"{what}: tflite file {raw} not found{resolved}", where=where)
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise SuiteError(f"{what}: tflite file {raw} is {kind}{resolved}; expected a .tflite model file",
                             where=where)
        inspect_model(read_model_file(path))
    except SuiteError:
        raise
    except OSError as error:
        raise SuiteError(f"{what}: cannot read tflite file {raw}{resolved}: {error.strerror or error}",
                         where=where) from None
    except TinyhilError as error:
        raise SuiteError(f"{what}: tflite file {raw}{resolved} is {error.message}", where=where,
                         details=error.details) from None
    return path


def _keras_file(check: _Checker, raw: str, what: str, node: _Map) -> Path:
    """A .keras or .h5 file, or a SavedModel directory; its content is read by the model stage
    (in a worker: TensorFlow stays out of suite loading)."""
    path = _suite_path(check, raw, what, node, "keras")
    where = check.where(node, "keras")
    resolved = "" if raw == str(path) else f" (resolved to {path})"
    if not path.exists():
        raise SuiteError(f"{what}: keras model {raw} not found{resolved}", where=where)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise SuiteError(f"{what}: keras model {raw} is a directory without saved_model.pb{resolved}; expected "
                             f"a .keras or .h5 file, or a SavedModel directory", where=where)
    elif path.suffix.lower() not in KERAS_SUFFIXES:
        raise SuiteError(f"{what}: keras model {raw} has the suffix '{path.suffix}'; expected "
                         f"{', '.join(KERAS_SUFFIXES)} or a SavedModel directory", where=where)
    return path


def _preprocessing(check: _Checker, node: Any, what: str, parent: _Map, key: str = "preprocessing") -> Preprocessing:
    if node is None:
        return Preprocessing()
    node = check.mapping(node, what, parent, key)
    check.keys(node, what, ("method", "scale", "offset", "mean", "std", "from_train"), required=("method",))
    method = check.value(node, "method", str, what)
    if method not in PREPROCESSING_METHODS:
        raise SuiteError(f"{what}.method must be one of {', '.join(PREPROCESSING_METHODS)}, found '{method}'",
                         where=check.where(node, "method"))
    values: dict[str, Any] = {"method": method}
    for key in ("scale", "offset"):
        if key in node:
            values[key] = float(check.value(node, key, (int, float), what))
    for key in ("mean", "std"):
        if key in node:
            raw = node[key]
            items = list(raw) if isinstance(raw, _Seq) else [raw]
            if not items or any(isinstance(item, bool) or not isinstance(item, (int, float)) for item in items):
                raise SuiteError(f"{what}.{key} must be a number or a list of numbers (one per channel), found "
                                 f"{raw!r}", where=check.where(node, key))
            values[key] = tuple(float(item) for item in items)
    if "from_train" in node:
        values["from_train"] = check.value(node, "from_train", bool, what)
    try:
        return Preprocessing(**values)
    except ValueError as error:
        raise SuiteError(f"{what}: {error}", where=check.where(node)) from None


def _dataset(check: _Checker, node: Any, what: str, parent: Any, profile: Mapping[str, Any]) -> DatasetSpec:
    node = check.mapping(node, what, parent, "dataset")
    check.keys(node, what, ("name", "options", "preprocessing", "device_preprocessing"), required=("name",))
    name = check.value(node, "name", str, what)
    loader = DATASETS.get(name)
    if loader is None:
        raise SuiteError(f"unknown data set '{name}'; known: {', '.join(sorted(DATASETS))}",
                         where=check.where(node, "name"))
    options = check.mapping(node.get("options", _Map()), f"{what}.options", node, "options")
    merged = _named_values(check, options, f"{what}.options", {o.name: o.type for o in loader.options},
                           f"data set '{name}'", "option")
    if merged.get("path"):
        # User data is read (and fingerprinted for the cache) whole: it must be the suite's
        # project's or a place the user named absolutely, never one a relative path wandered into.
        location = _suite_path(check, merged["path"], f"{what}.options", options, "path")
        if not location.exists():
            raise SuiteError(f"{what}.options: path {merged['path']} not found (resolved to {location})",
                             where=check.where(options, "path"))
    if "samples_per_class" in profile:
        # 0 (or no value) means "all the data", which the quick profile's cap must still bound.
        cap = profile["samples_per_class"]
        current = merged.get("samples_per_class")
        merged["samples_per_class"] = min(cap, current) if current else cap
    preprocessing = _preprocessing(check, node.get("preprocessing"), f"{what}.preprocessing", node)
    device = (_preprocessing(check, node["device_preprocessing"], f"{what}.device_preprocessing", node,
                             "device_preprocessing")
              if node.get("device_preprocessing") is not None else None)
    return DatasetSpec(name, types.MappingProxyType(merged), check.path.parent, preprocessing, device)


def _layers(check: _Checker, node: Any, what: str, parent: _Map) -> tuple[LayerSpec, ...]:
    """`layers:` is a list of one-key mappings, `- Conv2D: {filters: 8, kernel_size: 3}`, each a
    Keras layer class and its arguments."""
    if not isinstance(node, _Seq) or not node:
        raise SuiteError(f"{what}.layers must be a non-empty list of Keras layers, e.g. `- Dense: {{units: 3}}`",
                         where=check.where(parent, "layers"))
    specs = []
    for index, (item, line) in enumerate(zip(node, node.item_lines)):
        where = f"{check.path}:{line}"
        if not isinstance(item, _Map) or len(item) != 1:
            raise SuiteError(f"{what}.layers[{index}] must be one Keras layer class with its arguments, e.g. "
                             f"`- Conv2D: {{filters: 8, kernel_size: 3}}`; found {item!r}", where=where)
        (class_name, config), = item.items()
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise SuiteError(f"{what}.layers[{index}] {class_name}: its arguments must be a mapping, found "
                             f"{type(config).__name__} {config!r}", where=where)
        spec = LayerSpec(class_name, types.MappingProxyType(_plain(config)), line)
        problem = layer_problem(spec)
        if problem:
            raise SuiteError(f"{what}.layers[{index}] {class_name}: {problem}", where=where)
        specs.append(spec)
    return tuple(specs)


def _plain(value: Any) -> Any:
    """YAML values without the line-keeping containers, as Keras's deserialization gets them."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


_VARIANT_KEYS = ("name", "quantization", "calibration_samples", "calibration_source", "per_channel", "qat",
                 "thresholds", "esp_nn_version")


def _default_variant_name(quantization: str, per_channel: bool, qat: bool) -> str:
    return quantization + ("-per-tensor" if not per_channel else "") + ("-qat" if qat else "")


def _variants(check: _Checker, node: Any, what: str, parent: Any) -> tuple[Variant, ...]:
    if node is None:
        return (Variant("int8", "int8", DEFAULT_CALIBRATION_SAMPLES), Variant("float32", "float32"))
    if not isinstance(node, _Seq) or not node:
        raise SuiteError(f"{what} must be a non-empty list", where=check.where(parent, "variants"))
    variants: list[Variant] = []
    for index, item in enumerate(node):
        item_what = f"{what}[{index}]"
        item = check.mapping(item, item_what, parent, "variants")
        check.keys(item, item_what, _VARIANT_KEYS, required=("quantization",))
        overridden = _thresholds(check, item.get("thresholds"), f"{item_what}.thresholds", Thresholds(), item,
                                 "thresholds")
        threshold_overrides = {key: getattr(overridden, key) for key in item.get("thresholds") or {}}
        quantization = check.value(item, "quantization", str, item_what)
        if quantization not in QUANTIZATIONS:
            raise SuiteError(f"{item_what}.quantization must be one of {', '.join(QUANTIZATIONS)}, found "
                             f"'{quantization}'", where=check.where(item, "quantization"))
        integer = quantization in INTEGER_QUANTIZATIONS
        for key in ("calibration_samples", "calibration_source"):
            if key in item and not integer:
                raise SuiteError(f"{item_what}: {key} applies to integer quantization ({', '.join(INTEGER_QUANTIZATIONS)}), "
                                 f"not to {quantization}", where=check.where(item, key))
        per_channel = check.value(item, "per_channel", bool, item_what, default=True)
        qat = check.value(item, "qat", bool, item_what, default=False)
        for key in ("per_channel", "qat"):
            if key in item and quantization != "int8":
                raise SuiteError(f"{item_what}: {key} applies to int8 quantization, not to {quantization}",
                                 where=check.where(item, key))
        if qat and "calibration_source" in item:
            raise SuiteError(f"{item_what}: a quantization-aware trained model takes its ranges from training; "
                             f"calibration_source does not apply", where=check.where(item, "calibration_source"))
        base_name = _check_name(check.value(item, "name", str, item_what,
                                            default=_default_variant_name(quantization, per_channel, qat)),
                                f"{item_what}.name", check.where(item, "name"))
        axes: list[list[tuple[str, Any]]] = []
        for matrix_field in MATRIX_FIELDS:
            if matrix_field not in item:
                continue
            raw = item[matrix_field]
            values = list(raw) if isinstance(raw, _Seq) else [raw]
            if not values:
                raise SuiteError(f"{item_what}.{matrix_field} must not be an empty list",
                                 where=check.where(item, matrix_field))
            for value in values:
                if matrix_field == "esp_nn_version":
                    _check_esp_nn_version(check, value, f"{item_what}.esp_nn_version", item)
                elif matrix_field == "calibration_source":
                    if value not in CALIBRATION_SOURCES:
                        raise SuiteError(f"{item_what}.calibration_source must be {' or '.join(CALIBRATION_SOURCES)} "
                                         f"(or a list of them), found {value!r}",
                                         where=check.where(item, matrix_field))
                elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise SuiteError(f"{item_what}.{matrix_field} must be a positive int or a list of them, "
                                     f"found {value!r}", where=check.where(item, matrix_field))
            axes.append([(matrix_field, value) for value in values])
        if integer and "calibration_samples" not in item:
            axes.append([("calibration_samples", DEFAULT_CALIBRATION_SAMPLES)])
        is_matrix = any(isinstance(item.get(f), _Seq) for f in MATRIX_FIELDS)
        for combination in itertools.product(*axes) if axes else [()]:
            fields = dict(combination)
            source = fields.get("calibration_source", "train" if integer and not qat else None)
            if is_matrix:
                name = base_name + "".join(_SUFFIXES[key].format(value) for key, value in combination)
            else:
                # A single non-default source still tells the row from its siblings.
                name = base_name + ("-random" if source == "random" and "name" not in item else "")
            variants.append(Variant(name, quantization, fields.get("calibration_samples"), item.line,
                                    types.MappingProxyType(threshold_overrides), fields.get("esp_nn_version"),
                                    source, per_channel, qat))
    seen: dict[str, int] = {}
    for variant in variants:
        if variant.name in seen:
            raise SuiteError(f"{what}: two variants are named '{variant.name}' (give one a `name:`)",
                             where=f"{check.path}:{variant.line}")
        seen[variant.name] = variant.line
    return tuple(variants)


_SUFFIXES = {"calibration_samples": "-cal{}", "calibration_source": "-{}", "esp_nn_version": "-esp-nn{}"}


_MODEL_KEYS = ("name", *MODEL_SOURCES, "params", "train", "dataset", "training", "variants", "eval_samples", "arena_kb",
               "thresholds")


def _model(check: _Checker, node: Any, index: int, parent: Any, defaults: Mapping[str, Any],
           profile: Mapping[str, Any]) -> ModelSpec:
    what = f"models[{index}]"
    node = check.mapping(node, what, parent, "models")
    if isinstance(node.get("name"), str):
        what = f"model '{node['name']}'"
    check.keys(node, what, _MODEL_KEYS, required=("name",))
    name = _check_name(check.value(node, "name", str, what), "model name", check.where(node, "name"))
    given = [key for key in MODEL_SOURCES if key in node]
    if len(given) != 1:
        found = f"found {' and '.join(given)}" if given else "found none"
        raise SuiteError(f"{what} needs exactly one of 'architecture' (a zoo model to train), 'layers' (Keras layers "
                         f"to train), 'keras' (your Keras model) or 'tflite' (a model file); {found}",
                         where=check.where(node, given[1] if len(given) > 1 else None))
    kind = given[0]
    for key, owner in (("params", "architecture"), ("train", "keras")):
        if key in node and kind != owner:
            raise SuiteError(f"{what}: '{key}' applies to '{owner}' models, not to a '{kind}' model",
                             where=check.where(node, key))
    if kind == "tflite" and "training" in node:
        raise SuiteError(f"{what}: 'training' applies to models trained here, not to a tflite model",
                         where=check.where(node, "training"))
    fine_tune = check.value(node, "train", bool, what, default=False)
    if kind == "keras" and "training" in node and not fine_tune:
        raise SuiteError(f"{what}: 'training' settings apply to a keras model only with `train: true` (fine-tuning "
                         f"it); without it the model is used as it is", where=check.where(node, "training"))
    if kind != "tflite" and "dataset" not in node:
        need = {"architecture": "a zoo model needs data to train on", "layers": "a layers model needs data to train on",
                "keras": "a keras model's float accuracy is measured on it and its integer variants calibrate on it"}
        raise SuiteError(f"{what} is missing field 'dataset' ({need[kind]})", where=check.where(node))

    architecture = check.value(node, "architecture", str, what)
    params: dict[str, Any] = {}
    layers: tuple[LayerSpec, ...] = ()
    tflite = keras = None
    if kind == "architecture":
        arch = ARCHITECTURES.get(architecture)
        if arch is None:
            raise SuiteError(f"unknown architecture '{architecture}'; the zoo has: {', '.join(sorted(ARCHITECTURES))}",
                             where=check.where(node, "architecture"))
        raw_params = check.mapping(node.get("params", _Map()), f"{what}.params", node, "params")
        params = _named_values(check, raw_params, f"{what}.params", {p.name: p.type for p in arch.params},
                               f"architecture '{architecture}'", "parameter")
    elif kind == "layers":
        layers = _layers(check, node["layers"], what, node)
    elif kind == "keras":
        keras = _keras_file(check, check.value(node, "keras", str, what), what, node)
    else:
        tflite = _tflite_file(check, check.value(node, "tflite", str, what), what, node)
    dataset = _dataset(check, node["dataset"], f"{what}.dataset", node, profile) if "dataset" in node else None
    training = _training(check, node.get("training"), f"{what}.training", defaults["training"], node, "training")
    if "epochs" in profile:
        training = replace(training, epochs=min(training.epochs, profile["epochs"]))
    if tflite is not None:
        if "variants" in node:
            raise SuiteError(f"{what}: a tflite model runs as it is; variants apply to models built here (architecture, "
                             f"layers or keras)", where=check.where(node, "variants"))
        variants: tuple[Variant, ...] = (Variant("as-is", "as-is", None, node.line),)
    else:
        variants = _variants(check, node.get("variants"), f"{what}.variants", node)
    eval_samples = check.value(node, "eval_samples", int, what, default=defaults["eval_samples"], minimum=1)
    if "eval_samples" in profile:
        eval_samples = min(eval_samples, profile["eval_samples"])
    thresholds = _thresholds(check, node.get("thresholds"), f"{what}.thresholds", defaults["thresholds"], node,
                             "thresholds")
    thresholds = replace(thresholds, **profile.get("thresholds", {}))
    arena_kb = check.value(node, "arena_kb", (int, float), what, default=None, minimum=1)
    return ModelSpec(name, architecture, types.MappingProxyType(params), tflite, dataset, training, variants,
                     eval_samples, thresholds, node.line, layers, keras, fine_tune,
                     round(arena_kb * 1024) if arena_kb is not None else None)
