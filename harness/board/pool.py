"""The boards of one run, shared by its processes (pytest-xdist workers) through a directory.

Each board is an entry file; a process uses a board while it holds the board's lock (an flock, so
the kernel frees it when the holder dies, however it dies). A process keeps its board from case to
case; it lets it go between cases only when another process of the run is waiting for one (its
own board was taken out), so that the boards left are shared case by case instead of leaving a
worker idle with cases queued behind it. A board taken out stays out for the rest of the run, and
every process sees it: a file beside the entries says why.

No scheduler of our own: which case runs where is pytest-xdist's; which remote board a process
gets is labgrid's (harness.board.labgrid_place). This only keeps two processes off one board.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PortUnavailableError


@dataclass(frozen=True)
class PoolEntry:
    """A board of the pool: `spec` is what opens it (a port or a pyserial URL), `name` what rows and
    messages call it (the port, or labgrid:PLACE), `host` the machine it hangs off."""

    spec: str
    name: str
    host: str
    flasher: str = "platformio"      # "virtual" for a standing virtual board (harness.board.standing)

    @property
    def key(self) -> str:
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_")[:40]
        return f"{readable}-{hashlib.sha256(self.name.encode()).hexdigest()[:8]}"


class NoBoardLeft(PortUnavailableError):
    """Every board of the pool has been taken out."""


class BoardPool:
    """One process's view of the run's boards. Not thread-safe: one per process."""

    poll_s = 0.05

    def __init__(self, directory: Path, member: str) -> None:
        self.directory = Path(directory)
        self.member = member
        self.held: PoolEntry | None = None
        self._lock_handle = None
        self.cases_on_held = 0
        for sub in ("boards", "locks", "out", "waiting"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)

    # --- the boards -----------------------------------------------------------------------------

    def register(self, entry: PoolEntry) -> None:
        """Adds a board (idempotent: every process of the run may register the same one)."""
        path = self.directory / "boards" / f"{entry.key}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(entry), sort_keys=True))
        tmp.replace(path)

    def entries(self) -> list[PoolEntry]:
        found = []
        for path in sorted((self.directory / "boards").glob("*.json")):
            try:
                found.append(PoolEntry(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # one being replaced this instant: the next look has it
        return found

    def out(self) -> dict[str, str]:
        """Boards taken out, by name, with the reason."""
        reasons = {}
        for path in (self.directory / "out").glob("*.json"):
            try:
                record = json.loads(path.read_text())
                reasons[record["name"]] = record["reason"]
            except (OSError, ValueError, KeyError):
                continue
        return reasons

    def take_out(self, entry: PoolEntry, reason: str) -> bool:
        """Takes `entry` out for the rest of the run; True when this call did (not another process
        before it). Releases it if this process held it."""
        path = self.directory / "out" / f"{entry.key}.json"
        try:
            with open(path, "x") as handle:
                json.dump({"name": entry.name, "reason": reason, "by": self.member}, handle)
            first = True
        except FileExistsError:
            first = False
        if self.held is not None and self.held.key == entry.key:
            self.release()
        return first

    # --- leases ---------------------------------------------------------------------------------

    def _try_lock(self, entry: PoolEntry) -> bool:
        handle = open(self.directory / "locks" / f"{entry.key}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock_handle = handle
        return True

    def acquire(self, preferred: str | None = None, *, timeout_s: float | None = None) -> PoolEntry:
        """A board of the pool for this process alone: `preferred` (a name) when free, else any free
        one still in. Waits while all are busy (saying so, for `should_yield` of the others); raises
        NoBoardLeft when none is left in, PortUnavailableError after `timeout_s`."""
        if self.held is not None:
            return self.held
        waiting = self.directory / "waiting" / self.member
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                out = self.out()
                live = [entry for entry in self.entries() if entry.name not in out]
                if not live:
                    described = "; ".join(f"{name}: {reason}" for name, reason in sorted(out.items()))
                    raise NoBoardLeft(f"no board left in the pool: every one was taken out ({described or 'none registered'})")
                live.sort(key=lambda entry: entry.name != preferred)
                for entry in live:
                    if self._try_lock(entry):
                        self.held, self.cases_on_held = entry, 0
                        return entry
                if deadline is not None and time.monotonic() > deadline:
                    raise PortUnavailableError(f"no board of the pool came free within {timeout_s:g} s "
                                               f"({', '.join(entry.name for entry in live)} busy)")
                waiting.touch()
                time.sleep(self.poll_s)
        finally:
            waiting.unlink(missing_ok=True)

    def hand_over(self) -> None:
        """Lets the held board go to a process that is waiting, and gives it the time to take it
        (a second at most) before this process asks for a board again."""
        entry = self.held
        self.release()
        deadline = time.monotonic() + 1.0
        while entry is not None and self.others_waiting() and time.monotonic() < deadline:
            if not self._try_lock(entry):
                return  # taken
            self.release()
            time.sleep(self.poll_s)

    def wait_free(self, entry: PoolEntry, *, timeout_s: float) -> bool:
        """Until no process holds `entry` (True), or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            handle = open(self.directory / "locks" / f"{entry.key}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
            finally:
                handle.close()  # closing drops the lock, if taken
            time.sleep(self.poll_s * 4)

    def release(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None
        self.held = None

    def others_waiting(self) -> bool:
        return any(path.name != self.member for path in (self.directory / "waiting").iterdir())

    def should_yield(self) -> bool:
        """Between cases: let the board go, because a process of the run has none and this one has
        had its turn (at least one case since it took this board)."""
        return self.held is not None and self.cases_on_held > 0 and self.others_waiting()

    def close(self) -> None:
        self.release()
        (self.directory / "waiting" / self.member).unlink(missing_ok=True)
