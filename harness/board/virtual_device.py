"""The virtual ESP32-S3: a separate process that plays the device end of a pseudo-terminal.

Between the host and the firmware it models the link (the speed of USB or UART, answers in order,
inference on the other core) and injects the suite's faults. The firmware behind it is, by
preference, the firmware's own portable core built natively (`NativeCore`: the protocol engine and
model runner of firmware/components/tinyhil with esp-tflite-micro's TFLM and ESP-NN wrappers, the
code the chip runs); where that build's sources are not available, the Python engine with the
`tflite-micro` package's TFLM (`PythonCore`). Either boots as the firmware does: checks that the
model fits the flash partition, allocates the tensor arena in SRAM or PSRAM (failing as
`heap_caps_malloc` would when it does not fit), builds the interpreter, then serves the wire
protocol. Latency is an estimate from the ESP32-S3 cost model, never a measurement: the DeviceInfo
it sends says `virtual`, and the host marks its numbers `estimated`.

Run by `VirtualBoard`; `python -m harness.board.virtual_device --help` for the arguments.
"""

from __future__ import annotations

import argparse
import collections
import errno
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import protocol as p
from ..errors import ModelTooLargeError, TinyhilError, UnsupportedOpError
from ..tflite_model import ModelInfo, inspect_model
from ..tflm import HostInterpreter, open_interpreter
from .costmodel import ChipConfig, LatencyEstimate, estimate_latency, load_calibration
from .device import DeviceEngine, InvokeTiming
from .faults import FaultInjector
from .virtual import BOOT_BANNER, VirtualDeviceConfig

log = logging.getLogger("tinyhil.virtual_device")



def _dtype_of(numpy_name: str) -> p.DType:
    return p.DType.from_numpy_name(numpy_name)


def _tensor_spec(tensor) -> p.TensorSpec:
    scale = tensor.scales[0] if tensor.scales else 0.0
    zero_point = tensor.zero_points[0] if tensor.zero_points else 0
    return p.TensorSpec(_dtype_of(tensor.dtype), tuple(tensor.shape), float(scale), int(zero_point))


class TflmRuntime:
    """TFLM interpreter plus the cost model: the work of the device, the time of the chip. In the
    debug build (an interpreter opened with every tensor preserved) it also answers `tensor()`."""

    def __init__(self, host: HostInterpreter, estimate: LatencyEstimate, info: ModelInfo,
                 preserve_all_tensors: bool = False) -> None:
        self._host = host
        self._info = info
        self._preserve = preserve_all_tensors
        self._outputs: list[np.ndarray] = []
        self._timing = InvokeTiming(
            total_us=round(estimate.total_us),
            total_cycles=estimate.total_cycles,
            op_us=tuple(min(round(us), 0xFFFFFFFF) for us in estimate.op_us()),
            op_cycles=tuple(min(op.cycles, 0xFFFFFFFF) for op in estimate.ops),
        )
        self._pending: dict[int, np.ndarray] = {}

    def set_input(self, index: int, data: bytes) -> None:
        self._pending[index] = np.frombuffer(data, dtype=self._host.input_details[index]["dtype"])

    def invoke(self) -> InvokeTiming:
        self._outputs = self._host.run([self._pending[i] for i in range(len(self._host.input_details))])
        return self._timing

    def get_output(self, index: int) -> bytes:
        return self._outputs[index].tobytes()

    def tensor_count(self) -> int:
        return len(self._info.tensors) if self._preserve else 0

    def tensor(self, index: int) -> tuple[p.TensorSpec, bytes]:
        """Tensor `index` of the main subgraph as the last invoke left it, with the quantization
        of the model's tensor (its first scale and zero point), as the firmware's runner reports it."""
        if not self._preserve:
            raise p.TensorUnavailable("this firmware reuses tensor memory between operators: intermediate tensors "
                                      "are kept only by the debug build (preserve_all_tensors)")
        if not 0 <= index < len(self._info.tensors):
            # Checked here: the binding's GetTensor reads past its array (and crashes) otherwise.
            raise p.TensorUnavailable(f"tensor {index} does not exist: the main subgraph has "
                                      f"{len(self._info.tensors)} tensors")
        found = self._host.interpreter.GetTensor(index, 0)
        data = np.ascontiguousarray(found["tensor_data"])
        try:
            dtype = _dtype_of(np.dtype(found["dtype"]).name)
        except Exception:  # a type the wire protocol has no code for (bool, int64, ...)
            raise p.TensorUnavailable(f"tensor {index} is {np.dtype(found['dtype']).name}, a type the protocol "
                                      f"cannot carry") from None
        model_tensor = self._info.tensors[index]
        spec = p.TensorSpec(dtype, tuple(int(d) for d in found["shape"]),
                            float(model_tensor.scales[0]) if model_tensor.scales else 0.0,
                            int(model_tensor.zero_points[0]) if model_tensor.zero_points else 0)
        return spec, data.tobytes()


