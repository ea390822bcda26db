"""Host TFLite Micro (the `tflite-micro` package): build an interpreter, read what it allocated.

TFLM reports allocation sizes and op-resolution failures on the C-level stderr only, so both are
read by redirecting file descriptor 2 around the call. Shared by the reference stage and the
virtual board, which must agree on what "the arena TFLM used" means.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from .errors import ConversionError, ModelTooLargeError, TinyhilError, UnsupportedOpError

_UNSUPPORTED_OP = re.compile(r"Didn't find op for builtin opcode '([A-Z0-9_]+)'|"
                             r"Failed to get registration from op code ([A-Z0-9_]+)|"
                             r"Unsupported (?:builtin|custom) op[^:]*: ?(\w+)")
_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")


class CapturedStderr:
    def __enter__(self) -> CapturedStderr:
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", errors="replace")
        self._file.close()


@dataclass
class HostInterpreter:
    interpreter: object
    arena_used: int
    input_details: tuple[dict, ...]
    output_details: tuple[dict, ...]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # Every sample starts from zero recurrent state, as the firmware resets before Invoke().
        self.interpreter.reset()
        for index, array in enumerate(inputs):
            self.interpreter.set_input(array.reshape(self.input_details[index]["shape"]), index)
        self.interpreter.invoke()
        return [self.interpreter.get_output(i).copy() for i in range(len(self.output_details))]


def _details(interpreter, kind: str) -> tuple[dict, ...]:
    getter = getattr(interpreter, f"get_{kind}_details")
    found = []
    # The binding has no count: probe until it refuses an index (it also prints the refusal).
    with CapturedStderr():
        while True:
            try:
                found.append(getter(len(found)))
            except Exception:  # a bare RuntimeError past the last index
                return tuple(found)


# The host binding (tflite-micro's Python wrapper) segfaults instead of failing AllocateTensors()
# when the arena is smaller than this; such arenas are refused here with the same error kind.
MIN_HOST_ARENA_BYTES = 512


def open_interpreter(model: bytes, arena_size: int, *, where: str = "",
                     preserve_all_tensors: bool = False) -> HostInterpreter:
    """A ready TFLM interpreter, or an error that names the missing op or the arena shortfall.

    `preserve_all_tensors`: TFLM's debug mode (`InterpreterConfig.kPreserveAllTensors`, the linear
    memory planner): every tensor keeps its value after an invoke, for `tensor()`. The binding does
    not record allocations in that mode, so `arena_used` is then what `preserved_arena_bytes`
    measures."""
    from tflite_micro.python.tflite_micro import runtime

    least = MIN_PRESERVED_HOST_ARENA_BYTES if preserve_all_tensors else MIN_HOST_ARENA_BYTES
    if arena_size < least:
        raise ModelTooLargeError(f"AllocateTensors() cannot run in a {arena_size}-byte arena: TFLM needs at least "
                                 f"{least} bytes for its own bookkeeping"
                                 f"{' with every tensor preserved' if preserve_all_tensors else ''}", where=where)

    _check_softmax_scales(model, where)
    config = (runtime.InterpreterConfig.kPreserveAllTensors if preserve_all_tensors
              else runtime.InterpreterConfig.kAllocationRecording)
    interpreter, text, failure = _create(model, arena_size, config)
    if interpreter is None:
        # In the preserve mode an arena too small often leaves stderr empty: the exception says it.
        raise classify_failure(f"{text}\n{failure}" if preserve_all_tensors else text, failure, arena_size, where)
    if preserve_all_tensors:
        arena_used = preserved_arena_bytes(model, where=where, checked=True)
    else:
        with CapturedStderr() as allocations:
            interpreter.print_allocations()
        match = _ARENA_TOTAL.search(allocations.text)
        arena_used = int(match.group(1)) if match else 0
    return HostInterpreter(interpreter, arena_used, _details(interpreter, "input"), _details(interpreter, "output"))


def _create(model: bytes, arena_size: int, config) -> tuple[object | None, str, Exception | None]:
    """An interpreter, or None with TFLM's stderr and the exception."""
    from tflite_micro.python.tflite_micro import runtime

    interpreter, failure = None, None
    # The captured text exists only once the block has ended: read it after, never inside.
    with CapturedStderr() as creation:
        try:
            interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_size, intrepreter_config=config)
        except Exception as exc:  # RuntimeError with the real cause on stderr
            failure = exc
    return interpreter, creation.text, failure


# With every tensor preserved, the binding segfaults instead of failing below about 8.4 KB on the
# 64-bit host, whatever the model: the linear memory planner alone (1024 buffer offsets) takes 8 KB
# of the arena, MicroAllocator::Create then returns null, and the binding uses it all the same.
MIN_PRESERVED_HOST_ARENA_BYTES = 16 << 10
# A preserve-all-tensors arena beyond this could not be placed on any ESP32-S3 module (8 MB PSRAM
# is the largest); the search stops there.
PRESERVED_ARENA_LIMIT_BYTES = 64 << 20
_ARENA_SEARCH_STEP = 16  # TFLM aligns its allocations to 16 bytes


