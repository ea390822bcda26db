"""The firmware's build files checked against the upstream sources they are written for.

No ESP32-S3 toolchain is available here, so nothing is built for the chip. Instead each build
setting is checked with the upstream tool or file that decides it, pinned in ../shared/vendor
(NOTICE.md there): ESP-IDF 5.5.3's Kconfig tree with esp-idf-kconfig's kconfgen (every sdkconfig
the harness can render), its gen_esp32part.py and parttool.py (the partition table), its
tools/cmake (C/C++ standard and warning flags, compiled with host g++ on the portable sources),
platform-espressif32 6.13.0 (what `framework = espidf` installs and how it builds), and the
CMakeLists of esp-tflite-micro and esp-nn (the optimisation each part really gets).

Each check has a negative control where a check could silently pass: a test showing the same
check fails on input that is wrong.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

from harness import firmware as fw
from harness import idf_build

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
VENDOR = Path(__file__).resolve().parents[1].parent / "shared" / "vendor"
IDF = VENDOR / "esp-idf"
PLATFORM_DIR = VENDOR / "platform-espressif32"
TFLM = VENDOR / "esp-tflite-micro"
PARTITION_TOOLS = IDF / "components" / "partition_table"

pytestmark = pytest.mark.skipif(not VENDOR.is_dir(), reason=f"upstream sources not found at {VENDOR} "
                                "(../shared/vendor, see its NOTICE.md); these checks read them")

TIMEOUT_S = 120


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)


def _ini() -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(FIRMWARE / "platformio.ini")
    return ini


def _env() -> configparser.SectionProxy:
    return _ini()["env:esp32s3"]


def _migrated() -> bool:
    """Whether harness/firmware.py renders the ESP-IDF 5.5.3 firmware yet (the lead's change)."""
    return hasattr(fw, "render_sdkconfig")


def _waiting(name: str) -> str:
    return f"waiting for harness/firmware.py's move to ESP-IDF 5.5.3 (it has no {name} yet)"


def _pinned_versions() -> tuple[str, str, tuple[str, ...]]:
    """esp-tflite-micro's version, esp-nn's default and every esp-nn version a suite can pick."""
    try:
        from harness import sources
    except ImportError:  # before the lead's harness/sources.py
        return "1.3.8", "1.1.2", ("1.1.2",)
    return sources.TFLITE_MICRO_VERSION, sources.DEFAULT_ESP_NN_VERSION, tuple(sources.ESP_NN_VERSIONS)


TFLM_VERSION, ESP_NN_DEFAULT, ESP_NN_VERSIONS = _pinned_versions()
MANAGED_COMPONENTS = ("espressif/esp-tflite-micro", "espressif/esp-nn")


def _esp_nn_dir(version: str = ESP_NN_DEFAULT) -> Path:
    path = VENDOR / f"esp-nn-{version}"
    if not path.is_dir():
        pytest.skip(f"no vendored esp-nn {version} at {path}")
    return path


def _image(cpu_mhz: int = 240, esp_nn: bool = True, link_kind: str = "usb", esp_nn_version: str = ESP_NN_DEFAULT):
    extra = {"esp_nn_version": esp_nn_version} if "esp_nn_version" in fw.FirmwareImage.__dataclass_fields__ else {}
    return fw.FirmwareImage(model_name="build-check", model_path=Path("unused.tflite"), model_id="0" * 16,
                            arena_size=1024, arena_in_psram=False, cpu_mhz=cpu_mhz, esp_nn=esp_nn,
                            link=fw.LinkSettings(kind=link_kind), **extra)


# --- Kconfig: every sdkconfig the harness renders -----------------------------------------------

COMBINATIONS = [(mhz, nn, link) for mhz in idf_build.CPU_MHZ_CHOICES for nn in (True, False)
                for link in idf_build.LINK_KINDS]


def _rendered_sdkconfig(cpu_mhz: int, esp_nn: bool, link_kind: str, esp_nn_version: str = ESP_NN_DEFAULT) -> str:
    """What harness/firmware.py writes as sdkconfig.defaults for a model with these settings."""
    if _migrated():
        return fw.render_sdkconfig(_image(cpu_mhz, esp_nn, link_kind, esp_nn_version))
    base = (FIRMWARE / "sdkconfig.defaults").read_text()
    return base.rstrip() + "\n\n" + "\n".join(idf_build.sdkconfig_model_lines(cpu_mhz, esp_nn, link_kind)) + "\n"


@cache
def _renames() -> dict[str, str]:
    """Old option name -> new one, from every sdkconfig.rename kconfgen is given for esp32s3."""
    files = [IDF / "sdkconfig.rename"] + sorted(IDF.glob("components/*/sdkconfig.rename")) \
        + sorted(IDF.glob("components/*/sdkconfig.rename.esp32s3"))
    renames = {}
    for path in files:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) == 2 and not line.lstrip().startswith("#"):
                renames[fields[0]] = fields[1].lstrip("!")
    return renames


