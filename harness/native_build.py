"""esp-tflite-micro's TFLite Micro, its ESP-NN kernel wrappers and esp-nn's portable C kernels,
compiled natively with host gcc/g++, and programs linked against them; everything cached.

The source lists are read from the components' own CMakeLists.txt at build time (see CMakeScript),
so the host build compiles what the chip's build compiles, with two host substitutions:
tensorflow/lite/micro/esp/micro_time.cc becomes TFLM's generic micro_time.cc, and the wrappers'
<esp_timer.h> is a one-function stub (see ESP_TIMER_STUB).

Three cached layers, so that switching esp-nn version or kernel choice recompiles seconds, not
minutes:
- tflm-core: every TFLM source but the 7 ESP-NN wrappers (none of them includes esp-nn);
- esp-nn: esp-nn's C kernels for a non-S3 target (c_srcs). Its sources do not see CONFIG_*
  options, so one build serves both kernel choices of a version;
- kernels: the 7 wrappers in tensorflow/lite/micro/kernels/esp_nn, per esp-nn version and choice.
A layer's key hashes the compiler's identity, the exact compile commands and the content of every
file its sources could include (SOURCE_PARTS of the components), so any changed header rebuilds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from .errors import TinyhilError
from .idf_build import C_STANDARD, CXX_STANDARD, ESP_NN_OPTIMISATION, TFLM_CXX_STANDARD, TFLM_OPTIMISATION
from .sources import ESP_NN, TFLITE_MICRO, FirmwareSources, source_hash


class NativeBuildError(TinyhilError):
    """The host compiler, archiver or linker failed (or is missing) on sources that are there."""


@dataclass(frozen=True)
class TflmLibrary:
    key: str                        # content hash of everything it was built from
    archives: tuple[Path, ...]      # static libraries, in link order (link them as a group)
    include_dirs: tuple[Path, ...]  # what a program that uses TFLM + esp_nn needs
    defines: tuple[str, ...]        # what such a program must be compiled with
    cxxflags: tuple[str, ...]       # what TFLM's own C++ sources were compiled with
    sources: FirmwareSources
    esp_nn_optimized: bool


# --- Flags ---------------------------------------------------------------------------------------
# esp-tflite-micro 1.3.8 CMakeLists.txt: common_flags (-DTF_LITE_STATIC_MEMORY
# -DTF_LITE_DISABLE_X86_NEON -O3 ... -ffunction-sections -fdata-sections -fno-unwind-tables), for
# C++ also -fno-rtti -fno-exceptions -fno-threadsafe-statics and `-std=c++11 ... -std=gnu++14`
# (the last -std wins), -DESP_NN for every source. Its warning options are left out: host g++ 12
# warns differently from the chip's GCC, and the sources are not ours to fix, hence -w.
TFLM_DEFINES = ("TF_LITE_STATIC_MEMORY", "TF_LITE_DISABLE_X86_NEON", "ESP_NN")
TFLM_COMMON_FLAGS = (TFLM_OPTIMISATION, "-ffunction-sections", "-fdata-sections", "-fno-unwind-tables", "-fmessage-length=0", "-w")
TFLM_CXXFLAGS = (f"-std={TFLM_CXX_STANDARD}", "-fno-rtti", "-fno-exceptions", "-fno-threadsafe-statics", *TFLM_COMMON_FLAGS)
# TFLM's few C files get ESP-IDF 5.5's C standard (tools/cmake/build.cmake) and the common flags.
TFLM_CFLAGS = (f"-std={C_STANDARD}", *TFLM_COMMON_FLAGS)
# esp-nn CMakeLists.txt, non-S3 branch: -O2 -Wno-unused-function; the C standard is ESP-IDF's.
ESP_NN_CFLAGS = (f"-std={C_STANDARD}", ESP_NN_OPTIMISATION, "-fmessage-length=0", "-w")
# esp-nn's Kconfig default is NN_OPTIMIZED; on a target that is neither S3, P4 nor ESP32,
# include/esp_nn.h then maps the kernels to the generic *_opt.c versions (esp_nn_generic_opt.h),
# and without it to the *_ansi.c ones (esp_nn_ansi_c.h).
NN_OPTIMIZED_DEFINE = "CONFIG_NN_OPTIMIZED=1"

# Programs are compiled as ESP-IDF 5.5 compiles the firmware's own code: gnu++2b / gnu17, -O2
# (CONFIG_COMPILER_OPTIMIZATION_PERF in firmware/sdkconfig.defaults), no RTTI and no exceptions
# (ESP-IDF's defaults; TFLM built without RTTI emits no typeinfo a program with RTTI could need).
# -pthread: the host layer stands in for the chip's second core with a std::thread.
PROGRAM_CXXFLAGS = (f"-std={CXX_STANDARD}", "-O2", "-fno-rtti", "-fno-exceptions", "-pthread", "-fmessage-length=0")
PROGRAM_CFLAGS = (f"-std={C_STANDARD}", "-O2", "-pthread", "-fmessage-length=0")

WRAPPERS_DIR = "tensorflow/lite/micro/kernels/esp_nn"
ESP_MICRO_TIME = "tensorflow/lite/micro/esp/micro_time.cc"
GENERIC_MICRO_TIME = "tensorflow/lite/micro/micro_time.cc"

# The ESP-NN wrappers include <esp_timer.h> (they time each kernel into globals). On the host,
# microseconds of a monotonic clock, as esp_timer_get_time() gives on the chip.
ESP_TIMER_STUB = """\
/* tinyhil host stub: the one esp_timer function esp-tflite-micro's ESP-NN wrappers call. */
#pragma once
#include <stdint.h>
#include <time.h>
#ifdef __cplusplus
extern "C" {
#endif
static inline int64_t esp_timer_get_time(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (int64_t)now.tv_sec * 1000000 + now.tv_nsec / 1000;
}
#ifdef __cplusplus
}
#endif
"""

COMPILE_TIMEOUT_S = 900.0
LINK_TIMEOUT_S = 600.0
TOOL_TIMEOUT_S = 60.0
_HEADER_SUFFIXES = (".h", ".hh", ".hpp", ".hxx", ".inc", ".ipp", ".tcc", ".def")
_SOURCE_SUFFIXES = (".c", ".cc", ".cpp", ".cxx", ".C")

# Placeholders for the roots in compile commands: keys hash the commands with these, so a build
# from ../shared/vendor and one from a registry download of the same content share cache entries.
_TFLM = "@TFLM@"
_ESPNN = "@ESPNN@"
_STUB = "@STUB@"


# --- Reading CMakeLists.txt ----------------------------------------------------------------------

@dataclass(frozen=True)
class CMakeScript:
    """The parts of a component's CMakeLists.txt that decide what it compiles.

    Evaluates set(), list(APPEND|REMOVE_ITEM), file(GLOB) with ${} expansion, and records
    idf_component_register() and set_source_files_properties(); any other command is ignored.
    if() blocks are skipped whole: in these two files they only add ESP-IDF requirements and the
    S3/P4 sources and flags, none of which a host build (a target that is neither) takes."""

    variables: Mapping[str, str]
    registration: Mapping[str, tuple[str, ...]]
    source_flags: Mapping[str, tuple[str, ...]]

    def list(self, name: str) -> tuple[str, ...]:
        return tuple(item for item in self.variables.get(name, "").split(";") if item)

    @classmethod
    def read(cls, path: Path) -> CMakeScript:
        root = path.parent.resolve()
        variables: dict[str, str] = {"CMAKE_CURRENT_SOURCE_DIR": root.as_posix(),
                                     "CMAKE_CURRENT_LIST_DIR": root.as_posix()}
        registration: dict[str, tuple[str, ...]] = {}
        source_flags: dict[str, tuple[str, ...]] = {}
        depth = 0
        for name, raw in _cmake_commands(path.read_text()):
            if name in ("if", "foreach", "while", "function", "macro"):
                depth += 1
                continue
            if name in ("endif", "endforeach", "endwhile", "endfunction", "endmacro"):
                depth -= 1
                continue
            if depth:
                continue
            args = _expand_args(raw, variables)
            if name == "set" and args:
                variables[args[0]] = ";".join(args[1:])
            elif name == "list" and len(args) >= 2 and args[0] in ("APPEND", "REMOVE_ITEM"):
                current = [item for item in variables.get(args[1], "").split(";") if item]
                if args[0] == "APPEND":
                    current.extend(args[2:])
                else:
                    current = [item for item in current if item not in set(args[2:])]
                variables[args[1]] = ";".join(current)
            elif name == "file" and len(args) >= 2 and args[0] == "GLOB":
                found = sorted({match for pattern in args[2:] for match in glob.glob(pattern)})
                variables[args[1]] = ";".join(found)
            elif name == "idf_component_register":
                registration = _keyword_groups(args, ("SRCS", "SRC_DIRS", "INCLUDE_DIRS", "PRIV_INCLUDE_DIRS",
                                                      "REQUIRES", "PRIV_REQUIRES", "EXCLUDE_SRCS"))
            elif name == "set_source_files_properties" and "PROPERTIES" in args:
                split = args.index("PROPERTIES")
                properties = args[split + 1:]
                for key, value in zip(properties[::2], properties[1::2]):
                    if key == "COMPILE_FLAGS":
                        for source in args[:split]:
                            source_flags[_absolute(source, root)] = tuple(value.split())
        return cls(variables=variables, registration=registration, source_flags=source_flags)


_COMMAND = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\s*\(")
_VARIABLE = re.compile(r"\$\{([A-Za-z0-9_./+-]*)\}")


def _cmake_commands(text: str) -> Iterator[tuple[str, list[tuple[str, bool]]]]:
    """(lower-case command name, [(argument, quoted)]) for each command invocation."""
    position, length = 0, len(text)
    while position < length:
        char = text[position]
        if char == "#":
            position = text.find("\n", position)
            position = length if position < 0 else position
            continue
        match = _COMMAND.match(text, position)
        if not match:
            position += 1
            continue
        name = match.group(0).split("(")[0].strip().lower()
        position = match.end()
        args: list[tuple[str, bool]] = []
        token, depth = "", 0
        while position < length:
            char = text[position]
            if char == '"':
                end = position + 1
                value = ""
                while end < length and text[end] != '"':
                    if text[end] == "\\" and end + 1 < length:
                        value += text[end:end + 2] if text[end + 1] != '"' else '"'
                        end += 2
                        continue
                    value += text[end]
                    end += 1
                args.append((value, True))
                position = end + 1
                continue
            if char == "#":
                position = text.find("\n", position)
                position = length if position < 0 else position
                continue
            if char == "(":
                depth += 1
                token += char
            elif char == ")":
                if depth == 0:
                    if token:
                        args.append((token, False))
                    position += 1
                    break
                depth -= 1
                token += char
            elif char.isspace():
                if token:
                    args.append((token, False))
                token = ""
            else:
                token += char
            position += 1
        yield name, args


def _expand(value: str, variables: Mapping[str, str]) -> str:
    while True:
        expanded = _VARIABLE.sub(lambda match: variables.get(match.group(1), ""), value)
        if expanded == value:
            return expanded
        value = expanded


def _expand_args(raw: list[tuple[str, bool]], variables: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    for value, _quoted in raw:
        # Every consumer here (set, list, file) treats a quoted list like the unquoted one: its
        # elements join the variable's list.
        args.extend(piece for piece in _expand(value, variables).split(";") if piece)
    return args


def _keyword_groups(args: list[str], keywords: Sequence[str]) -> dict[str, tuple[str, ...]]:
    groups: dict[str, list[str]] = {}
    current: str | None = None
    for arg in args:
        if arg in keywords:
            current = arg
            groups.setdefault(arg, [])
        elif current is not None:
            groups[current].append(arg)
    return {key: tuple(value) for key, value in groups.items()}


def _absolute(path: str, root: Path) -> str:
    candidate = Path(path)
    return (candidate if candidate.is_absolute() else root / candidate).as_posix()


@dataclass(frozen=True)
class ComponentBuildPlan:
    """What a component's CMakeLists.txt compiles for a host (neither S3 nor P4) target."""

    sources: tuple[str, ...]                   # relative to the component root
    include_dirs: tuple[str, ...]              # public INCLUDE_DIRS, relative
    source_flags: Mapping[str, tuple[str, ...]]  # extra COMPILE_FLAGS per relative source


