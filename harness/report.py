"""The report stage: result rows -> results.json, results.csv, results.md and layers.csv.

Files are rewritten atomically after every finished row, so a run killed at any moment leaves
valid files with the rows finished so far. Latency is always marked: a column header carries
`estimated` or `measured` when every row shares it, and each value carries its own mark when a
table mixes the two.
"""

from __future__ import annotations

import json
import math
import os
import platform
import textwrap
from dataclasses import asdict, dataclass, field, fields, replace
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
    path: str = ""                            # the esp-nn / TFLM code path that runs the layer
    # The best MAC/cycle that path reaches (None for layers without MACs): a layer far below it is
    # slow because of its shape; a path far below the PIE peak is slow because of the library.
    path_ceiling: float | None = None
    # The cost model's cycles for the layer; on a measured row, what the model predicted (drift).
    estimated_cycles: int | None = None

    @property
    def macs_per_cycle(self) -> float:
        return self.macs / self.cycles if self.cycles else 0.0

    @property
    def pie_efficiency(self) -> float:
        """Share of the S3's SIMD peak (16 int8 MAC/cycle, one EE.VMULAS.S8.QACC per cycle)."""
        return self.macs_per_cycle / PIE_PEAK_MACS_PER_CYCLE

    @property
    def ceiling_efficiency(self) -> float | None:
        """Share of the ceiling of the code path that runs the layer."""
        return self.macs_per_cycle / self.path_ceiling if self.path_ceiling else None


@dataclass(frozen=True)
class CaseResult:
    suite: str
    model: str
    variant: str
    case_id: str
    quantization: str
    status: str                              # "passed", "failed" (a threshold), or "error"
    profile: str = ""                         # the suite profile ("full" or "quick") the row ran with
    calibration_samples: int | None = None
    calibration_source: str = ""              # "train" (N training samples) or "random" (N random inputs)
    per_channel: bool | None = None           # int8 weights per channel (True) or per tensor (False)
    qat: bool = False                         # quantization-aware trained before conversion
    source: str = ""                          # "zoo:<architecture>", "layers:<n>", "keras:<path>" or "tflite:<path>"
    model_path: str = ""                      # the .tflite that ran (in the artifact cache for zoo models)
    dataset: str = ""
    dataset_source: str = ""                  # where the data came from ("generated: ..." or "real: ..."), from the data set
    preprocessing: str = ""                   # the declared preprocessing of every split, e.g. "x * 0.00392 + 0"
    # The suite's device_preprocessing, when the evaluation inputs went through it instead ("" if not).
    device_preprocessing: str = ""
    board: str = ""                           # the port, URL or labgrid place (labgrid:PLACE) the row ran on
    board_host: str = ""                      # the machine that board hangs off (a labgrid exporter's name)
    worker: str = ""                          # the pytest-xdist worker (gw0, ...) of a farm run; "" for one process
    # Boards taken out of a farm's pool while this case ran on them, and where it ran again.
    board_note: str = ""
    latency_kind: str = ""                    # "estimated" (virtual board) or "measured" (real board)
    # An estimate's stated relative error (0.15: +-15%), from the cost model's held-out validation
    # or its calibration; None for measurements and for rows written before estimates carried one.
    latency_error: float | None = None
    # Which cost model gave an estimate ("calibrated on <board, date, build>" for a calibrated one);
    # "" for measurements.
    cost_model: str = ""
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
    # On a measured row: what the cost model estimates for the same model and settings (drift).
    estimated_latency_ms: float | None = None
    float_accuracy: float | None = None       # Keras float32 model on the test split
    float_eval_accuracy: float | None = None  # the same float model on this row's evaluation samples
    accuracy_drop_vs_float: float | None = None  # float_eval_accuracy - board_accuracy (integer rows)
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
    # Why a number is wrong (harness.diagnosis.Diagnosis as JSON), most telling first; empty when
    # nothing was found or nothing was looked at (docs/diagnosis.md).
    diagnoses: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    # The board's intermediate tensors of one sample against the host interpreters, per operator
    # (harness.diagnosis.DivergenceReport as JSON); None when not looked at.
    divergence: dict[str, Any] | None = field(default=None, repr=False)
    # Per-layer quantization error against the float model (QuantizationDebugger; harness.quant_debug
    # LayerError as JSON), int8 rows of trained models that were diagnosed.
    quantization_errors: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["violations"] = list(self.violations)
        data["layers"] = [{**asdict(layer), "macs_per_cycle": layer.macs_per_cycle,
                           "pie_efficiency": layer.pie_efficiency, "ceiling_efficiency": layer.ceiling_efficiency}
                          for layer in self.layers]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseResult:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["violations"] = tuple(values.get("violations", ()))
        values["diagnoses"] = tuple(values.get("diagnoses", ()))
        values["quantization_errors"] = tuple(values.get("quantization_errors", ()))
        values["latency_windows_ms"] = tuple(tuple(window) for window in values.get("latency_windows_ms", ()))
        derived = ("macs_per_cycle", "pie_efficiency", "ceiling_efficiency")
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


