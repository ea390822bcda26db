"""A board's own cost-model constants, fitted to the per-layer cycles it measured.

`calibrate_runs` reads the measured rows of tinyhil runs (results.json, with the per-layer cycle
counts of the profiled evaluation pass), counts for each layer what the cost model says it pays
(the stall factor of its code path, its bytes by memory, TFLM's per-operator cost), and solves
for the constants by least squares: relative errors, stall factors at least 1 (no code runs
faster than one instruction per cycle), everything else at least 0. A constant the layers do not
pin down stays at its published fit. The result is a calibration file that a suite names as
`board.calibration`; the virtual board then estimates with it, and its tables say
"estimated, calibrated on <board, date, firmware build>".
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import CalibrationError
from ...tflite_model import ModelInfo, inspect_model
from .model import ESP_NN_VERSIONS, ChipConfig, Constants, estimate_with, layer_terms, op_work

__all__ = ["Calibration", "CalibrationFit", "load_calibration", "calibrate_runs", "FORMAT"]

FORMAT = "tinyhil-calibration/1"
# Pulls every constant gently toward its published fit, so that one the layers cannot tell
# apart from another keeps its published value; far too weak to move a constant they do fix.
_PRIOR_WEIGHT = 1e-3


@dataclass(frozen=True)
class Calibration:
    board: str
    date: str
    firmware_build: str
    values: Mapping[str, float]              # fitted constants, over the published fit's
    relative_error: float                    # stated error of estimates made with it
    error_basis: str                         # how relative_error was found
    models: tuple[str, ...] = ()
    layers: int = 0
    # The esp-nn builds it was measured on ("" in the list for a build without esp-nn): the
    # constants of another version's paths are the published ones, so a suite may not mix them.
    esp_nn_versions: tuple[str, ...] = ()
    source: str = field(default="", compare=False)   # the file it was read from

    def constants(self) -> Constants:
        from .fit import default_constants

        return Constants({**default_constants().values, **self.values})

    def describe(self) -> str:
        return f"calibrated on {self.board}, {self.date}, {self.firmware_build}"

    def mismatch(self, esp_nn: bool, esp_nn_version: str) -> str:
        """Why this calibration does not describe a firmware built so, or "" when it does."""
        build = esp_nn_version if esp_nn else ""
        if not self.esp_nn_versions or build in self.esp_nn_versions:
            return ""
        measured = ", ".join(f"with esp-nn {v}" if v else "without esp-nn" for v in self.esp_nn_versions)
        wanted = f"esp-nn {esp_nn_version}" if esp_nn else "without esp-nn"
        return (f"the calibration was measured on firmware built {measured}, this one is built {wanted}: "
                f"its code paths would keep the published constants; calibrate on a run of that build")

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "board": self.board, "date": self.date,
                           "firmware_build": self.firmware_build, "relative_error": self.relative_error,
                           "error_basis": self.error_basis, "models": list(self.models), "layers": self.layers,
                           "esp_nn_versions": list(self.esp_nn_versions),
                           "constants": dict(sorted(self.values.items()))}, indent=1)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(self.to_json() + "\n")
        temporary.replace(path)


def load_calibration(path: Path) -> Calibration:
    """A calibration file, checked: its format, and every constant one the cost model has."""
    from .fit import default_constants

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CalibrationError(f"cannot read the calibration file: {error}", where=str(path)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CalibrationError(f"not a tinyhil calibration: expected format {FORMAT!r}, found {found!r}",
                               where=str(path))
    known = default_constants()
    values = data.get("constants")
    if not isinstance(values, dict) or not values:
        raise CalibrationError(f"expected a non-empty 'constants' mapping, found {values!r}", where=str(path))
    versions = data.get("esp_nn_versions", [])
    if not isinstance(versions, list) or not set(versions) <= {*ESP_NN_VERSIONS, ""}:
        raise CalibrationError(f"esp_nn_versions must list esp-nn versions of {', '.join(ESP_NN_VERSIONS)} (\"\" for a "
                               f"build without esp-nn), found {versions!r}", where=str(path))
    for name, value in values.items():
        try:
            known[name]
        except KeyError:
            raise CalibrationError(f"unknown cost-model constant {name!r}", where=str(path)) from None
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise CalibrationError(f"constant {name!r} must be a finite number >= 0, found {value!r}", where=str(path))
        if value == 0 and _must_be_positive(name):
            raise CalibrationError(f"constant {name!r} must be > 0 (a kernel that costs nothing per instruction or "
                                   f"MAC), found 0", where=str(path))
    error = data.get("relative_error")
    if not isinstance(error, (int, float)) or not 0 <= error < 10:
        raise CalibrationError(f"relative_error must be a fraction such as 0.1, found {error!r}", where=str(path))
    try:
        return Calibration(board=str(data["board"]), date=str(data["date"]), firmware_build=str(data["firmware_build"]),
                           values=MappingProxyType({k: float(v) for k, v in values.items()}),
                           relative_error=float(error), error_basis=str(data.get("error_basis", "")),
                           models=tuple(map(str, data.get("models", ()))), layers=int(data.get("layers", 0)),
                           esp_nn_versions=tuple(versions), source=str(path))
    except KeyError as missing:
        raise CalibrationError(f"the calibration has no {missing.args[0]!r}", where=str(path)) from None


@dataclass(frozen=True)
class _Layer:
    case_id: str
    index: int
    op: str
    path: str
    terms: Mapping[str, float]
    measured: float


@dataclass(frozen=True)
class _Model:
    case_id: str
    network: str                            # the .tflite's hash: one network run in several settings
    info: ModelInfo
    chip: ChipConfig
    measured_ms: float
    invoke_overhead: float | None           # unprofiled invoke minus its layers (profiler taken out), cycles


@dataclass(frozen=True)
class CalibrationFit:
    calibration: Calibration
    models: list[dict[str, Any]]            # case_id, measured_ms, published_ms, calibrated_ms, errors
    layers: list[dict[str, Any]]            # case_id, index, op, path, measured, published, calibrated cycles


def calibrate_runs(run_dirs: Sequence[Path]) -> CalibrationFit:
    """Fit the cost model's constants to the measured layers of these runs."""
    models, layers, provenance = _read_runs(run_dirs)
    values = _solve(layers, models)
    base = _published()
    calibrated = Constants({**base.values, **values})
    networks = sorted({model.network for model in models})
    if len(networks) >= 2:
        # Leave one network out, with every setting it was run in: the same layers at another
        # clock would otherwise vouch for themselves.
        held_out = []
        for network in networks:
            others = [m for m in models if m.network != network]
            kept_cases = {m.case_id for m in others}
            constants = Constants({**base.values, **_solve([l for l in layers if l.case_id in kept_cases], others)})
            held_out += [abs(_estimate_ms(m, constants) - m.measured_ms) / m.measured_ms
                         for m in models if m.network == network]
        relative_error = _round_up_percent(max(held_out))
        basis = f"largest error of a network left out of the fit, over {len(networks)} networks"
    else:
        from . import stated_error

        relative_error = max(stated_error(estimate_with(model.info, model.chip, calibrated, relative_error=0.0,
                                                        cost_model="")) for model in models)
        basis = "one network measured, none left to check it on: the published fit's stated error stands"
    board, date, build = provenance
    calibration = Calibration(board=board, date=date, firmware_build=build, values=MappingProxyType(values),
                              relative_error=relative_error, error_basis=basis,
                              models=tuple(m.case_id for m in models), layers=len(layers),
                              esp_nn_versions=tuple(sorted({m.chip.esp_nn_version if m.chip.esp_nn else ""
                                                            for m in models})))
    model_rows = []
    for model in models:
        published_ms, calibrated_ms = _estimate_ms(model, base), _estimate_ms(model, calibrated)
        model_rows.append({"case_id": model.case_id, "measured_ms": model.measured_ms,
                           "published_ms": published_ms, "calibrated_ms": calibrated_ms,
                           "published_error": (published_ms - model.measured_ms) / model.measured_ms,
                           "calibrated_error": (calibrated_ms - model.measured_ms) / model.measured_ms})
    layer_rows = [{"case_id": layer.case_id, "index": layer.index, "op": layer.op, "path": layer.path,
                   "measured_cycles": layer.measured, "published_cycles": _cycles(layer.terms, base),
                   "calibrated_cycles": _cycles(layer.terms, calibrated)} for layer in layers]
    return CalibrationFit(calibration, model_rows, layer_rows)