def tflite_micro_plan(root: Path) -> ComponentBuildPlan:
    """esp-tflite-micro's lib_srcs as its CMakeLists.txt builds it: the reference add/conv/
    depthwise_conv/fully_connected/mul/pooling/softmax kernels removed, the esp_nn/ wrappers added,
    esp/micro_time.cc in place of micro_time.cc."""
    return _plan(root, "lib_srcs")


def esp_nn_plan(root: Path) -> ComponentBuildPlan:
    """esp-nn's c_srcs: its portable C kernels (the S3 and P4 lists sit in if() blocks)."""
    return _plan(root, "c_srcs")


def _plan(root: Path, variable: str) -> ComponentBuildPlan:
    root = root.resolve()
    script = CMakeScript.read(root / "CMakeLists.txt")
    sources = tuple(dict.fromkeys(_relative(item, root) for item in script.list(variable)))
    includes = tuple(_relative(item, root) for item in script.registration.get("INCLUDE_DIRS", ()))
    flags = {_relative(path, root): value for path, value in script.source_flags.items()}
    return ComponentBuildPlan(sources=sources, include_dirs=includes, source_flags=flags)


def _relative(path: str, root: Path) -> str:
    candidate = Path(path)
    if not candidate.is_absolute():
        return candidate.as_posix().removeprefix("./") or "."
    return candidate.relative_to(root).as_posix() or "."