class Kconfgen:
    """kconfgen set up as ESP-IDF's build runs it (tools/cmake/kconfig.cmake) for an esp32s3
    project with every ESP-IDF component plus esp-nn's Kconfig.projbuild."""

    def __init__(self, work: Path, esp_nn_version: str = ESP_NN_DEFAULT) -> None:
        self.work = work
        components = sorted(p for p in (IDF / "components").iterdir() if p.is_dir())
        kconfigs = [c / "Kconfig" for c in components if (c / "Kconfig").is_file()]
        projbuilds = [c / "Kconfig.projbuild" for c in components if (c / "Kconfig.projbuild").is_file()]
        projbuilds.append(_esp_nn_dir(esp_nn_version) / "Kconfig.projbuild")
        renames = [p for c in components for p in (c / "sdkconfig.rename", c / "sdkconfig.rename.esp32s3")
                   if p.is_file()]
        kconfigs_in, projbuilds_in = work / "kconfigs.in", work / "kconfigs_projbuild.in"
        kconfigs_in.write_text("".join(f'osource "{p}"\n' for p in kconfigs))
        projbuilds_in.write_text("".join(f'osource "{p}"\n' for p in projbuilds))
        self.env_file = work / "config.env"
        self.env_file.write_text(json.dumps({
            "COMPONENT_KCONFIGS": "", "COMPONENT_KCONFIGS_PROJBUILD": "",
            "COMPONENT_SDKCONFIG_RENAMES": ";".join(str(p) for p in renames),
            "IDF_TARGET": "esp32s3", "IDF_TOOLCHAIN": "gcc", "IDF_VERSION": idf_build.IDF_VERSION,
            "IDF_ENV_FPGA": "", "IDF_PATH": str(IDF),
            "COMPONENT_KCONFIGS_SOURCE_FILE": str(kconfigs_in),
            "COMPONENT_KCONFIGS_PROJBUILD_SOURCE_FILE": str(projbuilds_in),
        }))
        self.count = 0

    def full_config(self, defaults_text: str) -> str:
        """The complete sdkconfig kconfgen writes from these defaults (no old-name section)."""
        self.count += 1
        defaults = self.work / f"defaults{self.count}"
        output = self.work / f"sdkconfig{self.count}"
        defaults.write_text(defaults_text)
        result = _run([sys.executable, "-m", "kconfgen", "--list-separator=semicolon",
                       "--kconfig", str(IDF / "Kconfig"), "--sdkconfig-rename", str(IDF / "sdkconfig.rename"),
                       "--defaults", str(defaults), "--env-file", str(self.env_file),
                       "--env", "IDF_MINIMAL_BUILD=n", "--env", f"IDF_INIT_VERSION={idf_build.IDF_VERSION}",
                       "--dont-write-deprecated", "--output", "config", str(output)], cwd=self.work)
        assert result.returncode == 0, f"kconfgen failed:\n{result.stdout}\n{result.stderr}"
        return output.read_text()


_KCONFGENS: dict[str, Kconfgen] = {}


def _kconfgen(tmp_path_factory, esp_nn_version: str = ESP_NN_DEFAULT) -> Kconfgen:
    if importlib.util.find_spec("kconfgen") is None:
        pytest.skip("kconfgen not installed: pip install esp-idf-kconfig==2.5.4 (the version PlatformIO's "
                    "ESP-IDF 5.5.3 build uses)")
    if esp_nn_version not in _KCONFGENS:
        _KCONFGENS[esp_nn_version] = Kconfgen(tmp_path_factory.mktemp(f"kconfgen-{esp_nn_version}"), esp_nn_version)
    return _KCONFGENS[esp_nn_version]


@pytest.fixture
def kconfgen(tmp_path_factory) -> Kconfgen:
    return _kconfgen(tmp_path_factory)


def _same_value(asked: str, written: str) -> bool:
    if asked == written:
        return True
    try:
        return int(asked, 0) == int(written, 0)
    except ValueError:
        return False


def option_problems(asked_text: str, written_text: str) -> list[str]:
    """Options asked for in a sdkconfig.defaults text that ESP-IDF 5.5.3 does not take as asked:
    old names (sdkconfig.rename), names kconfgen does not know or whose dependencies are unmet (it
    drops both silently), and values that did not stick (a later line, a choice, a range)."""
    asked = idf_build.parse_sdkconfig(asked_text)
    written = idf_build.parse_sdkconfig(written_text)
    problems = []
    for name, value in asked.items():
        if name in _renames():
            problems.append(f"{name} is an old name (ESP-IDF 5.5.3 calls it {_renames()[name]})")
        elif name not in written:
            problems.append(f"{name} is not an option of ESP-IDF 5.5.3 for esp32s3, or its dependencies are unmet")
        elif not _same_value(value, written[name]):
            problems.append(f"{name}: asked {value}, got {written[name]}")
    return problems


def console_problems(config: dict[str, str], link_kind: str) -> list[str]:
    """Ways a full sdkconfig lets console output onto the link's port."""
    problems = []
    if link_kind == "usb":
        if config.get("CONFIG_ESP_CONSOLE_USB_SERIAL_JTAG_ENABLED") == "y":
            problems.append("console (primary or secondary) on USB Serial/JTAG, the link")
        if config.get("CONFIG_ESP_CONSOLE_USB_CDC") == "y":
            problems.append("console on the native USB port (USB CDC), the link")
        if config.get("CONFIG_USJ_ENABLE_USB_SERIAL_JTAG") != "y":
            problems.append("USB Serial/JTAG disabled: the link would be off")
    else:
        if config.get("CONFIG_ESP_CONSOLE_UART") == "y" and config.get("CONFIG_ESP_CONSOLE_UART_NUM") == "0":
            problems.append("console on UART0, the link")
        if config.get("CONFIG_ESP_CONSOLE_ROM_SERIAL_PORT_NUM") == "0":
            problems.append("bootloader console (ROM serial port) on UART0, the link")
    return problems


