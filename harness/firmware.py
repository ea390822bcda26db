"""The firmware stage: what a board must run for one model x variant.

A `FirmwareImage` fixes the model, the tensor arena (size and placement) and the chip settings.
The virtual board boots it directly; the real board gets it built into a PlatformIO project
(firmware/). Sizing and placement are decided here, once, so both boards apply the same rule.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .errors import ModelTooLargeError, UnsupportedOpError
from .tflite_model import ModelInfo

# Bumped when the firmware's behaviour changes, so boards running an older build are reflashed.
# The content of firmware/ is part of the firmware id as well (template_hash).
FIRMWARE_VERSION = "tinyhil-fw-1"
FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "firmware"
# Files of firmware/ that go into every generated project; everything else there is documentation
# or native test code.
_TEMPLATE_FILES = ("platformio.ini", "sdkconfig.defaults", "src/main.cpp", "src/idf_component.yml",
                   "src/CMakeLists.txt", "CMakeLists.txt")
_TEMPLATE_DIRS = ("lib/tinyhil_protocol",)

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


# Native USB (USB Serial/JTAG, full speed): the baud setting is ignored. Device-to-host CDC moves
# about 560 KiB/s untuned (shared/reference/esp32s3-facts.md); the same rate is assumed host to
# device, plus about one 1 ms USB frame of latency per transfer.
USB_BYTES_PER_S = 560 * 1024
USB_TRANSFER_LATENCY_S = 0.001
UART_BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit


@dataclass(frozen=True)
class LinkSettings:
    kind: str = "usb"   # "usb" (native USB CDC) or "uart" (UART0 through a USB-serial bridge)
    baud: int = 115200  # UART only

    def __post_init__(self) -> None:
        if self.kind not in ("usb", "uart"):
            raise ValueError(f"link kind must be usb or uart, got {self.kind!r}")
        if self.baud <= 0:
            raise ValueError(f"baud must be positive, got {self.baud}")

    @property
    def bytes_per_s(self) -> float:
        return USB_BYTES_PER_S if self.kind == "usb" else self.baud / UART_BITS_PER_BYTE

    @property
    def latency_s(self) -> float:
        """Delay before a transfer that starts on an idle link (USB waits for its next frame)."""
        return USB_TRANSFER_LATENCY_S if self.kind == "usb" else 0.0

    def transfer_s(self, nbytes: int) -> float:
        """Time `nbytes` take on the wire as one transfer on an idle link."""
        return self.latency_s + nbytes / self.bytes_per_s

    def busy_until(self, link_free_at: float, now: float, nbytes: int, *, streaming: bool) -> float:
        """When `nbytes` have crossed. `streaming`: they were already waiting when the receiver
        got to them, so the wire never stopped (reception goes on in hardware while the CPU
        works) and they follow the previous bytes. Otherwise the link was idle and they start now,
        after the link's latency."""
        start = link_free_at if streaming and link_free_at > now - 1.0 else now + self.latency_s
        return start + nbytes / self.bytes_per_s


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
    link: LinkSettings = LinkSettings()

    @property
    def firmware_id(self) -> str:
        key = (f"{FIRMWARE_VERSION}|{template_hash()}|{self.model_id}|{self.arena_size}|{self.arena_in_psram}|"
               f"{self.cpu_mhz}|{self.esp_nn}|{self.link.kind}|{self.link.baud}")
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def model_id_of(model_bytes: bytes) -> str:
    return hashlib.sha256(model_bytes).hexdigest()[:16]


