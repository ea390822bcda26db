"""Progress of a run, for the person watching it: which case, which stage, how far.

The pipeline reports to a `Progress`; the base class is the sink that shows nothing. Where the
output goes decides the sink: on a terminal, `LiveProgress` keeps one status line and rewrites it
in place (a CI log would fill with those rewrites); elsewhere, `LineProgress` prints one line per
stage change and never a count. The pytest plugin and `tinyhil run` pick one (`for_stream` here,
the plugin through pytest's terminal writer) and clear it before they print anything themselves.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, TextIO


class Progress:
    """The no-op sink, and the interface the pipeline reports to."""

    def stage(self, case_id: str, stage: str, detail: str = "") -> None:
        """`case_id` entered `stage`, e.g. ("kws[int8]", "training", "kws (ds_cnn)")."""

    def count(self, case_id: str, stage: str, done: int, total: int, unit: str) -> None:
        """`done` of `total` `unit` of `stage`, e.g. 40 of 150 samples, or 3 of 20 epochs."""

    def clear(self) -> None:
        """Take any status off the screen before the caller prints (a no-op for most sinks)."""

    def close(self) -> None:
        """The run is over: nothing of the sink may stay on the screen."""


def _printable(text: str) -> str:
    # Details may come from a worker's output: a control character would move the cursor, and a
    # wide or combining character would make the status's width differ from its length, so the
    # status could not be taken back exactly. Printable ASCII only.
    return "".join(char if " " <= char <= "~" else "?" for char in text)


class _State:
    """What the status says: the case, its stage and detail, and the latest count."""

    def __init__(self) -> None:
        self.case_id = ""
        self.stage = ""
        self.detail = ""
        self.counted: tuple[int, int, str] | None = None

    def enter(self, case_id: str, stage: str, detail: str) -> bool:
        """Record a stage; True when it is a different one from the last."""
        changed = (case_id, stage) != (self.case_id, self.stage) or detail != self.detail
        if (case_id, stage) != (self.case_id, self.stage):
            self.counted = None
        self.case_id, self.stage, self.detail = case_id, stage, detail
        return changed

    def text(self, room: int) -> str:
        """The status in at most `room` characters: the detail is cut before the case, stage or count."""
        head = f"{self.case_id}: {self.stage}"
        tail = f" {self.counted[0]}/{self.counted[1]} {self.counted[2]}" if self.counted else ""
        detail = f" {self.detail}" if self.detail else ""
        spare = room - len(head) - len(tail)
        if len(detail) > spare:
            detail = detail[:max(spare - 3, 0)] + "..." if spare > 4 else ""
        return _printable(head + detail + tail)[:max(room, 0)]


class LiveProgress(Progress):
    """One status line on a terminal, rewritten in place.

    The status is written after whatever the line already holds (pytest's dots, or nothing for
    the CLI) and taken back with cursor-left and erase-to-end-of-line, so the caller's own text and
    cursor position are exactly as it left them. `write` puts text on the terminal unbuffered by
    anyone who tracks the line (pytest's writer keeps a line width for its progress column);
    `room` is how many columns the status may use now. Counts redraw at most every `interval`
    seconds (a fast model reports thousands of samples a second); stage changes and the last
    count always draw. `lead` separates the status from text already on the line."""

    def __init__(self, write: Callable[[str], None], room: Callable[[], int], *, lead: str = "",
                 interval: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._lead = lead          # between the caller's text on the line and the status
        self._room = room
        self._interval = interval
        self._clock = clock
        self._state = _State()
        self._shown = 0            # columns of status on the screen now
        self._drawn_at = -float("inf")
        # The pipeline may report from a thread that reads a worker's output.
        self._lock = threading.Lock()

    def stage(self, case_id: str, stage: str, detail: str = "") -> None:
        with self._lock:
            if self._state.enter(case_id, stage, detail):
                self._draw()

    def count(self, case_id: str, stage: str, done: int, total: int, unit: str) -> None:
        with self._lock:
            same = (case_id, stage) == (self._state.case_id, self._state.stage)
            if not same:
                self._state.enter(case_id, stage, "")
            self._state.counted = (done, total, unit)
            if not same or done >= total or self._clock() - self._drawn_at >= self._interval:
                self._draw()

    def clear(self) -> None:
        with self._lock:
            self._erase()

    def close(self) -> None:
        self.clear()

    def _erase(self) -> None:
        if self._shown:
            # Cursor left by the status's width, then erase to the end of the line. (A count of 0
            # would still move one column on most terminals, hence the test.)
            self._write(f"\x1b[{self._shown}D\x1b[K")
            self._shown = 0

    def _draw(self) -> None:
        room = self._room() - len(self._lead)
        text = self._lead + self._state.text(room) if room > 0 else ""
        back = f"\x1b[{self._shown}D" if self._shown else ""
        self._write(f"{back}\x1b[K{text}")
        self._shown = len(text)
        self._drawn_at = self._clock()


class LineProgress(Progress):
    """One line per stage change, for logs: no cursor movement, no counts."""

    def __init__(self, write_line: Callable[[str], None]) -> None:
        self._write_line = write_line
        self._state = _State()
        self._lock = threading.Lock()

    def stage(self, case_id: str, stage: str, detail: str = "") -> None:
        with self._lock:
            if self._state.enter(case_id, stage, detail):
                self._write_line(_printable(f"tinyhil: {case_id}: {stage}" + (f" {detail}" if detail else "")))

    def count(self, case_id: str, stage: str, done: int, total: int, unit: str) -> None:
        # A count of a stage never announced is still a stage change worth a line; the counts are not.
        with self._lock:
            if (case_id, stage) != (self._state.case_id, self._state.stage):
                self._state.enter(case_id, stage, "")
                self._write_line(_printable(f"tinyhil: {case_id}: {stage}"))


def _terminal_columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


def is_live_terminal(stream: TextIO) -> bool:
    """A terminal that understands cursor movement (not a pipe, a file, or TERM=dumb)."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (OSError, ValueError, AttributeError):
        return False


def for_stream(stream: TextIO) -> Progress:
    """The sink for a stream the caller prints whole lines to (the CLI's stderr)."""
    if is_live_terminal(stream):
        def write(text: str) -> None:
            stream.write(text)
            stream.flush()
        # The cursor is at the start of a line: the whole width less one column, so the terminal
        # never wraps (a wrapped status could not be taken back).
        return LiveProgress(write, lambda: _terminal_columns(stream) - 1)
    return LineProgress(lambda line: print(line, file=stream, flush=True))