# --- Subprocesses --------------------------------------------------------------------------------

def child_dies_with_parent() -> Callable[[], None]:
    """A preexec_fn that makes the child die with this process (Linux: PR_SET_PDEATHSIG)."""
    parent = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def setup() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        # The parent may have died between fork and prctl: then nobody would kill us.
        if os.getppid() != parent:
            os._exit(1)

    return setup


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """Asks `process` to end (SIGTERM), and kills it if it has not within `timeout_s`; reaps it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _run(args: Sequence[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a short tool (never a shell); killed with its process group on timeout or interrupt."""
    process = subprocess.Popen(list(args), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=child_dies_with_parent())
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise NativeBuildError(f"{Path(args[0]).name} did not finish within {timeout:.0f} s",
                               details=" ".join(args)) from None
    except BaseException:
        kill_group(process)
        raise
    return subprocess.CompletedProcess(list(args), process.returncode, output, "")


@dataclass(frozen=True)
class _Job:
    source: Path          # absolute
    label: str            # component-relative path, for messages
    command: tuple[str, ...]  # complete, with -c and -o
    output: Path


def _first_errors(output: str, count: int = 3) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\b(error|undefined reference)\b", line)]
    chosen = (errors or lines[-count:])[:count]
    return " | ".join(chosen) or "no output"


