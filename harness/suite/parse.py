"""Suite files -> `Suite`: the root, the board, thresholds and training, models and variants."""

from __future__ import annotations

import itertools
import types
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..board.costmodel import load_calibration
from ..board.faults import FaultPlan
from ..board.virtual import ENGINES, VirtualBoardOptions
from ..datasets import DATASETS
from ..errors import SuiteError, TinyhilError
from ..firmware import ARENA_PLACEMENTS, LinkSettings
from ..sources import DEFAULT_ESP_NN_VERSION, ESP_NN_VERSIONS
from ..tflite_model import inspect_model, read_model_file
from ..zoo import ARCHITECTURES
from .checks import (
    _check_name,
    _Checker,
    _LineLoader,
    _Map,
    _named_values,
    _Seq,
    _suite_path,
)
from .spec import (
    MATRIX_FIELDS,
    PROFILES,
    QUANTIZATIONS,
    BoardSettings,
    DatasetSpec,
    LatencyWindows,
    ModelSpec,
    Suite,
    Thresholds,
    Training,
    Variant,
)


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


def _calibration_file(check: _Checker, raw: str, node: _Map, esp_nn: bool, esp_nn_version: str) -> Path:
    """board.calibration: a file `tinyhil calibrate` wrote, read and checked now, also against the
    board's build (a variant's own esp_nn_version is checked when its case runs)."""
    path = _suite_path(check, raw, "board", node, "calibration")
    try:
        mismatch = load_calibration(path).mismatch(esp_nn, esp_nn_version)
    except TinyhilError as error:
        raise SuiteError(f"board.calibration {raw}: {error.message}", where=check.where(node, "calibration"),
                         details=error.details) from None
    if mismatch:
        raise SuiteError(f"board.calibration {raw}: {mismatch}", where=check.where(node, "calibration"))
    return path


_THRESHOLD_TYPES = {
    "max_latency_ms": (int, float), "max_model_bytes": int, "max_arena_bytes": int,
    "min_float_accuracy": (int, float), "min_int8_accuracy": (int, float),
    "min_output_agreement": (int, float), "agreement_tolerance_lsb": int,
    "max_latency_increase": (int, float), "max_model_bytes_increase": int, "max_arena_bytes_increase": int,
    "max_accuracy_drop": (int, float), "max_agreement_drop": (int, float),
}
_TRAINING_TYPES = {"epochs": int, "batch_size": int, "learning_rate": (int, float), "seed": int}
_PROFILE_KEYS = ("epochs", "samples_per_class", "eval_samples", "thresholds", "latency")


def _latency(check: _Checker, node: Any, what: str, base: LatencyWindows, parent: Any, key: str) -> LatencyWindows:
    if node is None:
        return base
    node = check.mapping(node, what, parent, key)
    check.keys(node, what, ("windows", "inferences_per_window"))
    return replace(base, **{name: check.value(node, name, int, what, minimum=1)
                            for name in ("windows", "inferences_per_window") if name in node})


def _thresholds(check: _Checker, node: Any, what: str, base: Thresholds, parent: Any, key: str) -> Thresholds:
    if node is None:
        return base
    node = check.mapping(node, what, parent, key)
    check.keys(node, what, tuple(_THRESHOLD_TYPES))
    # null switches an inherited threshold off (e.g. accuracy limits in the quick profile).
    values = {name: None if node[name] is None else check.value(node, name, types_, what, minimum=0)
              for name, types_ in _THRESHOLD_TYPES.items() if name in node}
    if values.get("agreement_tolerance_lsb", 0) is None:
        raise SuiteError(f"{what}.agreement_tolerance_lsb cannot be null", where=check.where(node, "agreement_tolerance_lsb"))
    return replace(base, **values)


def _training(check: _Checker, node: Any, what: str, base: Training, parent: Any, key: str) -> Training:
    if node is None:
        return base
    node = check.mapping(node, what, parent, key)
    check.keys(node, what, tuple(_TRAINING_TYPES))
    values = {name: check.value(node, name, types_, what, minimum=0) for name, types_ in _TRAINING_TYPES.items()
              if name in node}
    return replace(base, **values)


_FAULT_TYPES = {"seed": int, "start_after": int, "drop_rate": (int, float), "flip_rate": (int, float), "stall_rate": (int, float),
                "stall_s": (int, float), "reset_at": list, "disappear_at": list, "disappear_s": (int, float)}


