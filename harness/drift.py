"""How far the cost model's estimates are from what a board measured: per model and per layer of
the measured rows of a run (results.md's "Estimates against this board" and drift.csv)."""

from __future__ import annotations

from typing import Any, Sequence

from tabulate import tabulate

from .report import CaseResult

__all__ = ["DRIFT_COLUMNS", "drift_rows", "estimated_latency_ms", "model_drift", "drift_markdown"]

DRIFT_COLUMNS = ["case_id", "index", "op", "path", "measured_cycles", "estimated_cycles", "error_percent"]


def _error_percent(estimated: float, measured: float) -> float | None:
    """Signed: negative when the estimate is faster than the board."""
    return round(100 * (estimated - measured) / measured, 2) if measured else None


def drift_rows(rows: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """Per layer of each measured row: the board's cycles against the cost model's (the columns of
    drift.csv). Empty when no measured row carries the model's cycles."""
    return [{"case_id": row.case_id, "index": layer.index, "op": layer.op, "path": layer.path,
             "measured_cycles": layer.cycles, "estimated_cycles": layer.estimated_cycles,
             "error_percent": _error_percent(layer.estimated_cycles, layer.cycles)}
            for row in rows if row.latency_kind == "measured"
            for layer in row.layers if layer.estimated_cycles is not None]


def estimated_latency_ms(row: CaseResult) -> float | None:
    """The cost model's latency for a measured row: the pipeline's model-level estimate, else the sum
    of its layers' estimated cycles at the row's clock (only when every layer has one: a partial sum
    would pass for a fast estimate)."""
    if row.estimated_latency_ms is not None:
        return row.estimated_latency_ms
    if not row.layers or not row.cpu_mhz or any(layer.estimated_cycles is None for layer in row.layers):
        return None
    return sum(layer.estimated_cycles for layer in row.layers) / row.cpu_mhz / 1000


def model_drift(rows: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """Per measured row with an estimate: the measured median against the cost model's latency."""
    drift = []
    for row in rows:
        estimate = estimated_latency_ms(row) if row.latency_kind == "measured" else None
        if estimate is not None and row.latency_median_ms is not None:
            drift.append({"case_id": row.case_id, "measured_ms": row.latency_median_ms, "estimated_ms": estimate,
                          "error_percent": _error_percent(estimate, row.latency_median_ms)})
    return drift


def _signed_pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.1f}%"


def drift_markdown(rows: Sequence[CaseResult]) -> list[str]:
    """The "Estimates against this board" section of results.md, or nothing when no measured row
    has an estimate beside it."""
    models, layers = model_drift(rows), drift_rows(rows)
    if not models and not layers:
        return []
    named = sorted({row.cost_model for row in rows if row.latency_kind == "measured" and row.cost_model})
    lines = ["## Estimates against this board", "",
             "What the cost model estimates for these models at the same settings" + (
                 f" ({'; '.join(named)})" if named else "") + ", against what this board measured. Error is "
             "(estimate - measurement) / measurement: negative when the estimate is faster than the board."]
    if models:
        lines += ["", tabulate([[item["case_id"], f"{item['measured_ms']:.2f}", f"{item['estimated_ms']:.2f}",
                                 _signed_pct(item["error_percent"])] for item in models],
                               headers=["case", "measured median ms", "estimated ms", "error"], tablefmt="github",
                               disable_numparse=True)]
    if layers:
        lines += ["", "Per layer (measured with per-op profiling; drift.csv has this table):", "",
                  tabulate([[item["case_id"], str(item["index"]), item["op"], item["path"],
                             f"{item['measured_cycles']:,}", f"{item['estimated_cycles']:,}",
                             _signed_pct(item["error_percent"])] for item in layers],
                           headers=["case", "#", "op", "path", "measured cycles", "estimated cycles", "error"],
                           tablefmt="github", disable_numparse=True)]
    return lines + [""]
