"""A board on a serial port: a device path, `auto`, or a pyserial URL (rfc2217://, socket://).

Behind the port is a real ESP32-S3 (flashed with PlatformIOFlasher) or a standing virtual board
(harness.board.standing, flashed in band with VirtualBoardFlasher). A chip's local port is used
only when its USB identity is an ESP32-S3's (ESP32S3_USB_IDS) or the user says `flash_anyway`; a
URL is talked to, being an explicit remote setup, but never flashed without `flash_anyway`
(docs/hardware.md, "Which ports tinyhil uses"). A standing virtual board is no chip: neither check
applies to it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import serial
from serial.tools import list_ports

from .. import protocol as p
from ..errors import BoardError, LinkError, PortIdentityError, PortUnavailableError
from ..firmware import FirmwareBuild, FirmwareImage, chip_build
from .base import Board
from .flasher import RunningFirmware, discard_input, standing_board_url, upload_with
from .link import DeviceError, DeviceLink

# After an upload, esptool resets the chip; its native USB port disappears and comes back, maybe
# under another name (/dev/ttyACM0 -> /dev/ttyACM1).
REENUMERATION_TIMEOUT_S = 15.0

ESPRESSIF_USB_VID = 0x303A
# USB identities taken for an ESP32-S3 without being told: Espressif's own vendor id (the chip's
# native USB Serial/JTAG and USB-OTG), and the USB-UART bridges ESP32-S3 dev kits carry on their
# UART connector: Silicon Labs CP210x (10C4:EA60, Espressif's kits and many clones) and WCH's
# CH340/CH343/CH9102 family (1A86:*, most third-party boards). None marks any product id. Anything
# else (an FTDI cable, a built-in UART, a pseudo-terminal) is refused unless the user passes
# flash_anyway: flashing an ESP32-S3 image onto it is never right.
ESP32S3_USB_IDS: tuple[tuple[int, int | None], ...] = ((ESPRESSIF_USB_VID, None), (0x10C4, 0xEA60), (0x1A86, None))
FLASH_ANYWAY_HINT = "pass --flash-anyway to use it all the same"


@dataclass(frozen=True)
class PortIdentity:
    """What the operating system says is behind a serial port."""

    device: str
    vid: int | None = None
    pid: int | None = None
    description: str = ""

    @property
    def is_usb(self) -> bool:
        return self.vid is not None

    @property
    def could_be_esp32s3(self) -> bool:
        return any(self.vid == vid and (pid is None or self.pid == pid) for vid, pid in ESP32S3_USB_IDS)

    def describe(self) -> str:
        if not self.is_usb:
            return "no USB identity (not a USB device)"
        pid = f"{self.pid:04X}" if self.pid is not None else "????"
        return f"USB identity {self.vid:04X}:{pid}" + (f" ({self.description})" if self.description else "")


def port_identity(port: str) -> PortIdentity:
    """The USB identity of a local port, from pyserial's port list (which follows symlinks such
    as /dev/serial/by-id/...). A port the list does not have, or has without a vendor id (a
    built-in UART, a pseudo-terminal), has no USB identity."""
    target = os.path.realpath(port)
    for info in list_ports.comports(include_links=True):
        if os.path.realpath(info.device) == target:
            description = " ".join(part for part in (info.manufacturer, info.product) if part) or (
                info.description if info.description not in (None, "n/a", info.device) else "")
            return PortIdentity(port, info.vid, info.pid, description or "")
    return PortIdentity(port)


def _identity_refusal(identity: PortIdentity) -> PortIdentityError:
    return PortIdentityError(f"{identity.describe()}, so not taken for an ESP32-S3 (Espressif USB 303A:*, or a dev "
                             f"kit's CP210x 10C4:EA60 or CH34x 1A86:* bridge): nothing sent, nothing flashed; "
                             f"{FLASH_ANYWAY_HINT}", where=identity.device)


def check_port_identity(port: str) -> PortIdentity:
    """Refuse, at once and before a byte is sent, a local port that is not an ESP32-S3 by its USB
    identity. A silent /dev/ttyS0 otherwise costs three HELLO timeouts per model, then a build and
    an upload to whatever is on the other end."""
    if not os.path.exists(port):
        raise _missing_port(port)
    identity = port_identity(port)
    if not identity.could_be_esp32s3:
        raise _identity_refusal(identity)
    return identity


def _missing_port(port: str) -> PortUnavailableError:
    return PortUnavailableError(f"serial port {port} does not exist: is the board plugged in? "
                                f"(`python -m serial.tools.list_ports` lists the ports; --board=auto finds "
                                f"an ESP32-S3 by its USB vendor id)", where=port)


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
                 invoke_timeout_s: float = 60.0, build_root: Path | None = None, flasher=None,
                 flash_anyway: bool = False) -> None:
        super().__init__()
        self._flash_anyway = flash_anyway
        self._port_name = port
        self._baudrate = baudrate
        self._timeout_s = timeout_s
        self._invoke_timeout_s = invoke_timeout_s
        self._build_root = build_root
        # Read by the pipeline (a virtual flasher's options are the suite's board settings).
        self.flasher = flasher
        self._port = None
        self.flash_count = 0

    @property
    def _virtual(self) -> bool:
        """A standing virtual board behind the port: flashed in band, no USB identity to check."""
        return bool(getattr(self.flasher, "is_virtual", False))

    @property
    def name(self) -> str:
        return self._port_name

    def _open(self) -> DeviceLink:
        self._open_port()
        return self._new_link()

    def _open_port(self) -> serial.SerialBase:
        self.close()
        is_url = "://" in self._port_name
        if not is_url and not os.path.exists(self._port_name):
            raise _missing_port(self._port_name)
        try:
            url = standing_board_url(self._port_name) if self._virtual else self._port_name
            self._port = serial.serial_for_url(url, baudrate=self._baudrate, timeout=0.2)
        except (serial.SerialException, OSError, ValueError) as error:
            raise PortUnavailableError(f"cannot open serial port: {error}", where=self._port_name) from error
        return self._port

    def _new_link(self) -> DeviceLink:
        """A link for the firmware now running, on the port open now (its own decoder and sequence
        numbers: nothing of an earlier firmware's exchange carries over)."""
        assert self._port is not None
        self._link = DeviceLink(self._port, name=self._port_name, timeout_s=self._timeout_s,
                                invoke_timeout_s=self._invoke_timeout_s)
        return self._link

    def load(self, firmware: FirmwareImage) -> p.DeviceInfo:
        if self.info is not None and self.info.firmware_id == firmware.firmware_id:
            return self.info
        if self._virtual:
            return self._load_virtual(firmware)
        # The handshake checks the firmware id, which covers every pin of this build.
        self.build = chip_build(firmware)
        link = self._link if self._link is not None else self._open()
        try:
            running = link.handshake()
        except DeviceError:
            # A boot error does not say which firmware failed: flash this one, or, with nothing to
            # flash with, report the error as the kind it is (too large, unsupported op, ...).
            if self.flasher is None or self._build_root is None:
                return self._handshake(link, firmware)
            running = None
        except LinkError as error:
            self._raise_if_gone(error)
            running = None  # blank, crashed, or running something that is not tinyhil: flash it
        if running is None or running.firmware_id != firmware.firmware_id:
            self._flash(firmware)
            link = self._open()
        return self._handshake(link, firmware)

    def _load_virtual(self, firmware: FirmwareImage) -> p.DeviceInfo:
        """A standing virtual board says what it runs (INFO): one that runs another firmware, or none,
        is flashed at once, without waiting out a handshake first. INFO, FLASH and the handshake go
        over one port, kept open from the last load when there was one: over rfc2217 each open and
        close of a port costs most of a second. A load that fails closes it (a command's answer
        may still be on its way), so the next load starts on a fresh port."""
        self.info = None
        try:
            running = self._running_firmware()
            if running is not None and running.firmware_id == firmware.firmware_id:
                link = self._new_link()
                try:
                    info = link.handshake()
                except DeviceError:
                    info = None  # a boot error: whichever firmware it was, flash this one
                except LinkError as error:
                    self._raise_if_gone(error)
                    info = None
                if info is not None and info.firmware_id == firmware.firmware_id:
                    self.build = running.build
                    return self._handshake(link, firmware)
            self._flash(firmware)
            return self._handshake(self._new_link(), firmware)
        except BaseException:
            self.close()
            raise

    def _running_firmware(self) -> RunningFirmware | None:
        """INFO over the port left open by the last load, or over a port opened now. A kept port that
        fails (its standing board restarted on the same path, its network connection dropped) is
        opened once more, as a load did every time before: only a fresh port's failure counts."""
        if self._port is not None:
            try:
                return self.flasher.running(self._port_name, serial=self._port)
            except BoardError:
                self.close()
        port = self._open_port()
        discard_input(port)
        return self.flasher.running(self._port_name, serial=port)

    def _flash(self, firmware: FirmwareImage) -> None:
        if self.flasher is None or (self._build_root is None and not self._virtual):
            raise BoardError(f"board needs firmware {firmware.firmware_id} for {firmware.model_name} and this "
                             f"board was opened without a build directory to make it", where=self._port_name)
        self._check_may_flash()
        if self._virtual and self._port is not None:
            # In band, over the port the handshake then uses; no USB device to come back either.
            self.build = self.flasher.flash(firmware, self._port_name, self._build_root, serial=self._port)
            self.flash_count += 1
            return
        self.close()  # esptool (and download mode) needs the port to itself
        self.build = self._run_flasher(firmware)
        self.flash_count += 1
        self._port_name = self._wait_for_port(self._port_name)

    def _run_flasher(self, firmware: FirmwareImage) -> FirmwareBuild:
        flash = getattr(self.flasher, "flash", None)
        if flash is not None:
            return flash(firmware, self._port_name, self._build_root)
        # A flasher with only PlatformIOFlasher's build and upload steps.
        return upload_with(self.flasher, firmware, self._port_name, self._build_root)

    def _check_may_flash(self) -> None:
        """The last guard before an upload, for boards made without open_board's check (a
        pyserial URL, a SerialBoard built directly): only a port that is an ESP32-S3 by its USB
        identity is flashed unless the user said otherwise. A standing virtual board is no chip."""
        if self._flash_anyway or self._virtual:
            return
        if "://" in self._port_name:
            raise PortIdentityError("the board does not run the firmware this model needs, and a pyserial URL has "
                                    "no USB identity to show an ESP32-S3 is behind it: nothing flashed; pass "
                                    "--flash-anyway to flash it", where=self._port_name)
        identity = port_identity(self._port_name)
        if not identity.could_be_esp32s3:
            raise _identity_refusal(identity)

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

    def _raise_if_gone(self, error: BoardError) -> None:
        gone = self._unrecoverable(error)
        if gone is not None:
            raise gone from error

    def _unrecoverable(self, error: BoardError) -> BoardError | None:
        """The port is gone (unplugged, its standing board ended, its network connection dropped):
        no retry can help, and the farm takes the board out at once."""
        why = self._port_gone(error)
        if why is None:
            return None
        return PortUnavailableError(f"{why}; the link said: {error.message}", where=self._port_name)

    def _port_gone(self, error: BoardError) -> str | None:
        # The port's own exception (not silence, not a damaged frame) means this handle is dead: every
        # retry reuses it. pyserial reports a pty whose other end closed, or a USB device unplugged, as
        # "device reports readiness to read but returned no data" or EIO; a URL's dropped connection
        # as "connection failed" or "socket disconnected"; none of them reconnects.
        failure = _port_failure(error)
        if "://" in self._port_name:
            return f"the connection to {self._port_name} is gone ({failure})" if failure else None
        if not os.path.exists(self._port_name):
            return f"serial port {self._port_name} no longer exists (unplugged, or its standing board ended)"
        fd = getattr(self._port, "fd", None)
        if fd is not None:
            try:
                if os.fstat(fd).st_rdev != os.stat(self._port_name).st_rdev:
                    return f"serial port {self._port_name} now leads to another device than the one opened"
            except OSError as unreadable:
                return f"serial port {self._port_name} cannot be checked: {unreadable}"
        if failure:
            return (f"serial port {self._port_name} failed ({failure}): the device behind it is gone (unplugged, or "
                    f"its standing board ended)")
        return None

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None
        self._link = None
        self.info = None


def _port_failure(error: BaseException) -> str:
    """The port's own exception behind a link error (not a timeout), as text; "" when none."""
    seen = error.__cause__ or error.__context__
    while seen is not None:
        if isinstance(seen, (serial.SerialException, OSError)):
            return f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return ""