@pytest.mark.parametrize("esp_nn_version", ESP_NN_VERSIONS)
@pytest.mark.parametrize("cpu_mhz, esp_nn, link_kind", COMBINATIONS,
                         ids=[f"{mhz}MHz-{'espnn' if nn else 'ansi'}-{link}" for mhz, nn, link in COMBINATIONS])
def test_rendered_sdkconfig_takes_effect(tmp_path_factory, cpu_mhz, esp_nn, link_kind, esp_nn_version):
    """Every sdkconfig the harness can render, run through kconfgen with the esp-nn Kconfig of the
    version the firmware then pins: each option asked for exists and took the asked value, and
    the result means what the harness intends (clock, kernels, console off the link)."""
    asked = _rendered_sdkconfig(cpu_mhz, esp_nn, link_kind, esp_nn_version)
    written = _kconfgen(tmp_path_factory, esp_nn_version).full_config(asked)
    assert option_problems(asked, written) == []
    config = idf_build.parse_sdkconfig(written)
    assert config["CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ"] == str(cpu_mhz)
    assert config["CONFIG_NN_OPTIMIZED"] == ("y" if esp_nn else "n")
    assert config["CONFIG_NN_ANSI_C"] == ("n" if esp_nn else "y")
    assert console_problems(config, link_kind) == []
    # The rest of the build as the harness assumes it: -O2, octal PSRAM through heap_caps, 8 MB QIO
    # flash, the project's partition table, no C++ exceptions or RTTI (the compile check below).
    assert config["CONFIG_COMPILER_OPTIMIZATION_PERF"] == "y"
    assert config["CONFIG_SPIRAM_MODE_OCT"] == "y" and config["CONFIG_SPIRAM_USE_CAPS_ALLOC"] == "y"
    assert config["CONFIG_ESPTOOLPY_FLASHSIZE"] == '"8MB"' and config["CONFIG_ESPTOOLPY_FLASHMODE_QIO"] == "y"
    assert config["CONFIG_PARTITION_TABLE_FILENAME"] == '"partitions.csv"'
    assert config["CONFIG_COMPILER_CXX_EXCEPTIONS"] == "n" and config["CONFIG_COMPILER_CXX_RTTI"] == "n"
    assert config["CONFIG_ESP_TASK_WDT_CHECK_IDLE_TASK_CPU1"] == "n"
    assert idf_build.optimisation_levels(asked)["app"].startswith("-O2 ")


def test_option_check_catches_idf_4_4_era_names(kconfgen):
    """Negative control: what the Arduino build (ESP-IDF 4.4) used is caught, by name."""
    asked = ("CONFIG_AUTOSTART_ARDUINO=y\nCONFIG_ESP32S3_SPIRAM_SUPPORT=y\n"
             "CONFIG_ESP32S3_DEFAULT_CPU_FREQ_240=y\nCONFIG_FREERTOS_HZ=1000\n")
    problems = option_problems(asked, kconfgen.full_config(asked))
    assert len(problems) == 3, problems
    assert any(p.startswith("CONFIG_AUTOSTART_ARDUINO is not an option") for p in problems)
    assert any(p.startswith("CONFIG_ESP32S3_SPIRAM_SUPPORT is an old name") and "CONFIG_SPIRAM" in p for p in problems)
    assert any(p.startswith("CONFIG_ESP32S3_DEFAULT_CPU_FREQ_240 is an old name") for p in problems)


def test_option_check_catches_values_that_do_not_stick(kconfgen):
    """Negative control: an option whose dependency is off, and a choice member another line
    overrides, are reported although both names exist."""
    asked = ("# CONFIG_SPIRAM_BOOT_INIT is not set\nCONFIG_SPIRAM=y\nCONFIG_SPIRAM_MEMTEST=y\n"
             "CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_80=y\nCONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_160=y\n")
    problems = option_problems(asked, kconfgen.full_config(asked))
    assert any(p.startswith("CONFIG_SPIRAM_MEMTEST ") for p in problems), problems
    assert any(p.startswith("CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_80: asked y, got n") for p in problems), problems
    assert len(problems) == 2, problems


def test_console_check_catches_the_console_on_the_link(kconfgen):
    """Negative control: the other link kind's console line, and a default secondary console
    (USB Serial/JTAG), are caught for a USB link; the USB console line is fine for a UART link."""
    base = (FIRMWARE / "sdkconfig.defaults").read_text()
    wrong_primary = kconfgen.full_config(base + "\nCONFIG_ESP_CONSOLE_USB_SERIAL_JTAG=y\n")
    assert console_problems(idf_build.parse_sdkconfig(wrong_primary), "usb")
    assert console_problems(idf_build.parse_sdkconfig(wrong_primary), "uart") == []
    default_secondary = base.replace("CONFIG_ESP_CONSOLE_SECONDARY_NONE=y", "")
    assert default_secondary != base
    secondary = kconfgen.full_config(default_secondary + "\nCONFIG_ESP_CONSOLE_UART_DEFAULT=y\n")
    assert console_problems(idf_build.parse_sdkconfig(secondary), "usb")
    assert console_problems(idf_build.parse_sdkconfig(secondary), "uart")


