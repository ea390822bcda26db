"""The firmware stage: what a board must run for one model x variant.

A `FirmwareImage` fixes the model, the tensor arena (size and placement) and the chip settings.
The virtual board boots it directly; the real board gets it built into a PlatformIO project
(firmware/). Sizing and placement are decided here, once, so both boards apply the same rule.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .cache import publish_dir, staging_dir, sweep_staging
from .errors import ModelTooLargeError, UnsupportedOpError
from .sources import DEFAULT_ESP_NN_VERSION, TFLITE_MICRO_VERSION
from .tflite_model import ModelInfo

# Bumped when the firmware's behaviour changes, so boards running an older build are reflashed.
# The content of firmware/ is part of the firmware id as well (template_hash).
FIRMWARE_VERSION = "tinyhil-fw-2"
FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "firmware"
# Files of firmware/ that go into every generated project; everything else there is documentation,
# the host layer of the virtual board (host/) or native test code (test/).
_TEMPLATE_FILES = ("platformio.ini", "sdkconfig.defaults", "partitions.csv", "src/main.cpp", "src/CMakeLists.txt",
                   "CMakeLists.txt")
# The portable core: the chip build and the virtual board's native build compile the same files.
_TEMPLATE_DIRS = ("components/tinyhil",)
CORE_DIR = FIRMWARE_DIR / "components" / "tinyhil"
HOST_LAYER_DIR = FIRMWARE_DIR / "host"

# The host TFLM is 64-bit: its arena holds 8-byte pointers where the ESP32-S3 has 4-byte ones, so
# host usage is an upper bound. The margin covers allocator alignment differences between builds.
ARENA_MARGIN_FRACTION = 0.10
ARENA_MARGIN_BYTES = 2048
ARENA_ALIGN = 1024


@dataclass(frozen=True)
class MemoryBudget:
    """Memory of an ESP32-S3 N8R8 module as the esp32-s3-devkitc-1 PlatformIO board presents it."""

    sram_bytes: int = 327_680            # RAM the board definition gives the application
    # ESP-IDF, FreeRTOS, task stacks and link driver buffers, with the default 32 KB data cache
    # (firmware/sdkconfig.defaults says why not 64 KB).
    sram_reserved_bytes: int = 65_536
    psram_bytes: int = 8 * 1024 * 1024   # octal PSRAM on N8R8 / N16R8 modules
    # The factory app partition of firmware/partitions.csv (read from it: default_flash_app_bytes).
    flash_app_bytes: int = field(default_factory=lambda: default_flash_app_bytes())
    firmware_code_bytes: int = 360_000   # the image without the model (ESP-IDF + TFLM + ESP-NN)

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
    memory: MemoryBudget = field(default_factory=MemoryBudget)
    link: LinkSettings = LinkSettings()
    esp_nn_version: str = DEFAULT_ESP_NN_VERSION
    # The debug build: every tensor preserved, so the host can read intermediate tensors
    # (GET_TENSOR). Planned by plan_debug_firmware, whose arena is sized for it.
    preserve_all_tensors: bool = False

    @property
    def firmware_id(self) -> str:
        key = (f"{FIRMWARE_VERSION}|{template_hash()}|{self.model_id}|{self.arena_size}|{self.arena_in_psram}|"
               f"{self.cpu_mhz}|{self.esp_nn}|{self.link.kind}|{self.link.baud}|{self.esp_nn_version}")
        if self.preserve_all_tensors:  # appended only when set: normal images keep their ids
            key += "|preserve_all_tensors"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def platformio_env(self) -> str:
        """The env of firmware/platformio.ini that builds this image."""
        return PLATFORMIO_DEBUG_ENV if self.preserve_all_tensors else PLATFORMIO_ENV


# firmware/platformio.ini: the normal build, and the debug build that keeps every tensor.
PLATFORMIO_ENV = "esp32s3"
PLATFORMIO_DEBUG_ENV = "esp32s3-debug-tensors"


def model_id_of(model_bytes: bytes) -> str:
    return hashlib.sha256(model_bytes).hexdigest()[:16]


def arena_size_for(host_arena_used: int) -> int:
    wanted = int(host_arena_used * (1 + ARENA_MARGIN_FRACTION)) + ARENA_MARGIN_BYTES
    return -(-wanted // ARENA_ALIGN) * ARENA_ALIGN


ARENA_PLACEMENTS = ("auto", "sram", "psram")


def arena_in_psram(size: int, memory: MemoryBudget, arena: str = "auto") -> bool:
    """Where an arena of `size` bytes goes: with `auto`, SRAM when it fits the budget and PSRAM
    otherwise; `sram` or `psram` force it. The one placement rule of both images."""
    if arena not in ARENA_PLACEMENTS:
        raise ValueError(f"arena placement must be one of {', '.join(ARENA_PLACEMENTS)}, got {arena!r}")
    return size > memory.sram_arena_budget if arena == "auto" else arena == "psram"


_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(\[[A-Za-z0-9][A-Za-z0-9_.-]*\])?")


def plan_firmware(model_name: str, model_path: Path, host_arena_used: int, *, cpu_mhz: int = 240,
                  esp_nn: bool = True, arena: str = "auto", link: LinkSettings = LinkSettings(),
                  memory: MemoryBudget | None = None, esp_nn_version: str = DEFAULT_ESP_NN_VERSION,
                  arena_bytes: int | None = None) -> FirmwareImage:
    """Size the arena from the host's recorded allocation and place it: with `auto`, SRAM when it
    fits the budget and PSRAM otherwise; `sram` or `psram` force it (to measure what PSRAM costs).
    `arena_bytes` fixes the size instead, as a sketch's kTensorArenaSize does. Whether it then fits
    at all is for the board to say, as a device would."""
    if not _CASE_ID.fullmatch(model_name):
        # The name is written into generated C++ and YAML: suites check their names, and so does
        # this public entry point for callers that bypass them.
        raise ValueError(f"model name {model_name!r} must be a case id, model[variant], of letters, digits, "
                         f"'_', '-' and '.'")
    memory = memory or MemoryBudget()
    size = arena_bytes if arena_bytes is not None else arena_size_for(host_arena_used)
    in_psram = arena_in_psram(size, memory, arena)
    return FirmwareImage(model_name=model_name, model_path=model_path, model_id=model_id_of(model_path.read_bytes()),
                         arena_size=size, arena_in_psram=in_psram, cpu_mhz=cpu_mhz, esp_nn=esp_nn, memory=memory,
                         link=link, esp_nn_version=esp_nn_version)


def plan_debug_firmware(firmware: FirmwareImage, *, preserved_arena_used: int | None = None) -> FirmwareImage:
    """The debug build of `firmware`: the same model and chip settings with every tensor preserved,
    its arena sized from what host TFLM needs in that mode (`preserved_arena_used`, measured with
    harness.tflm.preserved_arena_bytes when not given) plus the usual margin, and placed by the
    `auto` rule whatever the normal image forced: SRAM when it fits the budget, else PSRAM. An
    arena that fits neither is refused here, with the bytes it needs and both budgets."""
    if preserved_arena_used is None:
        from .tflm import preserved_arena_bytes

        preserved_arena_used = preserved_arena_bytes(firmware.model_path.read_bytes(), where=firmware.model_name)
    memory = firmware.memory
    size = arena_size_for(preserved_arena_used)
    in_psram = arena_in_psram(size, memory)
    if size > (memory.psram_bytes if in_psram else memory.sram_arena_budget):
        raise ModelTooLargeError(
            f"the preserve-all-tensors debug build needs a {size}-byte tensor arena (host TFLM keeps every tensor "
            f"in {preserved_arena_used} bytes, plus margin): more than the SRAM budget "
            f"({memory.sram_arena_budget} bytes) and than PSRAM ({memory.psram_bytes} bytes)",
            where=firmware.model_name)
    return replace(firmware, arena_size=size, arena_in_psram=in_psram, preserve_all_tensors=True)


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


def default_flash_app_bytes() -> int:
    """The factory app partition of the shipped partition table: the room for code and model."""
    from .idf_build import app_partition_bytes

    return app_partition_bytes(FIRMWARE_DIR / "partitions.csv")


@dataclass(frozen=True)
class FirmwareBuild:
    """What a board's numbers come from: which build of the firmware ran, and its pinned parts."""

    kind: str                   # "chip" (PlatformIO/ESP-IDF for the ESP32-S3), "native" (the virtual
                                # board's host build of the same core), or "python" (the fallback engine)
    esp_tflite_micro: str
    esp_nn: str
    idf: str
    optimisation: str           # per part of the build, e.g. "app -O2, esp-tflite-micro -O3, esp-nn -O2"
    note: str = ""              # platform and compiler, the kernels and sources, or why it is the fallback