def boot(config: VirtualDeviceConfig) -> DeviceEngine:
    """Everything the firmware's setup() does; a failure becomes the board's boot error."""
    model = Path(config.model_path).read_bytes()
    info = inspect_model(model, where=config.model_path)
    op_names = tuple(op.name for op in info.ops)

    def device_info(arena_used: int) -> p.DeviceInfo:
        # Double-buffered like the two-core firmware: the emulation overlaps upload and inference.
        flags = ((p.FLAG_ESP_NN if config.esp_nn else 0) | (p.FLAG_ARENA_IN_PSRAM if config.arena_in_psram else 0)
                 | p.FLAG_DOUBLE_BUFFERED | (p.FLAG_PRESERVES_TENSORS if config.preserve_all_tensors else 0))
        return p.DeviceInfo(
            version=p.PROTOCOL_VERSION, board_kind=p.BOARD_VIRTUAL, cpu_mhz=config.cpu_mhz,
            sram_bytes=config.memory.sram_bytes, psram_bytes=config.memory.psram_bytes, flash_bytes=config.memory.flash_app_bytes,
            arena_size=config.arena_size, arena_used=arena_used, max_payload=config.max_payload,
            op_count=len(op_names), flags=flags, chip="ESP32-S3 (virtual)", firmware_id=config.firmware_id,
            model_id=config.model_id, inputs=tuple(_tensor_spec(t) for t in info.input_tensors()),
            outputs=tuple(_tensor_spec(t) for t in info.output_tensors()))

    def failed(code: p.ErrorCode, text: str) -> DeviceEngine:
        log.error("boot failed: %s: %s", code.name, text)
        return DeviceEngine(device_info(0), op_names, None, p.ErrorMsg(code, text))

    if config.faults.corrupt_op is not None:
        return failed(p.ErrorCode.MODEL_LOAD_FAILED,
                      f"the corrupt_op fault (operator {config.faults.corrupt_op}) needs the native firmware build "
                      f"(board.engine: native): the Python engine's TFLM, the tflite-micro package, has no "
                      f"per-operator hook to perturb an output with")
    image_bytes = config.memory.firmware_code_bytes + len(model)
    if image_bytes > config.memory.flash_app_bytes:
        return failed(p.ErrorCode.MODEL_TOO_LARGE,
                      f"firmware image {image_bytes} bytes (model {len(model)}) exceeds the "
                      f"{config.memory.flash_app_bytes}-byte app partition")
    free_sram = config.memory.sram_arena_budget
    region, free = ("PSRAM", config.memory.psram_bytes) if config.arena_in_psram else ("internal SRAM", free_sram)
    if config.arena_size > free:
        return failed(p.ErrorCode.ARENA_ALLOCATION_FAILED,
                      f"heap_caps_malloc({config.arena_size}) for the tensor arena failed: {region} has "
                      f"{free} bytes free")
    return _start_interpreter(config, model, info, op_names, device_info, failed)


def _chip(config: VirtualDeviceConfig) -> ChipConfig:
    # The model is a const array in flash, read through the data cache.
    return ChipConfig(cpu_mhz=config.cpu_mhz, esp_nn=config.esp_nn, tensors_in_psram=config.arena_in_psram,
                      weights_in_flash=True, esp_nn_version=config.esp_nn_version)


def _estimate(info: ModelInfo, config: VirtualDeviceConfig) -> LatencyEstimate:
    calibration = load_calibration(Path(config.calibration)) if config.calibration else None
    return estimate_latency(info, _chip(config), calibration)


_BOOT_ERROR_CODES = {UnsupportedOpError: p.ErrorCode.UNSUPPORTED_OP,
                     ModelTooLargeError: p.ErrorCode.ARENA_ALLOCATION_FAILED}