def test_kconfgen_is_the_version_platformio_installs():
    """The check's kconfgen is the one PlatformIO installs for ESP-IDF 5 (espidf.py's Python deps)."""
    from packaging.specifiers import SpecifierSet

    text = (PLATFORM_DIR / "builder" / "frameworks" / "espidf.py").read_text()
    spec = re.search(r'"esp-idf-kconfig": "([^"]+)"', text).group(1)
    try:
        installed = metadata.version("esp-idf-kconfig")
    except metadata.PackageNotFoundError:
        pytest.skip("esp-idf-kconfig not installed (pip install esp-idf-kconfig==2.5.4)")
    assert installed in SpecifierSet(spec), f"esp-idf-kconfig {installed}, PlatformIO uses {spec}"


def test_sdkconfig_model_lines_reject_what_the_firmware_cannot_do():
    with pytest.raises(ValueError):
        idf_build.sdkconfig_model_lines(120, True, "usb")
    with pytest.raises(ValueError):
        idf_build.sdkconfig_model_lines(240, True, "spi")


# --- Partition table ----------------------------------------------------------------------------

def _gen_esp32part(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(PARTITION_TOOLS / "gen_esp32part.py"), *args])


def test_partition_table_is_accepted_for_8mb_flash_and_round_trips(tmp_path):
    csv = FIRMWARE / "partitions.csv"
    binary, back, binary2 = tmp_path / "table.bin", tmp_path / "table.csv", tmp_path / "table2.bin"
    result = _gen_esp32part("--flash-size", "8MB", str(csv), str(binary))
    assert result.returncode == 0, result.stderr
    result = _gen_esp32part(str(binary), str(back))
    assert result.returncode == 0, result.stderr
    result = _gen_esp32part("--flash-size", "8MB", str(back), str(binary2))
    assert result.returncode == 0, result.stderr
    assert binary.read_bytes() == binary2.read_bytes()
    ours = [(p.name, p.type_id, p.offset, p.size) for p in idf_build.read_partition_table(csv)]
    theirs = [(p.name, p.type_id, p.offset, p.size) for p in idf_build.read_partition_table(back)]
    assert ours == theirs


def test_partition_table_check_fails_on_a_smaller_flash(tmp_path):
    """Negative control: the same table does not fit 4 MB, and gen_esp32part says so."""
    result = _gen_esp32part("--flash-size", "4MB", str(FIRMWARE / "partitions.csv"), str(tmp_path / "t.bin"))
    assert result.returncode != 0 and "does not fit" in result.stderr


def test_app_partition_bytes_is_what_platformio_reads():
    """PlatformIO gets the app partition with parttool.py --partition-boot-default (espidf.py's
    get_app_partition_offset); the harness's flash budget must be that partition's size."""
    result = _run([sys.executable, str(PARTITION_TOOLS / "parttool.py"), "-q", "--partition-table-offset",
                   hex(idf_build.PARTITION_TABLE_OFFSET), "--partition-table-file", str(FIRMWARE / "partitions.csv"),
                   "get_partition_info", "--partition-boot-default", "--info", "size", "offset"])
    assert result.returncode == 0, result.stderr
    size, offset = (int(v, 16) for v in result.stdout.split())
    assert idf_build.app_partition_bytes() == size
    factory = idf_build.boot_app_partition(idf_build.read_partition_table())
    assert (factory.name, factory.offset) == ("factory", offset)
    assert offset + size == 8 * 1024 * 1024, "the app partition is meant to run to the end of the flash"


@pytest.mark.parametrize("stock", sorted(p.name for p in PARTITION_TOOLS.glob("*.csv")) or ["none"])
def test_partition_reader_agrees_with_gen_esp32part_on_stock_tables(tmp_path, stock):
    """ESP-IDF's stock tables leave offsets blank and use K sizes: read_partition_table must place
    them where gen_esp32part.py does (its binary, turned back into CSV, has every offset)."""
    path = PARTITION_TOOLS / stock
    if not path.is_file():
        pytest.skip("no stock partition tables")
    binary = tmp_path / "t.bin"
    assert _gen_esp32part("-q", str(path), str(binary)).returncode == 0
    back = tmp_path / "t.csv"
    assert _gen_esp32part("-q", str(binary), str(back)).returncode == 0
    ours = [(p.name, p.offset, p.size) for p in idf_build.read_partition_table(path)]
    theirs = [(p.name, p.offset, p.size) for p in idf_build.read_partition_table(back)]
    assert ours == theirs