def _board(check: _Checker, node: Any, root: Any) -> BoardSettings:
    node = check.mapping(node, "board", root, "board")
    check.keys(node, "board", ("cpu_mhz", "esp_nn", "esp_nn_version", "arena", "link", "emulate_link", "realtime",
                               "faults", "engine", "calibration"))
    cpu_mhz = check.value(node, "cpu_mhz", int, "board", default=240)
    if cpu_mhz not in (80, 160, 240):
        raise SuiteError(f"board.cpu_mhz must be 80, 160 or 240 (the ESP32-S3's clock settings), found {cpu_mhz}",
                         where=check.where(node, "cpu_mhz"))
    arena = check.value(node, "arena", str, "board", default="auto")
    if arena not in ARENA_PLACEMENTS:
        raise SuiteError(f"board.arena must be one of {', '.join(ARENA_PLACEMENTS)}, found '{arena}'",
                         where=check.where(node, "arena"))
    link = LinkSettings()
    if "link" in node:
        link_node = check.mapping(node["link"], "board.link", node, "link")
        check.keys(link_node, "board.link", ("kind", "baud"))
        kind = check.value(link_node, "kind", str, "board.link", default="usb")
        if kind not in ("usb", "uart"):
            raise SuiteError(f"board.link.kind must be usb or uart, found '{kind}'", where=check.where(link_node, "kind"))
        link = LinkSettings(kind, check.value(link_node, "baud", int, "board.link", default=115200, minimum=300))
    faults = FaultPlan()
    if "faults" in node:
        fault_node = check.mapping(node["faults"], "board.faults", node, "faults")
        values = _named_values(check, fault_node, "board.faults", _FAULT_TYPES, "board.faults", "setting")
        try:
            faults = FaultPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except (ValueError, TypeError) as error:
            raise SuiteError(f"board.faults: {error}", where=check.where(fault_node)) from None
    engine = check.value(node, "engine", str, "board", default="auto")
    if engine not in ENGINES:
        raise SuiteError(f"board.engine must be one of {', '.join(ENGINES)}, found '{engine}'",
                         where=check.where(node, "engine"))
    esp_nn = check.value(node, "esp_nn", bool, "board", default=True)
    esp_nn_version = node.get("esp_nn_version", DEFAULT_ESP_NN_VERSION)
    _check_esp_nn_version(check, esp_nn_version, "board.esp_nn_version", node)
    calibration = ""
    if "calibration" in node:
        calibration = str(_calibration_file(check, check.value(node, "calibration", str, "board"), node,
                                            esp_nn, esp_nn_version))
    options = VirtualBoardOptions(emulate_link=check.value(node, "emulate_link", bool, "board", default=True),
                                  realtime=check.value(node, "realtime", bool, "board", default=False), faults=faults,
                                  engine=engine, calibration=calibration)
    return BoardSettings(cpu_mhz, esp_nn, arena, esp_nn_version, link, options)


def _check_esp_nn_version(check: _Checker, value: Any, what: str, node: Any) -> None:
    # The firmware pins esp-nn exactly (==VERSION): only versions whose sources are pinned and
    # checked here can be asked for.
    if not isinstance(value, str) or value not in ESP_NN_VERSIONS:
        raise SuiteError(f"{what} must be one of {', '.join(ESP_NN_VERSIONS)} (quote it as a string), found {value!r}",
                         where=check.where(node, "esp_nn_version"))


def _dataset(check: _Checker, node: Any, what: str, parent: Any, profile: Mapping[str, Any]) -> DatasetSpec:
    node = check.mapping(node, what, parent, "dataset")
    check.keys(node, what, ("name", "options"), required=("name",))
    name = check.value(node, "name", str, what)
    loader = DATASETS.get(name)
    if loader is None:
        raise SuiteError(f"unknown data set '{name}'; known: {', '.join(sorted(DATASETS))}",
                         where=check.where(node, "name"))
    options = check.mapping(node.get("options", _Map()), f"{what}.options", node, "options")
    merged = _named_values(check, options, f"{what}.options", {o.name: o.type for o in loader.options},
                           f"data set '{name}'", "option")
    if merged.get("path"):
        # A data directory is read (and fingerprinted for the cache) whole: it must be the suite's
        # project's or one the user named absolutely, never one a relative path wandered into.
        directory = _suite_path(check, merged["path"], f"{what}.options", options, "path")
        if not directory.is_dir():
            raise SuiteError(f"{what}.options: path {merged['path']} is not a directory (resolved to {directory})",
                             where=check.where(options, "path"))
    if "samples_per_class" in profile:
        # 0 (or no value) means "all the data", which the quick profile's cap must still bound.
        cap = profile["samples_per_class"]
        current = merged.get("samples_per_class")
        merged["samples_per_class"] = min(cap, current) if current else cap
    return DatasetSpec(name, types.MappingProxyType(merged), check.path.parent)


