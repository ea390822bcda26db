"""The report stage: result rows -> results.json, results.csv, results.md and layers.csv.

Files are rewritten atomically after every finished row, so a run killed at any moment leaves
valid files with the rows finished so far. Latency is always marked: a column header carries
`estimated` or `measured` when every row shares it, and each value carries its own mark when a
table mixes the two.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from tabulate import tabulate

from .board.costmodel import PIE_PEAK_MACS_PER_CYCLE
from .errors import ResultsError


@dataclass(frozen=True)
class LayerTiming:
    index: int
    op: str
    time_us: float
    cycles: int
    macs: int

    @property
    def macs_per_cycle(self) -> float:
        return self.macs / self.cycles if self.cycles else 0.0

    @property
    def pie_efficiency(self) -> float:
        """Share of the S3's SIMD peak (16 int8 MAC/cycle, one EE.VMULAS.S8.QACC per cycle)."""
        return self.macs_per_cycle / PIE_PEAK_MACS_PER_CYCLE


@dataclass(frozen=True)
class CaseResult:
    suite: str
    model: str
    variant: str
    case_id: str
    quantization: str
    status: str                              # "passed", "failed" (a threshold), or "error"
    calibration_samples: int | None = None
    source: str = ""                          # "zoo:<architecture>" or "tflite:<path>"
    model_path: str = ""                      # the .tflite that ran (in the artifact cache for zoo models)
    dataset: str = ""
    board: str = ""
    latency_kind: str = ""                    # "estimated" (virtual board) or "measured" (real board)
    cpu_mhz: int | None = None
    esp_nn: bool | None = None
    arena_in_psram: bool | None = None
    firmware_id: str = ""
    # Which firmware gave the numbers: "chip" (the ESP32-S3 build), "native" (the virtual board
    # running the chip's core built for the host) or "python" (the virtual board's fallback engine).
    firmware_build: str = ""
    esp_tflite_micro: str = ""
    esp_nn_version: str = ""
    idf_version: str = ""
    optimisation: str = ""
    firmware_note: str = ""                   # the kernels and sources a native build used, or why it did not run
    model_bytes: int | None = None
    arena_bytes: int | None = None            # arena the board's TFLM used
    arena_size: int | None = None             # arena the firmware allocated
    latency_median_ms: float | None = None
    latency_p90_ms: float | None = None
    float_accuracy: float | None = None       # Keras float32 model on the test split
    reference_accuracy: float | None = None   # this variant's .tflite on the reference interpreter
    board_accuracy: float | None = None       # this variant on the board
    reference_source: str = ""
    reference_note: str = ""
    exact_match: float | None = None
    host_tflm_exact_match: float | None = None  # board output == host TFLM output (same kernels: should be 1)
    output_agreement: float | None = None
    max_abs_diff: float | None = None
    diff_unit: str = ""
    top1_agreement: float | None = None
    cosine_similarity: float | None = None
    rmse: float | None = None
    eval_samples: int | None = None
    total_macs: int | None = None
    retries: int = 0                          # samples run again after a failed exchange with the board
    macs_per_cycle: float | None = None       # whole model: MACs / median invoke cycles
    # Measured boards: median invoke time with per-op profiling minus without it (the latency
    # columns are without it).
    profiler_overhead_ms: float | None = None
    # SHA-256 (16 hex digits) of the board's outputs over the evaluation samples: rows that differ
    # only in their esp-nn version must agree, or results.md says they do not.
    output_digest: str = ""
    violations: tuple[str, ...] = ()
    error: str = ""
    # Invoke times of the latency windows (harness.suite.LatencyWindows), one tuple per window.
    latency_windows_ms: tuple[tuple[float, ...], ...] = field(default=(), repr=False)
    # How much worse than a baseline still passes (harness.suite.Thresholds.regression_limits): kept
    # with the row so that `tinyhil compare` needs nothing but the two results files.
    regression_limits: dict[str, float | None] = field(default_factory=dict, repr=False)
    layers: tuple[LayerTiming, ...] = field(default=(), repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["violations"] = list(self.violations)
        data["layers"] = [{**asdict(layer), "macs_per_cycle": layer.macs_per_cycle,
                           "pie_efficiency": layer.pie_efficiency} for layer in self.layers]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseResult:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["violations"] = tuple(values.get("violations", ()))
        values["latency_windows_ms"] = tuple(tuple(window) for window in values.get("latency_windows_ms", ()))
        derived = ("macs_per_cycle", "pie_efficiency")
        values["layers"] = tuple(LayerTiming(**{k: v for k, v in layer.items() if k not in derived})
                                 for layer in values.get("layers", ()))
        return cls(**values)


_BUILD_NAMES = {"native": "the firmware's own core built for the host (virtual board)",
                "python": "the virtual board's Python engine with the tflite-micro package (the native build "
                          "was not available)",
                "chip": "the ESP32-S3 firmware"}


def firmware_label(rows: Sequence[CaseResult]) -> str:
    """Which firmware gave the numbers, with its pinned parts: one phrase per distinct build."""
    builds = sorted({(row.firmware_build, row.esp_tflite_micro, row.esp_nn_version, row.idf_version, row.optimisation,
                      row.firmware_note if row.firmware_build == "python" else "")
                     for row in rows if row.firmware_build})
    if not builds:
        return "not recorded"
    parts = []
    for kind, tflm, esp_nn, idf, optimisation, why in builds:
        pins = [f"esp-tflite-micro {tflm}" if tflm else "", f"esp-nn {esp_nn}" if esp_nn else "",
                f"ESP-IDF {idf}" if idf else "", f"optimisation {optimisation}" if optimisation else "", why]
        parts.append(f"{_BUILD_NAMES.get(kind, kind)} ({'; '.join(p for p in pins if p)})")
    return "; ".join(parts)


def esp_nn_disagreements(rows: Sequence[CaseResult]) -> list[str]:
    """Rows of one model and quantization that ran on different esp-nn versions with different board
    outputs: the kernels changed the numbers, which a user comparing versions must be told."""
    groups: dict[tuple, list[CaseResult]] = {}
    for row in rows:
        if row.output_digest and row.esp_nn_version:
            groups.setdefault((row.model, row.quantization, row.calibration_samples, row.eval_samples), []).append(row)
    notes = []
    for group in groups.values():
        digests = {row.esp_nn_version: row.output_digest for row in group}
        if len(set(digests.values())) > 1:
            notes.append(f"{group[0].model} ({group[0].quantization}): board outputs differ between esp-nn "
                         + ", ".join(f"{version} ({', '.join(r.case_id for r in group if r.esp_nn_version == version)})"
                                     for version in sorted(digests)))
    return notes


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _pct(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _mac_rate(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} ({100 * value / PIE_PEAK_MACS_PER_CYCLE:.1f}%)"


def _kb(value: int | None) -> str:
    return "" if value is None else f"{value / 1024:.1f}"


def latency_header(rows: Sequence[CaseResult]) -> tuple[str, bool]:
    """The latency column title, and whether each value must carry its own mark."""
    kinds = {row.latency_kind for row in rows if row.latency_kind}
    if len(kinds) == 1:
        return f"latency ms ({kinds.pop()})", False
    return "latency ms", True


def _latency(row: CaseResult, value: float | None, per_value: bool) -> str:
    if value is None:
        return ""
    mark = {"estimated": " est.", "measured": " meas."}.get(row.latency_kind, "") if per_value else ""
    return f"{value:.2f}{mark}"


def summary_table(rows: Sequence[CaseResult], tablefmt: str = "github") -> str:
    title, per_value = latency_header(rows)
    headers = ["model", "variant", "size KB", "arena KB", f"{title} p50", "p90", "MAC/cycle", "float acc",
               "ref acc", "board acc", "agreement", "exact", "max |diff|", "top-1 agr", "cosine", "RMSE", "status"]
    body = []
    for row in rows:
        diff = "" if row.max_abs_diff is None else (
            f"{row.max_abs_diff:.0f} LSB" if row.diff_unit == "LSB" else f"{row.max_abs_diff:.2g}")
        status = row.status if not row.violations and not row.error else f"{row.status}: " + (
            "; ".join(row.violations) or row.error)
        body.append([row.model, row.variant, _kb(row.model_bytes), _kb(row.arena_bytes),
                     _latency(row, row.latency_median_ms, per_value), _latency(row, row.latency_p90_ms, per_value),
                     _mac_rate(row.macs_per_cycle), _pct(row.float_accuracy), _pct(row.reference_accuracy), _pct(row.board_accuracy),
                     _pct(row.output_agreement), _pct(row.exact_match), diff, _pct(row.top1_agreement),
                     _num(row.cosine_similarity, 4), _num(row.rmse, 4), status[:120]])
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)


_CSV_COLUMNS = [f.name for f in fields(CaseResult)
                if f.name not in ("layers", "latency_windows_ms", "regression_limits")]


def _csv(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("; ".join(value) if isinstance(value, (list, tuple)) else value)
                         for key, value in row.items() if key in columns})
    return buffer.getvalue()