def _run_jobs(jobs: Sequence[_Job], *, workers: int, logs: Path) -> None:
    """Compile in parallel (at most `workers` compilers at once), from this thread: no thread pool,
    so preexec_fn stays safe. The first failure stops everything and is raised."""
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(jobs)
    running: dict[subprocess.Popen, tuple[_Job, Path, float]] = {}
    setup = child_dies_with_parent()
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                job = pending.pop(0)
                job.output.parent.mkdir(parents=True, exist_ok=True)
                log_path = logs / f"{len(jobs) - len(pending)}.log"
                with open(log_path, "wb") as log_file:
                    process = subprocess.Popen(job.command, stdin=subprocess.DEVNULL, stdout=log_file,
                                               stderr=subprocess.STDOUT, start_new_session=True,
                                               preexec_fn=setup)
                running[process] = (job, log_path, time.monotonic())
            finished = False
            for process, (job, log_path, started) in list(running.items()):
                code = process.poll()
                if code is None:
                    if time.monotonic() - started > COMPILE_TIMEOUT_S:
                        raise NativeBuildError(f"{Path(job.command[0]).name} did not finish {job.label} within "
                                               f"{COMPILE_TIMEOUT_S:.0f} s", where=str(job.source),
                                               details=" ".join(job.command))
                    continue
                finished = True
                del running[process]
                if code != 0:
                    output = log_path.read_text(errors="replace")
                    tool = Path(job.command[0]).name
                    raise NativeBuildError(f"{tool} failed on {job.label}: {_first_errors(output)}",
                                           where=str(job.source), details=f"{' '.join(job.command)}\n{output}")
            if not finished:
                time.sleep(0.02)
    finally:
        for process in running:
            kill_group(process)