def _variants(check: _Checker, node: Any, what: str, parent: Any) -> tuple[Variant, ...]:
    if node is None:
        return (Variant("int8", "int8", 100), Variant("float32", "float32"))
    if not isinstance(node, _Seq) or not node:
        raise SuiteError(f"{what} must be a non-empty list", where=check.where(parent, "variants"))
    variants: list[Variant] = []
    for index, item in enumerate(node):
        item_what = f"{what}[{index}]"
        item = check.mapping(item, item_what, parent, "variants")
        check.keys(item, item_what, ("name", "quantization", "calibration_samples", "thresholds", "esp_nn_version"),
                   required=("quantization",))
        overridden = _thresholds(check, item.get("thresholds"), f"{item_what}.thresholds", Thresholds(), item,
                                 "thresholds")
        threshold_overrides = {key: getattr(overridden, key) for key in item.get("thresholds") or {}}
        quantization = check.value(item, "quantization", str, item_what)
        if quantization not in QUANTIZATIONS:
            raise SuiteError(f"{item_what}.quantization must be one of {', '.join(QUANTIZATIONS)}, found "
                             f"'{quantization}'", where=check.where(item, "quantization"))
        base_name = _check_name(check.value(item, "name", str, item_what, default=quantization),
                                f"{item_what}.name", check.where(item, "name"))
        axes: list[list[tuple[str, Any]]] = []
        for matrix_field in MATRIX_FIELDS:
            if matrix_field not in item:
                continue
            raw = item[matrix_field]
            values = list(raw) if isinstance(raw, _Seq) else [raw]
            for value in values:
                if matrix_field == "esp_nn_version":
                    _check_esp_nn_version(check, value, f"{item_what}.esp_nn_version", item)
                elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise SuiteError(f"{item_what}.{matrix_field} must be a positive int or a list of them, "
                                     f"found {value!r}", where=check.where(item, matrix_field))
            axes.append([(matrix_field, value) for value in values])
        if quantization == "int8" and "calibration_samples" not in item:
            axes.append([("calibration_samples", 100)])
        if quantization == "float32" and "calibration_samples" in item:
            raise SuiteError(f"{item_what}: calibration_samples applies to int8 quantization only",
                             where=check.where(item, "calibration_samples"))
        is_matrix = any(isinstance(item.get(f), _Seq) for f in MATRIX_FIELDS)
        for combination in itertools.product(*axes) if axes else [()]:
            fields = dict(combination)
            suffix = "".join(f"-cal{v}" if k == "calibration_samples" else f"-esp-nn{v}" if k == "esp_nn_version"
                             else f"-{k}{v}" for k, v in combination)
            name = base_name + suffix if is_matrix else base_name
            variants.append(Variant(name, quantization, fields.get("calibration_samples"), item.line,
                                    types.MappingProxyType(threshold_overrides), fields.get("esp_nn_version")))
    seen: dict[str, int] = {}
    for variant in variants:
        if variant.name in seen:
            raise SuiteError(f"{what}: two variants are named '{variant.name}'", where=f"{check.path}:{variant.line}")
        seen[variant.name] = variant.line
    return tuple(variants)


def _model(check: _Checker, node: Any, index: int, parent: Any, defaults: Mapping[str, Any],
           profile: Mapping[str, Any]) -> ModelSpec:
    what = f"models[{index}]"
    node = check.mapping(node, what, parent, "models")
    if isinstance(node.get("name"), str):
        what = f"model '{node['name']}'"
    check.keys(node, what, ("name", "architecture", "params", "tflite", "dataset", "training", "variants",
                            "eval_samples", "thresholds"), required=("name",))
    name = _check_name(check.value(node, "name", str, what), "model name", check.where(node, "name"))
    if ("architecture" in node) == ("tflite" in node):
        raise SuiteError(f"{what} needs exactly one of 'architecture' (a zoo model to train) or 'tflite' (a "
                         f"model file)", where=check.where(node))
    architecture = check.value(node, "architecture", str, what)
    params: dict[str, Any] = {}
    tflite: Path | None = None
    dataset = None
    if architecture is not None:
        arch = ARCHITECTURES.get(architecture)
        if arch is None:
            raise SuiteError(f"unknown architecture '{architecture}'; the zoo has: {', '.join(sorted(ARCHITECTURES))}",
                             where=check.where(node, "architecture"))
        raw_params = check.mapping(node.get("params", _Map()), f"{what}.params", node, "params")
        params = _named_values(check, raw_params, f"{what}.params", {p.name: p.type for p in arch.params},
                               f"architecture '{architecture}'", "parameter")
        if "dataset" not in node:
            raise SuiteError(f"{what} is missing field 'dataset' (a zoo model needs data to train on)",
                             where=check.where(node))
    else:
        if "params" in node or "training" in node:
            key = "params" if "params" in node else "training"
            raise SuiteError(f"{what}: '{key}' applies to zoo architectures, not to a tflite model",
                             where=check.where(node, key))
        tflite = _tflite_file(check, check.value(node, "tflite", str, what), what, node)
    if "dataset" in node:
        dataset = _dataset(check, node["dataset"], f"{what}.dataset", node, profile)
    training = _training(check, node.get("training"), f"{what}.training", defaults["training"], node, "training")
    if "epochs" in profile:
        training = replace(training, epochs=min(training.epochs, profile["epochs"]))
    if tflite is not None:
        if "variants" in node:
            raise SuiteError(f"{what}: a tflite model runs as it is; variants apply to zoo architectures",
                             where=check.where(node, "variants"))
        variants: tuple[Variant, ...] = (Variant("as-is", "as-is", None, node.line),)
    else:
        variants = _variants(check, node.get("variants"), f"{what}.variants", node)
    eval_samples = check.value(node, "eval_samples", int, what, default=defaults["eval_samples"], minimum=1)
    if "eval_samples" in profile:
        eval_samples = min(eval_samples, profile["eval_samples"])
    thresholds = _thresholds(check, node.get("thresholds"), f"{what}.thresholds", defaults["thresholds"], node,
                             "thresholds")
    thresholds = replace(thresholds, **profile.get("thresholds", {}))
    return ModelSpec(name, architecture, types.MappingProxyType(params), tflite, dataset, training, variants,
                     eval_samples, thresholds, node.line)