def _start_interpreter(config, model, info: ModelInfo, op_names, device_info, failed) -> DeviceEngine:
    try:
        host = open_interpreter(model, config.arena_size, preserve_all_tensors=config.preserve_all_tensors)
    except TinyhilError as error:
        text = error.message
        if config.preserve_all_tensors and isinstance(error, ModelTooLargeError):
            text = f"{text} (the preserve-all-tensors debug build, which gives every tensor its own memory)"
        return failed(_BOOT_ERROR_CODES.get(type(error), p.ErrorCode.MODEL_LOAD_FAILED), text)
    estimate = _estimate(info, config)
    log.info("booted: model %s, %d ops, arena %d of %d bytes in %s, estimated %.1f us per invoke%s",
             config.model_id, len(op_names), host.arena_used, config.arena_size,
             "PSRAM" if config.arena_in_psram else "SRAM", estimate.total_us,
             ", every tensor preserved (debug build)" if config.preserve_all_tensors else "")
    return DeviceEngine(device_info(host.arena_used), op_names,
                        TflmRuntime(host, estimate, info, config.preserve_all_tensors))


class PythonCore:
    """The Python device engine (harness/board/device.py) with host TFLM: the fallback firmware
    when the native build's sources are not available. It answers synchronously, as it handles."""

    exit_code = None  # it runs in this process: a crash ends the board process itself

    def __init__(self, config: VirtualDeviceConfig, on_output: Callable[[bytes, bool], bool]) -> None:
        self._engine = boot(config)
        self._on_output = on_output

    def feed(self, data: bytes) -> None:
        for _end, request in self._engine.frames(data, time.monotonic()):
            for answer in self._engine.handle(request):
                if not self._on_output(answer, True):
                    return  # the board reset: nothing more of this read is handled

    def idle_deadline(self) -> float | None:
        return self._engine.idle_deadline()

    def tick(self) -> None:
        """The firmware's idle-gap check (Engine::poll does it on every pass of its loop)."""
        for answer in self._engine.idle(time.monotonic()):
            self._on_output(answer, True)

    def stop(self) -> None:
        pass


class NativeCore:
    """The firmware's own core (protocol engine, model runner, TFLM with ESP-NN wrappers) as a
    native process on one end of a socket pair; its output is split into frames for the link
    emulation by a reader thread."""

    def __init__(self, config: VirtualDeviceConfig, on_output: Callable[[bytes, bool], bool], log_file,
                 estimates: Path) -> None:
        self._on_output = on_output
        ours, theirs = socket.socketpair()
        self._socket = ours
        command = [config.native_program, "--fd", str(theirs.fileno()), "--model", config.model_path,
                   "--estimates", str(estimates), "--arena-bytes", str(config.arena_size),
                   "--arena-in-psram", "1" if config.arena_in_psram else "0",
                   "--sram-free", str(config.memory.sram_arena_budget), "--psram-free", str(config.memory.psram_bytes),
                   "--sram-bytes", str(config.memory.sram_bytes), "--psram-bytes", str(config.memory.psram_bytes),
                   "--flash-app-bytes", str(config.memory.flash_app_bytes),
                   "--code-bytes", str(config.memory.firmware_code_bytes), "--cpu-mhz", str(config.cpu_mhz),
                   "--esp-nn", "1" if config.esp_nn else "0", "--worker", "thread",
                   "--preserve-all-tensors", "1" if config.preserve_all_tensors else "0",
                   "--max-payload", str(config.max_payload), "--firmware-id", config.firmware_id,
                   "--model-id", config.model_id, "--parent-pid", str(os.getpid())]
        if config.faults.corrupt_op is not None:
            command += ["--corrupt-op", str(config.faults.corrupt_op)]
        try:
            # No PR_SET_PDEATHSIG: it fires when the *thread* that started the child ends, and a reset
            # restarts the firmware from the reader thread of the one it replaces. The firmware
            # watches getppid() instead (firmware/host/main.cpp) and exits within 200 ms of this
            # process, however this process ends.
            self._process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                             stdout=log_file, stderr=log_file)
        finally:
            theirs.close()
        self._stopped = False
        self._reader = threading.Thread(target=self._read, name="native-output", daemon=True)
        self._reader.start()

    @property
    def exit_code(self) -> int | None:
        """The firmware's exit code when it ended without being stopped (a crash), else None."""
        return None if self._stopped else self._process.poll()

    def idle_deadline(self) -> float | None:
        return None  # the native firmware keeps its own idle gap, on its own clock

    def tick(self) -> None:
        pass

    def feed(self, data: bytes) -> None:
        try:
            self._socket.sendall(data)
        except OSError:
            pass  # the process is gone (a reset under way): bytes sent to a rebooting board are lost

    def stop(self) -> None:
        self._stopped = True
        if self._process.poll() is None:
            self._process.kill()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("native firmware process %d did not die", self._process.pid)
        self._socket.close()

    def _read(self) -> None:
        pending = bytearray()
        while not self._stopped:
            try:
                chunk = self._socket.recv(65536)
            except OSError:
                return
            if not chunk:
                return  # the firmware ended: the board's main loop sees it in exit_code
            pending += chunk
            for segment, is_frame in split_device_output(pending):
                if self._stopped or not self._on_output(segment, is_frame):
                    return