# --- Toolchain and keys --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Toolchain:
    cc: str
    cxx: str
    ar: str
    identity: tuple[str, ...]


def _toolchain() -> _Toolchain:
    found = {}
    for role, env, default in (("cc", "CC", "gcc"), ("cxx", "CXX", "g++"), ("ar", "AR", "ar")):
        wanted = os.environ.get(env) or default
        path = shutil.which(wanted)
        if path is None:
            raise NativeBuildError(f"{wanted} not found on PATH: the native TFLite Micro build needs gcc, g++ and ar")
        found[role] = path
    identity = []
    for role in ("cc", "cxx"):
        result = _run([found[role], "-dumpfullversion", "-dumpmachine"], timeout=TOOL_TIMEOUT_S)
        if result.returncode != 0:
            raise NativeBuildError(f"{found[role]} -dumpfullversion failed", details=result.stdout)
        identity.append(f"{role}={os.path.realpath(found[role])} {' '.join(result.stdout.split())}")
    version = _run([found["ar"], "--version"], timeout=TOOL_TIMEOUT_S).stdout.splitlines()
    identity.append(f"ar={os.path.realpath(found['ar'])} {version[0] if version else ''}")
    return _Toolchain(cc=found["cc"], cxx=found["cxx"], ar=found["ar"], identity=tuple(identity))


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _materialize(command: Sequence[str], roots: Mapping[str, Path]) -> tuple[str, ...]:
    def fill(arg: str) -> str:
        for placeholder, path in roots.items():
            arg = arg.replace(placeholder, path.as_posix())
        return arg

    return tuple(fill(arg) for arg in command)


# --- Cache entries --------------------------------------------------------------------------------

@contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    """One builder per entry across processes; the lock goes with its holder, however it ends."""
    locks = cache / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(entry: Path) -> bool:
    return (entry / "build.json").is_file()


def _staging(entry: Path) -> Path:
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Under the entry's lock, earlier staging directories of this entry belong to dead builders.
    for stale in entry.parent.glob(f".{entry.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{entry.name}.staging-{os.getpid()}-", dir=entry.parent))


def _commit(staging: Path, entry: Path, record: Mapping[str, object]) -> None:
    shutil.rmtree(staging / "obj", ignore_errors=True)
    shutil.rmtree(staging / "logs", ignore_errors=True)
    (staging / "build.json").write_text(json.dumps(record, indent=1, default=str))
    try:
        staging.rename(entry)
    except OSError:
        if not _complete(entry):
            raise
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class _Layer:
    """One cached static library: its compile jobs (with placeholders) and what it is keyed on."""

    kind: str
    library: str
    commands: tuple[tuple[str, str, tuple[str, ...]], ...]  # (label, root placeholder, command)
    inputs: tuple[object, ...]
    files: Mapping[str, str] = field(default_factory=dict)  # extra files written into the entry

    def key(self, toolchain: _Toolchain) -> str:
        return _key(self.kind, toolchain.identity, self.commands, self.inputs, dict(self.files))