def chip_build(firmware: FirmwareImage, template_dir: Path = FIRMWARE_DIR) -> FirmwareBuild:
    """The build `pio run` makes of this firmware for the ESP32-S3: pins read from the rendered files."""
    from . import idf_build

    levels = idf_build.optimisation_levels(render_sdkconfig(firmware, template_dir))
    return FirmwareBuild(kind="chip", esp_tflite_micro=TFLITE_MICRO_VERSION, esp_nn=firmware.esp_nn_version,
                         idf=idf_build.IDF_VERSION, optimisation=_describe_optimisation(levels),
                         note=f"{_platform_pin(template_dir)}, {idf_build.TOOLCHAIN_PACKAGE} "
                              f"{idf_build.TOOLCHAIN_VERSION}")


def _describe_optimisation(levels: Mapping[str, str]) -> str:
    return ", ".join(f"{part} {level}" for part, level in levels.items())


@cache
def _platform_pin(template_dir: Path = FIRMWARE_DIR) -> str:
    import configparser

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(template_dir / "platformio.ini")
    return next((ini[section]["platform"].strip() for section in ini.sections() if "platform" in ini[section]),
                "unknown")


def idf_component_manifest(firmware: FirmwareImage) -> str:
    """src/idf_component.yml: every registry component pinned exactly. esp-tflite-micro accepts any
    esp-nn >= 1.1.1, so without a pin of its own each build would take the newest esp-nn, whose S3
    kernels changed between 1.1.x and 1.2.x (esp-nn #23, #26, #36)."""
    from .idf_build import IDF_VERSION

    return (f"# Generated by tinyhil for {firmware.model_name}. Do not edit.\n"
            "# Resolved by the ESP-IDF component manager during the PlatformIO build.\n"
            "dependencies:\n"
            f'  idf: "=={IDF_VERSION}"\n'
            f'  espressif/esp-tflite-micro: "=={TFLITE_MICRO_VERSION}"\n'
            f'  espressif/esp-nn: "=={firmware.esp_nn_version}"\n')