def split_device_output(buffer: bytearray) -> list[tuple[bytes, bool]]:
    """Whole frames, and bytes outside frames, taken off the front of `buffer`; an incomplete frame
    stays. The native firmware writes its frames whole and intact, so no CRC is checked here."""
    out: list[tuple[bytes, bool]] = []
    while buffer:
        start = buffer.find(p.SYNC)
        if start != 0:
            keep = 1 if start < 0 and buffer[-1] == p.SYNC[0] else 0
            cut = len(buffer) - keep if start < 0 else start
            if cut == 0:
                break
            out.append((bytes(buffer[:cut]), False))
            del buffer[:cut]
            continue
        if len(buffer) < p.HEADER_SIZE:
            break
        size = p.HEADER_SIZE + int.from_bytes(buffer[4:6], "little") + p.TRAILER_SIZE
        if len(buffer) < size:
            break
        out.append((bytes(buffer[:size]), True))
        del buffer[:size]
    return out


def _write_estimates(config: VirtualDeviceConfig) -> Path:
    """The cost model's timing of this firmware, for the native process to report as its own."""
    info = inspect_model(Path(config.model_path).read_bytes(), where=config.model_path)
    estimate = _estimate(info, config)
    lines = [f"{round(estimate.total_us)} {estimate.total_cycles}"]
    lines += [f"{min(round(us), 0xFFFFFFFF)} {min(op.cycles, 0xFFFFFFFF)}" for us, op in zip(estimate.op_us(), estimate.ops)]
    path = Path(config.workdir) / f"estimates-{config.firmware_id}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


