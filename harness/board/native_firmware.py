"""The virtual board's firmware: the chip firmware's portable core built natively.

firmware/components/tinyhil (protocol engine and model runner) and firmware/host (the host layer in
place of the chip layer) are compiled with host g++ and linked against TFLite Micro from the pinned
esp-tflite-micro with its ESP-NN kernel wrappers and esp-nn's portable C kernels
(harness/native_build.py). One executable per esp-nn version and kernel choice serves every model;
the model, arena and latency estimates are its arguments.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..cache import content_key
from ..idf_build import ESP_NN_OPTIMISATION, TFLM_DEPTHWISE_CONV_OPTIMISATION, TFLM_OPTIMISATION
from ..firmware import CORE_DIR, CUSTOM_RESOLVER_METHODS, HOST_LAYER_DIR, RESOLVER_METHODS, FirmwareBuild
from ..native_build import build_program, build_tflm
from ..sources import TFLITE_MICRO_VERSION, locate_sources

log = logging.getLogger("tinyhil.native_firmware")

PROGRAM_SOURCES = (CORE_DIR / "src" / "tinyhil_protocol.cpp", CORE_DIR / "src" / "model_runner.cpp",
                   HOST_LAYER_DIR / "main.cpp")


def default_native_cache() -> Path:
    """Where native builds are kept: `TINYHIL_NATIVE_CACHE`, else the checkout's default artifact
    cache (.tinyhil-cache, under native/). Not a run's own --cache-dir: a build depends only on the
    pinned sources, flags and compiler (its key says so), so every run can share it, and only the
    first pays for it."""
    configured = os.environ.get("TINYHIL_NATIVE_CACHE")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / ".tinyhil-cache"


@dataclass(frozen=True)
class NativeFirmware:
    program: Path
    build: FirmwareBuild


def op_registrations() -> dict[str, str]:
    """firmware/host/main.cpp's registration tables, from the generator's own, so that every method
    name the chip's model_config.h can use is compiled against the pinned TFLM."""
    builtin = "".join(f"    case tflite::BuiltinOperator_{op}: return resolver.{method}();\n"
                      for op, method in sorted(RESOLVER_METHODS.items()))
    custom = "".join(f'  if (std::strcmp(name, "{op}") == 0) return resolver.{method}();\n'
                     for op, method in sorted(CUSTOM_RESOLVER_METHODS.items()))
    return {"op_registrations.inc": builtin, "custom_op_registrations.inc": custom}


def build_native_firmware(esp_nn_version: str, esp_nn: bool, *, cache_root: Path, vendor_dir: Path | None = None,
                          registry_url: str | None = None) -> NativeFirmware:
    """The native firmware for an esp-nn version and kernel choice (ESP-NN on: esp-nn's optimized C
    kernels; off: its ANSI C ones), built once and cached. It serves every model.

    Raises SourcesUnavailable when the pinned sources cannot be had (the caller may fall back to the
    Python engine) and NativeBuildError when they can but do not build (a real failure)."""
    sources = locate_sources(esp_nn_version, vendor_dir=vendor_dir, registry_url=registry_url,
                             cache_root=cache_root)
    library = build_tflm(sources, esp_nn_optimized=esp_nn, cache_root=cache_root)
    tables = op_registrations()
    generated = cache_root / "native" / "generated" / content_key("op_registrations", tables)
    for name, text in tables.items():
        if not (generated / name).is_file():
            generated.mkdir(parents=True, exist_ok=True)
            partial = generated / f"{name}.{os.getpid()}.partial"
            partial.write_text(text)
            partial.replace(generated / name)
    program = build_program("tinyhil-firmware", PROGRAM_SOURCES,
                            include_dirs=(CORE_DIR / "include", HOST_LAYER_DIR, generated), library=library,
                            cache_root=cache_root)
    kernels = "esp-nn portable C (generic optimized)" if esp_nn else "esp-nn ANSI C"
    build = FirmwareBuild(kind="native", esp_tflite_micro=TFLITE_MICRO_VERSION, esp_nn=esp_nn_version,
                          idf="none (host build)", optimisation=_optimisation(),
                          note=f"host g++ {_compiler_version()}; {kernels}; sources: {sources.tflite_micro.origin}, "
                               f"{sources.esp_nn.origin}")
    return NativeFirmware(program, build)


def _optimisation() -> str:
    # As the chip build applies them (harness/idf_build.py), compiled by host g++ instead.
    return (f"firmware core -O2, esp-tflite-micro {TFLM_OPTIMISATION} (esp_nn/depthwise_conv.cc "
            f"{TFLM_DEPTHWISE_CONV_OPTIMISATION}), esp-nn {ESP_NN_OPTIMISATION} (host g++)")


def _compiler_version() -> str:
    try:
        return subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "(version unknown)"
