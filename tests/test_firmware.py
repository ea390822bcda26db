"""Firmware projects generated from models: what can be checked without the ESP32 toolchain.

PlatformIO cannot install the espressif32 platform here, so nothing is built for the chip. The
generated projects are read with PlatformIO's own configuration parser, the model arrays are
compiled with g++ and read back, and the op resolver is checked against the model's operators.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from platformio.project.config import ProjectConfig

from harness.board.flasher import PlatformIOFlasher
from harness.errors import ModelTooLargeError, UnsupportedOpError
from harness.firmware import (FIRMWARE_DIR, FirmwareImage, c_array, check_fits, chip_build, parse_c_array,
                              plan_debug_firmware, plan_firmware, render_project, resolver_method)
from harness.reference import model_io
from harness.report import read_results
from harness.tflite_model import inspect_model

ENV = "env:esp32s3"
DEBUG_ENV = "env:esp32s3-debug-tensors"


def _render(model: Path, out: Path, **changes) -> tuple:
    _, _, arena = model_io(model)
    firmware = replace(plan_firmware(model.stem, model, arena), **changes)
    info = inspect_model(model.read_bytes())
    return render_project(firmware, info, out), info


def _validate_project(project, info) -> None:
    directory = project.directory
    config = ProjectConfig(str(directory / "platformio.ini"))
    assert config.envs() == ["esp32s3", "esp32s3-debug-tensors"]
    assert config.get("platformio", "default_envs") == ["esp32s3"]
    # The debug build is the normal one plus the define main.cpp reads, and nothing else.
    assert config.get(DEBUG_ENV, "build_flags") == ["-DTINYHIL_PRESERVE_ALL_TENSORS=1"]
    for option in ("board", "framework", "platform", "board_build.partitions"):
        assert config.get(DEBUG_ENV, option) == config.get(ENV, option)
    assert config.get(ENV, "board") == "esp32-s3-devkitc-1"
    assert config.get(ENV, "framework") == ["espidf"]  # no Arduino layer: IDF 5.5.3, not 4.4.7
    assert re.fullmatch(r"espressif32 @ \d+\.\d+\.\d+", config.get(ENV, "platform")), "platform must be pinned"
    assert (directory / config.get(ENV, "board_build.partitions")).is_file()
    components = yaml.safe_load((directory / "src" / "idf_component.yml").read_text())["dependencies"]
    assert components["espressif/esp-tflite-micro"] == "==1.3.8"
    assert components["espressif/esp-nn"] == f"=={project.firmware.esp_nn_version}"
    assert parse_c_array((directory / "src" / "model_data.cpp").read_text()) == project.firmware.model_path.read_bytes()
    header = (directory / "src" / "model_config.h").read_text()
    registered = re.findall(r"resolver\.(Add\w+)\(\)", header)
    assert registered == [resolver_method(op) for op in info.all_op_types]
    assert "MicroMutableOpResolver<TINYHIL_OP_TYPES>" in header
    assert f"#define TINYHIL_OP_TYPES {len(info.all_op_types)}" in header
    assert f'#define TINYHIL_FIRMWARE_ID "{project.firmware.firmware_id}"' in header
    assert f"#define TINYHIL_ARENA_BYTES {project.firmware.arena_size}" in header
    assert f"#define TINYHIL_ARENA_IN_PSRAM {int(project.firmware.arena_in_psram)}" in header
    assert f"#define TINYHIL_IMAGE_PRESERVES_TENSORS {int(project.firmware.preserve_all_tensors)}" in header
    sdkconfig = (directory / "sdkconfig.defaults").read_text()
    assert f"CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_{project.firmware.cpu_mhz}=y" in sdkconfig
    assert ("CONFIG_NN_OPTIMIZED=y" if project.firmware.esp_nn else "CONFIG_NN_ANSI_C=y") in sdkconfig
    for source in ("include/tinyhil_protocol.h", "src/tinyhil_protocol.cpp", "include/model_runner.h",
                   "src/model_runner.cpp", "CMakeLists.txt"):
        copied = directory / "components" / "tinyhil" / source
        assert copied.read_bytes() == (FIRMWARE_DIR / "components" / "tinyhil" / source).read_bytes()
    assert not (directory / "lib").exists()  # PlatformIO's library finder would compile it a second time
    assert not (directory / "test").exists() and not (directory / "host").exists()  # not firmware


def test_resolver_methods_are_those_of_the_pinned_tflm():
    assert resolver_method("CONV_2D") == "AddConv2D"
    assert resolver_method("DEPTHWISE_CONV_2D") == "AddDepthwiseConv2D"
    assert resolver_method("AVERAGE_POOL_2D") == "AddAveragePool2D"
    assert resolver_method("FULLY_CONNECTED") == "AddFullyConnected"
    assert resolver_method("UNIDIRECTIONAL_SEQUENCE_LSTM") == "AddUnidirectionalSequenceLSTM"
    assert resolver_method("BATCH_TO_SPACE_ND") == "AddBatchToSpaceNd"
    assert resolver_method("PADV2") == "AddPadV2"
    assert resolver_method("CUMSUM") == "AddCumSum"
    with pytest.raises(UnsupportedOpError, match="no kernel for op TOPK_V2"):
        resolver_method("TOPK_V2")


def test_c_array_round_trips_and_compiles(tmp_path, sine_model):
    data = sine_model.read_bytes()
    source = c_array("tinyhil_model", data)
    assert parse_c_array(source) == data and "alignas(16)" in source
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    (tmp_path / "model_data.h").write_text("#pragma once\nextern const unsigned char tinyhil_model[];\n"
                                           "extern const unsigned int tinyhil_model_len;\n")
    (tmp_path / "model_data.cpp").write_text(source)
    (tmp_path / "check.cpp").write_text(
        '#include <cstdio>\n#include <cstdint>\n#include "model_data.h"\n'
        "int main() { if (reinterpret_cast<std::uintptr_t>(tinyhil_model) % 16) return 2;\n"
        "  fwrite(tinyhil_model, 1, tinyhil_model_len, stdout); return 0; }\n")
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-o", str(tmp_path / "check"), str(tmp_path / "check.cpp"),
                    str(tmp_path / "model_data.cpp")], check=True, timeout=120, cwd=tmp_path)
    output = subprocess.run([str(tmp_path / "check")], capture_output=True, timeout=30, check=True).stdout
    assert output == data


def test_generated_project_validates_and_is_reused_when_unchanged(tmp_path, sine_model):
    project, info = _render(sine_model, tmp_path)
    _validate_project(project, info)
    again, _ = _render(sine_model, tmp_path)
    assert again.directory == project.directory
    slower, _ = _render(sine_model, tmp_path, cpu_mhz=160, esp_nn=False)
    assert slower.directory != project.directory
    _validate_project(slower, info)


def test_the_debug_image_renders_its_own_project_for_the_debug_env(tmp_path, sine_model):
    """The preserve-all-tensors image: its own firmware id, arena and project, marked in
    model_config.h for main.cpp's check against the env that builds it."""
    _, _, arena = model_io(sine_model)
    normal = plan_firmware("sine", sine_model, arena)
    debug = plan_debug_firmware(normal)
    assert debug.preserve_all_tensors and not normal.preserve_all_tensors
    assert debug.firmware_id != normal.firmware_id and debug.arena_size > normal.arena_size
    assert (normal.platformio_env, debug.platformio_env) == ("esp32s3", "esp32s3-debug-tensors")
    info = inspect_model(sine_model.read_bytes())
    project = render_project(debug, info, tmp_path)
    _validate_project(project, info)
    assert project.directory != render_project(normal, info, tmp_path).directory
    main = (project.directory / "src" / "main.cpp").read_text()
    assert "#if TINYHIL_PRESERVE_ALL_TENSORS != TINYHIL_IMAGE_PRESERVES_TENSORS\n#error" in main


