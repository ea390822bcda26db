"""Deterministic fault injection for the virtual board: what a real link and board do to a run.

A `FaultPlan` is data (from a suite or a test); a `FaultInjector` applies it with its own seeded
random generator, so the same plan on the same traffic injects the same faults. Faults act on the
device side of the link, where a real board's would: bytes lost or corrupted on the wire in
either direction, a board that stalls, resets (and prints its boot banner again), or drops off the
bus for a while and comes back. One fault acts inside the firmware instead: `corrupt_op` perturbs
one operator's output (firmware/host/corrupt_op.h), so that a test can check that the divergence
diagnosis names that operator; only the native firmware build can run it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class FaultPlan:
    seed: int = 0
    start_after: int = 0          # byte faults and stalls begin after this many invokes (a clean set-up)
    drop_rate: float = 0.0        # probability that a byte is lost, per byte and direction
    flip_rate: float = 0.0        # probability that a byte has one bit flipped
    stall_rate: float = 0.0       # probability that the board stalls before answering a request
    stall_s: float = 0.0          # how long a stall lasts
    reset_at: tuple[int, ...] = field(default=())      # invoke numbers (1-based) during which the board resets
    disappear_at: tuple[int, ...] = field(default=())  # invoke numbers during which the board drops off the bus
    disappear_s: float = 0.0      # how long it stays away before it boots again
    # An operator of the main graph (0-based) whose output 0 the firmware perturbs after every
    # invoke (every second element moved by 32 LSB, or by half plus 0.5 for float32); None: none.
    corrupt_op: int | None = None

    def __post_init__(self) -> None:
        for name in ("drop_rate", "flip_rate", "stall_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("stall_s", "disappear_s", "start_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.corrupt_op is not None and (isinstance(self.corrupt_op, bool) or not isinstance(self.corrupt_op, int)
                                            or self.corrupt_op < 0):
            raise ValueError(f"corrupt_op must be an operator index (a non-negative integer), got {self.corrupt_op!r}")

    @property
    def active(self) -> bool:
        # corrupt_op 0 is a fault too: it names the first operator.
        return self.corrupt_op is not None or any(getattr(self, f.name) for f in fields(self)
                                                  if f.name not in ("seed", "start_after", "corrupt_op"))

    def to_json(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> FaultPlan:
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


@dataclass
class FaultCounts:
    dropped: int = 0
    flipped: int = 0
    stalls: int = 0
    resets: int = 0
    disappearances: int = 0


class FaultInjector:
    """Applies a plan to one board's traffic. All randomness comes from the plan's seed."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        # One generator per stream: which bytes are hit then depends only on that direction's
        # bytes, not on how reads happened to chunk them or interleave with answers.
        self._random = {stream: random.Random(f"{plan.seed}:{stream}") for stream in ("to_board", "to_host", "stall")}
        self.counts = FaultCounts()
        self.invokes = 0

    def corrupt(self, data: bytes, direction: str = "to_board") -> bytes:
        """`data` as it arrives after crossing a noisy wire in `direction` (to_board or to_host)."""
        plan = self.plan
        if not data or (plan.drop_rate == 0 and plan.flip_rate == 0) or self.invokes < plan.start_after:
            return data
        rng = self._random[direction]
        out = bytearray()
        for byte in data:
            if plan.drop_rate and rng.random() < plan.drop_rate:
                self.counts.dropped += 1
                continue
            if plan.flip_rate and rng.random() < plan.flip_rate:
                byte ^= 1 << rng.randrange(8)
                self.counts.flipped += 1
            out.append(byte)
        return bytes(out)

    def stall_seconds(self) -> float:
        if self.invokes < self.plan.start_after:
            return 0.0
        if self.plan.stall_rate and self._random["stall"].random() < self.plan.stall_rate:
            self.counts.stalls += 1
            return self.plan.stall_s
        return 0.0

    def on_invoke(self) -> str:
        """What happens to the invoke now being answered: "", "reset" or "disappear"."""
        self.invokes += 1
        if self.invokes in self.plan.disappear_at:
            self.counts.disappearances += 1
            return "disappear"
        if self.invokes in self.plan.reset_at:
            self.counts.resets += 1
            return "reset"
        return ""