def test_partition_reader_fills_offsets_and_sizes_like_gen_esp32part(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("# comment\nnvs, data, nvs, , 24K\nphy, data, phy, , 0x1000\n"
                     "app0, app, ota_0, , 1M\nrest, data, spiffs, , -0x400000\n")
    partitions = idf_build.read_partition_table(table)
    assert [(p.offset, p.size) for p in partitions] == [
        (0x9000, 0x6000), (0xF000, 0x1000), (0x10000, 0x100000), (0x110000, 0x400000 - 0x110000)]
    assert idf_build.app_partition_bytes(table) == 0x100000
    result = _gen_esp32part("-q", str(table), str(tmp_path / "t.bin"))
    assert result.returncode == 0, result.stderr


def test_partition_sizes_parse_with_platformio_rules():
    """builder/main.py's _parse_size (for checkprogsize's maximum size) takes digits, 0x hex or a
    K/M suffix on digits; anything else would reach the size check as a string."""
    for raw in (FIRMWARE / "partitions.csv").read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            size = raw.split(",")[4].strip()
            assert size.isdigit() or size.startswith("0x") or (size[-1] in "KkMm" and size[:-1].isdigit()), size


def test_platformio_finds_the_project_table_not_a_stock_one():
    """espidf.py's generate_partition_table looks in ESP-IDF's partition_table directory first:
    a stock file of the same name would shadow the project's."""
    name = _env()["board_build.partitions"]
    assert (FIRMWARE / name).is_file()
    assert not (PARTITION_TOOLS / name).exists()
    defaults = idf_build.parse_sdkconfig((FIRMWARE / "sdkconfig.defaults").read_text())
    assert defaults["CONFIG_PARTITION_TABLE_CUSTOM"] == "y"
    assert defaults["CONFIG_PARTITION_TABLE_CUSTOM_FILENAME"] == f'"{name}"'


# --- C/C++ standard and warnings ----------------------------------------------------------------

@cache
def _idf_default_flags() -> dict[str, list[str]]:
    """The options of __build_set_default_build_specifications in ESP-IDF's build.cmake, per
    variable (compile_options, c_compile_options, cxx_compile_options, compile_definitions)."""
    text = (IDF / "tools" / "cmake" / "build.cmake").read_text()
    body = text.split("function(__build_set_default_build_specifications)", 1)[1].split("endfunction()", 1)[0]
    body = "\n".join(line.split("#", 1)[0] for line in body.splitlines())
    flags: dict[str, list[str]] = {}
    for variable, values in re.findall(r"list\(APPEND\s+(\w+)\s+(.*?)\)", body, flags=re.DOTALL):
        flags.setdefault(variable, []).extend(re.findall(r'"([^"]+)"', values))
    return flags


def test_idf_standards_are_the_recorded_ones():
    flags = _idf_default_flags()
    assert flags["c_compile_options"] == [f"-std={idf_build.C_STANDARD}"]
    assert flags["cxx_compile_options"] == [f"-std={idf_build.CXX_STANDARD}"]
    assert "-Werror" in flags["compile_options"] and "-Wall" in flags["compile_options"]
    version = re.findall(r"set\(IDF_VERSION_(?:MAJOR|MINOR|PATCH) (\d+)\)",
                         (IDF / "tools" / "cmake" / "version.cmake").read_text())
    assert ".".join(version) == idf_build.IDF_VERSION


def _cxx_command(std: str, source: Path) -> list[str]:
    flags = _idf_default_flags()
    # -fno-exceptions / -fno-rtti: CONFIG_COMPILER_CXX_EXCEPTIONS and _RTTI are off (checked on
    # every rendered sdkconfig above); ESP-IDF's top-level CMakeLists.txt turns that into these.
    return (["g++", f"-std={std}", *flags["compile_options"], "-fno-exceptions", "-fno-rtti", "-fsyntax-only",
             *(f"-D{d}" for d in flags.get("compile_definitions", [])), "-DTF_LITE_STATIC_MEMORY",
             "-I", str(FIRMWARE / "components" / "tinyhil" / "include"),
             *(arg for sub in (".", "third_party/flatbuffers/include", "third_party/gemmlowp", "third_party/ruy",
                               "third_party/kissfft") for arg in ("-I", str(TFLM / sub))),
             "-I", str(_esp_nn_dir() / "include"), str(source)])


PORTABLE_SOURCES = sorted((FIRMWARE / "components" / "tinyhil" / "src").glob("*.cpp"))
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="host g++ not found")


@needs_gxx
@pytest.mark.parametrize("source", PORTABLE_SOURCES or [None], ids=[p.name for p in PORTABLE_SOURCES] or ["none"])
def test_portable_sources_compile_with_idf_flags(source):
    """components/tinyhil with ESP-IDF 5.5.3's standard and warnings (-Wall -Werror ...), against the
    pinned TFLM headers. No ESP-IDF include path is given: the portable core must not need one."""
    if source is None:
        pytest.skip("no .cpp under firmware/components/tinyhil/src yet (the lead moves the portable core there)")
    result = _run(_cxx_command(idf_build.CXX_STANDARD, source))
    assert result.returncode == 0, result.stderr[-4000:]


