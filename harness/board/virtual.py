"""The virtual board: a `virtual_device` process behind a pseudo-terminal, reached with pyserial.

"Flashing" a virtual board (re)starts the process with the firmware image's configuration; the
host then talks to the pty's slave end exactly as it would talk to /dev/ttyACM0.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import tty
from dataclasses import asdict, dataclass
from pathlib import Path

import serial

from .. import protocol as p
from ..errors import BoardError, LinkError
from ..firmware import FirmwareBuild, FirmwareImage, LinkSettings, MemoryBudget
from ..native_build import child_dies_with_parent, stop_process
from ..sources import SourcesUnavailable
from .faults import FaultPlan
from .base import Board
from .link import DeviceLink
from .native_firmware import NativeFirmware, build_native_firmware, default_native_cache

log = logging.getLogger("tinyhil.virtual")

_STOP_TIMEOUT_S = 5.0
# How long a started board process may take to boot (Python start-up, the firmware's process, the
# interpreter) before the handshake's own, much shorter, per-request timeouts begin.
_BOOT_TIMEOUT_S = 30.0
# What the board writes when it starts serving: the ESP32-S3 ROM's reset text, then its own line.
BOOT_BANNER = (b"ESP-ROM:esp32s3-20210327\r\nrst:0x1 (POWERON),boot:0x8 (SPI_FAST_FLASH_BOOT)\r\n"
               b"tinyhil virtual ESP32-S3 booting\r\n")


@dataclass(frozen=True)
class VirtualDeviceConfig:
    """What the 'firmware' of a virtual board fixes (model, arena, chip settings, link), and what
    only a virtual board has: fault injection and real-time pacing of inference."""

    model_path: str
    model_id: str
    firmware_id: str
    arena_size: int
    arena_in_psram: bool
    cpu_mhz: int
    esp_nn: bool
    memory: MemoryBudget
    link: LinkSettings = LinkSettings()
    emulate_link: bool = True     # pace transfers at the link's rate, so transfer times look like hardware
    realtime: bool = False        # also take the estimated inference time before answering an invoke
    faults: FaultPlan = FaultPlan()
    max_payload: int = p.MAX_PAYLOAD
    engine: str = "python"        # "native" (the firmware's core built for the host) or "python"
    native_program: str = ""      # the native firmware executable, with engine "native"
    workdir: str = ""             # where the board keeps its files (latency estimates)
    esp_nn_version: str = "1.1.2"  # which esp-nn's code paths the cost model follows
    calibration: str = ""         # a calibration file for the cost model, or "" for the published fit
    preserve_all_tensors: bool = False  # the debug build: every tensor kept for GET_TENSOR

    @classmethod
    def for_firmware(cls, firmware: FirmwareImage, options: VirtualBoardOptions | None = None, *,
                     native_program: Path | None = None, workdir: Path | None = None) -> VirtualDeviceConfig:
        options = options or VirtualBoardOptions()
        return cls(model_path=str(firmware.model_path), model_id=firmware.model_id,
                   firmware_id=firmware.firmware_id, arena_size=firmware.arena_size,
                   arena_in_psram=firmware.arena_in_psram, cpu_mhz=firmware.cpu_mhz, esp_nn=firmware.esp_nn,
                   memory=firmware.memory, link=firmware.link, emulate_link=options.emulate_link,
                   realtime=options.realtime, faults=options.faults,
                   engine="native" if native_program is not None else "python",
                   native_program=str(native_program or ""), workdir=str(workdir or ""),
                   esp_nn_version=firmware.esp_nn_version, calibration=options.calibration,
                   preserve_all_tensors=firmware.preserve_all_tensors)

    def to_json(self) -> str:
        data = asdict(self)
        data["faults"] = self.faults.to_json()
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VirtualDeviceConfig:
        fields = json.loads(text)
        fields["memory"] = MemoryBudget(**fields["memory"])
        fields["link"] = LinkSettings(**fields["link"])
        fields["faults"] = FaultPlan.from_json(fields["faults"])
        return cls(**fields)


ENGINES = ("auto", "native", "python")


@dataclass(frozen=True)
class VirtualBoardOptions:
    """Settings of the virtual board that are not firmware (a suite's `board:` section)."""

    emulate_link: bool = True
    realtime: bool = False
    faults: FaultPlan = FaultPlan()
    # auto: the firmware's own core built natively when its pinned sources can be had, else the
    # Python engine (and every table says which ran); native: that build or an error; python: the
    # Python engine.
    engine: str = "auto"
    # A board's calibration of the cost model (harness.board.costmodel.calibration), already
    # checked when the suite was loaded; "" estimates with the constants fitted to published timings.
    calibration: str = ""


def python_engine_build(why: str) -> FirmwareBuild:
    """The fallback: the Python device engine with the `tflite-micro` package's reference kernels."""
    from importlib import metadata

    try:
        package = metadata.version("tflite-micro")
    except metadata.PackageNotFoundError:
        package = "absent"
    return FirmwareBuild(kind="python", esp_tflite_micro=f"none (tflite-micro package {package})", esp_nn="none",
                         idf="none", optimisation="n/a", note=why)


class VirtualBoard(Board):
    kind = "virtual"

    def __init__(self, workdir: Path, *, timeout_s: float = 10.0, invoke_timeout_s: float = 60.0,
                 options: VirtualBoardOptions | None = None, build_root: Path | None = None,
                 vendor_dir: Path | None = None) -> None:
        super().__init__()
        self.options = options or VirtualBoardOptions()
        self._workdir = Path(workdir)
        self._build_root = Path(build_root) if build_root is not None else default_native_cache()
        self._vendor_dir = vendor_dir
        self._native: dict[tuple[str, bool], NativeFirmware | SourcesUnavailable] = {}
        self._timeout_s = timeout_s
        self._invoke_timeout_s = invoke_timeout_s
        self._process: subprocess.Popen | None = None
        self._slave_fd: int | None = None
        self._slave_path = ""
        self._port: serial.Serial | None = None
        self._config: VirtualDeviceConfig | None = None
        self.flash_count = 0

    @property
    def name(self) -> str:
        return f"virtual ({self._slave_path})" if self._slave_path else "virtual"

    @property
    def log_path(self) -> Path:
        return self._workdir / "virtual-board.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _firmware_build(self, firmware: FirmwareImage) -> NativeFirmware | None:
        """The native firmware to run, or None for the Python engine (self.build says why)."""
        if self.options.engine not in ENGINES:
            raise BoardError(f"virtual board engine must be one of {', '.join(ENGINES)}, got {self.options.engine!r}")
        if self.options.engine == "python":
            self.build = python_engine_build("the suite asked for the Python engine")
            return None
        key = (firmware.esp_nn_version, firmware.esp_nn)
        if key not in self._native:
            try:
                self._native[key] = build_native_firmware(*key, cache_root=self._build_root,
                                                          vendor_dir=self._vendor_dir)
            except SourcesUnavailable as missing:
                if self.options.engine == "native":
                    raise BoardError(f"the virtual board cannot build the firmware natively: {missing.message}",
                                     where=self.name) from missing
                log.warning("virtual board: %s; running the Python engine instead", missing.one_line())
                self._native[key] = missing
        built = self._native[key]
        if isinstance(built, SourcesUnavailable):
            self.build = python_engine_build(f"native build unavailable: {built.message}")
            return None
        self.build = built.build
        return built

    def load(self, firmware: FirmwareImage) -> p.DeviceInfo:
        native = self._firmware_build(firmware)
        config = VirtualDeviceConfig.for_firmware(firmware, self.options,
                                                  native_program=native.program if native else None,
                                                  workdir=self._workdir)
        if self._running() and self._config == config and self.info is not None:
            return self.info
        self.close()
        self._start(config)
        self._port = serial.Serial(self._slave_path, baudrate=115200, timeout=0.2, exclusive=True)
        self._wait_for_boot()
        link = DeviceLink(self._port, name=self._slave_path, timeout_s=self._timeout_s,
                          invoke_timeout_s=self._invoke_timeout_s)
        try:
            info = self._handshake(link, firmware)
        except LinkError as error:
            raise self._crash_error(error) from error
        self._config = config
        return info

    def _wait_for_boot(self) -> None:
        """Until the banner is through, or the process died, or the boot timeout passed: the
        handshake's HELLOs would otherwise time out while a loaded machine is still starting the
        board (a real board's boot is not counted against them either)."""
        seen = b""
        deadline = time.monotonic() + _BOOT_TIMEOUT_S
        while not seen.endswith(BOOT_BANNER) and self._running() and time.monotonic() < deadline:
            seen = (seen + self._port.read(len(BOOT_BANNER) - len(seen) or 1))[-len(BOOT_BANNER):]

    def _unrecoverable(self, error: BoardError) -> BoardError | None:
        crashed = self._crash_error(error)
        return crashed if crashed is not error else None

    def _crash_error(self, error: BoardError) -> BoardError:
        """A dead board process explains a link failure better than the link does."""
        if self._process is not None and self._process.poll() is not None:
            tail = self.log_tail(8).replace("\n", " | ")
            return BoardError(f"virtual board process exited with code {self._process.returncode}; "
                              f"log tail: {tail or '(empty)'}", where=self.name, details=self.log_tail(60))
        return error

    def _running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _start(self, config: VirtualDeviceConfig) -> None:
        self._workdir.mkdir(parents=True, exist_ok=True)
        config_path = self._workdir / "virtual-board.json"
        config_path.write_text(config.to_json())
        master_fd, slave_fd = os.openpty()
        # Raw mode before anything flows: a cooked pty would echo the device's own bytes back to
        # it and translate CR/LF inside binary frames.
        tty.setraw(slave_fd)
        tty.setraw(master_fd)
        command = [sys.executable, "-m", "harness.board.virtual_device", "--config", str(config_path),
                   "--fd", str(master_fd), "--log", str(self.log_path)]
        # One log for the board's whole life: a later load (another case, or the debug image a
        # diagnosis loads after the run) appends, so the earlier boards' console stays readable.
        build = ", debug build: every tensor preserved" if config.preserve_all_tensors else ""
        try:
            with open(self.log_path, "ab") as console:
                console.write(f"--- board started: firmware {config.firmware_id}, model {config.model_id}{build}, "
                              f"{config.engine} engine ---\n".encode())
                console.flush()
                # The board process watches its parent, but learns which process that is only once
                # it has started: a host killed while it was starting would leave it running for
                # good. The kernel's parent-death signal covers that window too. (It fires when the
                # *thread* that started the board ends: boards are started from the session's.)
                self._process = subprocess.Popen(command, pass_fds=(master_fd,), stdin=subprocess.DEVNULL,
                                                 stdout=console, stderr=console,
                                                 cwd=Path(__file__).resolve().parents[2],
                                                 preexec_fn=child_dies_with_parent())
        finally:
            os.close(master_fd)
        # Holding one slave descriptor keeps the pty alive between host connections, as a
        # powered board keeps its port.
        self._slave_fd = slave_fd
        self._slave_path = os.ttyname(slave_fd)
        self.flash_count += 1

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None
        if self._process is not None:
            stop_process(self._process, _STOP_TIMEOUT_S)
            self._process = None
        if self._slave_fd is not None:
            os.close(self._slave_fd)
            self._slave_fd = None
        self._link = None
        self.info = None
        self._config = None