def _build_layer(layer: _Layer, *, toolchain: _Toolchain, roots: Mapping[str, Path], cache: Path,
                 workers: int) -> tuple[Path, str]:
    key = layer.key(toolchain)
    entry = cache / layer.kind / key
    if _complete(entry):
        return entry, key
    with _locked(cache, f"{layer.kind}-{key}"):
        if _complete(entry):
            return entry, key
        staging = _staging(entry)
        try:
            for name, text in layer.files.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            # Files of the entry itself (the esp_timer stub) are read from the staging copy while
            # compiling; the committed entry has the same content, hence the placeholder.
            filled = {**roots, _STUB: staging / "include"}
            jobs, objects = [], []
            for label, root, command in layer.commands:
                output = staging / "obj" / f"{label}.o"
                source = filled[root] / label
                jobs.append(_Job(source=source, label=label, output=output,
                                 command=(*_materialize(command, filled), "-c", source.as_posix(),
                                          "-o", output.as_posix())))
                objects.append(output)
            started = time.monotonic()
            _run_jobs(jobs, workers=workers, logs=staging / "logs")
            archive = staging / layer.library
            result = _run([toolchain.ar, "rcsD", archive.as_posix(), *(obj.as_posix() for obj in objects)],
                          timeout=LINK_TIMEOUT_S)
            if result.returncode != 0:
                raise NativeBuildError(f"ar failed on {layer.library}: {_first_errors(result.stdout)}",
                                       where=str(archive), details=result.stdout)
            _commit(staging, entry, {"kind": layer.kind, "key": key, "toolchain": toolchain.identity,
                                     "seconds": round(time.monotonic() - started, 1),
                                     "commands": [[label, *command] for label, _, command in layer.commands]})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return entry, key


# --- TFLite Micro ---------------------------------------------------------------------------------

def _tflm_layers(sources: FirmwareSources, esp_nn_optimized: bool) -> tuple[_Layer, _Layer, _Layer, tuple[str, ...],
                                                                            tuple[str, ...]]:
    tflm_plan = tflite_micro_plan(sources.tflite_micro.root)
    nn_plan = esp_nn_plan(sources.esp_nn.root)
    tflm_includes = tuple(f"-I{_TFLM}/{item}".removesuffix("/.") for item in tflm_plan.include_dirs)
    nn_includes = tuple(f"-I{_ESPNN}/{item}".removesuffix("/.") for item in nn_plan.include_dirs)
    defines = tuple(f"-D{name}" for name in TFLM_DEFINES)

    choice = (f"-D{NN_OPTIMIZED_DEFINE}",) if esp_nn_optimized else ()

    def command(source: str, *, extra_defines: Sequence[str] = (), extra_includes: Sequence[str] = ()):
        is_c = source.endswith(".c")
        # Per-file COMPILE_FLAGS (-O2 for esp_nn/depthwise_conv.cc) come last, as CMake puts them.
        return (_compiler("cc" if is_c else "cxx"), *(TFLM_CFLAGS if is_c else TFLM_CXXFLAGS), *defines,
                *extra_defines, *tflm_includes, *extra_includes, f"-ffile-prefix-map={_TFLM}=esp-tflite-micro",
                *tflm_plan.source_flags.get(source, ()))

    core, kernels = [], []
    for source in tflm_plan.sources:
        if source == ESP_MICRO_TIME:
            # esp/micro_time.cc reads esp_timer; the host takes TFLM's generic micro_time.cc, with
            # its clock() variant so that TFLM's profiler still gets microsecond ticks.
            core.append((GENERIC_MICRO_TIME, _TFLM, command(GENERIC_MICRO_TIME,
                                                            extra_defines=("-DTF_LITE_USE_CTIME",))))
        elif source.startswith(WRAPPERS_DIR + "/"):
            kernels.append((source, _TFLM, command(source, extra_defines=choice,
                                                   extra_includes=(*nn_includes, f"-I{_STUB}"))))
        else:
            core.append((source, _TFLM, command(source)))

    nn_commands = tuple((source, _ESPNN, (_compiler("cc"), *ESP_NN_CFLAGS, *nn_includes,
                                          *nn_plan.source_flags.get(source, ()),
                                          f"-ffile-prefix-map={_ESPNN}=esp-nn"))
                        for source in nn_plan.sources)
    tflm_hash = source_hash(sources.tflite_micro.root, TFLITE_MICRO)
    nn_hash = source_hash(sources.esp_nn.root, ESP_NN)
    layers = (
        _Layer("tflm-core", "libtflm_core.a", tuple(core), (tflm_hash,)),
        _Layer("esp-nn", "libesp_nn.a", nn_commands, (nn_hash,)),
        _Layer("tflm-esp-nn-kernels", "libtflm_esp_nn_kernels.a", tuple(kernels), (tflm_hash, nn_hash),
               files={"include/esp_timer.h": ESP_TIMER_STUB}),
    )
    return (*layers, tflm_plan.include_dirs, nn_plan.include_dirs)