def _published() -> Constants:
    from .fit import default_constants

    return default_constants()


def _read_runs(run_dirs: Sequence[Path]) -> tuple[list[_Model], list[_Layer], tuple[str, str, str]]:
    from ...report import read_results

    models: list[_Model] = []
    layers: list[_Layer] = []
    boards, dates, builds = set(), set(), set()
    for run_dir in run_dirs:
        metadata, rows = read_results(run_dir)
        for row in rows:
            if row.latency_kind != "measured" or row.status == "error" or not row.layers or not row.latency_median_ms:
                continue
            where = f"{run_dir} ({row.case_id})"
            path = Path(row.model_path)
            if not path.is_file():
                raise CalibrationError(f"the model that ran, {path}, is gone: calibrate where the run was made, "
                                       f"or run the suite again", where=where)
            if row.esp_nn and row.esp_nn_version not in ESP_NN_VERSIONS:
                raise CalibrationError(f"expected a run built with esp-nn {' or '.join(ESP_NN_VERSIONS)}, found "
                                       f"{row.esp_nn_version or 'no version recorded'}", where=where)
            if row.cpu_mhz not in (80, 160, 240):
                raise CalibrationError(f"expected a clock of 80, 160 or 240 MHz, found {row.cpu_mhz}", where=where)
            model_bytes = path.read_bytes()
            info = inspect_model(model_bytes, where=str(path))
            chip = ChipConfig(cpu_mhz=row.cpu_mhz, esp_nn=bool(row.esp_nn), tensors_in_psram=bool(row.arena_in_psram),
                              esp_nn_version=row.esp_nn_version if row.esp_nn else ESP_NN_VERSIONS[0])
            case_id = f"{run_dir.name}/{row.case_id}"
            timed = [t for t in row.layers if 0 <= t.index < len(info.ops) and t.cycles > 0]
            # The layers were timed in the profiled pass; take out what the profiler added, spread
            # over them, so that layers and invoke add up to the unprofiled latency.
            profiler = (row.profiler_overhead_ms or 0.0) * 1000 * chip.cpu_mhz / max(1, len(row.layers))
            for timing in timed:
                op = info.ops[timing.index]
                work = op_work(op, info.tensors, chip)
                layers.append(_Layer(case_id, timing.index, timing.op, work.path, layer_terms(work, chip),
                                     max(1.0, timing.cycles - profiler)))
            overhead = row.latency_median_ms * 1000 * chip.cpu_mhz - sum(max(1.0, t.cycles - profiler) for t in timed)
            models.append(_Model(case_id, hashlib.sha256(model_bytes).hexdigest()[:16], info, chip,
                                 float(row.latency_median_ms), overhead))
            boards.add(row.board)
            dates.add(str(metadata.get("started", ""))[:10])
            builds.add(f"{row.firmware_build} build, esp-tflite-micro {row.esp_tflite_micro}, esp-nn {row.esp_nn_version}, "
                       f"ESP-IDF {row.idf_version} {row.optimisation}".strip())
    if not layers:
        raise CalibrationError("no measured layers: a calibration needs runs made on a board (latency measured, "
                               "per-layer cycles recorded); virtual-board runs only hold estimates",
                               where=", ".join(map(str, run_dirs)))
    return models, layers, (", ".join(sorted(boards)), " to ".join(sorted(dates)[::max(1, len(dates) - 1)]),
                            "; ".join(sorted(builds)))