def quantization_text(row: CaseResult) -> str:
    """How a row's model was quantized, in a few words: "int8, train x50", "int8 per-tensor,
    random x100", "int8 QAT", "int16x8, train x100", "float32"."""
    if row.quantization in ("float32", "as-is", ""):
        return row.quantization
    kind = row.quantization + (" per-tensor" if row.per_channel is False else "") + (" QAT" if row.qat else "")
    if row.qat or not row.calibration_samples:
        return kind
    return f"{kind}, {row.calibration_source or 'train'} x{row.calibration_samples}"


def drop_text(row: CaseResult) -> str:
    """An integer row's accuracy against the float model's on the same samples, in points."""
    if row.accuracy_drop_vs_float is None:
        return ""
    # + 0.0: no drop reads "+0.0", not "-0.0"
    return f"{-100 * row.accuracy_drop_vs_float + 0.0:+.1f} pt"


def esp_nn_disagreements(rows: Sequence[CaseResult]) -> list[str]:
    """Rows of one model and quantization that ran on different esp-nn versions with different board
    outputs: the kernels changed the numbers, which a user comparing versions must be told."""
    groups: dict[tuple, list[CaseResult]] = {}
    for row in rows:
        if row.output_digest and row.esp_nn_version:
            groups.setdefault((row.model, quantization_text(row), row.eval_samples), []).append(row)
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


def kib(value: int | None) -> str:
    """Bytes in KiB (1024 bytes), the unit every table states."""
    return "" if value is None else f"{value / 1024:.1f}"


CALIBRATED_PREFIX = "calibrated on "
HELD_OUT_SOURCE = "the stated error of the cost model from its held-out validation, docs/board-model.md"


def is_calibrated(row: CaseResult) -> bool:
    """An estimate from a cost model fitted to a real board's per-layer timings."""
    return row.latency_kind == "estimated" and row.cost_model.startswith(CALIBRATED_PREFIX)


def latency_label(row: CaseResult) -> str:
    """"estimated", "estimated, calibrated", "measured", or "" for an unmarked row."""
    return "estimated, calibrated" if is_calibrated(row) else row.latency_kind


def band_text(error: float | None) -> str:
    """A stated relative error as the band it gives: 0.15 -> "±15%"."""
    return "" if error is None else f"±{round(100 * error, 1):g}%"


def latency_band(row: CaseResult) -> str:
    """The band an estimated latency carries ("±15%"), or "" (a measurement, or no stated error)."""
    return band_text(row.latency_error) if row.latency_kind == "estimated" else ""


def latency_header(rows: Sequence[CaseResult]) -> tuple[str, bool]:
    """The latency column title, and whether each value must carry its own mark."""
    labels = {latency_label(row) for row in rows if row.latency_kind}
    if len(labels) == 1:
        return f"latency ms ({labels.pop()})", False
    return "latency ms", True


LATENCY_MARKS = {"estimated": "est.", "estimated, calibrated": "cal. est.", "measured": "meas."}


def _latency(row: CaseResult, value: float | None, per_value: bool) -> str:
    if value is None:
        return ""
    mark = LATENCY_MARKS.get(latency_label(row), "") if per_value else ""
    return " ".join(part for part in (f"{value:.2f}", latency_band(row), mark) if part)


def estimate_notes(rows: Sequence[CaseResult]) -> list[str]:
    """Where the band of each estimate comes from: one sentence per cost model and stated error,
    naming the rows when a run has several."""
    groups: dict[tuple[str, float | None], list[str]] = {}
    for row in rows:
        if row.latency_kind == "estimated":
            groups.setdefault((row.cost_model, row.latency_error), []).append(row.case_id)
    notes = []
    for (model, error), cases in groups.items():
        latency = "Latency" + (f" of {', '.join(cases)}" if len(groups) > 1 else "")
        if model.startswith(CALIBRATED_PREFIX):
            text = f"{latency}: estimated, {model}" + (
                f"; {band_text(error)} is the stated error of that calibration" if error is not None else "")
        else:
            text = f"{latency}: estimated by the cost model" + (f" ({model})" if model else "") + (
                f"; {band_text(error)} is {HELD_OUT_SOURCE}" if error is not None
                else "; no stated error recorded (written before estimates carried one)")
        notes.append(text + ".")
    return notes