def preserved_arena_bytes(model: bytes, *, where: str = "", checked: bool = False) -> int:
    """The smallest arena (to 16 bytes, and at least MIN_PRESERVED_HOST_ARENA_BYTES) in which host
    TFLM allocates `model` with every tensor preserved: what the firmware's debug build needs before
    the margin of harness/firmware.py.

    TFLM's binding records no allocations in this mode (print_allocations refuses), so the size is
    found by allocating: doubling until AllocateTensors() succeeds, then bisecting. A failure other
    than the arena (an op without a kernel) is raised as open_interpreter raises it. `checked`:
    the caller already ran the SOFTMAX scale check."""
    from tflite_micro.python.tflite_micro import runtime

    if not checked:
        _check_softmax_scales(model, where)
    config = runtime.InterpreterConfig.kPreserveAllTensors

    def fits(size: int) -> bool:
        interpreter, text, failure = _create(model, size, config)
        if interpreter is not None:
            return True
        error = classify_failure(f"{text}\n{failure}", failure, size, where)
        if not isinstance(error, ModelTooLargeError):
            raise error
        return False

    low, high = MIN_PRESERVED_HOST_ARENA_BYTES, 64 << 10
    if fits(low):
        return low  # a small model: the floor that is safe to probe is an upper bound
    while not fits(high):
        if high >= PRESERVED_ARENA_LIMIT_BYTES:
            # A kernel that refuses the model in Prepare fails AllocateTensors() at every size too:
            # the normal mode at the same size tells that apart and names it.
            _, text, failure = _create(model, high, runtime.InterpreterConfig.kAllocationRecording)
            if failure is not None:
                raise classify_failure(text, failure, high, where)
            raise ModelTooLargeError(f"with every tensor preserved, TFLM cannot allocate this model in "
                                     f"{PRESERVED_ARENA_LIMIT_BYTES} bytes, more than any ESP32-S3 module has",
                                     where=where)
        low, high = high, min(high * 2, PRESERVED_ARENA_LIMIT_BYTES)
    while high - low > _ARENA_SEARCH_STEP:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _check_softmax_scales(model: bytes, where: str) -> None:
    """TFLM's int8 SOFTMAX needs input scale x beta x 2^26 > 1 (PreprocessSoftmaxScaling, then
    QuantizeMultiplierGreaterThanOne); below it TFLM aborts the process without a word, on the host
    and on the chip alike. Seen on untrained models, whose logits shrink to a scale near 1e-8.
    Keras converts softmax with beta 1, the value assumed here."""
    from .tflite_model import inspect_model

    info = inspect_model(model, where=where)
    for op in info.ops:
        if op.name != "SOFTMAX" or not op.inputs:
            continue
        tensor = info.tensors[op.inputs[0]]
        if tensor.dtype == "int8" and tensor.scales and tensor.scales[0] * 2.0 ** 26 <= 1.0:
            raise ConversionError(
                f"op {op.index} (SOFTMAX) has an int8 input scale of {tensor.scales[0]:.3g}: TFLite Micro needs "
                f"more than 2^-26 ({2.0 ** -26:.3g}) and aborts on this model, on the host and on the chip. The "
                f"logits barely varied on the data it was calibrated with (an untrained model?): train it, or "
                f"quantize it again with representative calibration inputs", where=where)


def classify_failure(stderr_text: str, failure: Exception, arena_size: int, where: str) -> TinyhilError:
    messages = " ".join(stderr_text.split())
    match = _UNSUPPORTED_OP.search(stderr_text)
    if match:
        op = next(group for group in match.groups() if group)
        return UnsupportedOpError(f"TFLite Micro has no kernel for op {op}", where=where, details=messages)
    if "allocate" in messages.lower():
        return ModelTooLargeError(f"AllocateTensors() failed with a {arena_size}-byte arena: {messages[-200:]}",
                                  where=where, details=messages)
    return TinyhilError(f"TFLite Micro could not load the model: {failure}: {messages[-200:]}", where=where,
                        details=messages)


# --- int16x8 models -------------------------------------------------------------------------------

# Ops with an int16-activation kernel in esp-tflite-micro 1.3.8, the library the firmware builds,
# read off its sources (tests/test_quantize.py re-reads them from ../shared/vendor): the ESP-NN
# wrappers (kernels/esp_nn/: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, pooling, SOFTMAX, ADD,
# MUL, each falling back to the reference kernel for int16) and the reference kernels it compiles.
# RESHAPE, SQUEEZE and EXPAND_DIMS copy bytes whatever the type. Missing there, among the ops the
# allowed layers become: REDUCE_MAX (GlobalMaxPooling), ELU and HARD_SWISH (int8 only). Host TFLM
# (the pip package, built from a newer TFLM) may run ops 1.3.8 cannot, so both are checked.
ESP_TFLM_VERSION = "1.3.8"
INT16_OPS_ESP_TFLM: frozenset[str] = frozenset({
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D", "AVERAGE_POOL_2D", "SOFTMAX", "ADD", "MUL",
    "MEAN", "SUM", "LOGISTIC", "TANH", "UNIDIRECTIONAL_SEQUENCE_LSTM", "RELU", "RELU6", "LEAKY_RELU", "PRELU",
    "PAD", "PADV2", "TRANSPOSE", "STRIDED_SLICE", "EXPAND_DIMS", "RESHAPE", "SQUEEZE", "RESIZE_NEAREST_NEIGHBOR",
    "MINIMUM", "MAXIMUM",
    "QUANTIZE", "DEQUANTIZE"})