class VirtualBoardProcess:
    """The running board: the firmware core behind a link with the speed of the real one, and the
    faults of the plan.

    Time is modelled on three timelines, as on the ESP32-S3 (one core serves the link, the other
    runs inference): each frame from the host is handed to the firmware once its last byte could
    have crossed the wire (rx), an invoke's answer is ready once the inference could have run
    (compute, with `realtime`), and answers leave in order at the link's rate (tx, a writer thread).
    So the upload of sample k+1 overlaps the inference of sample k and the sending of its answer,
    as it would on the chip.
    """

    def __init__(self, config: VirtualDeviceConfig, fd: int, console=None) -> None:
        self._config = config
        self._fd = fd
        self._console = console
        self._faults = FaultInjector(config.faults)
        self._lock = threading.RLock()
        self._generation = 0
        self._offline_until = 0.0
        self._rx_ready = time.monotonic()  # when the last byte to the board has crossed the wire
        self._compute_free = time.monotonic()
        self._tx = _PacedWriter(fd, config.link if config.emulate_link else None)
        # Frame ends of what the firmware receives, for pacing: its decoder and this one are the
        # same state machine (tests/test_native_engine.py), so they agree on every byte. Its idle
        # gap is timed on the emulated wire; the bytes reach the firmware when they cross it, in
        # slices short against the gap, so that the firmware's own clock sees the same gaps.
        self._shadow = p.FrameDecoder(config.max_payload)
        # The estimate depends only on the firmware: every boot of this board reports the same one.
        self._estimates = _write_estimates(config) if config.engine == "native" else None
        self._core = self._start_core()

    def _start_core(self):
        if self._estimates is not None:
            return NativeCore(self._config, self._on_output, self._console, self._estimates)
        return PythonCore(self._config, self._on_output)

    def _read(self) -> bytes | None:
        try:
            return os.read(self._fd, 65536)
        except OSError as error:
            # EIO: no process has the port open right now; a board keeps running regardless.
            if error.errno != errno.EIO:
                raise
            time.sleep(0.05)
            return None

    def _reboot(self, why: str) -> None:
        log.warning("%s: rebooting", why)
        with self._lock:
            self._tx.drop_pending()  # answers not yet on the wire die with the reset
            self._generation += 1
            self._core.stop()
            self._shadow = p.FrameDecoder(self._config.max_payload)
            self._core = self._start_core()
            self._compute_free = time.monotonic()
            self._tx.send(BOOT_BANNER, time.monotonic())

    def _disappear(self) -> None:
        """Off the bus: everything sent to the board is lost until it comes back and boots."""
        log.warning("dropping off the bus for %.2f s", self._config.faults.disappear_s)
        with self._lock:
            self._tx.drop_pending()
            self._generation += 1
            self._core.stop()
            self._offline_until = time.monotonic() + self._config.faults.disappear_s

    def _back_on_the_bus(self) -> None:
        with self._lock:
            if self._offline_until and time.monotonic() >= self._offline_until:
                self._offline_until = 0.0
                self._reboot("back on the bus")

    def handle(self, data: bytes, streaming: bool = False) -> None:
        """`data` as one read delivered it. Its bytes cross the wire one after another (from where
        the previous read's ended when `streaming`, else after the link's latency); each frame in
        it reaches the firmware once its own last byte has crossed, as the firmware handles a frame
        when it is complete, and the next read waits until the last byte of this one has crossed."""
        if self._offline_until:
            return  # nobody there to receive it
        data = self._faults.corrupt(data, "to_board")
        if not data:
            return
        with self._lock:
            generation, core, shadow = self._generation, self._core, self._shadow
        paced = self._config.emulate_link
        last_byte = self._rx_ready
        if paced:
            seconds_per_byte = 1.0 / self._config.link.bytes_per_s
            self._rx_ready = self._config.link.busy_until(self._rx_ready, time.monotonic(), len(data),
                                                          streaming=streaming)
            first_byte = self._rx_ready - (len(data) - 1) * seconds_per_byte
            # Slices of at most a fifth of the gap on the wire, so a slow link's bytes reach the
            # firmware as steadily as they cross and it never sees a gap the wire did not have.
            step = max(1, int(p.IDLE_GAP_S / 5 * self._config.link.bytes_per_s))
        else:
            first_byte = self._rx_ready = time.monotonic()
            step = len(data)
        if first_byte - last_byte >= p.IDLE_GAP_S:
            shadow.expire()  # the firmware drops what it holds too, and says so
        cuts = sorted({end for end, _frame in shadow.feed_with_ends(data)} | set(range(step, len(data), step))
                      | {len(data)})
        start = 0
        for end in cuts:
            if paced:
                _sleep_until(self._rx_ready - (len(data) - end) * seconds_per_byte)
            if self._generation != generation:
                return  # the board reset or dropped off the bus: the rest of the read is lost
            core.feed(data[start:end])
            start = end

    def _wait_s(self) -> float:
        """How long the main loop may wait for bytes: less while a core must look at its idle gap."""
        if self._offline_until:
            return 0.05
        deadline = self._core.idle_deadline()
        return 0.5 if deadline is None else min(0.5, max(0.001, deadline - time.monotonic()))

    def _on_output(self, data: bytes, is_frame: bool) -> bool:
        """Queues what the firmware wrote for the wire; False when the board reset instead."""
        if not is_frame:
            self._tx.send(data, time.monotonic())
            return True
        # A stalled board does nothing at all for a while, reading included.
        stall = self._faults.stall_seconds()
        if stall:
            time.sleep(stall)
        now = ready = time.monotonic()
        kind = data[2]
        if kind == p.MsgType.INVOKE_RESULT or kind == p.MsgType.OUTPUT_DATA:
            if kind == p.MsgType.INVOKE_RESULT:
                action = self._faults.on_invoke()
                if action == "reset":
                    self._reboot(f"reset during invoke {self._faults.invokes}")
                    return False
                if action == "disappear":
                    self._disappear()
                    return False
            if self._config.realtime and kind == p.MsgType.INVOKE_RESULT:
                inference_s = p.InvokeResult.unpack(data[p.HEADER_SIZE:-p.TRAILER_SIZE]).total_us / 1e6
                self._compute_free = max(self._compute_free, now) + inference_s
            ready = max(ready, self._compute_free if self._config.realtime else ready)
        self._tx.send(self._faults.corrupt(data, "to_host"), ready)
        return True

    def run(self, parent_pid: int) -> None:
        self._tx.send(BOOT_BANNER, time.monotonic())
        try:
            while os.getppid() == parent_pid:
                if self._core.exit_code is not None:
                    # The firmware crashed: end the board process too, so that the host reports the
                    # crash with the log's tail instead of timing out on a silent port.
                    log.error("native firmware exited with code %s", self._core.exit_code)
                    raise SystemExit(f"native firmware crashed (exit code {self._core.exit_code})")
                if self._offline_until:
                    self._back_on_the_bus()
                self._core.tick()
                # Bytes already waiting kept streaming while this board was busy; waiting for them
                # means the link went idle.
                streaming = bool(select.select([self._fd], [], [], 0)[0])
                if not streaming and not select.select([self._fd], [], [], self._wait_s())[0]:
                    continue
                data = self._read()
                if data:
                    self.handle(data, streaming)
        finally:
            self._core.stop()
            self._tx.close()
        log.info("parent gone; faults injected: %s", self._faults.counts)