def test_the_flasher_builds_and_uploads_each_image_with_its_env(tmp_path, sine_model):
    """PlatformIO cannot install the espressif32 toolchain here: a stand-in `pio` (a real
    subprocess) records the arguments the flasher runs it with."""
    recorder = tmp_path / "pio.py"
    calls = tmp_path / "calls.txt"
    recorder.write_text(f"import sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    flasher = PlatformIOFlasher(tmp_path / "logs", pio=(sys.executable, str(recorder)))
    _, _, arena = model_io(sine_model)
    normal = plan_firmware("sine", sine_model, arena)
    info = inspect_model(sine_model.read_bytes())
    for firmware in (normal, plan_debug_firmware(normal)):
        flasher.upload(render_project(firmware, info, tmp_path / "fw"), "/dev/ttyACM0")
    lines = calls.read_text().splitlines()
    assert [line.split()[:3] for line in lines] == [["run", "-e", "esp32s3"]] * 2 + [
        ["run", "-e", "esp32s3-debug-tensors"]] * 2
    assert lines[1].endswith("-t upload --upload-port /dev/ttyACM0")


def test_models_that_cannot_fit_fail_before_building_with_the_numbers(tmp_path, sine_model):
    _, _, arena = model_io(sine_model)
    info = inspect_model(sine_model.read_bytes())
    firmware = plan_firmware("sine", sine_model, arena)
    with pytest.raises(ModelTooLargeError, match=r"arena of 9437184 bytes does not fit PSRAM \(8388608"):
        check_fits(replace(firmware, arena_size=9 * 1024 * 1024, arena_in_psram=True), info)
    with pytest.raises(ModelTooLargeError, match=r"does not fit internal SRAM \(262144"):
        check_fits(replace(firmware, arena_size=300_000, arena_in_psram=False), info)
    # The factory partition of firmware/partitions.csv: 0x7F0000 bytes.
    with pytest.raises(ModelTooLargeError, match=r"model 9000000\), the app partition holds 8323072"):
        check_fits(firmware, replace(info, size_bytes=9_000_000))


def test_custom_ops_without_a_tflm_registration_are_refused_before_building(tmp_path, shared_dir):
    model = shared_dir / "models" / "tflm-examples" / "audio_preprocessor_int8.tflite"
    info = inspect_model(model.read_bytes())
    firmware = FirmwareImage("audio", model, "0" * 16, 65536, False)
    check_fits(firmware, info)  # TFLM's own Signal* ops: registered by name (AddWindow, ...)
    unknown = replace(info, all_subgraph_ops=(*info.all_subgraph_ops, ("MyVendorOp", True)))
    with pytest.raises(UnsupportedOpError, match="custom op.*MyVendorOp"):
        check_fits(firmware, unknown)


def test_every_seed_model_renders_a_valid_project(seed_quick_runs, tmp_path):
    root, first, _ = seed_quick_runs
    assert first.returncode == 0, first.stdout[-2000:]
    _, rows = read_results(root / "results" / "seed" / "first")
    assert {row.model for row in rows} == {"keyword_cnn", "anomaly_cnn1d", "mobilenet_v2", "lstm", "ds_cnn"}
    for row in rows:
        project, info = _render(Path(row.model_path), tmp_path)
        _validate_project(project, info)
        assert project.firmware.arena_size == row.arena_size


def test_a_chip_build_names_its_pins_and_the_optimisation_it_really_gets(sine_model):
    _, _, arena = model_io(sine_model)
    for version in ("1.1.2", "1.2.3"):
        build = chip_build(plan_firmware("sine", sine_model, arena, esp_nn_version=version))
        assert (build.kind, build.esp_tflite_micro, build.esp_nn, build.idf) == ("chip", "1.3.8", version, "5.5.3")
        assert build.note.startswith("espressif32 @ 6.13.0, toolchain-xtensa-esp-elf 14.2.0")
        assert "app -O2" in build.optimisation and "esp-tflite-micro -O3" in build.optimisation


@pytest.mark.parametrize("name", ["kws\n#error injected", "kws */ #error", "../kws", "kws[int8]\n", ""])
def test_a_name_that_could_break_the_generated_cpp_is_refused_by_plan_firmware(sine_model, name):
    """Suites check their names; plan_firmware is public, and writes the name into model_config.h
    and idf_component.yml, so it refuses one that is not a case id on its own."""
    with pytest.raises(ValueError, match="must be a case id"):
        plan_firmware(name, sine_model, 2048)
    assert plan_firmware("kws[int8-esp-nn1.2.3]", sine_model, 2048).model_name == "kws[int8-esp-nn1.2.3]"