def _compiler(role: str) -> str:
    # Resolved to the toolchain's path when materialized; the key holds the toolchain identity.
    return f"@{role.upper()}@"


def build_tflm(sources: FirmwareSources, *, esp_nn_optimized: bool, cache_root: Path,
               jobs: int | None = None) -> TflmLibrary:
    """TFLite Micro with esp-nn, as static libraries under cache_root/native, built once per content.

    A warm call hashes the sources and checks three cache entries; a cold one compiles with `jobs`
    parallel compilers (default: os.cpu_count()). Raises NativeBuildError on any tool failure."""
    toolchain = _toolchain()
    cache = Path(cache_root) / "native"
    core, esp_nn, kernels, tflm_includes, nn_includes = _tflm_layers(sources, esp_nn_optimized)
    roots = {_TFLM: sources.tflite_micro.root, _ESPNN: sources.esp_nn.root, "@CC@": Path(toolchain.cc),
             "@CXX@": Path(toolchain.cxx)}
    workers = jobs or os.cpu_count() or 1
    built = [_build_layer(layer, toolchain=toolchain, roots=roots, cache=cache, workers=workers)
             for layer in (core, esp_nn, kernels)]
    (core_dir, core_key), (nn_dir, nn_key), (kernels_dir, kernels_key) = built
    tflm_root, nn_root = sources.tflite_micro.root, sources.esp_nn.root
    include_dirs = (*(tflm_root / item for item in tflm_includes), *(nn_root / item for item in nn_includes),
                    kernels_dir / "include")
    defines = (*TFLM_DEFINES, *((NN_OPTIMIZED_DEFINE,) if esp_nn_optimized else ()))
    return TflmLibrary(key=_key(core_key, nn_key, kernels_key),
                       archives=(kernels_dir / kernels.library, core_dir / core.library, nn_dir / esp_nn.library),
                       include_dirs=tuple(Path(os.path.normpath(path)) for path in include_dirs),
                       defines=defines, cxxflags=TFLM_CXXFLAGS, sources=sources, esp_nn_optimized=esp_nn_optimized)


# --- Programs --------------------------------------------------------------------------------------