class _PacedWriter:
    """Writes answers in order, each no earlier than its ready time and no faster than the link.

    The wire is modelled in the answers' own times: an answer that was ready while the previous
    one was still on the wire follows it; one that found the wire idle starts after the link's
    latency from its ready time. (How late this thread happens to wake is no part of the link.)
    Answers whose time has come by the time the thread gets to them leave in one write."""

    def __init__(self, fd: int, link) -> None:
        self._fd = fd
        self._link = link
        self._pending: collections.deque = collections.deque()
        self._closed = False
        self._generation = 0
        self._wakeup = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="tx", daemon=True)
        self._thread.start()

    def send(self, data: bytes, ready_at: float) -> None:
        with self._wakeup:
            self._pending.append((self._generation, data, ready_at))
            self._wakeup.notify()

    def drop_pending(self) -> None:
        with self._wakeup:
            self._generation += 1
            self._pending.clear()

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=2)

    def _take(self) -> list | None:
        """Everything queued, once there is something; None once closed and all is written."""
        with self._wakeup:
            while not self._pending and not self._closed:
                self._wakeup.wait()
            if not self._pending:
                return None
            items = list(self._pending)
            self._pending.clear()
            return items

    def _run(self) -> None:
        link = self._link
        wire_free = time.monotonic()
        out = bytearray()
        while (items := self._take()) is not None:
            # drop_pending empties the queue, so what was taken together is of one generation.
            taken = items[0][0]
            for generation, data, ready_at in items:
                if generation != self._generation:
                    continue
                if link is not None:
                    # On the wire from when it was ready: right behind the previous answer if that
                    # was still going out, else after the latency of an idle link.
                    due = link.busy_until(wire_free, ready_at, len(data), streaming=ready_at <= wire_free)
                else:
                    due = ready_at
                if due > time.monotonic():
                    self._write(out, taken)  # what is already due leaves before this thread sleeps
                    _sleep_until(due)
                    if generation != self._generation:
                        continue
                wire_free = due
                out += data
            self._write(out, taken)

    def _write(self, out: bytearray, generation: int) -> None:
        if generation != self._generation:  # a reset came first: these never reach the wire
            out.clear()
            return
        with memoryview(out) as view:
            written = 0
            while written < len(view):
                written += os.write(self._fd, view[written:])
        out.clear()


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.board.virtual_device", description=__doc__)
    parser.add_argument("--config", required=True, help="VirtualDeviceConfig as a JSON file")
    parser.add_argument("--fd", type=int, required=True, help="pty master file descriptor to serve")
    parser.add_argument("--log", help="log file (the board's console)")
    args = parser.parse_args(argv)
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    parent = os.getppid()
    config = VirtualDeviceConfig.from_json(Path(args.config).read_text())
    with open(args.log or os.devnull, "ab", buffering=0) as console:
        VirtualBoardProcess(config, args.fd, console).run(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