@needs_gxx
def test_protocol_engine_needs_more_than_idf_4_4_cxx11():
    """Negative control: ESP-IDF 4.4's gnu++11 fails on the protocol engine (C++14 constexpr), so
    the standard the check compiles with matters."""
    engine = FIRMWARE / "components" / "tinyhil" / "src" / "tinyhil_protocol.cpp"
    if not engine.is_file():
        pytest.skip("the protocol engine is not under firmware/components/tinyhil/src yet")
    result = _run(_cxx_command("gnu++11", engine))
    assert result.returncode != 0 and "constexpr" in result.stderr, result.stderr[-2000:]


@needs_gxx
def test_the_model_runner_refuses_to_compile_without_tf_lite_static_memory():
    """esp-tflite-micro gives TF_LITE_STATIC_MEMORY only to components that require it, and TFLM's
    structs change layout with it: a glue built without it crashed at boot. Without the define the
    portable core must not compile at all."""
    runner = FIRMWARE / "components" / "tinyhil" / "src" / "model_runner.cpp"
    command = [arg for arg in _cxx_command(idf_build.CXX_STANDARD, runner) if arg != "-DTF_LITE_STATIC_MEMORY"]
    result = _run(command)
    assert result.returncode != 0 and "TF_LITE_STATIC_MEMORY is not defined" in result.stderr, result.stderr[-2000:]


@needs_gxx
def test_idf_warning_flags_reject_a_warning(tmp_path):
    """Negative control: with ESP-IDF's flags (-Wall -Werror) a plain warning fails the compile."""
    source = tmp_path / "warn.cpp"
    source.write_text("int f(int a, int b) { if (a = b) return 1; return 0; }\n")
    result = _run(_cxx_command(idf_build.CXX_STANDARD, source))
    assert result.returncode != 0 and "-Werror=parentheses" in result.stderr


# --- PlatformIO and the platform ----------------------------------------------------------------

@cache
def _platform_json() -> dict:
    return json.loads((PLATFORM_DIR / "platform.json").read_text())


def _espidf_package_version(spec: str) -> str:
    """PlatformIO writes ESP-IDF X.Y.Z as 3.XXYYZZ (framework-espidf ~3.50503.0 is 5.5.3)."""
    packed = re.fullmatch(r"~?3\.(\d+)\.\d+", spec).group(1)
    return f"{int(packed[:-4])}.{int(packed[-4:-2])}.{int(packed[-2:])}"


def test_platform_pin_matches_the_vendored_platform():
    env = _env()
    assert env["platform"].strip() == idf_build.PLATFORM
    assert idf_build.PLATFORM == f"espressif32 @ {_platform_json()['version']}"
    assert idf_build.PLATFORM_VERSION == _platform_json()["version"]
    assert [f.strip() for f in env["framework"].split(",")] == ["espidf"]


def test_framework_espidf_is_the_recorded_idf_version():
    platform = _platform_json()
    assert platform["frameworks"]["espidf"]["package"] == "framework-espidf"
    spec = platform["packages"]["framework-espidf"]["version"]
    assert spec == idf_build.FRAMEWORK_ESPIDF_PACKAGE
    assert _espidf_package_version(spec) == idf_build.IDF_VERSION
    # With Arduino in `framework`, platform.py pins the 4.4 package instead: why there is none.
    downgrade = re.search(r'if "arduino" in frameworks:\s*# Downgrade[^\n]*\n\s*self\.packages\["framework-espidf"\]'
                          r'\["version"\] = "([^"]+)"', (PLATFORM_DIR / "platform.py").read_text())
    assert downgrade and _espidf_package_version(downgrade.group(1)) == "4.4.7"


def test_toolchain_is_the_recorded_one():
    """platform.py makes toolchain-xtensa-esp-elf mandatory for espidf-only projects on Xtensa."""
    platform_py = (PLATFORM_DIR / "platform.py").read_text()
    assert re.search(r'self\.packages\["%s"\]\[\s*"optional"\s*\] = False' % idf_build.TOOLCHAIN_PACKAGE, platform_py)
    assert _platform_json()["packages"][idf_build.TOOLCHAIN_PACKAGE]["version"] == idf_build.TOOLCHAIN_VERSION


def test_board_manifest_is_in_the_platform():
    env = _env()
    assert env["board"].strip() == idf_build.BOARD
    manifest = json.loads((PLATFORM_DIR / "boards" / f"{idf_build.BOARD}.json").read_text())
    assert manifest["build"]["mcu"] == "esp32s3"
    assert "espidf" in manifest["frameworks"]
    assert env["board_upload.flash_size"].strip() == "8MB"
    defaults = idf_build.parse_sdkconfig((FIRMWARE / "sdkconfig.defaults").read_text())
    assert defaults["CONFIG_ESPTOOLPY_FLASHSIZE_8MB"] == "y"  # espidf.py warns on a mismatch


def test_no_optimisation_flag_in_build_flags():
    """The level comes from sdkconfig (recorded); build_flags would reach every component."""
    from platformio.project.config import ProjectConfig

    config = ProjectConfig(str(FIRMWARE / "platformio.ini"))
    assert config.validate(["esp32s3", "esp32s3-debug-tensors"], silent=True)
    for env in ("esp32s3", "esp32s3-debug-tensors"):
        for option in ("build_flags", "build_unflags", "build_src_flags"):
            flags = " ".join(config.get(f"env:{env}", option, []))
            assert not re.search(r"(^|\s)-O\w*", flags), f"{env} {option}: {flags}"


