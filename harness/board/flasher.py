"""Flashers: what puts a firmware image on the board behind a port, for `SerialBoard`.

Two kinds, with one shape (`flash(firmware, port, build_root) -> FirmwareBuild`, `running_build(port)`,
`is_virtual`):

- `PlatformIOFlasher` builds and uploads the chip firmware with PlatformIO (esptool underneath),
  through argument lists with timeouts. PlatformIO downloads the espressif32 platform, the Xtensa
  toolchain and ESP-IDF components on first use. Where its registry is out of reach the build fails,
  and the error says so instead of pretending: docs/hardware.md lists what a machine needs.
- `VirtualBoardFlasher` flashes a standing virtual board (harness.board.standing) in band, over the
  same port the protocol uses (a path or a pyserial URL such as rfc2217://), as esptool flashes a
  chip over its port. This "virtual download mode" is tinyhil's own, not esptool's: it carries the
  virtual device's configuration and the .tflite model, and the board builds its firmware itself.
  Given `serial=` (a pyserial port already open), it talks over that port and leaves it open, so
  that `SerialBoard` runs INFO, FLASH and its handshake on one open port; given only a name, it
  opens the port for the command and closes it after.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

import serial

from ..errors import BoardError, PortUnavailableError
from ..firmware import (
    FirmwareBuild,
    FirmwareImage,
    FirmwareProject,
    chip_build,
    render_project,
)
from ..tflite_model import inspect_model
from .virtual import BOOT_BANNER, ENGINES, VirtualBoardOptions, VirtualDeviceConfig

# A pyserial port object (serial.Serial, or a URL handler's class from serial.serial_for_url).
SerialPort = serial.SerialBase

# The in-band download mode of standing virtual boards (harness.board.standing, docs/hardware.md).
# Long, ASCII and framed by CR LF: a tinyhil frame would need these 40 bytes in a row, in a payload
# of sample data or a CRC, to be taken for a command (the host's own flasher never sends frames and
# commands together). The CR LF in front also ends whatever line a serial console was printing.
DOWNLOAD_MAGIC = b"\r\n~~tinyhil-virtual-download-mode-v1~~\r\n"
ANSWER_MAGIC = b"\r\n~~tinyhil-virtual-download-answer-v1~~\r\n"


@dataclass(frozen=True)
class FlashHeader:
    """The FLASH command's line: the sizes of what follows it, the model's hash, the engine asked for."""

    config_bytes: int
    model_bytes: int
    sha256: str
    engine: str

    def line(self) -> bytes:
        return (f"FLASH config={self.config_bytes} model={self.model_bytes} sha256={self.sha256} "
                f"engine={self.engine}\n").encode()

    @classmethod
    def parse(cls, line: str) -> FlashHeader:
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        try:
            header = cls(int(fields["config"]), int(fields["model"]), fields["sha256"], fields["engine"])
        except (KeyError, ValueError) as error:
            raise ValueError(f"FLASH line {line!r} lacks config=, model=, sha256= or engine= ({error})") from None
        if header.engine not in ENGINES or header.config_bytes <= 0 or header.model_bytes <= 0:
            raise ValueError(f"FLASH line {line!r}: engine must be one of {', '.join(ENGINES)} and sizes positive")
        return header


def flash_command(config_json: str, model: bytes, engine: str) -> bytes:
    """What the host sends to flash a standing board: the device configuration and the model."""
    config = config_json.encode()
    header = FlashHeader(len(config), len(model), hashlib.sha256(model).hexdigest(), engine)
    return DOWNLOAD_MAGIC + header.line() + config + model


def info_command() -> bytes:
    return DOWNLOAD_MAGIC + b"INFO\n"


BUILD_TIMEOUT_S = 1800   # a first build also installs the platform and toolchain
UPLOAD_TIMEOUT_S = 300


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def upload_with(uploader, firmware: FirmwareImage, port: str, build_root: Path) -> FirmwareBuild:
    """Render the PlatformIO project of `firmware`, build it and upload it to `port` with
    `uploader` (anything with PlatformIOFlasher's build and upload); the chip build it makes."""
    project = render_project(firmware, inspect_model(firmware.model_path.read_bytes(), where=str(firmware.model_path)),
                             build_root)
    uploader.build(project)
    uploader.upload(project, port)
    return chip_build(firmware)


@dataclass(frozen=True)
class PlatformIOFlasher:
    log_dir: Path
    pio: tuple[str, ...] = (sys.executable, "-m", "platformio")
    is_virtual: ClassVar[bool] = False

    def flash(self, firmware: FirmwareImage, port: str, build_root: Path) -> FirmwareBuild:
        """Build (once per project content) and upload; the port must be closed by the caller."""
        return upload_with(self, firmware, port, build_root)

    def running_build(self, port: str) -> FirmwareBuild | None:
        """A chip does not say which build it runs beyond its firmware id: None (unknown)."""
        return None

    def _run(self, args: list[str], log_name: str, timeout_s: float, what: str) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / log_name
        command = [*self.pio, *args]
        with open(log_path, "wb") as log:
            log.write((" ".join(command) + "\n").encode())
            log.flush()
            try:
                completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           timeout=timeout_s)
            except FileNotFoundError as error:
                raise BoardError(f"cannot run PlatformIO ({error}); install it with `make install` "
                                 f"(platformio is in requirements.lock)") from error
            except subprocess.TimeoutExpired:
                raise BoardError(f"{what} did not finish within {timeout_s:g} s; log: {log_path}",
                                 details=_tail(log_path, 60)) from None
        if completed.returncode != 0:
            tail = _tail(log_path, 60)
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            hint = ""
            if any(word in tail for word in ("HTTPClientError", "Could not resolve", "ConnectionError",
                                             "Name or service not known", "registry")):
                hint = (" PlatformIO needs its registry to install the espressif32 platform and toolchain on "
                        "first use, and it is out of reach from this machine (docs/hardware.md).")
            raise BoardError(f"{what} failed (exit {completed.returncode}): {last.strip()[:200]}.{hint} "
                             f"Log: {log_path}", details=tail)
        return log_path

    def build(self, project: FirmwareProject) -> Path:
        """Build once per project content; PlatformIO's .pio/ keeps the objects for the next build."""
        marker = project.directory / ".built"
        if marker.is_file():
            return project.directory
        # The debug image (every tensor preserved) is built by its own env of platformio.ini.
        self._run(["run", "-e", project.firmware.platformio_env, "-d", str(project.directory)],
                  f"build-{project.content_hash}.log", BUILD_TIMEOUT_S,
                  f"building firmware for {project.firmware.model_name}")
        marker.write_text("")
        return project.directory

    def upload(self, project: FirmwareProject, port: str) -> None:
        self.build(project)
        self._run(["run", "-e", project.firmware.platformio_env, "-d", str(project.directory), "-t", "upload",
                   "--upload-port", port], f"upload-{project.content_hash}.log", UPLOAD_TIMEOUT_S,
                  f"flashing {project.firmware.model_name} to {port}")


