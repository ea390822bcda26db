"""The firmware stage: what a board must run for one model x variant.

A `FirmwareImage` fixes the model, the tensor arena (size and placement) and the chip settings.
The virtual board boots it directly; the real board gets it built into a PlatformIO project
(firmware/). Sizing and placement are decided here, once, so both boards apply the same rule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# Bumped when the firmware's behaviour changes, so boards running an older build are reflashed.
FIRMWARE_VERSION = "tinyhil-fw-1"

# The host TFLM is 64-bit: its arena holds 8-byte pointers where the ESP32-S3 has 4-byte ones, so
# host usage is an upper bound. The margin covers allocator alignment differences between builds.
ARENA_MARGIN_FRACTION = 0.10
ARENA_MARGIN_BYTES = 2048
ARENA_ALIGN = 1024


@dataclass(frozen=True)
class MemoryBudget:
    """Memory of an ESP32-S3 N8R8 module as the esp32-s3-devkitc-1 PlatformIO board presents it."""

    sram_bytes: int = 327_680            # RAM the board definition gives the application
    sram_reserved_bytes: int = 65_536    # Arduino core, FreeRTOS, task stacks and link buffers
    psram_bytes: int = 8 * 1024 * 1024   # octal PSRAM on N8R8 / N16R8 modules
    flash_app_bytes: int = 3_342_336     # app0 partition of the default 8 MB partition table
    firmware_code_bytes: int = 360_000   # the image without the model (Arduino + TFLM + ESP-NN)

    @property
    def sram_arena_budget(self) -> int:
        return self.sram_bytes - self.sram_reserved_bytes


@dataclass(frozen=True)
class FirmwareImage:
    model_name: str
    model_path: Path
    model_id: str
    arena_size: int
    arena_in_psram: bool
    cpu_mhz: int = 240
    esp_nn: bool = True
    memory: MemoryBudget = MemoryBudget()

    @property
    def firmware_id(self) -> str:
        key = f"{FIRMWARE_VERSION}|{self.model_id}|{self.arena_size}|{self.arena_in_psram}|{self.cpu_mhz}|{self.esp_nn}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def model_id_of(model_bytes: bytes) -> str:
    return hashlib.sha256(model_bytes).hexdigest()[:16]


def arena_size_for(host_arena_used: int) -> int:
    wanted = int(host_arena_used * (1 + ARENA_MARGIN_FRACTION)) + ARENA_MARGIN_BYTES
    return -(-wanted // ARENA_ALIGN) * ARENA_ALIGN


def plan_firmware(model_name: str, model_path: Path, host_arena_used: int, *, cpu_mhz: int = 240,
                  esp_nn: bool = True, memory: MemoryBudget = MemoryBudget()) -> FirmwareImage:
    """Size the arena from the host's recorded allocation and place it: SRAM when it fits the
    budget, PSRAM otherwise. Whether it then fits at all is for the board to say, as a device would."""
    arena = arena_size_for(host_arena_used)
    return FirmwareImage(model_name=model_name, model_path=model_path, model_id=model_id_of(model_path.read_bytes()),
                         arena_size=arena, arena_in_psram=arena > memory.sram_arena_budget, cpu_mhz=cpu_mhz,
                         esp_nn=esp_nn, memory=memory)
