"""What every diagnosis is: a named failure, the measured facts behind it, and what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# "incomplete": the evidence a diagnosis needed could not be gathered (harness.diagnose says which).
KINDS = ("divergence", "preprocessing", "calibration", "arena", "unsupported-op", "slow", "incomplete")


@dataclass(frozen=True)
class Diagnosis:
    kind: str                    # one of KINDS
    title: str                   # plain words: "Preprocessing differs between training and the board"
    evidence: tuple[str, ...]    # measured facts with their numbers, one line each
    suggestion: str              # what to do

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"diagnosis kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def one_line(self) -> str:
        """For pytest's failure message and one-line logs."""
        first = f": {self.evidence[0]}" if self.evidence else ""
        return f"{self.title}{first}; {self.suggestion}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "evidence": list(self.evidence), "suggestion": self.suggestion}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Diagnosis:
        return cls(str(data["kind"]), str(data["title"]), tuple(str(line) for line in data.get("evidence", ())),
                   str(data.get("suggestion", "")))


def pct(share: float) -> str:
    """A share as a percentage with the precision small shares need."""
    value = 100 * share
    return f"{value:.1f}%" if value < 10 else f"{value:.0f}%"


def num(value: float) -> str:
    """A measured float in 3 significant digits, without exponent notation for everyday sizes."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def nbytes(value: int) -> str:
    """Bytes with the KiB the tables use."""
    return f"{value:,} bytes ({value / 1024:.1f} KiB)"
