"""The reference stage: what the int8 model should output, from two host interpreters.

LiteRT (ai-edge-litert) with BUILTIN_REF kernels is the reference: its optimized kernels round
differently from TFLite Micro by +-1 LSB, the reference kernels do not. Host TFLM runs too: it
records the arena the model needs, and it is the fallback where LiteRT refuses a model (custom
TFLM ops such as the audio front end's Signal* ops, or per-channel quantization LiteRT rejects).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tflm import open_interpreter

# Big enough for any model that fits an ESP32-S3 with 8 MB PSRAM; only the used part matters.
HOST_ARENA_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorQuant:
    dtype: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Float data -> the tensor's type, as the device's preprocessing must do it."""
        if self.dtype == "float32" or self.scale == 0.0:
            return values.astype(self.dtype)
        info = np.iinfo(self.dtype)
        scaled = np.round(values / self.scale) + self.zero_point
        return np.clip(scaled, info.min, info.max).astype(self.dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        if self.dtype == "float32" or self.scale == 0.0:
            return values.astype(np.float32)
        return ((values.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


@dataclass(frozen=True)
class ReferenceRun:
    outputs: np.ndarray               # (samples, *output shape), the reference the board is judged by
    source: str                       # "litert-builtin-ref" or "tflm-host"
    tflm_outputs: np.ndarray
    litert_note: str                  # why LiteRT was not the reference, if it was not
    host_arena_bytes: int
    input_quant: TensorQuant
    output_quant: TensorQuant


def _quant_of(details: dict) -> TensorQuant:
    params = details.get("quantization_parameters", {})
    scales, zero_points = params.get("scales", []), params.get("zero_points", [])
    dtype = np.dtype(details["dtype"]).name
    return TensorQuant(dtype, tuple(int(d) for d in details["shape"]),
                       float(scales[0]) if len(scales) else 0.0, int(zero_points[0]) if len(zero_points) else 0)


def model_io(model_path: Path) -> tuple[TensorQuant, TensorQuant, int]:
    """Input and output quantization and the host arena TFLM records, without running anything."""
    host = open_interpreter(model_path.read_bytes(), HOST_ARENA_BYTES, where=str(model_path))
    _require_single_io(host.input_details, host.output_details, model_path)
    return _quant_of(host.input_details[0]), _quant_of(host.output_details[0]), host.arena_used


def _require_single_io(inputs, outputs, model_path: Path) -> None:
    from .errors import TinyhilError

    if len(inputs) != 1 or len(outputs) != 1:
        raise TinyhilError(f"the pipeline runs models with one input and one output; this one has "
                           f"{len(inputs)} inputs and {len(outputs)} outputs", where=str(model_path))


def run_litert(model_path: Path, inputs: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(model_path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                              num_threads=1)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs = []
    for sample in inputs:
        interpreter.reset_all_variables()
        interpreter.set_tensor(input_index, sample[np.newaxis] if sample.ndim < len(
            interpreter.get_input_details()[0]["shape"]) else sample)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index)[0].copy())
    return np.stack(outputs)


def run_reference(model_path: Path, inputs: np.ndarray) -> ReferenceRun:
    """`inputs` are already in the model's input type, one sample per row."""
    host = open_interpreter(model_path.read_bytes(), HOST_ARENA_BYTES, where=str(model_path))
    _require_single_io(host.input_details, host.output_details, model_path)
    tflm_outputs = np.stack([host.run([sample])[0].reshape(host.output_details[0]["shape"])[0] for sample in inputs])
    try:
        litert = run_litert(model_path, inputs)
        source, note = litert, ""
    except Exception as error:  # LiteRT refuses some valid TFLM models; that is reported, not fatal
        source, note = None, f"LiteRT cannot run this model ({' '.join(str(error).split())[:160]}); TFLM host is the reference"
    return ReferenceRun(
        outputs=source if source is not None else tflm_outputs,
        source="litert-builtin-ref" if source is not None else "tflm-host",
        tflm_outputs=tflm_outputs, litert_note=note, host_arena_bytes=host.arena_used,
        input_quant=_quant_of(host.input_details[0]), output_quant=_quant_of(host.output_details[0]))
