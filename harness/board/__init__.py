"""Boards: one interface (`Board`), two implementations sharing the protocol code (`DeviceLink`)."""

from __future__ import annotations

from pathlib import Path

from .base import Board, Inference
from .flasher import PlatformIOFlasher
from .serial_board import SerialBoard, find_espressif_port
from .virtual import VirtualBoard

__all__ = ["Board", "Inference", "SerialBoard", "VirtualBoard", "open_board"]


def open_board(spec: str, workdir: Path, build_root: Path) -> Board:
    """`virtual` (the default), `auto`, a device path such as /dev/ttyACM0, or a pyserial URL.

    `workdir` keeps the board's logs (build, upload, console); `build_root` the generated
    firmware projects, keyed by content so an unchanged one is never rebuilt."""
    if spec == "virtual":
        return VirtualBoard(workdir)
    port = find_espressif_port() if spec == "auto" else spec
    return SerialBoard(port, build_root=build_root, flasher=PlatformIOFlasher(workdir))
