"""Boards: one interface (`Board`), two implementations sharing the protocol code (`DeviceLink`)."""

from __future__ import annotations

from pathlib import Path

from .base import Board, Inference
from .serial_board import SerialBoard, find_espressif_port
from .virtual import VirtualBoard

__all__ = ["Board", "Inference", "SerialBoard", "VirtualBoard", "open_board"]


def open_board(spec: str, workdir: Path) -> Board:
    """`virtual` (the default), `auto`, a device path such as /dev/ttyACM0, or a pyserial URL."""
    if spec == "virtual":
        return VirtualBoard(workdir)
    if spec == "auto":
        return SerialBoard(find_espressif_port())
    return SerialBoard(spec)