# A first FLASH of a session may build the board's native firmware (minutes on a cold cache);
# later ones take a second or two. The deadline is a hang guard only: a board that dies meanwhile
# takes its port with it, which ends the wait at once.
FLASH_TIMEOUT_S = 900.0
INFO_TIMEOUT_S = 5.0
# From the FLASHED answer to the firmware's boot banner: the device process starts Python and loads
# the interpreter (a few seconds on a loaded machine).
BOOT_TIMEOUT_S = 30.0
_TAIL_BYTES = 48


def discard_input(port: SerialPort) -> None:
    """Drop what waits unread on a port just opened: a standing board's pty keeps, across hosts,
    what the firmware sent while nobody listened, and the answer to a command whose host died."""
    try:
        port.reset_input_buffer()
    except (OSError, serial.SerialException, NotImplementedError):
        pass


def standing_board_url(port: str) -> str:
    """What pyserial opens for a standing board's `port`: an rfc2217:// URL gets `ign_set_control`.
    A standing board is a pty, which has no modem lines, and ser2net never acknowledges pyserial's
    DTR/RTS requests on one: without it, opening fails with "timeout while waiting for option
    'control'" (after pyserial's 3 s network timeout)."""
    if not port.startswith("rfc2217://") or "ign_set_control" in port:
        return port
    return f"{port}{'&' if '?' in port else '?'}ign_set_control"


