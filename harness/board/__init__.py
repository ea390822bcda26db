"""Boards: one interface (`Board`), two implementations sharing the protocol code (`DeviceLink`)."""

from __future__ import annotations

from pathlib import Path

from .base import Board, BoardTensor, Inference
from ..errors import BoardError
from .flasher import PlatformIOFlasher
from .serial_board import SerialBoard, check_port_identity, find_espressif_port, port_identity
from .virtual import VirtualBoard

FLASHERS = ("platformio", "virtual")

__all__ = ["Board", "BoardTensor", "Inference", "SerialBoard", "VirtualBoard", "open_board", "port_identity"]


def open_board(spec: str, workdir: Path, build_root: Path, *, flash_anyway: bool = False,
               flasher: str = "platformio") -> Board:
    """`virtual` (the default), `auto`, a device path such as /dev/ttyACM0, or a pyserial URL.

    `workdir` keeps the board's logs (build, upload, console); `build_root` the generated
    firmware projects, keyed by content so an unchanged one is never rebuilt. A device path whose
    USB identity is not an ESP32-S3's is refused here, before a byte is sent, unless
    `flash_anyway`; a URL is opened, but flashed only with `flash_anyway`. `flasher` "virtual"
    says the port is a standing virtual board (harness.board.standing), flashed over its own link:
    it has no USB identity to check."""
    if spec == "virtual":
        return VirtualBoard(workdir)
    if flasher not in FLASHERS:
        raise BoardError(f"flasher must be one of {', '.join(FLASHERS)}, got {flasher!r}", where=spec)
    port = find_espressif_port() if spec == "auto" else spec
    if flasher == "virtual":
        from .flasher import VirtualBoardFlasher

        return SerialBoard(port, build_root=build_root, flasher=VirtualBoardFlasher(workdir))
    if "://" not in port and not flash_anyway:
        check_port_identity(port)
    return SerialBoard(port, build_root=build_root, flasher=PlatformIOFlasher(workdir), flash_anyway=flash_anyway)
