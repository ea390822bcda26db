"""What the real board's firmware is built with, as facts the harness can use and record.

The firmware (firmware/) is a PlatformIO project with `framework = espidf`. This module holds the
pinned facts of that build (ESP-IDF and platform versions, the C/C++ standards ESP-IDF compiles
with, the optimisation level each part of the build really gets), reads the shipped partition
table for the flash budget of a model, and renders the per-model sdkconfig lines (clock, esp-nn
kernels, console channel).

Everything here is plain data and parsing: nothing reads the upstream sources at run time.
tests/test_build_checks.py checks each fact against those sources (the pinned ESP-IDF,
platform-espressif32, esp-tflite-micro and esp-nn trees in ../shared/vendor).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "firmware"
PARTITIONS_CSV = FIRMWARE_DIR / "partitions.csv"

# --- Pinned versions --------------------------------------------------------------------------

IDF_VERSION = "5.5.3"
PLATFORM = "espressif32 @ 6.13.0"
PLATFORM_VERSION = "6.13.0"
# platform.json's framework-espidf requirement for `framework = espidf` (PlatformIO writes ESP-IDF
# X.Y.Z as 3.XXYYZZ), and the toolchain it switches to (platform.py, espidf-only branch).
FRAMEWORK_ESPIDF_PACKAGE = "~3.50503.0"
TOOLCHAIN_PACKAGE = "toolchain-xtensa-esp-elf"
TOOLCHAIN_VERSION = "14.2.0+20251107"
BOARD = "esp32-s3-devkitc-1"

# --- Language standards -------------------------------------------------------------------------

# ESP-IDF 5.5.3 tools/cmake/build.cmake (__build_set_default_build_specifications), for every
# component of a chip target: the app, components/tinyhil and ESP-IDF itself.
C_STANDARD = "gnu17"
CXX_STANDARD = "gnu++2b"
# esp-tflite-micro 1.3.8 compiles its own C++ sources with `-std=c++11 ... -std=gnu++14` after
# ESP-IDF's flags (CMakeLists.txt, PRIVATE): the last -std wins, so TFLM itself is C++14.
TFLM_CXX_STANDARD = "gnu++14"

# --- Optimisation -------------------------------------------------------------------------------

# CONFIG_COMPILER_OPTIMIZATION_* -> the -O flag ESP-IDF adds for the app and every component
# (ESP-IDF's top-level CMakeLists.txt; the Kconfig prompts of the choice name the same flags).
OPTIMISATION_FLAGS: Mapping[str, str] = {
    "CONFIG_COMPILER_OPTIMIZATION_DEBUG": "-Og",
    "CONFIG_COMPILER_OPTIMIZATION_SIZE": "-Os",
    "CONFIG_COMPILER_OPTIMIZATION_PERF": "-O2",
    "CONFIG_COMPILER_OPTIMIZATION_NONE": "-O0",
}
# Kconfig's default for the choice when no line selects one.
DEFAULT_OPTIMISATION = "CONFIG_COMPILER_OPTIMIZATION_DEBUG"
# What components add after ESP-IDF's level, in their own CMakeLists.txt (PRIVATE options come
# after the build-wide ones, and a source file's COMPILE_FLAGS after both).
TFLM_OPTIMISATION = "-O3"                # esp-tflite-micro: common_flags
TFLM_DEPTHWISE_CONV_FILE = "tensorflow/lite/micro/kernels/esp_nn/depthwise_conv.cc"
TFLM_DEPTHWISE_CONV_OPTIMISATION = "-O2"  # set_source_files_properties(... COMPILE_FLAGS -O2)
ESP_NN_OPTIMISATION = "-O2"              # esp-nn: target_compile_options(... PRIVATE ... -O2)

BUILDERS = ("platformio", "idf.py")


def effective_optimisation(flags: list[str], builder: str = "platformio") -> str:
    """The -O flag that wins among `flags`, given in command-line order (build-wide first, then
    the component's, then the source file's). GCC takes the last one. PlatformIO's espidf builder
    adds each CMake flag fragment with SCons' AppendUnique, which skips a flag already present, so
    a repeated flag stays at its first position; idf.py passes CMake's command line unchanged."""
    if builder not in BUILDERS:
        raise ValueError(f"builder must be one of {', '.join(BUILDERS)}, got {builder!r}")
    levels = [flag for flag in flags if flag.startswith("-O")]
    if not levels:
        raise ValueError("no -O flag given")
    if builder == "platformio":
        levels = list(dict.fromkeys(levels))
    return levels[-1]


