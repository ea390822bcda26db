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