def test_the_debug_tensors_env_is_the_normal_build_with_the_preserve_define():
    """harness/board/flasher.py builds preserve-all-tensors images with this env; main.cpp reads the
    define (and refuses an image planned for the other build)."""
    from platformio.project.config import ProjectConfig

    config = ProjectConfig(str(FIRMWARE / "platformio.ini"))
    assert config.get("platformio", "default_envs") == ["esp32s3"]
    assert _ini()["env:esp32s3-debug-tensors"]["extends"].strip() == "env:esp32s3"
    assert config.get("env:esp32s3-debug-tensors", "build_flags") == ["-DTINYHIL_PRESERVE_ALL_TENSORS=1"]
    assert fw.PLATFORMIO_DEBUG_ENV == "esp32s3-debug-tensors" and fw.PLATFORMIO_ENV == "esp32s3"
    for option in ("platform", "board", "framework", "board_build.partitions", "board_build.flash_mode",
                   "board_upload.flash_size"):
        assert config.get("env:esp32s3-debug-tensors", option) == config.get("env:esp32s3", option), option
    main = (FIRMWARE / "src" / "main.cpp").read_text()
    assert "memory.preserve_all_tensors = TINYHIL_PRESERVE_ALL_TENSORS != 0;" in main


def test_no_lib_directory():
    """PlatformIO's library finder compiles firmware/lib on top of ESP-IDF's components."""
    assert not (FIRMWARE / "lib").exists(), "firmware/lib exists: move it into components/"


# --- CMake components ---------------------------------------------------------------------------

def _register_args(cmakelists: Path) -> dict[str, list[str]]:
    text = "\n".join(line.split("#", 1)[0] for line in cmakelists.read_text().splitlines())
    call = re.search(r"idf_component_register\((.*?)\)", text, flags=re.DOTALL)
    assert call, f"no idf_component_register in {cmakelists}"
    args: dict[str, list[str]] = {}
    key = None
    for token in call.group(1).split():
        token = token.strip('"')
        if token.isupper():
            key = token
            args[key] = []
        else:
            args[key].append(token)
    return args


def _known_component(name: str) -> bool:
    managed = {dep.replace("/", "__") for dep in MANAGED_COMPONENTS}
    return (IDF / "components" / name).is_dir() or (FIRMWARE / "components" / name).is_dir() or name in managed


def test_app_component_lists_its_sources_and_requirements():
    code = "\n".join(line.split("#", 1)[0] for line in (FIRMWARE / "src" / "CMakeLists.txt").read_text().splitlines())
    assert "GLOB" not in code.upper(), "sources must be listed, not globbed"
    args = _register_args(FIRMWARE / "src" / "CMakeLists.txt")
    assert args["SRCS"] == ["main.cpp", "model_data.cpp"]
    requires = args.get("REQUIRES", []) + args.get("PRIV_REQUIRES", [])
    for needed in ("tinyhil", "espressif__esp-tflite-micro", "esp_timer", "esp_driver_usb_serial_jtag",
                   "esp_driver_uart", "esp_psram", "freertos"):
        assert needed in requires
    unknown = [name for name in requires if not _known_component(name)]
    assert unknown == []


def test_tinyhil_component_builds_the_portable_core_with_tflm():
    args = _register_args(FIRMWARE / "components" / "tinyhil" / "CMakeLists.txt")
    assert args["INCLUDE_DIRS"] == ["include"]
    assert args["REQUIRES"] == ["espressif__esp-tflite-micro"]
    if not PORTABLE_SOURCES:
        pytest.skip("no .cpp under firmware/components/tinyhil/src yet")
    assert sorted(args["SRCS"]) == sorted(f"src/{p.name}" for p in PORTABLE_SOURCES)
    # What requiring esp-tflite-micro brings: its headers, and the define its structs depend on.
    tflm = (TFLM / "CMakeLists.txt").read_text()
    assert re.search(r"target_compile_options\(\$\{COMPONENT_LIB\}\s+INTERFACE\s+-DTF_LITE_STATIC_MEMORY\)", tflm)


def test_requirement_check_catches_an_unknown_component():
    """Negative control: an Arduino-era or misspelt name is not a component of this build."""
    assert not _known_component("arduino")
    assert not _known_component("esp-tflite-micro-x")
    assert _known_component("esp_driver_uart")


@pytest.mark.parametrize("esp_nn_version", ESP_NN_VERSIONS)
def test_component_manifest_pins_the_vendored_versions(esp_nn_version):
    """src/idf_component.yml (rendered per model) pins exactly the versions the checks here read."""
    if not hasattr(fw, "idf_component_manifest"):
        pytest.skip(_waiting("idf_component_manifest"))
    import yaml

    manifest = yaml.safe_load(fw.idf_component_manifest(_image(esp_nn_version=esp_nn_version)))["dependencies"]
    pins = {name: str(spec.get("version") if isinstance(spec, dict) else spec) for name, spec in manifest.items()}
    assert set(pins) == {"idf", *MANAGED_COMPONENTS}
    assert pins["idf"] == f"=={idf_build.IDF_VERSION}"
    tflm_version = yaml.safe_load((TFLM / "idf_component.yml").read_text())["version"]
    assert pins["espressif/esp-tflite-micro"] == f"=={tflm_version}" == f"=={TFLM_VERSION}"
    esp_nn_dir = _esp_nn_dir(esp_nn_version)
    # esp-nn 1.1.2's manifest has no version field; its vendored directory is named after it.
    vendored = yaml.safe_load((esp_nn_dir / "idf_component.yml").read_text()).get("version", esp_nn_version)
    assert pins["espressif/esp-nn"] == f"=={vendored}" == f"=={esp_nn_version}"


