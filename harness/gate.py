"""The gate stage: a result against the suite's thresholds."""

from __future__ import annotations

from dataclasses import dataclass

from .suite import Thresholds


@dataclass(frozen=True)
class Violation:
    metric: str
    value: float
    limit: float
    comparison: str  # ">" (value above a maximum) or "<" (below a minimum)

    def __str__(self) -> str:
        bound = "max" if self.comparison == ">" else "min"
        return f"{self.metric} {_fmt(self.value)} {self.comparison} {bound} {_fmt(self.limit)}"


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def check(thresholds: Thresholds, *, latency_ms: float, model_bytes: int, arena_bytes: int,
          float_accuracy: float | None, int8_accuracy: float | None, agreement: float) -> list[Violation]:
    """Every threshold the result breaks; accuracy limits apply only where that accuracy exists."""
    maxima = ((thresholds.max_latency_ms, "latency_ms", latency_ms),
              (thresholds.max_model_bytes, "model_bytes", model_bytes),
              (thresholds.max_arena_bytes, "arena_bytes", arena_bytes))
    minima = ((thresholds.min_float_accuracy, "float_accuracy", float_accuracy),
              (thresholds.min_int8_accuracy, "int8_accuracy", int8_accuracy),
              (thresholds.min_output_agreement, "output_agreement", agreement))
    violations = [Violation(name, value, limit, ">") for limit, name, value in maxima
                  if limit is not None and value > limit]
    violations += [Violation(name, value, limit, "<") for limit, name, value in minima
                   if limit is not None and value is not None and value < limit]
    return violations