def parse_suite(text: str, path: Path, profile: str = "full") -> Suite:
    if profile not in PROFILES:
        raise SuiteError(f"unknown profile '{profile}'; expected one of {', '.join(PROFILES)}")
    check = _Checker(path)
    loader = _LineLoader(text)
    loader.name = str(path)
    try:
        document = loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise SuiteError(f"YAML syntax error: {problem}", where=where) from None
    finally:
        loader.dispose()
    if document is None:
        raise SuiteError("suite file is empty", where=str(path))
    root = check.mapping(document, "the suite")
    # `x-` keys hold YAML anchors for reuse (as in docker-compose files) and are otherwise ignored.
    check.keys(root, "the suite", ("suite", "description", "board", "latency", "defaults", "quick", "models"),
               required=("models",), extension_prefix="x-")
    if "suite" in root:
        name = _check_name(check.value(root, "suite", str, "the suite"), "suite name",
                           check.where(root, "suite"))
    else:
        name = _check_name(path.stem, "suite name (the file's name; set `suite:` to choose another)",
                           str(path))
    description = check.value(root, "description", str, "the suite", default="")
    board = _board(check, root["board"], root) if "board" in root else BoardSettings()
    latency = _latency(check, root.get("latency"), "latency", LatencyWindows(), root, "latency")
    profile_overrides: dict[str, Any] = {}
    if profile == "quick" and "quick" in root:
        quick = check.mapping(root["quick"], "quick", root, "quick")
        check.keys(quick, "quick", _PROFILE_KEYS)
        for key in ("epochs", "samples_per_class", "eval_samples"):
            if key in quick:
                profile_overrides[key] = check.value(quick, key, int, "quick", minimum=1)
        if "thresholds" in quick:
            overridden = _thresholds(check, quick["thresholds"], "quick.thresholds", Thresholds(), quick, "thresholds")
            profile_overrides["thresholds"] = {key: getattr(overridden, key) for key in quick["thresholds"]}
        latency = _latency(check, quick.get("latency"), "quick.latency", latency, quick, "latency")
    defaults_node = root.get("defaults", _Map())
    defaults_node = check.mapping(defaults_node, "defaults", root, "defaults")
    check.keys(defaults_node, "defaults", ("training", "eval_samples", "thresholds"))
    defaults = {
        "training": _training(check, defaults_node.get("training"), "defaults.training", Training(), defaults_node,
                              "training"),
        "eval_samples": check.value(defaults_node, "eval_samples", int, "defaults", default=200, minimum=1),
        "thresholds": _thresholds(check, defaults_node.get("thresholds"), "defaults.thresholds", Thresholds(),
                                  defaults_node, "thresholds"),
    }
    models_node = root["models"]
    if not isinstance(models_node, _Seq) or not models_node:
        raise SuiteError("models must be a non-empty list", where=check.where(root, "models"))
    models = tuple(_model(check, item, index, root, defaults, profile_overrides) for index, item in enumerate(models_node))
    names: dict[str, int] = {}
    for model in models:
        if model.name in names:
            raise SuiteError(f"two models are named '{model.name}' (first on line {names[model.name]})",
                             where=f"{path}:{model.line}")
        names[model.name] = model.line
    return Suite(name, path, description, profile, board, models, latency)


def load_suite(path: str | Path, profile: str = "full") -> Suite:
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file not found (expected a YAML file at {path.resolve()})", where=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SuiteError(f"cannot read suite: {error}", where=str(path)) from error
    return parse_suite(text, path, profile)