# --- Optimisation -------------------------------------------------------------------------------

def test_optimisation_mapping_matches_idf_kconfig():
    """The -O flag of each CONFIG_COMPILER_OPTIMIZATION_* choice, as ESP-IDF's Kconfig prompts state
    it (the mapping itself is in ESP-IDF's top-level CMakeLists.txt, which is not vendored)."""
    kconfig = (IDF / "Kconfig").read_text()
    choice = re.search(r"choice COMPILER_OPTIMIZATION\n(.*?)endchoice", kconfig, flags=re.DOTALL).group(1)
    members = dict(re.findall(r"config (COMPILER_OPTIMIZATION_\w+)\s+bool \"([^\"]+)\"", choice))
    assert {f"CONFIG_{m}" for m in members} == set(idf_build.OPTIMISATION_FLAGS)
    for member, prompt in members.items():
        assert re.search(r"-O\w", prompt).group(0) == idf_build.OPTIMISATION_FLAGS[f"CONFIG_{member}"]
    default = re.search(r"default (COMPILER_OPTIMIZATION_\w+)", choice).group(1)
    assert f"CONFIG_{default}" == idf_build.DEFAULT_OPTIMISATION
    # tools/cmake adds no -O flag of its own that could override the level.
    for path in (IDF / "tools" / "cmake").glob("*.cmake"):
        assert not re.search(r'"-O[0-3sgz]"', path.read_text()), path


def test_component_optimisation_matches_their_cmakelists():
    tflm = (TFLM / "CMakeLists.txt").read_text()
    common = re.search(r"set\(common_flags(.*?)\)", tflm, flags=re.DOTALL).group(1).split()
    assert [f for f in common if f.startswith("-O")] == [idf_build.TFLM_OPTIMISATION]
    assert re.search(r"target_compile_options\(\$\{COMPONENT_LIB\} PRIVATE \$\{common_flags\}", tflm)
    per_file = re.search(r"set_source_files_properties\(\$\{tfmicro_kernels_dir\}/(\S+)\s+PROPERTIES COMPILE_FLAGS (\S+)\)",
                         tflm)
    assert f"tensorflow/lite/micro/kernels/{per_file.group(1)}" == idf_build.TFLM_DEPTHWISE_CONV_FILE
    assert (TFLM / idf_build.TFLM_DEPTHWISE_CONV_FILE).is_file()
    assert per_file.group(2) == idf_build.TFLM_DEPTHWISE_CONV_OPTIMISATION
    cxx_stds = re.findall(r"-std=(\S+)", tflm.split("COMPILE_LANGUAGE:CXX", 1)[1].split(">)", 1)[0])
    assert cxx_stds[-1] == idf_build.TFLM_CXX_STANDARD

    esp_nn = (_esp_nn_dir() / "CMakeLists.txt").read_text()
    s3 = re.search(r"if\(CONFIG_IDF_TARGET_ESP32S3\)\s*target_compile_options\(\$\{COMPONENT_LIB\} PRIVATE([^)]*)\)",
                   esp_nn)
    assert [f for f in s3.group(1).split() if f.startswith("-O")] == [idf_build.ESP_NN_OPTIMISATION]


def test_optimisation_levels_per_builder_and_choice():
    perf = (FIRMWARE / "sdkconfig.defaults").read_text()
    levels = idf_build.optimisation_levels(perf)
    assert levels["app"] == "-O2 (CONFIG_COMPILER_OPTIMIZATION_PERF)" == levels["esp-idf"]
    assert levels["esp-tflite-micro"].startswith("-O3 ")
    assert levels["esp-nn"].startswith("-O2 ")
    # The per-file -O2 repeats the build-wide -O2: PlatformIO keeps the first, so -O3 wins there.
    assert levels["esp-tflite-micro depthwise_conv.cc"].startswith("-O3 ")
    assert idf_build.optimisation_levels(perf, "idf.py")["esp-tflite-micro depthwise_conv.cc"].startswith("-O2 ")
    size = idf_build.optimisation_levels("CONFIG_COMPILER_OPTIMIZATION_SIZE=y\n")
    assert size["app"].startswith("-Os ") and size["esp-tflite-micro depthwise_conv.cc"].startswith("-O2 ")
    assert size["esp-nn"].startswith("-O2 ")
    assert idf_build.optimisation_levels("")["app"] == "-Og (CONFIG_COMPILER_OPTIMIZATION_DEBUG, the Kconfig default)"
    facts = idf_build.build_facts(perf)
    assert facts["firmware esp-idf"] == "5.5.3" and facts["firmware optimisation app"].startswith("-O2")