def _tree_digest(directories: Sequence[Path], skip: Sequence[Path]) -> list[tuple[int, str, str]]:
    """Content hashes of the headers and sources a program's include directories offer (the
    library's own directories are covered by its key), by position and relative name: the same
    files elsewhere give the same key."""
    skipped = {Path(os.path.realpath(path)) for path in skip}
    found = []
    for index, directory in enumerate(directories):
        real = Path(os.path.realpath(directory))
        if real in skipped or not real.is_dir():
            continue
        for path in sorted(real.rglob("*")):
            if path.is_file() and path.suffix in (*_HEADER_SUFFIXES, *_SOURCE_SUFFIXES):
                found.append((index, path.relative_to(real).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest()))
    return found


def build_program(name: str, sources: Sequence[Path], *, include_dirs: Sequence[Path], library: TflmLibrary,
                  cache_root: Path, extra_flags: Sequence[str] = ()) -> Path:
    """An executable of `sources` linked against `library`, cached by content hash: the sources,
    every header in include_dirs and next to the sources, the flags, the library's key and the
    compiler. extra_flags come last on every compile and link line, so they can override."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise NativeBuildError(f"program name {name!r} is not a plain file name")
    toolchain = _toolchain()
    cache = Path(cache_root) / "native"
    sources = tuple(Path(os.path.realpath(source)) for source in sources)
    for source in sources:
        if not source.is_file():
            raise NativeBuildError(f"program source {source} does not exist", where=str(source))
    includes = tuple(Path(os.path.realpath(directory)) for directory in include_dirs)
    all_includes = (*includes, *library.include_dirs)
    defines = tuple(f"-D{define}" for define in library.defines)
    commands = []
    for index, source in enumerate(sources):
        is_c = source.suffix == ".c"
        flags = PROGRAM_CFLAGS if is_c else PROGRAM_CXXFLAGS
        commands.append((index, source, (toolchain.cc if is_c else toolchain.cxx, *flags, *defines,
                                         *(f"-I{path.as_posix()}" for path in all_includes), *extra_flags)))
    source_dirs = tuple(dict.fromkeys(source.parent for source in sources))
    digest = _tree_digest((*includes, *source_dirs), skip=library.include_dirs)
    # Paths are left out of the key (only contents, relative names and flags count), so that a
    # program written afresh into a temporary directory still finds its cached build.
    key = _key("program", name, toolchain.identity, library.key,
               [(source.name, hashlib.sha256(source.read_bytes()).hexdigest()) for source in sources],
               digest, [flags for flags in (PROGRAM_CFLAGS, PROGRAM_CXXFLAGS)], list(library.defines),
               len(includes), list(extra_flags))
    entry = cache / "programs" / f"{name}-{key}"
    executable = entry / name
    if _complete(entry):
        return executable
    with _locked(cache, f"program-{name}-{key}"):
        if _complete(entry):
            return executable
        staging = _staging(entry)
        try:
            jobs = [_Job(source=source, label=source.name, output=staging / "obj" / f"{index}-{source.stem}.o",
                         command=(*command, "-c", source.as_posix(), "-o",
                                  (staging / "obj" / f"{index}-{source.stem}.o").as_posix()))
                    for index, source, command in commands]
            _run_jobs(jobs, workers=os.cpu_count() or 1, logs=staging / "logs")
            # A group: the wrappers need the core and esp-nn, and the core calls back into the
            # kernels it registers.
            link = (toolchain.cxx, *(job.output.as_posix() for job in jobs), "-Wl,--start-group",
                    *(archive.as_posix() for archive in library.archives), "-Wl,--end-group", "-lm", "-pthread",
                    *extra_flags, "-o", (staging / name).as_posix())
            result = _run(link, timeout=LINK_TIMEOUT_S)
            if result.returncode != 0:
                raise NativeBuildError(f"linking {name} failed: {_first_errors(result.stdout)}",
                                       where=str(staging / name), details=f"{' '.join(link)}\n{result.stdout}")
            _commit(staging, entry, {"kind": "program", "name": name, "key": key, "library": library.key,
                                     "sources": [source.as_posix() for source in sources],
                                     "link": list(link)})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return executable