# Every builtin op the op resolver of the pinned esp-tflite-micro (TFLITE_MICRO_VERSION) can register,
# with its MicroMutableOpResolver method; read off that version's micro_mutable_op_resolver.h.
# The virtual board's native build compiles every one of these calls against the pinned sources
# (firmware/host/main.cpp), so a name that version lacks fails there. An op missing here has no
# kernel in the firmware.
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
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice",
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
    "REDUCE_ALL": "AddReduceAll",
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


# Custom ops (by their custom code) that TFLM's op resolver can register: the signal library's audio
# front end (micro_speech's preprocessor model) and a few others, read off the same header.
CUSTOM_RESOLVER_METHODS: Mapping[str, str] = MappingProxyType({
    "CIRCULAR_BUFFER": "AddCircularBuffer",
    "SignalDelay": "AddDelay",
    "SignalEnergy": "AddEnergy",
    "SignalFftAutoScale": "AddFftAutoScale",
    "SignalFilterBank": "AddFilterBank",
    "SignalFilterBankLog": "AddFilterBankLog",
    "SignalFilterBankSpectralSubtraction": "AddFilterBankSpectralSubtraction",
    "SignalFilterBankSquareRoot": "AddFilterBankSquareRoot",
    "SignalFramer": "AddFramer",
    "SignalIrfft": "AddIrfft",
    "SignalOverlapAdd": "AddOverlapAdd",
    "SignalPCAN": "AddPCAN",
    "SignalRfft": "AddRfft",
    "SignalStacker": "AddStacker",
    "SignalWindow": "AddWindow",
    "TFLite_Detection_PostProcess": "AddDetectionPostprocess",
})


