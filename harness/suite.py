"""Suite files: YAML (safe-loaded) -> validated, typed `Suite` with one `Case` per model x variant.

Every error names the file, the line and the field. A variant whose field holds a list (a matrix,
e.g. `calibration_samples: [50, 500]`) expands into one case per value.

A suite is untrusted input. Names become directories (the suite's results), test ids and lines of
generated firmware sources (model and variant), so they are held to a safe character set. Relative
paths resolve against the suite file and must stay inside the suite's project (`project_root`);
absolute paths are the user's explicit choice. A `tflite:` file is parsed here, so a file that is
not a TFLite model stops validation rather than a run.
"""

from __future__ import annotations

import itertools
import re
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from .board.costmodel import load_calibration
from .board.faults import FaultPlan
from .board.virtual import ENGINES, VirtualBoardOptions
from .datasets import DATASETS
from .errors import SuiteError, TinyhilError
from .firmware import ARENA_PLACEMENTS, LinkSettings
from .sources import DEFAULT_ESP_NN_VERSION, ESP_NN_VERSIONS
from .tflite_model import inspect_model, read_model_file
from .zoo import ARCHITECTURES

PROFILES = ("full", "quick")
QUANTIZATIONS = ("int8", "float32")
# Variant fields that may hold a list and then expand into a matrix of variants.
MATRIX_FIELDS = ("calibration_samples", "esp_nn_version")
# Suite, model and variant names: path components, pytest ids and text in generated C++ and YAML.
# No separators, no leading dot (so never `.` or `..`), no whitespace or quotes.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "letters, digits, '_', '-' and '.' (1 to 64 of them, the first a letter or digit)"


# --- YAML with line numbers ---------------------------------------------------------------------

class _Map(dict):
    line: int = 0
    key_lines: dict

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class _Seq(list):
    line: int = 0
    item_lines: list


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers where every mapping, key and list item was."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    result = _Map()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise SuiteError(f"keys must be strings, found {key!r}", where=f"{loader.name}:{line}")
        if key in result:
            raise SuiteError(f"duplicate key '{key}' (first on line {result.key_lines[key]})",
                             where=f"{loader.name}:{line}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    result = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


# --- typed suite ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    max_latency_ms: float | None = None
    max_model_bytes: int | None = None
    max_arena_bytes: int | None = None
    min_float_accuracy: float | None = None
    min_int8_accuracy: float | None = None
    min_output_agreement: float | None = None  # fraction of samples whose board output matches the reference
    agreement_tolerance_lsb: int = 1           # how far (in output LSB) still counts as matching
    # Against a baseline run (`--baseline`, `tinyhil compare`): how much worse is still no regression.
    # Latency is relative; bytes are exact counts; accuracy and agreement are absolute fractions
    # (0.01 = one percentage point). Sizes default to 0: a model that grew by a byte is news.
    max_latency_increase: float | None = 0.05
    max_model_bytes_increase: int | None = 0
    max_arena_bytes_increase: int | None = 0
    max_accuracy_drop: float | None = 0.01
    max_agreement_drop: float | None = 0.01

    def regression_limits(self) -> dict[str, float | None]:
        return {"latency_ms": self.max_latency_increase, "model_bytes": self.max_model_bytes_increase,
                "arena_bytes": self.max_arena_bytes_increase, "accuracy": self.max_accuracy_drop,
                "output_agreement": self.max_agreement_drop}


@dataclass(frozen=True)
class Training:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 0.001
    seed: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    options: Mapping[str, Any]
    base_dir: Path

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(sorted(self.options.items()))}


@dataclass(frozen=True)
class Variant:
    name: str
    quantization: str                 # "int8" (full-integer PTQ) or "float32"
    calibration_samples: int | None = None
    line: int = 0
    thresholds: Mapping[str, Any] = field(default_factory=dict)  # overrides of the model's thresholds
    esp_nn_version: str | None = None  # overrides board.esp_nn_version, to put versions side by side


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str | None
    params: Mapping[str, Any]
    tflite: Path | None
    dataset: DatasetSpec | None
    training: Training
    variants: tuple[Variant, ...]
    eval_samples: int
    thresholds: Thresholds
    line: int


@dataclass(frozen=True)
class BoardSettings:
    cpu_mhz: int = 240
    esp_nn: bool = True
    arena: str = "auto"                       # "auto", "sram" or "psram"
    esp_nn_version: str = DEFAULT_ESP_NN_VERSION  # the esp-nn the firmware pins exactly
    link: LinkSettings = LinkSettings()
    virtual: VirtualBoardOptions = VirtualBoardOptions()  # link emulation, real-time pacing, faults


@dataclass(frozen=True)
class LatencyWindows:
    """MLPerf Tiny's performance practice: several windows of back-to-back inferences on one input,
    reported as the median of the window medians. The windows' samples are what a baseline
    comparison tests for significance."""
    windows: int = 5
    inferences_per_window: int = 20