def layer_rows(rows: Sequence[CaseResult]) -> list[dict[str, Any]]:
    return [{"model": row.model, "variant": row.variant, "latency_kind": row.latency_kind, "op_index": layer.index,
             "op": layer.op, "time_us": round(layer.time_us, 2), "cycles": layer.cycles, "macs": layer.macs,
             "macs_per_cycle": round(layer.macs_per_cycle, 4), "pie_efficiency": round(layer.pie_efficiency, 5)}
            for row in rows for layer in row.layers]


@dataclass(frozen=True)
class RunMetadata:
    suite: str
    suite_path: str
    profile: str
    board: str
    run_id: str
    started: str
    tinyhil_version: str
    libraries: dict[str, str]


def write_results(run_dir: Path, metadata: RunMetadata, rows: Sequence[CaseResult]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    document = {"metadata": asdict(metadata), "results": [row.to_json() for row in rows]}
    atomic_write(run_dir / "results.json", json.dumps(document, indent=1))
    atomic_write(run_dir / "results.csv", _csv((row.to_json() for row in rows), _CSV_COLUMNS))
    atomic_write(run_dir / "layers.csv", _csv(layer_rows(rows), ["model", "variant", "latency_kind", "op_index",
                                                                "op", "time_us", "cycles", "macs",
                                                                "macs_per_cycle", "pie_efficiency"]))
    kinds = sorted({row.latency_kind for row in rows if row.latency_kind})
    note = {"estimated": "Latency is **estimated** by the virtual ESP32-S3's cost model, not measured.",
            "measured": "Latency is **measured** on the board (TFLM `Invoke()`, microsecond timer)."}
    lines = [f"# {metadata.suite}: run {metadata.run_id}", "",
             f"Board: {metadata.board}; profile: {metadata.profile}; started {metadata.started}; "
             f"tinyhil {metadata.tinyhil_version}.", ""]
    lines += [note[kind] for kind in kinds if kind in note]
    lines += ["", f"Firmware: {firmware_label(rows)}."]
    lines += ["", summary_table(rows), ""]
    lines += [f"- {row.case_id}: {row.reference_note}" for row in rows if row.reference_note]
    lines += [f"- {note}" for note in esp_nn_disagreements(rows)]
    lines += [f"- {row.case_id}: {row.retries} sample(s) run again after a failed exchange with the board"
              for row in rows if row.retries]
    lines += ["", f"MAC/cycle: the model's multiply-accumulates per CPU cycle of one invoke, and its share of "
              f"the ESP32-S3's SIMD peak of {PIE_PEAK_MACS_PER_CYCLE} int8 MAC/cycle (layers.csv has it per layer)."]
    lines += ["", "Reference: LiteRT with BUILTIN_REF kernels unless noted; agreement is the fraction of samples "
              "whose every output is within the suite's tolerance of it.", "",
              "Libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(metadata.libraries.items())), ""]
    atomic_write(run_dir / "results.md", "\n".join(lines))


def _results_file(path: Path) -> Path:
    return path / "results.json" if path.is_dir() else path


def read_results(run_dir: Path) -> tuple[dict[str, Any], list[CaseResult]]:
    """A run's metadata and rows, from its directory or its results.json."""
    path = _results_file(Path(run_dir))
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return document["metadata"], [CaseResult.from_json(row) for row in document["results"]]
    except FileNotFoundError:
        raise ResultsError("no results file here (expected a run directory holding results.json, or the file "
                           "itself)", where=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsError(f"cannot read results: {error}", where=str(path)) from error
    except (KeyError, TypeError, ValueError) as error:
        raise ResultsError(f"not a tinyhil results file (expected 'metadata' and 'results' with result rows; "
                           f"{type(error).__name__}: {error})", where=str(path)) from error


def read_runs(path: Path, what: str = "baseline") -> dict[tuple[str, str], CaseResult]:
    """Rows by (suite, case id) from a results.json, a run directory, or a tree of run directories
    (one per suite, as `results/` or a CI artifact holds them): a baseline, or the run compared
    with one. A case found twice is an error: which of the two rows counts would be a guess."""
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{what} not found (expected a results.json, a run directory, or a directory of "
                           "them)", where=str(path))
    files = [path] if path.is_file() else ([path / "results.json"] if (path / "results.json").is_file()
                                            else sorted(path.rglob("results.json")))
    if not files:
        raise ResultsError(f"no results.json under the {what} directory", where=str(path))
    rows: dict[tuple[str, str], CaseResult] = {}
    origin: dict[tuple[str, str], Path] = {}
    for file in files:
        for row in read_results(file)[1]:
            key = (row.suite, row.case_id)
            if key in rows:
                raise ResultsError(f"{row.suite} {row.case_id} is in two {what} files, {origin[key]} and {file}; "
                                   "point at one run", where=str(path))
            rows[key], origin[key] = row, file
    return rows