@dataclass
class VirtualBoardFlasher:
    """Flashes a standing virtual board over its own serial link (a path, or a pyserial URL such as
    rfc2217://host:port): the in-band download mode of harness.board.standing, not esptool. The
    board stores the model in its own workdir and builds or chooses its firmware itself, so
    `build_root` is not used. `options` are the suite's virtual-board settings (engine, faults, link
    emulation, calibration); the pipeline sets them before each load."""

    log_dir: Path
    options: VirtualBoardOptions | None = None
    flash_timeout_s: float = FLASH_TIMEOUT_S
    info_timeout_s: float = INFO_TIMEOUT_S
    boot_timeout_s: float = BOOT_TIMEOUT_S
    is_virtual: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.options is None:
            self.options = VirtualBoardOptions()

    def flash(self, firmware: FirmwareImage, port: str, build_root: Path | None = None, *,
              serial: SerialPort | None = None) -> FirmwareBuild:
        """Send `firmware` (its device configuration and model) to the standing board on `port`, wait
        for its ack and its boot banner; the build the board now runs. `serial`: the port already
        open (SerialBoard's, left open for the handshake that follows); without it the flasher
        opens `port` and closes it again."""
        options = self.options or VirtualBoardOptions()
        if options.engine not in ENGINES:
            raise BoardError(f"virtual board engine must be one of {', '.join(ENGINES)}, got {options.engine!r}",
                             where=port)
        config = VirtualDeviceConfig.for_firmware(firmware, options)
        command = flash_command(config.to_json(), firmware.model_path.read_bytes(), options.engine)
        started = time.monotonic()
        with _Download(port, serial) as link:
            link.send(command, f"the image of {firmware.model_name}")
            kind, answer = link.answer(started + self.flash_timeout_s, "the board's FLASHED answer")
            if kind == "ERROR":
                raise BoardError(f"the standing board refused the image of {firmware.model_name}: {answer}",
                                 where=port)
            if kind != "FLASHED" or not isinstance(answer, dict) or answer.get("firmware_id") != firmware.firmware_id:
                raise BoardError(f"expected FLASHED with firmware {firmware.firmware_id}, got {kind} {answer}; "
                                 f"last bytes: {link.last_bytes()}", where=port)
            build = _build_of(answer, port)
            link.wait_for(BOOT_BANNER, time.monotonic() + self.boot_timeout_s,
                          f"the boot banner of firmware {firmware.firmware_id} after flashing")
        seconds = time.monotonic() - started
        self._log(f"{port}: flashed {firmware.model_name} (firmware {firmware.firmware_id}, {build.kind} build) "
                  f"in {seconds:.2f} s")
        return build

    def running_build(self, port: str, *, serial: SerialPort | None = None) -> FirmwareBuild | None:
        """The build the standing board on `port` runs (its INFO answer), or None when it is blank
        or its firmware crashed (both want flashing). `serial` as for `flash`."""
        running = self.running(port, serial=serial)
        return running.build if running is not None else None

    def running(self, port: str, *, serial: SerialPort | None = None) -> RunningFirmware | None:
        """What the standing board on `port` runs, firmware id and build, by INFO; None as for
        `running_build`. The id lets a load that needs another firmware flash at once, without a
        handshake first."""
        with _Download(port, serial) as link:
            link.send(info_command(), "INFO")
            kind, answer = link.answer(time.monotonic() + self.info_timeout_s,
                                       "the INFO answer of a standing virtual board")
        if kind != "INFO" or not isinstance(answer, dict):
            raise BoardError(f"expected an INFO answer, got {kind} {answer}", where=port)
        if answer.get("state") == "running":
            return RunningFirmware(str(answer.get("firmware_id", "")), _build_of(answer, port))
        if answer.get("state") == "crashed":
            self._log(f"{port}: the board's firmware {answer.get('firmware_id')} had crashed (exit code "
                      f"{answer.get('exit_code')}); console tail: {answer.get('console_tail', '')!r}")
        return None

    def _log(self, line: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "flash.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


@dataclass(frozen=True)
class RunningFirmware:
    """A standing board's INFO answer while a firmware runs."""

    firmware_id: str
    build: FirmwareBuild


def _build_of(answer: dict, port: str) -> FirmwareBuild:
    try:
        return FirmwareBuild(**answer["build"])
    except (KeyError, TypeError) as error:
        raise BoardError(f"the board's answer has no valid firmware build ({error}): {answer}", where=port) from None


class _Download:
    """One download-mode conversation: commands out, answers in. Over `open_port` when given (the
    caller's, left open), else over `port` opened for this conversation and closed after it: over
    rfc2217 an open and a close cost about 0.8 s together (the telnet negotiation; pyserial sleeps
    0.3 s in close), which a load paid for INFO, FLASH and its handshake each."""

    def __init__(self, port: str, open_port: SerialPort | None = None) -> None:
        self.name = port
        self._buffer = bytearray()
        self._tail = bytearray()
        self._owned = open_port is None
        if open_port is not None:
            # Not flushed: the owner keeps its port to itself, so only the firmware's bytes can be
            # waiting, and answer() skips them; a flush is another network round trip over rfc2217.
            self._port = open_port
            return
        if "://" not in port and not os.path.exists(port):
            raise PortUnavailableError(f"serial port {port} does not exist: is the standing board running?",
                                       where=port)
        try:
            self._port = serial.serial_for_url(standing_board_url(port), baudrate=115200, timeout=0.2)
        except (serial.SerialException, OSError, ValueError) as error:
            raise PortUnavailableError(f"cannot open serial port: {error}", where=port) from error
        discard_input(self._port)  # what the firmware (or an earlier host's command) left unread

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self._owned:
            self._port.close()

    def last_bytes(self) -> str:
        return bytes(self._tail).hex(" ") or "nothing"

    def send(self, data: bytes, what: str) -> None:
        try:
            self._port.write(data)
            self._port.flush()
        except (serial.SerialException, OSError) as error:
            raise PortUnavailableError(f"writing {what} failed: {error}", where=self.name) from error

    def _read(self, expected: str, deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise BoardError(f"expected {expected}, nothing arrived in time; last bytes: {self.last_bytes()}",
                             where=self.name)
        try:
            data = self._port.read(max(1, self._port.in_waiting))
        except (serial.SerialException, OSError) as error:
            raise PortUnavailableError(f"reading while waiting for {expected} failed (the board is gone): {error}; "
                                       f"last bytes: {self.last_bytes()}", where=self.name) from error
        self._buffer += data
        self._tail += data
        del self._tail[:-_TAIL_BYTES]

    def answer(self, deadline: float, expected: str) -> tuple[str, object]:
        """The next answer line after ANSWER_MAGIC (other bytes, such as the firmware's, skipped)."""
        while True:
            start = self._buffer.find(ANSWER_MAGIC)
            if start < 0:  # the firmware's own bytes: only a possible start of the magic is kept
                del self._buffer[:max(0, len(self._buffer) - len(ANSWER_MAGIC))]
            end = self._buffer.find(b"\n", start + len(ANSWER_MAGIC)) if start >= 0 else -1
            if end >= 0:
                line = bytes(self._buffer[start + len(ANSWER_MAGIC):end]).decode("utf-8", "replace")
                del self._buffer[:end + 1]
                kind, _, payload = line.partition(" ")
                try:
                    return kind, json.loads(payload)
                except json.JSONDecodeError:
                    raise BoardError(f"expected {expected}, got an answer that is not JSON: {line[:200]!r}",
                                     where=self.name) from None
            self._read(expected, deadline)

    def wait_for(self, marker: bytes, deadline: float, expected: str) -> None:
        while marker not in self._buffer:
            self._read(expected, deadline)
