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


def open_interpreter(model: bytes, arena_size: int, *, where: str = "") -> HostInterpreter:
    """A ready TFLM interpreter, or an error that names the missing op or the arena shortfall."""
    from tflite_micro.python.tflite_micro import runtime

    if arena_size < MIN_HOST_ARENA_BYTES:
        raise ModelTooLargeError(f"AllocateTensors() cannot run in a {arena_size}-byte arena: TFLM needs at least "
                                 f"{MIN_HOST_ARENA_BYTES} bytes for its own bookkeeping", where=where)

    _check_softmax_scales(model, where)
    with CapturedStderr() as creation:
        try:
            interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_size)
        except Exception as exc:  # RuntimeError with the real cause on stderr
            interpreter, failure = None, exc
    if interpreter is None:
        raise classify_failure(creation.text, failure, arena_size, where)
    with CapturedStderr() as allocations:
        interpreter.print_allocations()
    match = _ARENA_TOTAL.search(allocations.text)
    return HostInterpreter(interpreter, int(match.group(1)) if match else 0, _details(interpreter, "input"),
                           _details(interpreter, "output"))


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
        return UnsupportedOpError(f"TFLite Micro cannot {stage.split()[-1]} this int16x8 model: {text[-200:]}: "
                                  f"quantize it as int8", where=where, details=text)
    index = int(node.group(2))
    name = info.ops[index].name if index < len(info.ops) else node.group(1)
    kind = _UNSUPPORTED_TYPE.search(text)
    cause = text[:node.start()].strip()[-160:]
    reason = f"type {next(g for g in kind.groups() if g)} is not supported" if kind else cause or "no reason given"
    return UnsupportedOpError(f"op {index} ({name}) cannot {stage} in int16 on TFLite Micro ({reason}): quantize "
                              f"this model as int8", where=where, details=text)
