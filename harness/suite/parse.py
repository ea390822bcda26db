"""Suite files -> `Suite`: the root, the board, thresholds and training, models and variants."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..board.costmodel import load_calibration
from ..board.faults import FaultPlan
from ..board.virtual import ENGINES, VirtualBoardOptions
from ..errors import SuiteError, TinyhilError
from ..firmware import ARENA_PLACEMENTS, LinkSettings
from ..sources import DEFAULT_ESP_NN_VERSION
from .checks import (
    _check_esp_nn_version,
    _check_name,
    _Checker,
    _LineLoader,
    _Map,
    _named_values,
    _Seq,
    _suite_path,
    _thresholds,
    _training,
)
from .models import _model
from .spec import PROFILES, BoardSettings, LatencyWindows, Suite, Thresholds, Training


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


_PROFILE_KEYS = ("epochs", "samples_per_class", "eval_samples", "thresholds", "latency")


def _latency(check: _Checker, node: Any, what: str, base: LatencyWindows, parent: Any, key: str) -> LatencyWindows:
    if node is None:
        return base
    node = check.mapping(node, what, parent, key)
    check.keys(node, what, ("windows", "inferences_per_window"))
    return replace(base, **{name: check.value(node, name, int, what, minimum=1)
                            for name in ("windows", "inferences_per_window") if name in node})



_FAULT_TYPES = {"seed": int, "start_after": int, "drop_rate": (int, float), "flip_rate": (int, float), "stall_rate": (int, float),
                "stall_s": (int, float), "reset_at": list, "disappear_at": list, "disappear_s": (int, float),
                "corrupt_op": int}


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