def resolver_method(op_name: str) -> str:
    """The `tflite::MicroMutableOpResolver` method that registers builtin op `op_name`."""
    try:
        return RESOLVER_METHODS.get(op_name) or CUSTOM_RESOLVER_METHODS[op_name]
    except KeyError:
        raise UnsupportedOpError(f"TFLite Micro (esp-tflite-micro {TFLITE_MICRO_VERSION}) has no kernel for op {op_name}") from None


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
    custom = [op for op in model.custom_op_types if op not in CUSTOM_RESOLVER_METHODS]
    if custom:
        raise UnsupportedOpError(f"custom op(s) {', '.join(custom)} need a registration the firmware generator "
                                 f"does not have; it registers builtin ops and TFLM's own custom ops "
                                 f"({', '.join(sorted(CUSTOM_RESOLVER_METHODS))})", where=firmware.model_name)
    missing = sorted(op for op in model.all_op_types
                     if op not in RESOLVER_METHODS and op not in CUSTOM_RESOLVER_METHODS)
    if missing:
        raise UnsupportedOpError(f"TFLite Micro (esp-tflite-micro {TFLITE_MICRO_VERSION}) has no kernel for op(s) {', '.join(missing)}",
                                 where=firmware.model_name)


def _config_header(firmware: FirmwareImage, model: ModelInfo) -> str:
    # Every subgraph's ops: an IF/WHILE body's ops are resolved in AllocateTensors() like the main
    # graph's.
    ops = model.all_op_types
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
// The arena above is planned for this build; main.cpp checks that the PlatformIO env agrees
// (TINYHIL_PRESERVE_ALL_TENSORS, set by the {PLATFORMIO_DEBUG_ENV} env).
#define TINYHIL_IMAGE_PRESERVES_TENSORS {1 if firmware.preserve_all_tensors else 0}
#define TINYHIL_LINK_UART {1 if firmware.link.kind == "uart" else 0}
#define TINYHIL_UART_BAUD {firmware.link.baud}
#define TINYHIL_OP_COUNT {len(model.ops)}
#define TINYHIL_OP_TYPES {len(ops)}
#define TINYHIL_SRAM_BYTES {firmware.memory.sram_bytes}
#define TINYHIL_PSRAM_BYTES {firmware.memory.psram_bytes}
#define TINYHIL_FLASH_APP_BYTES {firmware.memory.flash_app_bytes}

using TinyhilOpResolver = tflite::MicroMutableOpResolver<TINYHIL_OP_TYPES>;

// Exactly the operator types of the model's subgraphs ({", ".join(ops)}): nothing else is linked in.
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
        "sdkconfig.defaults": render_sdkconfig(firmware, template_dir),
        "src/idf_component.yml": idf_component_manifest(firmware),
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
        # Concurrent runs may render the same project: each in its own staging directory, and the
        # first to finish publishes it (a directory without .complete is one a crash left).
        sweep_staging(out_root)
        with staging_dir(out_root, content_hash) as staging:
            for path in _template_paths(template_dir):
                target = staging / path.relative_to(template_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            for relative, text in generated.items():
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            (staging / ".complete").write_text("")
            if directory.is_dir() and not (directory / ".complete").is_file():
                shutil.rmtree(directory, ignore_errors=True)
            publish_dir(staging, directory)
    return FirmwareProject(directory, content_hash, firmware)


def render_sdkconfig(firmware: FirmwareImage, template_dir: Path = FIRMWARE_DIR) -> str:
    """The project's sdkconfig.defaults: firmware/sdkconfig.defaults plus this firmware's clock,
    esp-nn kernel choice and console channel (never the link's port)."""
    from .idf_build import sdkconfig_model_lines

    base = (template_dir / "sdkconfig.defaults").read_text() if (template_dir / "sdkconfig.defaults").is_file() else ""
    lines = [base.rstrip(), "", "# Generated by tinyhil for this model:",
             *sdkconfig_model_lines(firmware.cpu_mhz, firmware.esp_nn, firmware.link.kind), ""]
    return "\n".join(lines)