def has_p90(rows: Sequence[CaseResult]) -> bool:
    """p90 is shown for measured latency only: the cost model's estimate depends on the model and the
    board settings, not on the input, so an estimate's p90 would only repeat its median."""
    return any(row.latency_kind == "measured" for row in rows)


P90_NOTE = ("p90 is given for measured latency only: the virtual board's cost model gives every inference of a "
            "model the same estimate (it does not depend on the input), so its p90 would repeat the median.")

REFERENCE_NAMES = {"litert-builtin-ref": "LiteRT", "tflm-host": "host TFLM"}


def reference_name(row: CaseResult) -> str:
    return REFERENCE_NAMES.get(row.reference_source, row.reference_source)


def agreement_header(rows: Sequence[CaseResult], title: str = "agreement") -> tuple[str, bool]:
    """The agreement column title, naming the reference when every row shares it, and whether each
    value must name its own: a LiteRT disagreement where the board matches host TFLM is a
    difference between interpreters, not a board fault, so the reader must see which one."""
    names = {reference_name(row) for row in rows if row.reference_source}
    if len(names) == 1:
        return f"{title} vs {names.pop()}", False
    return title, True


def agreement_text(row: CaseResult, per_value: bool) -> str:
    value = _pct(row.output_agreement)
    return f"{value} vs {reference_name(row)}" if per_value and value and row.reference_source else value


def data_label(row: CaseResult) -> str:
    """The row's data set and whether it is real or generated (the data set's own `source`)."""
    if not row.dataset:
        return "random inputs" if row.source.startswith("tflite:") else ""
    kind = row.dataset_source.split(":", 1)[0].strip() if ":" in row.dataset_source else ""
    return f"{row.dataset} ({kind})" if kind else row.dataset


def dataset_notes(rows: Sequence[CaseResult]) -> list[str]:
    """One line per data set used: its name, where its samples came from, and the preprocessing
    declared for it (the one every split, the reference and the board went through)."""
    sources = dict.fromkeys((row.dataset, row.dataset_source, row.preprocessing) for row in rows
                            if row.dataset and row.dataset_source)
    return [f"{name}: {source}" + (f"; preprocessing {prep}" if prep and not prep.startswith("none") else "")
            for name, source, prep in sources]


def arena_placement(row: CaseResult) -> str:
    return "" if row.arena_in_psram is None else ("PSRAM" if row.arena_in_psram else "SRAM")


def board_settings(rows: Sequence[CaseResult]) -> dict[str, str]:
    """Clock, kernels and arena placement over a run's rows: one value, or each value with its rows."""
    def kernels(row: CaseResult) -> str | None:
        if row.esp_nn is None:
            return None
        name = "ESP-NN" if row.esp_nn else "TFLM reference kernels (ESP-NN off)"
        return f"{name} (esp-nn {row.esp_nn_version})" if row.esp_nn and row.esp_nn_version else name

    def describe(values: list[tuple[str, str | None]]) -> str:
        groups: dict[str, list[str]] = {}
        for case_id, value in values:
            if value is not None:
                groups.setdefault(value, []).append(case_id)
        if not groups:
            return "n/a"
        if len(groups) == 1:
            return next(iter(groups))
        # Several values: a clear majority as "the other rows", the rest with the rows they apply to.
        ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
        if len(ordered[0][1]) > len(ordered[1][1]):
            return "; ".join([ordered[0][0] + " (the other rows)"] + [f"{value} ({', '.join(cases)})"
                                                                      for value, cases in ordered[1:]])
        return "; ".join(f"{value} ({', '.join(cases)})" for value, cases in ordered)

    return {"clock": describe([(row.case_id, f"{row.cpu_mhz} MHz" if row.cpu_mhz else None) for row in rows]),
            "kernels": describe([(row.case_id, kernels(row)) for row in rows]),
            "arena": describe([(row.case_id, arena_placement(row) or None) for row in rows]),
            "firmware": firmware_label(rows)}


def _status(row: CaseResult, full: bool) -> str:
    if not full or not (row.violations or row.error):
        return row.status
    return f"{row.status}: " + ("; ".join(row.violations) or row.error)