@dataclass(frozen=True)
class Case:
    suite: Suite
    model: ModelSpec
    variant: Variant

    @property
    def id(self) -> str:
        return f"{self.model.name}[{self.variant.name}]"

    @property
    def where(self) -> str:
        return f"{self.suite.path}:{self.variant.line or self.model.line}"

    @property
    def thresholds(self) -> Thresholds:
        return replace(self.model.thresholds, **self.variant.thresholds)

    @property
    def esp_nn_version(self) -> str:
        return self.variant.esp_nn_version or self.suite.board.esp_nn_version


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    profile: str
    board: BoardSettings
    models: tuple[ModelSpec, ...] = field(default=())
    latency: LatencyWindows = LatencyWindows()

    def cases(self) -> list[Case]:
        return [Case(self, model, variant) for model in self.models for variant in model.variants]


# --- validation ---------------------------------------------------------------------------------

class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def where(self, node: Any, key: str | None = None) -> str:
        line = node.line_of(key) if isinstance(node, _Map) and key else getattr(node, "line", 0)
        return f"{self.path}:{line}" if line else str(self.path)

    def mapping(self, node: Any, what: str, parent: Any = None, key: str | None = None) -> _Map:
        if not isinstance(node, _Map):
            where = self.where(parent, key) if parent is not None else str(self.path)
            raise SuiteError(f"{what} must be a mapping, found {type(node).__name__}", where=where)
        return node

    def keys(self, node: _Map, what: str, allowed: tuple[str, ...], required: tuple[str, ...] = (),
             extension_prefix: str | None = None) -> None:
        for key in node:
            if extension_prefix and key.startswith(extension_prefix):
                continue
            if key not in allowed:
                raise SuiteError(f"unknown field '{key}' in {what}; expected one of: {', '.join(allowed)}",
                                 where=self.where(node, key))
        for key in required:
            if key not in node:
                raise SuiteError(f"{what} is missing field '{key}'", where=self.where(node))

    def value(self, node: _Map, key: str, types_: type | tuple[type, ...], what: str, default: Any = None,
              minimum: float | None = None) -> Any:
        if key not in node:
            return default
        value = node[key]
        expected = types_ if isinstance(types_, tuple) else (types_,)
        # YAML booleans are ints in Python; never let `true` pass as a number.
        if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in expected)
            raise SuiteError(f"{what}.{key} must be {names}, found {type(value).__name__} {value!r}",
                             where=self.where(node, key))
        if minimum is not None and value < minimum:
            raise SuiteError(f"{what}.{key} must be at least {minimum}, found {value!r}", where=self.where(node, key))
        return value


def is_safe_name(text: str) -> bool:
    """Whether `text` may name a suite, model or variant (and so a directory or a C++ comment);
    for other names that become path components, such as a run id."""
    return _NAME.fullmatch(text) is not None


def _check_name(name: str, what: str, where: str) -> str:
    if not is_safe_name(name):
        raise SuiteError(f"{what} {name!r} is not allowed: names become directories, test ids and lines of "
                         f"generated firmware, so they take {NAME_RULE}", where=where)
    return name


def project_root(suite_path: Path) -> Path:
    """The folder a suite's relative paths must stay in: the parent of the nearest `suites` folder
    the suite file sits in (a checkout whose suites/ refer to ../models, ../data), else the suite's
    own folder."""
    folder = suite_path.resolve().parent
    for candidate in (folder, *folder.parents):
        if candidate.name == "suites":
            return candidate.parent
    return folder


def _suite_path(check: _Checker, raw: str, what: str, node: _Map, key: str) -> Path:
    """`raw` resolved against the suite file. A relative path may not leave the project (after
    symlinks: a link inside it that points out counts as leaving); an absolute path is taken as the
    user's explicit choice."""
    where = check.where(node, key)
    if not raw or "\0" in raw:
        raise SuiteError(f"{what}: {key} must be a path, found {raw!r}", where=where)
    given = Path(raw)
    try:
        if given.is_absolute():
            return given.resolve()
        root = project_root(check.path)
        resolved = (check.path.resolve().parent / given).resolve()
    except (OSError, RuntimeError) as error:  # a name too long, a symlink loop
        raise SuiteError(f"{what}: {key} {raw} cannot be resolved: {error}", where=where) from None
    if not resolved.is_relative_to(root):
        raise SuiteError(f"{what}: {key} {raw} leads out of the suite's project {root} (to {resolved}); relative "
                         f"paths must stay inside it (an absolute path names a place elsewhere)", where=where)
    return resolved


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


def _named_values(check: _Checker, node: _Map, what: str, types_: Mapping[str, Any], owner: str,
                  noun: str) -> dict[str, Any]:
    """Values of a mapping whose keys a registry defines (data set options, architecture params)."""
    for key in node:
        if key not in types_:
            raise SuiteError(f"{owner} has no {noun} '{key}'; it takes: {', '.join(types_)}",
                             where=check.where(node, key))
        check.value(node, key, types_[key], what)
    return dict(node)


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