def _must_be_positive(name: str) -> bool:
    return _is_stall_factor(name) or name.endswith("_tap") or name.startswith("tflm-reference")


def _is_stall_factor(name: str) -> bool:
    return name.startswith("esp-nn-") and "/ansi." not in name


def _solve(layers: Sequence[_Layer], models: Sequence[_Model]) -> dict[str, float]:
    from scipy.optimize import lsq_linear

    base = _published()
    names = sorted({name for layer in layers for name in layer.terms})
    prior = np.array([base[name] for name in names])
    weights = 1.0 / np.array([layer.measured for layer in layers])
    matrix = np.array([[layer.terms.get(name, 0.0) for name in names] for layer in layers]) * weights[:, None]
    target = np.array([layer.measured for layer in layers]) * weights
    # Solve in units of each constant's published value, so the prior weighs every one alike.
    scaled = matrix * prior
    augmented = np.vstack([scaled, _PRIOR_WEIGHT * np.eye(len(names))])
    goal = np.concatenate([target, _PRIOR_WEIGHT * np.ones(len(names))])
    lower = np.array([1.0 / value if _is_stall_factor(name) else 0.0 for name, value in zip(names, prior)])
    result = lsq_linear(augmented, goal, bounds=(lower, np.inf), method="bvls")
    values = {name: float(x * p) for name, x, p in zip(names, result.x, prior)}
    overheads = [m.invoke_overhead for m in models if m.invoke_overhead is not None]
    if overheads:
        values["dispatch.invoke_cycles"] = max(0.0, float(np.median(overheads)))
    return values


def _cycles(terms: Mapping[str, float], constants: Constants) -> float:
    return sum(amount * constants[name] for name, amount in terms.items())


def _estimate_ms(model: _Model, constants: Constants) -> float:
    return estimate_with(model.info, model.chip, constants, relative_error=0.0, cost_model="").total_us / 1000


def _round_up_percent(fraction: float) -> float:
    return max(0.01, math.ceil(fraction * 100 - 1e-9) / 100)