def arena_size_for(host_arena_used: int) -> int:
    wanted = int(host_arena_used * (1 + ARENA_MARGIN_FRACTION)) + ARENA_MARGIN_BYTES
    return -(-wanted // ARENA_ALIGN) * ARENA_ALIGN


ARENA_PLACEMENTS = ("auto", "sram", "psram")


def plan_firmware(model_name: str, model_path: Path, host_arena_used: int, *, cpu_mhz: int = 240,
                  esp_nn: bool = True, arena: str = "auto", link: LinkSettings = LinkSettings(),
                  memory: MemoryBudget = MemoryBudget()) -> FirmwareImage:
    """Size the arena from the host's recorded allocation and place it: with `auto`, SRAM when it
    fits the budget and PSRAM otherwise; `sram` or `psram` force it (to measure what PSRAM costs).
    Whether it then fits at all is for the board to say, as a device would."""
    if arena not in ARENA_PLACEMENTS:
        raise ValueError(f"arena placement must be one of {', '.join(ARENA_PLACEMENTS)}, got {arena!r}")
    size = arena_size_for(host_arena_used)
    in_psram = size > memory.sram_arena_budget if arena == "auto" else arena == "psram"
    return FirmwareImage(model_name=model_name, model_path=model_path, model_id=model_id_of(model_path.read_bytes()),
                         arena_size=size, arena_in_psram=in_psram, cpu_mhz=cpu_mhz, esp_nn=esp_nn, memory=memory,
                         link=link)


# --- PlatformIO project generation -------------------------------------------------------------

def _template_paths(template_dir: Path) -> list[Path]:
    paths = [template_dir / name for name in _TEMPLATE_FILES if (template_dir / name).is_file()]
    for directory in _TEMPLATE_DIRS:
        paths += sorted(p for p in (template_dir / directory).rglob("*") if p.is_file())
    return sorted(paths)


@cache
def template_hash(template_dir: Path = FIRMWARE_DIR) -> str:
    """Hash of the firmware sources every generated project is made from."""
    digest = hashlib.sha256()
    for path in _template_paths(template_dir):
        digest.update(str(path.relative_to(template_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@cache
def firmware_versions(template_dir: Path = FIRMWARE_DIR) -> dict[str, str]:
    """The firmware's pinned platform and TFLM component: the library versions behind a measured
    latency (the host's tflite-micro package is what the virtual board runs instead)."""
    import configparser

    import yaml

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(template_dir / "platformio.ini")
    platform = next((ini[section]["platform"] for section in ini.sections() if "platform" in ini[section]), "unknown")
    component = yaml.safe_load((template_dir / "src" / "idf_component.yml").read_text())
    tflm = component.get("dependencies", {}).get("espressif/esp-tflite-micro", "unknown")
    return {"firmware platform": platform.strip(), "firmware esp-tflite-micro": str(tflm).strip()}


# Every builtin op the op resolver of the pinned esp-tflite-micro (1.3.4, src/idf_component.yml)
# can register, with its MicroMutableOpResolver method; read off that version's
# micro_mutable_op_resolver.h. An op missing here has no kernel in the firmware.
RESOLVER_METHODS: Mapping[str, str] = MappingProxyType({
    "ABS": "AddAbs",
    "ADD": "AddAdd",
    "ADD_N": "AddAddN",
    "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast",
    "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D",
    "COS": "AddCos",
    "CUMSUM": "AddCumSum",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEQUANTIZE": "AddDequantize",
    "DIV": "AddDiv",
    "ELU": "AddElu",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "EQUAL": "AddEqual",
    "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill",
    "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog",
    "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax",
    "MAXIMUM": "AddMaximum",
    "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean",
    "MINIMUM": "AddMinimum",
    "MIRROR_PAD": "AddMirrorPad",
    "MUL": "AddMul",
    "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack",
    "PAD": "AddPad",
    "PADV2": "AddPadV2",
    "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable",
    "REDUCE_MAX": "AddReduceMax",
    "REDUCE_MIN": "AddReduceMin",
    "RELU": "AddRelu",
    "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound",
    "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2",
    "SHAPE": "AddShape",
    "SIN": "AddSin",
    "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit",
    "SPLIT_V": "AddSplitV",
    "SQRT": "AddSqrt",
    "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference",
    "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub",
    "SUM": "AddSum",
    "SVDF": "AddSvdf",
    "TANH": "AddTanh",
    "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile",
    "ZEROS_LIKE": "AddZerosLike",
})


def resolver_method(op_name: str) -> str:
    """The `tflite::MicroMutableOpResolver` method that registers builtin op `op_name`."""
    try:
        return RESOLVER_METHODS[op_name]
    except KeyError:
        raise UnsupportedOpError(f"TFLite Micro (esp-tflite-micro 1.3.4) has no kernel for op {op_name}") from None


def c_array(symbol: str, data: bytes, *, alignment: int = 16) -> str:
    """The model as C++ source: what `xxd -i` gives, aligned for TFLM, const so it stays in flash."""
    lines = [f"// Generated by tinyhil from a {len(data)}-byte .tflite model. Do not edit.",
             '#include "model_data.h"', "",
             f"alignas({alignment}) const unsigned char {symbol}[] = {{"]
    for start in range(0, len(data), 12):
        chunk = data[start:start + 12]
        lines.append("  " + ", ".join(f"0x{byte:02x}" for byte in chunk) + ",")
    lines += ["};", f"const unsigned int {symbol}_len = {len(data)};", ""]
    return "\n".join(lines)


def parse_c_array(source: str) -> bytes:
    """Bytes of the first array initializer in `source` (checks what c_array wrote)."""
    body = source[source.index("{") + 1:source.index("};")]
    return bytes(int(token, 16) for token in re.findall(r"0x([0-9a-fA-F]{2})", body))


def check_fits(firmware: FirmwareImage, model: ModelInfo) -> None:
    """Refuse, with the numbers, what cannot fit the board, before spending a build on it."""
    memory = firmware.memory
    image = memory.firmware_code_bytes + model.size_bytes
    if image > memory.flash_app_bytes:
        raise ModelTooLargeError(f"firmware image would be {image} bytes (code {memory.firmware_code_bytes} + model "
                                 f"{model.size_bytes}), the app partition holds {memory.flash_app_bytes}",
                                 where=firmware.model_name)
    region, free = (("PSRAM", memory.psram_bytes) if firmware.arena_in_psram
                    else ("internal SRAM", memory.sram_arena_budget))
    if firmware.arena_size > free:
        raise ModelTooLargeError(f"tensor arena of {firmware.arena_size} bytes does not fit {region} ({free} bytes "
                                 f"available)", where=firmware.model_name)
    custom = sorted({op.name for op in model.ops if op.is_custom})
    if custom:
        raise UnsupportedOpError(f"custom op(s) {', '.join(custom)} need a registration the firmware generator "
                                 f"does not have; only builtin ops are resolved", where=firmware.model_name)
    missing = sorted(op for op in model.op_types if op not in RESOLVER_METHODS)
    if missing:
        raise UnsupportedOpError(f"TFLite Micro (esp-tflite-micro 1.3.4) has no kernel for op(s) {', '.join(missing)}",
                                 where=firmware.model_name)


def _config_header(firmware: FirmwareImage, model: ModelInfo) -> str:
    ops = model.op_types
    registrations = "\n".join(f"  if (resolver.{resolver_method(op)}() != kTfLiteOk) return false;" for op in ops)
    return f"""// Generated by tinyhil for {firmware.model_name}. Do not edit.
#pragma once
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

#define TINYHIL_FIRMWARE_ID "{firmware.firmware_id}"
#define TINYHIL_MODEL_ID "{firmware.model_id}"
#define TINYHIL_CPU_MHZ {firmware.cpu_mhz}
#define TINYHIL_ESP_NN {1 if firmware.esp_nn else 0}
// Host TFLM's recorded arena plus the margin of harness/firmware.py.
#define TINYHIL_ARENA_BYTES {firmware.arena_size}
#define TINYHIL_ARENA_IN_PSRAM {1 if firmware.arena_in_psram else 0}
#define TINYHIL_LINK_UART {1 if firmware.link.kind == "uart" else 0}
#define TINYHIL_UART_BAUD {firmware.link.baud}
#define TINYHIL_OP_COUNT {len(model.ops)}
#define TINYHIL_OP_TYPES {len(ops)}
#define TINYHIL_SRAM_BYTES {firmware.memory.sram_bytes}
#define TINYHIL_PSRAM_BYTES {firmware.memory.psram_bytes}
#define TINYHIL_FLASH_APP_BYTES {firmware.memory.flash_app_bytes}

using TinyhilOpResolver = tflite::MicroMutableOpResolver<TINYHIL_OP_TYPES>;

// Exactly the operator types of the model ({", ".join(ops)}): nothing else is linked in.
inline bool tinyhil_register_ops(TinyhilOpResolver& resolver) {{
{registrations}
  return true;
}}
"""


@dataclass(frozen=True)
class FirmwareProject:
    directory: Path
    content_hash: str
    firmware: FirmwareImage


def render_project(firmware: FirmwareImage, model: ModelInfo, out_root: Path,
                   template_dir: Path = FIRMWARE_DIR) -> FirmwareProject:
    """A PlatformIO project for this model under out_root/<content hash>/ (reused when present)."""
    check_fits(firmware, model)
    if not (template_dir / "platformio.ini").is_file():
        raise FileNotFoundError(f"firmware sources not found at {template_dir} (expected platformio.ini there)")
    model_bytes = firmware.model_path.read_bytes()
    generated = {
        "src/model_data.cpp": c_array("tinyhil_model", model_bytes),
        "src/model_data.h": ("#pragma once\nextern const unsigned char tinyhil_model[];\n"
                             "extern const unsigned int tinyhil_model_len;\n"),
        "src/model_config.h": _config_header(firmware, model),
        "sdkconfig.defaults": _sdkconfig(firmware, template_dir),
    }
    digest = hashlib.sha256()
    for path in _template_paths(template_dir):
        relative = str(path.relative_to(template_dir))
        if relative not in generated:
            digest.update(relative.encode() + b"\0" + path.read_bytes())
    for relative, text in sorted(generated.items()):
        digest.update(relative.encode() + b"\0" + text.encode())
    content_hash = digest.hexdigest()[:24]
    directory = out_root / content_hash
    if not (directory / ".complete").is_file():
        staging = out_root / f"{content_hash}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for path in _template_paths(template_dir):
            target = staging / path.relative_to(template_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        for relative, text in generated.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        (staging / ".complete").write_text("")
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    return FirmwareProject(directory, content_hash, firmware)


def _sdkconfig(firmware: FirmwareImage, template_dir: Path) -> str:
    base = (template_dir / "sdkconfig.defaults").read_text() if (template_dir / "sdkconfig.defaults").is_file() else ""
    lines = [base.rstrip(), "", "# Generated by tinyhil for this model:",
             f"CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_{firmware.cpu_mhz}=y",
             f"CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ={firmware.cpu_mhz}",
             # esp-nn's Kconfig choice: optimized S3 kernels, or its portable C ones.
             "CONFIG_NN_OPTIMIZED=y" if firmware.esp_nn else "CONFIG_NN_ANSI_C=y", ""]
    return "\n".join(lines)