# Large enough for any model the ESP32-S3's 8 MB PSRAM could hold: this check is about kernels.
INT16_CHECK_ARENA_BYTES = 8 << 20
_FAILED_NODE = re.compile(r"Node (\S+) \(number (\d+)(?:f)?\) failed to (invoke|prepare)")
_UNSUPPORTED_TYPE = re.compile(r"(?:Input )?[Tt]ype (\w+) \(\d+\)(?: is)? not (?:currently )?supported|"
                               r"Type (\w+) (?:is )?not currently supported")


def int16_kernel_problem(info, op) -> str:
    """Why esp-tflite-micro's kernel would compute this int16 op wrongly, or "". Its esp-nn
    FULLY_CONNECTED wrapper sends int16 inputs to the per-tensor reference kernel even when the
    weights carry one scale per output channel (kernels/esp_nn/fully_connected.cc, case
    kTfLiteInt16), where upstream TFLM's own kernel reads them: the chip would give other numbers
    than every reference."""
    if op.name != "FULLY_CONNECTED" or len(op.inputs) < 2 or op.inputs[1] < 0:
        return ""
    activation, weights = info.tensors[op.inputs[0]], info.tensors[op.inputs[1]]
    if activation.dtype == "int16" and len(weights.scales) > 1:
        return (f"int16 input with per-channel weights ({len(weights.scales)} scales), which esp-tflite-micro "
                f"{ESP_TFLM_VERSION}'s esp-nn FULLY_CONNECTED computes with one scale (its int16 case ignores "
                f"per-channel quantization): convert with per-tensor dense weights "
                f"(converter._experimental_disable_per_channel_quantization_for_dense_layers, as tinyhil's int16x8 does)")
    return ""


def check_runs_int16(model: bytes, *, where: str = "") -> None:
    """An int16x8 model must run on the firmware's TFLite Micro: every op needs an int16 kernel
    in esp-tflite-micro 1.3.8, and host TFLM must allocate and invoke it once. Raises
    UnsupportedOpError naming the op (index and name) otherwise."""
    from .tflite_model import inspect_model

    info = inspect_model(model, where=where)
    for op in info.ops:
        if op.name not in INT16_OPS_ESP_TFLM:
            raise UnsupportedOpError(
                f"op {op.index} ({op.name}) has no int16 kernel in esp-tflite-micro {ESP_TFLM_VERSION}, which the "
                f"firmware builds: quantize this model as int8, or replace the layer that becomes {op.name}",
                where=where)
        problem = int16_kernel_problem(info, op)
        if problem:
            raise UnsupportedOpError(f"op {op.index} ({op.name}): {problem}", where=where)
    try:
        interpreter = open_interpreter(model, INT16_CHECK_ARENA_BYTES, where=where)
    except ModelTooLargeError:
        raise
    except TinyhilError as error:  # a kernel's Prepare refused the model: name its op
        raise _int16_failure(info, " ".join((error.details or error.message).split()), "be prepared",
                             where) from error
    detail = interpreter.input_details[0]
    zeros = np.zeros(detail["shape"], dtype=detail["dtype"])
    with CapturedStderr() as invoke:
        try:
            interpreter.run([zeros])
            failure = None
        except Exception as exc:  # RuntimeError with the cause on stderr
            failure = exc
    if failure is None:
        return
    raise _int16_failure(info, " ".join(invoke.text.split()) or str(failure), "run", where) from failure


def _int16_failure(info, text: str, stage: str, where: str) -> UnsupportedOpError:
    """TFLM's complaint about an int16x8 model, with the op it names (index and name)."""
    node = _FAILED_NODE.search(text)
    if not node:
        return UnsupportedOpError(f"TFLite Micro cannot {stage} this int16x8 model: {text[-200:]}: "
                                  f"quantize it as int8", where=where, details=text)
    index = int(node.group(2))
    name = info.ops[index].name if index < len(info.ops) else node.group(1)
    kind = _UNSUPPORTED_TYPE.search(text)
    cause = text[:node.start()].strip()[-160:]
    reason = f"type {next(g for g in kind.groups() if g)} is not supported" if kind else cause or "no reason given"
    return UnsupportedOpError(f"op {index} ({name}) cannot {stage} in int16 on TFLite Micro ({reason}): quantize "
                              f"this model as int8", where=where, details=text)