def _diff(row: CaseResult) -> str:
    if row.max_abs_diff is None:
        return ""
    return f"{row.max_abs_diff:.0f} LSB" if row.diff_unit == "LSB" else f"{row.max_abs_diff:.2g}"


def summary_frame(rows: Sequence[CaseResult], full: bool = True):
    """The summary as a pandas DataFrame of display strings, one column per figure, in table order.
    `full` puts every violation in the status column; otherwise it holds passed/failed/error."""
    import pandas as pd

    title, per_value = latency_header(rows)
    agreement_title, per_reference = agreement_header(rows)
    columns: list[tuple[str, Any]] = [
        ("model", lambda r: r.model), ("variant", lambda r: r.variant), ("quantization", quantization_text),
        ("data", data_label),
        ("size KiB", lambda r: kib(r.model_bytes)), ("arena KiB", lambda r: kib(r.arena_bytes)),
        ("arena in", arena_placement), (title, lambda r: _latency(r, r.latency_median_ms, per_value))]
    if has_p90(rows):
        columns.append(("p90", lambda r: _latency(r, r.latency_p90_ms, per_value) if r.latency_kind == "measured"
                        else ""))
    columns += [("MAC/cycle", lambda r: _mac_rate(r.macs_per_cycle)), ("float acc", lambda r: _pct(r.float_accuracy)),
                ("ref acc", lambda r: _pct(r.reference_accuracy)), ("board acc", lambda r: _pct(r.board_accuracy)),
                ("vs float", drop_text),
                (agreement_title, lambda r: agreement_text(r, per_reference)), ("= host TFLM", lambda r: _pct(r.host_tflm_exact_match)),
                ("exact", lambda r: _pct(r.exact_match)), ("max diff", _diff),
                ("top-1 agr", lambda r: _pct(r.top1_agreement)), ("cosine", lambda r: _num(r.cosine_similarity, 4)),
                ("RMSE", lambda r: _num(r.rmse, 4)), ("status", lambda r: _status(r, full))]
    return pd.DataFrame({header: [cell(row) for row in rows] for header, cell in columns}, dtype=object)


def _render(frame, tablefmt: str) -> str:
    return tabulate(frame, headers="keys", tablefmt=tablefmt, showindex=False, disable_numparse=True)


def summary_table(rows: Sequence[CaseResult], tablefmt: str = "github") -> str:
    """Every column (results.md)."""
    return _render(summary_frame(rows), tablefmt)


# The terminal keeps these columns longest; the rest go first when the terminal is narrow.
_TERMINAL_KEEP = ("model", "variant", "status", "latency", "board acc", "size KiB", "agreement", "= host TFLM",
                  "arena KiB", "float acc", "vs float", "p90", "MAC/cycle", "ref acc", "data", "arena in", "exact",
                  "max diff", "top-1 agr", "cosine", "RMSE", "quantization")


def _keep_rank(header: str) -> int:
    return next(rank for rank, name in enumerate(_TERMINAL_KEEP) if header.startswith(name))


def _plain(frame) -> str:
    """Columns two spaces apart, figures right-aligned: tabulate pads every header by two more, which
    a terminal table cannot spare."""
    widths = {name: max([len(name)] + [len(cell) for cell in frame[name]]) for name in frame.columns}
    numeric = {name: any(cell[:1].isdigit() for cell in frame[name]) for name in frame.columns}

    def line(cells: Iterable[tuple[str, str]]) -> str:
        return "  ".join(cell.rjust(widths[name]) if numeric[name] else cell.ljust(widths[name])
                         for name, cell in cells).rstrip()

    lines = [line((name, name) for name in frame.columns), line((name, "-" * widths[name]) for name in frame.columns)]
    lines += [line(zip(frame.columns, values)) for values in frame.itertuples(index=False)]
    return "\n".join(lines)


def terminal_table(rows: Sequence[CaseResult], width: int) -> str:
    """The summary for a terminal `width` columns wide: the columns that fit, most important first
    (failures are listed by the caller; results.md has every column and the reasons)."""
    frame = summary_frame(rows, full=False)
    # A column no row has a value in (accuracy without a data set) says nothing: it goes first, unlisted.
    frame = frame.loc[:, [name for name in frame.columns if any(frame[name])]]
    widths = {name: max([len(name)] + [len(cell) for cell in frame[name]]) for name in frame.columns}
    dropped: list[str] = []
    while sum(widths[name] + 2 for name in frame.columns) - 2 >= width and len(frame.columns) > 3:
        last = max(frame.columns, key=_keep_rank)
        dropped.insert(0, last)
        frame = frame.drop(columns=[last])
    text = _plain(frame)
    if dropped:
        text += "\n" + "\n".join(textwrap.wrap("not shown at this terminal width (see results.md): "
                                               + ", ".join(dropped), width=max(width - 1, 20)))
    return text


