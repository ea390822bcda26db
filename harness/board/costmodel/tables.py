"""Text tables of the cost model for the command line: one model's estimate layer by layer, and
what a calibration changed."""

from __future__ import annotations

from tabulate import tabulate

from ...tflite_model import ModelInfo
from .calibration import CalibrationFit
from .model import PIE_PEAK_MACS_PER_CYCLE, LatencyEstimate

__all__ = ["estimate_summary", "estimate_table", "calibration_table"]


def estimate_summary(estimate: LatencyEstimate) -> str:
    """'42.1 ms ±25%, estimated (fitted to published timings (esp-nn 1.1.2)) at 240 MHz'."""
    from ...report import band_text

    return (f"{_ms(estimate.total_us / 1000)} ms {band_text(estimate.relative_error)}, estimated "
            f"({estimate.cost_model}) at {estimate.cpu_mhz} MHz")


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def estimate_table(info: ModelInfo, estimate: LatencyEstimate) -> str:
    rows = []
    for op, cost in zip(info.ops, estimate.ops):
        rate = cost.macs_per_cycle if cost.macs else None
        rows.append([cost.index, cost.name, cost.path, f"{cost.macs:,}" if cost.macs else "",
                     f"{cost.cycles / estimate.cpu_mhz / 1000:.3f}",
                     "" if rate is None else f"{rate:.2f}",
                     "" if rate is None or not cost.ceiling else f"{cost.ceiling:.2f} ({rate / cost.ceiling:.0%})",
                     "" if rate is None else f"{rate / PIE_PEAK_MACS_PER_CYCLE:.1%}"])
    return tabulate(rows, headers=["#", "op", "code path", "MACs", "ms", "MAC/cycle", "path ceiling (share)",
                                   "of PIE peak"], tablefmt="simple", disable_numparse=True)


def calibration_table(fit: CalibrationFit) -> str:
    rows = [[m["case_id"], f"{m['measured_ms']:.2f}", f"{m['published_ms']:.2f} ({m['published_error']:+.1%})",
             f"{m['calibrated_ms']:.2f} ({m['calibrated_error']:+.1%})"] for m in fit.models]
    return tabulate(rows, headers=["model", "measured ms", "published fit ms", "calibrated ms"], tablefmt="simple",
                    disable_numparse=True)
