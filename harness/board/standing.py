"""A standing virtual board: a long-lived process that owns a pseudo-terminal at a stable path, as a
dev kit owns its USB port, and that the host flashes over that same port.

The farm's boards (local ports, or ports exported over the network by ser2net/labgrid) are reached
through `SerialBoard`, pyserial and any URL. With no ESP32-S3 here, a standing board stands in for
one: it starts *blank* (no firmware: it drops what the host sends, so the host's handshake goes
unanswered), and it is flashed in band, through the port, by `VirtualBoardFlasher`. That "virtual
download mode" is ours, not esptool's: a chip is flashed with PlatformIO/esptool, which cannot run
here. Once flashed, the board runs a `harness.board.virtual_device` child (the native firmware core
or the Python engine, the link emulation, the suite's faults) and relays bytes between the pty and
that child. Its latencies are the cost model's estimates, like every virtual board's.

Download mode (docs/hardware.md, "Standing virtual boards"): a command is DOWNLOAD_MAGIC, one ASCII
line, and for FLASH the image after it:

    DOWNLOAD_MAGIC "INFO\\n"
    DOWNLOAD_MAGIC "FLASH config=<bytes> model=<bytes> sha256=<hex of model> engine=<auto|native|python>\\n"
                   <VirtualDeviceConfig JSON> <.tflite bytes>

The board answers ANSWER_MAGIC and one line: `INFO <json>`, `FLASHED <json>` or `ERROR <json
string>`. Run `python -m harness.board.standing --help` for the arguments.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import tty
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import TinyhilError
from ..firmware import FirmwareBuild
from ..native_build import child_dies_with_parent, stop_process
from ..sources import SourcesUnavailable
from .flasher import ANSWER_MAGIC, DOWNLOAD_MAGIC, FlashHeader
from .native_firmware import NativeFirmware, build_native_firmware, default_native_cache
from .virtual import ENGINES, VirtualDeviceConfig, python_engine_build

log = logging.getLogger("tinyhil.standing")

_MAX_COMMAND_LINE = 1024
# A command whose line or image stops arriving for this long is dropped (its host died mid-flash):
# the board goes back to what it was doing, and the next command is read as a command.
COMMAND_IDLE_S = 2.0
# Bytes that could be the start of DOWNLOAD_MAGIC are held back this long for the rest of it
# (a command is written in one write, so its magic arrives in one piece); a frame that happens to
# end with such bytes then reaches the firmware this much later.
_HOLD_S = 0.02
# What waits for a host that does not read (nobody has the port open): a chip's USB FIFO drops
# the rest as well.
_MAX_PENDING_TO_HOST = 1 << 20
_STOP_TIMEOUT_S = 5.0


class _Stop(Exception):
    """SIGTERM or SIGINT: leave the serving loop, clean up, exit 0."""


def _answer(kind: str, payload) -> bytes:
    return ANSWER_MAGIC + f"{kind} {json.dumps(payload, sort_keys=True)}\n".encode()


@dataclass
class _Command:
    """A download-mode command being received."""

    line: bytearray
    header: FlashHeader | None = None
    body: bytearray | None = None
    deadline: float = 0.0


class StandingBoard:
    def __init__(self, link: Path, workdir: Path, engine: str = "auto", build_root: Path | None = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.link = Path(link)
        self.workdir = Path(workdir)
        self.engine = engine
        self._build_root = build_root or default_native_cache()
        self._native: dict[tuple[str, bool], NativeFirmware | SourcesUnavailable] = {}
        self._master = self._slave = -1
        self._slave_path = ""
        self._lock_fd = -1
        self._child: subprocess.Popen | None = None
        self._child_socket: socket.socket | None = None
        self._running: dict | None = None   # what INFO reports while a firmware runs
        self._crashed: dict | None = None
        self._held = b""                    # a possible start of DOWNLOAD_MAGIC
        self._held_until = 0.0
        self._command: _Command | None = None
        self._to_host = bytearray()
        self._to_child = bytearray()

    # --- the port ---------------------------------------------------------------------------------

    def open_port(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock_path()
        if self.link.exists() and not self.link.is_symlink():
            raise TinyhilError(f"{self.link} exists and is not a symlink: not replaced")
        # A symlink there now is stale: its board holds no lock (it was killed). Its target may be
        # another pty by now (pty numbers are reused at once), so it is replaced, never followed.
        master, slave = os.openpty()
        # Raw both ends before anything flows (as VirtualBoard does): a cooked pty echoes and
        # translates CR/LF inside binary frames.
        tty.setraw(slave)
        tty.setraw(master)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        # The slave stays open here: the pty, and the path, outlive every host that opens and closes it.
        self._slave_path = os.ttyname(slave)
        partial = self.link.with_name(f".{self.link.name}.{os.getpid()}")
        os.symlink(self._slave_path, partial)
        os.replace(partial, self.link)
        log.info("standing at %s -> %s, blank", self.link, self._slave_path)
        return self._slave_path

    def close(self) -> None:
        self._stop_child()
        try:
            if os.readlink(self.link) == self._slave_path:
                os.unlink(self.link)
        except OSError:
            pass
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        if self._lock_fd >= 0:
            # Unlinked while still held, so a board starting now locks a new file, not this one.
            try:
                os.unlink(self._lock_file)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def _lock_file(self) -> Path:
        return self.link.with_name(f"{self.link.name}.lock")

    def _lock_path(self) -> None:
        """One standing board per path: an exclusive lock on PATH.lock for the board's life (the
        kernel drops it when the process dies, however it dies)."""
        while True:
            fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise TinyhilError(f"another standing board (pid {owner or '?'}) serves {self.link}: stop it or "
                                   f"choose another path") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self._lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was replaced or removed by a board that just ended: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    # --- serving ----------------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            self._check_child()
            readers = [self._master] + ([self._child_socket] if self._child_socket else [])
            writers = ([self._master] if self._to_host else []) + (
                [self._child_socket] if self._child_socket and self._to_child else [])
            readable, writable, _ = select.select(readers, writers, [], self._wait_s())
            if self._master in writable:
                self._write_host()
            if self._child_socket is not None and self._child_socket in writable:
                self._write_child()
            if self._master in readable:
                self._from_host()
            if self._child_socket is not None and self._child_socket in readable:
                self._from_child()
            self._expire(time.monotonic())

    def _wait_s(self) -> float:
        deadlines = [d for d in (self._held_until if self._held else 0.0,
                                 self._command.deadline if self._command else 0.0) if d]
        return max(0.001, min(deadlines) - time.monotonic()) if deadlines else 0.5

    def _expire(self, now: float) -> None:
        if self._held and now >= self._held_until:
            held, self._held = self._held, b""
            self._forward(held)
        if self._command is not None and now >= self._command.deadline:
            command, self._command = self._command, None
            got = len(command.body) if command.body is not None else len(command.line)
            log.warning("a download-mode command stopped arriving (%d bytes in, then %.1f s of silence): dropped",
                        got, COMMAND_IDLE_S)
            self._send_host(_answer("ERROR", f"command cut off after {got} bytes and {COMMAND_IDLE_S:g} s of "
                                             f"silence: dropped"))

    def _from_host(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno == errno.EIO:  # not with our slave held open; a host races us at most
                return
            raise
        self._scan(data, time.monotonic())

    def _scan(self, data: bytes, now: float) -> None:
        """Host bytes: a command's, or the firmware's (dropped while blank)."""
        while data:
            if self._command is not None:
                data = self._feed_command(data, now)
                continue
            buffer = self._held + data
            self._held, data = b"", b""
            found = buffer.find(DOWNLOAD_MAGIC)
            if found >= 0:
                self._forward(buffer[:found])
                self._command = _Command(bytearray(), deadline=now + COMMAND_IDLE_S)
                data = buffer[found + len(DOWNLOAD_MAGIC):]
                continue
            keep = _magic_prefix_at_end(buffer)
            self._forward(buffer[:len(buffer) - keep])
            if keep:
                self._held, self._held_until = buffer[len(buffer) - keep:], now + _HOLD_S

    def _feed_command(self, data: bytes, now: float) -> bytes:
        """Takes what the command needs of `data`; returns the rest."""
        command = self._command
        assert command is not None
        command.deadline = now + COMMAND_IDLE_S
        if command.header is None:
            end = data.find(b"\n")
            if end < 0:
                command.line += data
                if len(command.line) > _MAX_COMMAND_LINE:
                    self._command = None
                    self._send_host(_answer("ERROR", f"command line longer than {_MAX_COMMAND_LINE} bytes"))
                return b""
            command.line += data[:end]
            rest = data[end + 1:]
            line = command.line.decode("ascii", "replace").strip()
            if line == "INFO":
                self._command = None
                self._send_host(_answer("INFO", self.info()))
                return rest
            if not line.startswith("FLASH "):
                self._command = None
                self._send_host(_answer("ERROR", f"unknown command {line[:80]!r}: INFO or FLASH expected"))
                return rest
            try:
                command.header = FlashHeader.parse(line)
            except ValueError as error:
                self._command = None
                self._send_host(_answer("ERROR", str(error)))
                return rest
            command.body = bytearray()
            data = rest
        assert command.header is not None and command.body is not None
        need = command.header.config_bytes + command.header.model_bytes - len(command.body)
        command.body += data[:need]
        if len(command.body) < command.header.config_bytes + command.header.model_bytes:
            return b""
        self._command = None
        self._flash(command.header, bytes(command.body))
        return data[need:]

    def _forward(self, data: bytes) -> None:
        if data and self._child_socket is not None:
            self._to_child += data
        # Blank (or crashed): nothing reads the port, as on a chip without an app.

    def _from_child(self) -> None:
        assert self._child_socket is not None
        try:
            data = self._child_socket.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._send_host(data)

    def _send_host(self, data: bytes) -> None:
        self._to_host += data
        if len(self._to_host) > _MAX_PENDING_TO_HOST:
            del self._to_host[:len(self._to_host) - _MAX_PENDING_TO_HOST]
        self._write_host()

    def _write_host(self) -> None:
        try:
            written = os.write(self._master, self._to_host)
        except BlockingIOError:
            return
        del self._to_host[:written]

    def _write_child(self) -> None:
        assert self._child_socket is not None
        try:
            written = self._child_socket.send(self._to_child)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._to_child)  # the firmware is gone: _check_child reports it
        del self._to_child[:written]

    # --- download mode ----------------------------------------------------------------------------

    def info(self) -> dict:
        if self._running is not None:
            return {"state": "running", **self._running}
        if self._crashed is not None:
            return {"state": "crashed", **self._crashed}
        return {"state": "blank"}

    def _flash(self, header: FlashHeader, body: bytes) -> None:
        started = time.monotonic()
        try:
            config = VirtualDeviceConfig.from_json(body[:header.config_bytes].decode())
            model = body[header.config_bytes:]
            if hashlib.sha256(model).hexdigest() != header.sha256:
                raise TinyhilError(f"the model's SHA-256 is {hashlib.sha256(model).hexdigest()}, its FLASH line "
                                   f"says {header.sha256}: the image was damaged on the way; nothing flashed")
            # The host's paths mean nothing here (it may be another machine): the board keeps its own.
            stored = self.workdir / "models" / f"{header.sha256}.tflite"
            if not stored.is_file():
                stored.parent.mkdir(parents=True, exist_ok=True)
                partial = stored.with_name(f"{stored.name}.{os.getpid()}.partial")
                partial.write_bytes(model)
                partial.replace(stored)
            native, build = self._firmware_build(config, header.engine)
        except (TinyhilError, ValueError, KeyError, TypeError, OSError) as error:
            text = error.one_line() if isinstance(error, TinyhilError) else f"{type(error).__name__}: {error}"
            log.error("flash refused: %s", text)
            self._send_host(_answer("ERROR", text))
            return
        config = replace(config, model_path=str(stored), engine="native" if native else "python",
                         native_program=str(native.program) if native else "", workdir=str(self.workdir))
        self._stop_child()
        self._running = {"firmware_id": config.firmware_id, "model_id": config.model_id, "build": asdict(build)}
        self._crashed = None
        log.info("flashed firmware %s (model %s, %s engine) in %.2f s", config.firmware_id, config.model_id,
                 config.engine, time.monotonic() - started)
        self._send_host(_answer("FLASHED", self._running))
        try:
            self._start_child(config)
        except OSError as error:  # the ack is out: the host learns of it as a board that never boots
            log.error("cannot start the firmware's process: %s", error)
            self._crashed, self._running = {**self._running, "exit_code": None, "console_tail": str(error)}, None

    def _firmware_build(self, config: VirtualDeviceConfig, requested: str) -> tuple[NativeFirmware | None, FirmwareBuild]:
        """As VirtualBoard._firmware_build: the suite's engine, or this board's for `auto`."""
        engine = requested if requested != "auto" else self.engine
        if engine == "python":
            return None, python_engine_build("the suite or the standing board asked for the Python engine")
        key = (config.esp_nn_version, config.esp_nn)
        if key not in self._native:
            try:
                self._native[key] = build_native_firmware(*key, cache_root=self._build_root)
            except SourcesUnavailable as missing:
                if engine == "native":
                    raise TinyhilError(f"the standing board cannot build the firmware natively: "
                                       f"{missing.message}") from missing
                log.warning("%s; running the Python engine instead", missing.one_line())
                self._native[key] = missing
        built = self._native[key]
        if isinstance(built, SourcesUnavailable):
            return None, python_engine_build(f"native build unavailable: {built.message}")
        return built, built.build

    # --- the firmware's process -------------------------------------------------------------------

    @property
    def console_path(self) -> Path:
        return self.workdir / "virtual-board.log"

    def _start_child(self, config: VirtualDeviceConfig) -> None:
        config_path = self.workdir / "virtual-board.json"
        config_path.write_text(config.to_json())
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "harness.board.virtual_device", "--config", str(config_path),
                   "--fd", str(theirs.fileno()), "--log", str(self.console_path)]
        try:
            with open(self.console_path, "ab") as console:
                console.write(f"--- flashed: firmware {config.firmware_id}, model {config.model_id}, "
                              f"{config.engine} engine ---\n".encode())
                console.flush()
                # Started from the main thread, so PR_SET_PDEATHSIG ends it with this process.
                self._child = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                               stdout=console, stderr=console,
                                               cwd=Path(__file__).resolve().parents[2],
                                               preexec_fn=child_dies_with_parent())
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._child_socket = ours

    def _check_child(self) -> None:
        if self._child is None or self._child.poll() is None:
            return
        code = self._child.returncode
        tail = _tail(self.console_path, 8)
        log.error("the firmware's process exited with code %s; console tail: %s", code, tail.replace("\n", " | "))
        self._crashed = {**(self._running or {}), "exit_code": code, "console_tail": tail}
        self._running = None
        self._stop_child()

    def _stop_child(self) -> None:
        if self._child is not None:
            stop_process(self._child, _STOP_TIMEOUT_S)
            self._child = None
        if self._child_socket is not None:
            self._child_socket.close()
            self._child_socket = None
        self._to_child.clear()


def _magic_prefix_at_end(buffer: bytes) -> int:
    """How many bytes at the end of `buffer` are a proper start of DOWNLOAD_MAGIC."""
    for size in range(min(len(buffer), len(DOWNLOAD_MAGIC) - 1), 0, -1):
        if DOWNLOAD_MAGIC.startswith(buffer[-size:]):
            return size
    return 0


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.board.standing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link", required=True, type=Path, help="the port's stable path (a symlink to the pty)")
    parser.add_argument("--workdir", required=True, type=Path, help="the board's own files: models, logs")
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="the firmware for suites that leave it to the board (auto: native when it builds)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=args.workdir / "standing-board.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")

    def stop(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    board = StandingBoard(args.link, args.workdir, args.engine)
    try:
        try:
            board.open_port()
        except (TinyhilError, OSError) as error:
            print(f"standing board: {error}", file=sys.stderr)
            return 2
        print(f"ready {args.link}", flush=True)
        board.serve()
    except _Stop as why:
        log.info("%s: stopping", why)
    finally:
        # A second signal must not cut the clean-up short (the path would be left dangling).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        board.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
