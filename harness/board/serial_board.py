"""A real ESP32-S3 on a serial port: a device path, `auto`, or a pyserial URL (rfc2217://, socket://)."""

from __future__ import annotations

import os

import serial
from serial.tools import list_ports

from .. import protocol as p
from ..errors import PortUnavailableError
from ..firmware import FirmwareImage
from .base import Board
from .link import DeviceLink

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
    reflash_hint = ("Building and flashing firmware from a suite is not implemented yet: flash the firmware "
                    "yourself (docs/hardware.md).")

    def __init__(self, port: str, *, baudrate: int = 921600, timeout_s: float = 5.0,
                 invoke_timeout_s: float = 60.0) -> None:
        super().__init__()
        self._port_name = port
        self._baudrate = baudrate
        self._timeout_s = timeout_s
        self._invoke_timeout_s = invoke_timeout_s
        self._port = None

    @property
    def name(self) -> str:
        return self._port_name

    def _open(self) -> DeviceLink:
        self.close()
        is_url = "://" in self._port_name
        if not is_url and not os.path.exists(self._port_name):
            raise PortUnavailableError(f"serial port {self._port_name} does not exist: is the board plugged in? "
                             f"(`python -m serial.tools.list_ports` lists the ports; --board=auto finds an "
                             f"ESP32-S3 by its USB vendor id)", where=self._port_name)
        try:
            self._port = serial.serial_for_url(self._port_name, baudrate=self._baudrate, timeout=0.2)
        except (serial.SerialException, OSError, ValueError) as error:
            raise PortUnavailableError(f"cannot open serial port: {error}", where=self._port_name) from error
        return DeviceLink(self._port, name=self._port_name, timeout_s=self._timeout_s,
                          invoke_timeout_s=self._invoke_timeout_s)

    def load(self, firmware: FirmwareImage) -> p.DeviceInfo:
        if self.info is not None and self.info.firmware_id == firmware.firmware_id:
            return self.info
        link = self._link if self._link is not None else self._open()
        return self._handshake(link, firmware)

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None
        self._link = None
        self.info = None
