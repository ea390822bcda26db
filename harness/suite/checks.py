"""YAML with line numbers, and the checks every part of a suite shares: field types, names,
paths that stay inside the suite's project."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import SuiteError
from ..sources import ESP_NN_VERSIONS
from .spec import Thresholds, Training

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


def _named_values(check: _Checker, node: _Map, what: str, types_: Mapping[str, Any], owner: str,
                  noun: str) -> dict[str, Any]:
    """Values of a mapping whose keys a registry defines (data set options, architecture params)."""
    for key in node:
        if key not in types_:
            raise SuiteError(f"{owner} has no {noun} '{key}'; it takes: {', '.join(types_)}",
                             where=check.where(node, key))
        check.value(node, key, types_[key], what)
    return dict(node)


_THRESHOLD_TYPES = {
    "max_latency_ms": (int, float), "max_model_bytes": int, "max_arena_bytes": int,
    "min_float_accuracy": (int, float), "min_int8_accuracy": (int, float),
    "min_output_agreement": (int, float), "agreement_tolerance_lsb": int,
    "max_latency_increase": (int, float), "max_model_bytes_increase": int, "max_arena_bytes_increase": int,
    "max_accuracy_drop": (int, float), "max_agreement_drop": (int, float),
    "max_accuracy_drop_vs_float": (int, float),
}
_TRAINING_TYPES = {"epochs": int, "batch_size": int, "learning_rate": (int, float), "seed": int}

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



def _check_esp_nn_version(check: _Checker, value: Any, what: str, node: Any) -> None:
    # The firmware pins esp-nn exactly (==VERSION): only versions whose sources are pinned and
    # checked here can be asked for.
    if not isinstance(value, str) or value not in ESP_NN_VERSIONS:
        raise SuiteError(f"{what} must be one of {', '.join(ESP_NN_VERSIONS)} (quote it as a string), found {value!r}",
                         where=check.where(node, "esp_nn_version"))


