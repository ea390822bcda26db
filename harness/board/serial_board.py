"""A real ESP32-S3 on a serial port: a device path, `auto`, or a pyserial URL (rfc2217://, socket://)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import serial
from serial.tools import list_ports

from .. import protocol as p
from ..errors import BoardError, LinkError, PortUnavailableError
from ..firmware import FirmwareImage, chip_build, render_project
from ..tflite_model import inspect_model
from .base import Board
from .link import DeviceError, DeviceLink

# After an upload, esptool resets the chip; its native USB port disappears and comes back, maybe
# under another name (/dev/ttyACM0 -> /dev/ttyACM1).
REENUMERATION_TIMEOUT_S = 15.0

ESPRESSIF_USB_VID = 0x303A


def find_espressif_port() -> str:
    """The one Espressif USB device attached; `--board=auto` resolves through this."""
    ports = [port.device for port in list_ports.comports() if port.vid == ESPRESSIF_USB_VID]
    if not ports:
        raise PortUnavailableError(f"--board=auto found no Espressif USB device (vendor id 0x{ESPRESSIF_USB_VID:04X}); "
                         f"attached ports: {', '.join(p.device for p in list_ports.comports()) or 'none'}")
    if len(ports) > 1:
        raise PortUnavailableError(f"--board=auto found several Espressif devices ({', '.join(ports)}); name one")
    return ports[0]


class SerialBoard(Board):
    kind = "serial"
    reflash_hint = "Flashing did not take: is the board in download mode, or is this the wrong port? (docs/hardware.md)"

    def __init__(self, port: str, *, baudrate: int = 921600, timeout_s: float = 5.0,
                 invoke_timeout_s: float = 60.0, build_root: Path | None = None, flasher=None) -> None:
        super().__init__()
        self._port_name = port
        self._baudrate = baudrate
        self._timeout_s = timeout_s
        self._invoke_timeout_s = invoke_timeout_s
        self._build_root = build_root
        self._flasher = flasher
        self._port = None
        self.flash_count = 0

    @property
    def name(self) -> str:
        return self._port_name

    def _open(self) -> DeviceLink:
        self.close()
        is_url = "://" in self._port_name
        if not is_url and not os.path.exists(self._port_name):
            raise PortUnavailableError(f"serial port {self._port_name} does not exist: is the board plugged in? "
                                       f"(`python -m serial.tools.list_ports` lists the ports; --board=auto finds "
                                       f"an ESP32-S3 by its USB vendor id)", where=self._port_name)
        try:
            self._port = serial.serial_for_url(self._port_name, baudrate=self._baudrate, timeout=0.2)
        except (serial.SerialException, OSError, ValueError) as error:
            raise PortUnavailableError(f"cannot open serial port: {error}", where=self._port_name) from error
        self._link = DeviceLink(self._port, name=self._port_name, timeout_s=self._timeout_s,
                                invoke_timeout_s=self._invoke_timeout_s)
        return self._link

    def load(self, firmware: FirmwareImage) -> p.DeviceInfo:
        # The handshake checks the firmware id, which covers every pin of this build.
        self.build = chip_build(firmware)
        if self.info is not None and self.info.firmware_id == firmware.firmware_id:
            return self.info
        link = self._link if self._link is not None else self._open()
        try:
            running = link.handshake()
        except DeviceError:
            # A boot error does not say which firmware failed: flash this one, or, with nothing to
            # flash with, report the error as the kind it is (too large, unsupported op, ...).
            if self._flasher is None or self._build_root is None:
                return self._handshake(link, firmware)
            running = None
        except LinkError:
            running = None  # blank, crashed, or running something that is not tinyhil: flash it
        if running is None or running.firmware_id != firmware.firmware_id:
            self._flash(firmware)
            link = self._open()
        return self._handshake(link, firmware)

    def _flash(self, firmware: FirmwareImage) -> None:
        if self._flasher is None or self._build_root is None:
            raise BoardError(f"board needs firmware {firmware.firmware_id} for {firmware.model_name} and this "
                             f"board was opened without a build directory to make it", where=self._port_name)
        project = render_project(firmware, inspect_model(firmware.model_path.read_bytes(),
                                                         where=str(firmware.model_path)), self._build_root)
        self._flasher.build(project)
        self.close()  # esptool needs the port to itself
        self._flasher.upload(project, self._port_name)
        self.flash_count += 1
        self._port_name = self._wait_for_port(self._port_name)

    @staticmethod
    def _wait_for_port(port: str) -> str:
        if "://" in port:
            return port
        deadline = time.monotonic() + REENUMERATION_TIMEOUT_S
        while time.monotonic() < deadline:
            if os.path.exists(port):
                return port
            espressif = [p.device for p in list_ports.comports() if p.vid == ESPRESSIF_USB_VID]
            if len(espressif) == 1:
                return espressif[0]
            time.sleep(0.2)
        raise PortUnavailableError(f"after flashing, {port} did not come back within {REENUMERATION_TIMEOUT_S:g} s "
                                   f"and no single Espressif USB device appeared instead", where=port)

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None
        self._link = None
        self.info = None
