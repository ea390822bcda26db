"""Live progress (harness.progress): one status line on a terminal, taken off before pytest or the CLI
prints, and plain stage lines in logs. The terminal tests run the sinks and pytest itself on a real
pseudo-terminal and replay what reached it through a small terminal model, so what is checked is
the screen a person would see, not the bytes."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from harness.progress import LineProgress, LiveProgress, Progress, for_stream

REPO = Path(__file__).resolve().parents[1]
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def screen(raw: str, width: int) -> list[str]:
    """The lines a terminal `width` columns wide shows after `raw`: printable characters, CR, LF,
    BS, and the CSI sequences the sinks and pytest use (cursor left/right/column, erase to end of
    line, colours). Anything else fails the test: a sink must not rely on more. Wraps like a
    terminal does, so a status that overflowed the line would leave its remnant here."""
    lines: list[list[str]] = [[]]
    row = col = 0
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "\x1b":
            match = _CSI.match(raw, index)
            assert match, f"unexpected escape sequence {raw[index:index + 8]!r}"
            args, command = match.groups()
            count = int(args) if args.isdigit() else 1
            if command == "D":
                col = max(col - count, 0)
            elif command == "C":
                col = min(col + count, width - 1)
            elif command == "G":
                col = count - 1
            elif command == "K":
                del lines[row][col:]
            elif command != "m":
                raise AssertionError(f"unexpected escape sequence {match.group()!r}")
            index = match.end()
            continue
        index += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        elif char == "\b":
            col = max(col - 1, 0)
        else:
            if col >= width:
                row, col = row + 1, 0
                if row == len(lines):
                    lines.append([])
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
    return ["".join(line).rstrip() for line in lines]


def _pty(width: int) -> tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, width, 0, 0))
    return master, slave


def _drain(master: int, timeout: float = 60.0) -> str:
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the slave side is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_live_status_on_a_terminal_is_taken_off_before_the_cli_prints(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    master, slave = _pty(60)
    stream = os.fdopen(slave, "w", encoding="utf-8", buffering=1)
    sink = for_stream(stream)
    assert isinstance(sink, LiveProgress)
    print("passed: kws[float32]", file=stream)
    sink.stage("kws[int8]", "training", "keyword_cnn (keyword_cnn) on keywords, 2400 training samples")
    for epoch in range(1, 21):
        sink.count("kws[int8]", "training", epoch, 20, "epochs")
    sink.clear()  # what `tinyhil run` does before each line it prints
    print("passed: kws[int8]", file=stream)
    sink.stage("ds[int8]", "board", "virtual")
    for done in range(0, 151, 15):
        sink.count("ds[int8]", "board", done, 150, "samples")
    sink.close()
    stream.close()
    raw = _drain(master)
    os.close(master)
    # The status was there, cut to the width (detail shortened, count kept), and is gone again.
    assert "kws[int8]: training keyword_cnn (keyword_cnn) on keyword..." in raw
    assert "kws[int8]: training keyword_cnn (keyword_cn... 20/20 epochs" in raw
    assert "ds[int8]: board virtual 150/150 samples" in raw
    assert screen(raw, 60) == ["passed: kws[float32]", "passed: kws[int8]", ""]


def test_counts_redraw_at_most_every_interval_but_always_the_last():
    writes: list[str] = []
    now = [0.0]
    sink = LiveProgress(writes.append, lambda: 79, clock=lambda: now[0])
    sink.stage("m[int8]", "board")
    for done in range(1, 1001):
        now[0] = done * 0.001  # a fast model: 1000 samples a second
        sink.count("m[int8]", "board", done, 1000, "samples")
    shown = [text for text in writes if "samples" in text]
    assert 9 <= len(shown) <= 11 and shown[-1].endswith("m[int8]: board 1000/1000 samples")
    sink.close()
    assert screen("".join(writes), 80) == [""]


def test_control_characters_in_a_detail_never_reach_the_terminal():
    writes: list[str] = []
    sink = LiveProgress(writes.append, lambda: 79)
    sink.stage("m", "training", "epoch\r\x1b[2J 3 \u5168\u5b57")
    # CR and ESC replaced (inert text), and the double-width characters too: the status's width
    # must equal its length, or taking it back would leave a remnant.
    assert "".join(writes) == "\x1b[Km: training epoch??[2J 3 ??"
    assert screen("".join(writes), 80) == ["m: training epoch??[2J 3 ??"]


def test_logs_get_one_line_per_stage_and_no_counts():
    stream = io.StringIO()
    sink = for_stream(stream)
    assert isinstance(sink, LineProgress)
    sink.stage("kws[int8]", "training", "keyword_cnn")
    for epoch in range(1, 21):
        sink.count("kws[int8]", "training", epoch, 20, "epochs")
    sink.stage("kws[int8]", "training", "keyword_cnn")  # the same stage again: no new line
    sink.count("kws[int8]", "board", 1, 150, "samples")   # a stage first seen through a count
    sink.count("kws[int8]", "board", 2, 150, "samples")
    sink.stage("ds[int8]", "converting")
    sink.close()
    assert stream.getvalue().splitlines() == ["tinyhil: kws[int8]: training keyword_cnn", "tinyhil: kws[int8]: board",
                                              "tinyhil: ds[int8]: converting"]
    Progress().stage("a", "b")  # the base class is the silent sink
    Progress().close()


# A tiny driver in place of BenchSession: the plugin's sink, fed what the pipeline reports.
_FAKE_DRIVER = '''
from harness.pytest_plugin import terminal_progress


def test_trains_and_runs(pytestconfig):
    sink = terminal_progress(pytestconfig)
    sink.stage("kws-int8", "training", "kws (ds_cnn)")
    for epoch in range(1, 21):
        sink.count("kws-int8", "training", epoch, 20, "epochs")
    sink.stage("kws-int8", "board", "virtual")
    for done in range(0, 151, 10):
        sink.count("kws-int8", "board", done, 150, "samples")


def test_plain():
    pass


def test_ends_with_the_status_up(pytestconfig):
    terminal_progress(pytestconfig).stage("ds-int8", "converting")
    assert False, "fails on purpose"
'''


def _fake_driver(tmp_path: Path) -> Path:
    path = tmp_path / "test_fake_driver.py"
    path.write_text(_FAKE_DRIVER)
    return path


@pytest.mark.parametrize("verbosity", ["-q", "-v"])
def test_pytest_shows_the_status_on_a_terminal_without_garbling_its_own_lines(tmp_path, verbosity):
    path = _fake_driver(tmp_path)
    master, slave = _pty(100)
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", verbosity, path.name],
                               stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path, env={**env, "TERM": "xterm"},
                               start_new_session=True)
    os.close(slave)
    try:
        raw = _drain(master, timeout=120)
        process.wait(timeout=60)
    finally:
        os.close(master)
        process.kill()
    assert "kws-int8: training kws (ds_cnn) 20/20 epochs" in raw and "kws-int8: board virtual 150/150 samples" in raw
    assert "ds-int8: converting" in raw
    lines = screen(raw, 100)
    assert not [line for line in lines if "kws-int8" in line or "ds-int8:" in line], "\n".join(lines)
    if verbosity == "-q":
        assert any(re.fullmatch(r"\.\.F +\[100%\]", line) for line in lines), "\n".join(lines)
    else:
        expected = [r"test_fake_driver\.py::test_trains_and_runs PASSED +\[ 33%\]",
                    r"test_fake_driver\.py::test_plain PASSED +\[ 66%\]",
                    r"test_fake_driver\.py::test_ends_with_the_status_up FAILED +\[100%\]"]
        for pattern in expected:
            assert any(re.fullmatch(pattern, line) for line in lines), (pattern, "\n".join(lines))
    assert any(re.fullmatch(r"(=+ )?1 failed, 2 passed in [0-9.]+s( =+)?", line) for line in lines), "\n".join(lines)
    assert all(len(line) <= 100 for line in lines)


def test_pytest_prints_stage_lines_in_a_log(tmp_path):
    path = _fake_driver(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", path.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("tinyhil: ")] == [
        "tinyhil: kws-int8: training kws (ds_cnn)", "tinyhil: kws-int8: board virtual", "tinyhil: ds-int8: converting"]
    assert "epochs" not in result.stdout and "samples" not in result.stdout and "\x1b" not in result.stdout
    assert "1 failed, 2 passed" in result.stdout


def test_flash_anyway_is_an_option_of_run_and_of_pytest(tmp_path):
    from harness.cli import build_parser

    assert build_parser().parse_args(["run", "s.yaml", "--flash-anyway"]).flash_anyway is True
    assert build_parser().parse_args(["run", "s.yaml"]).flash_anyway is False
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert re.search(r"--flash-anyway\s+use and flash a port whose USB identity is not an\s+ESP32-S3's",
                     result.stdout), result.stdout[-3000:]


def test_flash_anyway_reaches_the_board_from_the_session(tmp_path):
    """A pseudo-terminal has no USB identity: the session's board is refused at once, unless the
    session was told flash_anyway (then the port is opened; nothing is sent until a case runs)."""
    from harness.errors import PortIdentityError
    from harness.pipeline import BenchSession

    controller, device = os.openpty()
    try:
        port = os.ttyname(device)
        for flash_anyway in (False, True):
            with BenchSession(board=port, cache_dir=tmp_path / "cache", results_dir=tmp_path / f"r{flash_anyway}",
                              flash_anyway=flash_anyway) as session:
                if flash_anyway:
                    assert session.boards.board().name == port
                else:
                    with pytest.raises(PortIdentityError, match="--flash-anyway"):
                        session.boards.board()
    finally:
        os.close(controller)
        os.close(device)