_CSV_COLUMNS = [f.name for f in fields(CaseResult)
                if f.name not in ("layers", "latency_windows_ms", "regression_limits", "diagnoses", "divergence",
                                  "quantization_errors")] + ["diagnosis"]
_LAYER_COLUMNS = ["case_id", "model", "variant", "board", "board_host", "latency_kind", "op_index", "op", "path", "time_us", "cycles",
                  "estimated_cycles", "macs", "macs_per_cycle", "pie_efficiency", "path_ceiling", "ceiling_efficiency"]


def _csv(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    import pandas as pd

    records = [{key: ("; ".join(value) if isinstance(value, (list, tuple)) else value) for key, value in row.items()
                if key in columns} for row in rows]
    # dtype=object keeps each value as written: an int column with a gap stays "50", not "50.0".
    return pd.DataFrame(records, columns=columns, dtype=object).to_csv(index=False, lineterminator="\n")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def layer_rows(rows: Sequence[CaseResult]) -> list[dict[str, Any]]:
    return [{"case_id": row.case_id, "model": row.model, "variant": row.variant, "board": row.board,
             "board_host": row.board_host, "latency_kind": row.latency_kind,
             "op_index": layer.index, "op": layer.op, "path": layer.path, "time_us": round(layer.time_us, 2),
             "cycles": layer.cycles, "estimated_cycles": layer.estimated_cycles, "macs": layer.macs,
             "macs_per_cycle": round(layer.macs_per_cycle, 4), "pie_efficiency": round(layer.pie_efficiency, 5),
             "path_ceiling": layer.path_ceiling, "ceiling_efficiency": _round(layer.ceiling_efficiency, 5)}
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
    # The machine that trained, converted and ran the reference (host_facts()): accuracy depends on it.
    host: dict[str, str] = field(default_factory=dict)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Processor") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        distribution = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        distribution = ""
    kernel = f"{platform.system()} {platform.release()}"
    return f"{distribution} ({kernel})" if distribution else kernel


def host_facts() -> dict[str, str]:
    """What the host is, for reproducing a run's accuracies: CPU, cores, memory, OS, Python. No
    hostname or user: results files get shared."""
    facts = {"cpu": _cpu_model(), "cores": str(os.cpu_count() or "unknown")}
    if hasattr(os, "sched_getaffinity"):
        usable = len(os.sched_getaffinity(0))
        if usable != os.cpu_count():
            facts["cores"] += f" ({usable} usable)"
    try:
        facts["memory"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (OSError, ValueError, AttributeError):
        pass
    facts.update(machine=platform.machine(), os=_os_name(),
                 python=f"{platform.python_implementation()} {platform.python_version()}")
    return facts


def host_label(host: dict[str, str]) -> str:
    if not host:
        return "not recorded"
    known = ("cpu", "cores", "memory", "machine", "os", "python")
    parts = [f"{key} {host[key]}" for key in known if key in host]
    return "; ".join(parts + [f"{key} {value}" for key, value in host.items() if key not in known])


QUICK_BANNER = ("**Quick profile: not benchmark figures.** Few samples and a short training: this run checks that "
                "the pipeline works. Its accuracies and sample counts are not comparable with a full run; run "
                "with `--profile=full` for figures to publish.")


def write_results(run_dir: Path, metadata: RunMetadata, rows: Sequence[CaseResult]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    document = {"metadata": asdict(metadata), "results": [row.to_json() for row in rows]}
    # results.json is the record (resume and compare read it), so it goes last: a run killed
    # between two writes leaves the tables with every row the record has, or one more, never fewer.
    from .explain import diagnosis_summary

    atomic_write(run_dir / "results.csv", _csv(({**row.to_json(), "diagnosis": diagnosis_summary(row)} for row in rows),
                                               _CSV_COLUMNS))
    atomic_write(run_dir / "layers.csv", _csv(layer_rows(rows), _LAYER_COLUMNS))
    from .drift import DRIFT_COLUMNS, drift_rows

    drift = drift_rows(rows)
    if drift:
        atomic_write(run_dir / "drift.csv", _csv(drift, DRIFT_COLUMNS))
    atomic_write(run_dir / "results.md", results_markdown(metadata, rows))
    atomic_write(run_dir / "results.json", json.dumps(document, indent=1))


def results_markdown(metadata: RunMetadata, rows: Sequence[CaseResult]) -> str:
    kinds = sorted({row.latency_kind for row in rows if row.latency_kind})
    note = {"estimated": "Latency is **estimated** by the virtual ESP32-S3's cost model, not measured.",
            "measured": "Latency is **measured** on the board (TFLM `Invoke()`, microsecond timer)."}
    quick = metadata.profile == "quick"
    settings = board_settings(rows)
    lines = [f"# {metadata.suite}: run {metadata.run_id}" + (" (quick profile: not benchmark figures)" if quick
                                                             else ""), ""]
    if quick:
        lines += [f"> {QUICK_BANNER}", ""]
    lines += [f"Board: {metadata.board}; profile: {metadata.profile}; started {metadata.started}; "
              f"tinyhil {metadata.tinyhil_version}.", "",
              f"Board settings: clock {settings['clock']}; kernels {settings['kernels']}; arena in {settings['arena']}.",
              "", f"Host (training, conversion, reference): {host_label(metadata.host)}.", ""]
    lines += [note[kind] for kind in kinds if kind in note]
    lines += ["", *estimate_notes(rows)] if "estimated" in kinds else []
    lines += ["", f"Firmware: {settings['firmware']}."]
    lines += ["", summary_table(rows), ""]
    lines += [f"- {row.case_id}: {row.reference_note}" for row in rows if row.reference_note]
    lines += [f"- {note}" for note in esp_nn_disagreements(rows)]
    lines += [f"- {row.case_id}: {row.retries} sample(s) run again after a failed exchange with the board"
              for row in rows if row.retries]
    lines += [f"- {row.case_id}: {row.board_note}" for row in rows if row.board_note]
    boards = sorted({(row.board, row.board_host) for row in rows if row.board})
    if len(boards) > 1:
        lines += ["", "Boards (a farm run; each row names its board and host in results.csv): "
                  + ", ".join(f"{board} on {host}" if host else board for board, host in boards) + "."]
    datasets = dataset_notes(rows)
    if datasets:
        lines += ["", "Data sets:", ""] + [f"- {line}" for line in datasets]
    lines += ["", "Sizes are in KiB (1024 bytes): the model's flatbuffer and the tensor arena TFLM used."]
    if kinds and not has_p90(rows):
        lines += ["", P90_NOTE]
    lines += ["", f"MAC/cycle: the model's multiply-accumulates per CPU cycle of one invoke, and its share of "
              f"the ESP32-S3's SIMD peak of {PIE_PEAK_MACS_PER_CYCLE} int8 MAC/cycle. layers.csv has it per layer, "
              "against that peak (pie_efficiency) and against the ceiling of the esp-nn or TFLM code path that runs "
              "the layer (path_ceiling, ceiling_efficiency): a layer far below its path's ceiling is slow because of "
              "its shape, a path far below the peak because of the library."]
    lines += ["", "Reference: LiteRT with BUILTIN_REF kernels unless noted; agreement is the fraction of samples "
              "whose every output is within the suite's tolerance of the reference named beside it. "
              "`= host TFLM` is the fraction of samples whose board output equals host TFLM's bit for bit (the "
              "same kernels: it should be 100%); where it is 100% and agreement is low, the two reference "
              "interpreters disagree, not the board.", "",
              "Libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(metadata.libraries.items())), ""]
    from .drift import drift_markdown
    from .explain import diagnoses_markdown

    return "\n".join(lines + diagnoses_markdown(rows) + drift_markdown(rows))


def _results_file(path: Path) -> Path:
    return path / "results.json" if path.is_dir() else path


def read_results(run_dir: Path) -> tuple[dict[str, Any], list[CaseResult]]:
    """A run's metadata and rows, from its directory or its results.json."""
    path = _results_file(Path(run_dir))
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        metadata = document["metadata"]
        rows = [CaseResult.from_json(row) for row in document["results"]]
        # Rows written before rows carried their profile: the run's profile is theirs.
        return metadata, [row if row.profile else replace(row, profile=str(metadata.get("profile", "")))
                          for row in rows]
    except FileNotFoundError:
        raise ResultsError("no results file here (expected a run directory holding results.json, or the file "
                           "itself)", where=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsError(f"cannot read results: {error}", where=str(path)) from error
    except (KeyError, TypeError, ValueError, AttributeError) as error:
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