def parse_sdkconfig(text: str) -> dict[str, str]:
    """The options a sdkconfig or sdkconfig.defaults text sets, as {"CONFIG_X": value}: "y", "n"
    for `# CONFIG_X is not set`, otherwise the value as written (strings keep their quotes). A
    later line for the same option replaces an earlier one, as in kconfgen."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        unset = re.fullmatch(r"#\s*(CONFIG_\w+) is not set", line)
        if unset:
            options[unset.group(1)] = "n"
            continue
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"(CONFIG_\w+)=(.*)", line)
        if not match:
            raise ValueError(f"not a sdkconfig line: {raw!r}")
        options[match.group(1)] = match.group(2).strip()
    return options


def optimisation_choice(sdkconfig_text: str) -> str:
    """The CONFIG_COMPILER_OPTIMIZATION_* option in effect: the last one set to y (a choice keeps
    the last selection), else the Kconfig default."""
    chosen = DEFAULT_OPTIMISATION
    for raw in sdkconfig_text.splitlines():
        match = re.fullmatch(r"(CONFIG_COMPILER_OPTIMIZATION_(?:DEBUG|SIZE|PERF|NONE))=y", raw.strip())
        if match:
            chosen = match.group(1)
    return chosen


def optimisation_levels(sdkconfig_text: str, builder: str = "platformio") -> dict[str, str]:
    """For a rendered sdkconfig (or sdkconfig.defaults) text, the optimisation level of each part of
    the build, for the results to record:

    - app: src/ and components/tinyhil (ESP-IDF's build-wide level only),
    - esp-idf: every ESP-IDF component (same level),
    - esp-tflite-micro: TFLM with the ESP-NN kernel wrappers (its -O3 comes after the build-wide
      level),
    - esp-tflite-micro depthwise_conv.cc: the ESP-NN depthwise wrapper, which esp-tflite-micro
      sets back to -O2 per file. Under PlatformIO that -O2 is dropped when the build-wide level is
      -O2 as well (a repeated flag, see `effective_optimisation`), so the file gets -O3 then,
    - esp-nn: the kernels (its -O2 comes after the build-wide level; the S3 assembly has none).
    """
    choice = optimisation_choice(sdkconfig_text)
    level = OPTIMISATION_FLAGS[choice]
    suffix = "" if choice in parse_sdkconfig(sdkconfig_text) else ", the Kconfig default"
    tflm = effective_optimisation([level, TFLM_OPTIMISATION], builder)
    depthwise = effective_optimisation([level, TFLM_OPTIMISATION, TFLM_DEPTHWISE_CONV_OPTIMISATION], builder)
    esp_nn = effective_optimisation([level, ESP_NN_OPTIMISATION], builder)
    return {
        "app": f"{level} ({choice}{suffix})",
        "esp-idf": f"{level} ({choice}{suffix})",
        "esp-tflite-micro": f"{tflm} (its CMakeLists.txt)",
        "esp-tflite-micro depthwise_conv.cc": (
            f"{depthwise} (set for this file in its CMakeLists.txt)" if depthwise == TFLM_DEPTHWISE_CONV_OPTIMISATION
            else f"{depthwise} (the file's own {TFLM_DEPTHWISE_CONV_OPTIMISATION} is dropped by PlatformIO as a repeat "
                 f"of the build-wide {level})"),
        "esp-nn": f"{esp_nn} (its CMakeLists.txt)",
    }


def build_facts(sdkconfig_text: str, builder: str = "platformio") -> dict[str, str]:
    """Everything about the firmware build that a measured latency depends on, as flat strings."""
    facts = {
        "firmware platform": PLATFORM,
        "firmware esp-idf": IDF_VERSION,
        "firmware toolchain": f"{TOOLCHAIN_PACKAGE} {TOOLCHAIN_VERSION}",
        "firmware c standard": C_STANDARD,
        "firmware c++ standard": f"{CXX_STANDARD} (esp-tflite-micro: {TFLM_CXX_STANDARD})",
    }
    facts.update({f"firmware optimisation {part}": level
                  for part, level in optimisation_levels(sdkconfig_text, builder).items()})
    return facts


# --- Per-model sdkconfig lines ------------------------------------------------------------------

CPU_MHZ_CHOICES = (80, 160, 240)
LINK_KINDS = ("usb", "uart")


def sdkconfig_model_lines(cpu_mhz: int, esp_nn: bool, link_kind: str) -> list[str]:
    """The lines harness/firmware.py appends to firmware/sdkconfig.defaults for one model.

    - Clock: the choice member only; CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ is derived from it.
    - esp-nn: its Kconfig.projbuild choice, optimized (S3 assembly) or portable ANSI C kernels.
    - Console, never on the link's port. Link on native USB (USB Serial/JTAG): console on UART0,
      the DevKitC's "UART" port. Link on UART0: console on USB Serial/JTAG. The secondary console
      is off in the static part. The ROM's own boot messages still go to UART0 (fixed in the
      chip), so a UART link sees them after every reset, before the firmware's first frame.
    """
    if cpu_mhz not in CPU_MHZ_CHOICES:
        raise ValueError(f"cpu_mhz must be one of {CPU_MHZ_CHOICES}, got {cpu_mhz}")
    if link_kind not in LINK_KINDS:
        raise ValueError(f"link kind must be one of {LINK_KINDS}, got {link_kind!r}")
    return [
        f"CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_{cpu_mhz}=y",
        "CONFIG_NN_OPTIMIZED=y" if esp_nn else "CONFIG_NN_ANSI_C=y",
        "CONFIG_ESP_CONSOLE_UART_DEFAULT=y" if link_kind == "usb" else "CONFIG_ESP_CONSOLE_USB_SERIAL_JTAG=y",
    ]


# --- Partition table ----------------------------------------------------------------------------

PARTITION_TABLE_OFFSET = 0x8000
PARTITION_TABLE_SIZE = 0x1000
_TYPES = {"app": 0x00, "data": 0x01}
_APP_SUBTYPES = {"factory": 0x00, "test": 0x20, **{f"ota_{n}": 0x10 + n for n in range(16)}}
_ALIGNMENT = {0x00: 0x10000}  # app partitions; everything else 4 KiB
_DEFAULT_ALIGNMENT = 0x1000


@dataclass(frozen=True)
class Partition:
    name: str
    type: str      # as written: "app", "data" or a number
    subtype: str   # as written
    offset: int
    size: int
    flags: str = ""

    @property
    def type_id(self) -> int:
        return _parse_int(self.type, _TYPES)

    @property
    def is_app(self) -> bool:
        return self.type_id == _TYPES["app"]


def _parse_int(value: str, keywords: Mapping[str, int] | None = None) -> int:
    """gen_esp32part.py's parse_int: int(x, 0) with k/K and m/M suffixes (x1024, x1024^2), or a
    keyword."""
    text = value.strip()
    for letter, multiplier in (("k", 1024), ("m", 1024 * 1024)):
        if text.lower().endswith(letter):
            return _parse_int(text[:-1], keywords) * multiplier
    try:
        return int(text, 0)
    except ValueError:
        if keywords and text.lower() in keywords:
            return keywords[text.lower()]
        raise ValueError(f"invalid partition table field {value!r}") from None


def read_partition_table(path: Path | str = PARTITIONS_CSV,
                         table_offset: int = PARTITION_TABLE_OFFSET) -> list[Partition]:
    """The partitions of an ESP-IDF partition CSV, read as gen_esp32part.py reads it: blank offsets
    follow the previous partition (aligned to 64 KiB for app partitions, 4 KiB otherwise, the first
    one after the table's sector), sizes take K/M suffixes or hex, a negative size means "up to
    that offset", $VARS are expanded from the environment."""
    path = Path(path)
    rows = []
    for line_no, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = os.path.expandvars(raw).strip()
        unknown = re.search(r"(?<!\\)\$([A-Za-z_][A-Za-z0-9_]*)", line)
        if unknown:
            raise ValueError(f"{path}:{line_no}: unknown variable {unknown.group(1)}")
        if not line or line.startswith("#"):
            continue
        fields = [field.strip() for field in (line + ",,,,").split(",")]
        name, ptype, subtype, offset, size, flags = fields[:6]
        if ptype in ("bootloader", "partition_table"):
            raise ValueError(f"{path}:{line_no}: {ptype} entries are not supported here")
        if not size:
            raise ValueError(f"{path}:{line_no}: partition {name} has no size")
        try:
            rows.append((line_no, name, ptype, subtype, _parse_int(offset) if offset else None,
                         _parse_int(size), flags))
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: {exc}") from None
    partitions = []
    last_end = table_offset + PARTITION_TABLE_SIZE
    for line_no, name, ptype, subtype, offset, size, flags in rows:
        if offset is None:
            align = _ALIGNMENT.get(_parse_int(ptype, _TYPES), _DEFAULT_ALIGNMENT)
            offset = -(-last_end // align) * align
        elif offset < last_end:
            raise ValueError(f"{path}:{line_no}: partition {name} at {offset:#x} overlaps the previous one, "
                             f"which ends at {last_end:#x}")
        if size < 0:
            size = -size - offset
        partitions.append(Partition(name, ptype, subtype, offset, size, flags))
        last_end = offset + size
    return partitions


def boot_app_partition(partitions: list[Partition]) -> Partition:
    """The app partition the bootloader starts on a freshly flashed board: factory, else ota_0."""
    apps = [p for p in partitions if p.is_app]
    for wanted in ("factory", "ota_0"):
        for partition in apps:
            if _parse_int(partition.subtype, _APP_SUBTYPES) == _APP_SUBTYPES[wanted]:
                return partition
    raise ValueError("the partition table has no factory or ota_0 app partition")


def app_partition_bytes(path: Path | str = PARTITIONS_CSV) -> int:
    """The size of the app partition the firmware runs from: the flash budget of code + model."""
    return boot_app_partition(read_partition_table(path)).size
