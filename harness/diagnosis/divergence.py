"""Where a board's outputs part from the reference: the first operator whose output tensor differs.

The board returns every op's output tensor of one sample (the firmware's preserve-all-tensors
debug mode); the host runs the same sample through TFLite Micro (the same kernels as the chip's
reference path, so it should agree to the bit) and through LiteRT's reference kernels (the
reference the pipeline judges by). The first op past the tolerance is where to look: the ops
after it only carry its error forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..board.costmodel import ChipConfig, estimate_latency
from ..errors import TinyhilError
from ..reference import HOST_ARENA_BYTES
from ..tflite_model import ModelInfo, inspect_model, read_model_file

# Float tensors have no LSB: a relative difference stands in for "within one step", the rule
# harness/compare.py applies to float outputs.
FLOAT_RELATIVE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class TensorDivergence:
    op_index: int
    op_name: str
    kernel: str                         # "esp-nn" or "reference": what the firmware runs for this op
    tensor_index: int
    tensor_name: str
    dtype: str
    elements: int
    vs_tflm_max_lsb: float              # max |board - host TFLM|, in LSB (absolute for float tensors)
    vs_tflm_share: float                # share of the elements that differ from host TFLM
    vs_litert_max_lsb: float | None     # None where LiteRT could not run the model
    vs_litert_share: float | None

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping) -> TensorDivergence:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DivergenceReport:
    sample_index: int
    tolerance_lsb: int
    layers: tuple[TensorDivergence, ...]        # every op's outputs, execution order
    first_vs_tflm: TensorDivergence | None      # first op past the tolerance against host TFLM
    first_vs_litert: TensorDivergence | None
    text: str                                   # one sentence for the row, the report and `explain`
    litert_note: str = ""                       # why LiteRT is missing, when it is
    missing_tensors: tuple[int, ...] = ()       # tensors asked for that the board did not return

    def to_json(self) -> dict:
        return {"sample_index": self.sample_index, "tolerance_lsb": self.tolerance_lsb,
                "layers": [layer.to_json() for layer in self.layers],
                "first_vs_tflm": self.first_vs_tflm.to_json() if self.first_vs_tflm else None,
                "first_vs_litert": self.first_vs_litert.to_json() if self.first_vs_litert else None,
                "text": self.text, "litert_note": self.litert_note, "missing_tensors": list(self.missing_tensors)}

    @classmethod
    def from_json(cls, data: Mapping) -> DivergenceReport:
        first = {key: TensorDivergence.from_json(data[key]) if data.get(key) else None
                 for key in ("first_vs_tflm", "first_vs_litert")}
        return cls(int(data["sample_index"]), int(data["tolerance_lsb"]),
                   tuple(TensorDivergence.from_json(layer) for layer in data["layers"]), first["first_vs_tflm"],
                   first["first_vs_litert"], data["text"], data.get("litert_note", ""),
                   tuple(data.get("missing_tensors", ())))


def _model(model_path: Path) -> tuple[bytes, ModelInfo]:
    data = read_model_file(model_path, where=str(model_path))
    return data, inspect_model(data, where=str(model_path))


def _op_outputs(info: ModelInfo) -> tuple[tuple[int, int], ...]:
    """(op index, tensor index) of every output of every op of the main subgraph, in execution
    order (TFLM invokes the operators in the order the flatbuffer lists them)."""
    return tuple((op.index, tensor) for op in info.ops for tensor in op.outputs if 0 <= tensor < len(info.tensors))


def tensors_to_read(model_path: Path) -> tuple[int, ...]:
    """The output tensors of every op of the main subgraph, in execution order: what the board's
    debug mode must return for `diagnose_divergence`. Tensors of a type the wire protocol does not
    carry (int64 from ARG_MAX, bool from comparisons) are left out: diagnose_divergence lists them
    as missing instead of the whole read failing on them."""
    from ..protocol import DType

    carried = {dtype.numpy_name for dtype in DType}
    _, info = _model(model_path)
    seen: dict[int, None] = {}
    for _, tensor in _op_outputs(info):
        if info.tensors[tensor].dtype in carried:
            seen.setdefault(tensor, None)
    return tuple(seen)


def _sample_for(sample: np.ndarray, shape) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    if sample.size != int(np.prod(shape)):
        raise TinyhilError(f"the sample has {sample.size} values, the model's input {shape} takes {int(np.prod(shape))}")
    return sample.reshape(shape)


def _host_tflm(data: bytes, info: ModelInfo, sample: np.ndarray, wanted: tuple[int, ...]) -> dict[int, np.ndarray]:
    from tflite_micro.python.tflite_micro import runtime

    from ..tflm import CapturedStderr, classify_failure

    with CapturedStderr() as creation:
        try:
            interpreter = runtime.Interpreter.from_bytes(
                data, arena_size=HOST_ARENA_BYTES,
                intrepreter_config=runtime.InterpreterConfig.kPreserveAllTensors)
        except Exception as exc:  # RuntimeError; the cause is on stderr
            interpreter, failure = None, exc
    if interpreter is None:
        raise classify_failure(creation.text, failure, HOST_ARENA_BYTES, "host TFLM (preserve all tensors)")
    details = interpreter.get_input_details(0)
    interpreter.reset()
    interpreter.set_input(_sample_for(sample, details["shape"]).astype(details["dtype"]), 0)
    interpreter.invoke()
    return {index: np.array(interpreter.GetTensor(index, 0)["tensor_data"]).copy() for index in wanted}


def _litert(model_path: Path, sample: np.ndarray, wanted: tuple[int, ...]) -> dict[int, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(model_path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                              num_threads=1, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.reset_all_variables()
    interpreter.set_tensor(detail["index"], _sample_for(sample, detail["shape"]).astype(detail["dtype"]))
    interpreter.invoke()
    return {index: interpreter.get_tensor(index).copy() for index in wanted}


def host_tensors(model_path: Path, sample: np.ndarray) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None, str]:
    """Every op's output tensor of one sample (in the model's input type) on host TFLM and on
    LiteRT's reference kernels, keyed by tensor index; LiteRT's is None, with why, when it refuses
    the model (TFLM's custom Signal ops, per-channel quantization it rejects)."""
    data, info = _model(model_path)
    wanted = tensors_to_read(model_path)
    tflm = _host_tflm(data, info, sample, wanted)
    try:
        litert, note = _litert(model_path, sample, wanted), ""
    except Exception as error:  # LiteRT refuses some valid TFLM models; that is said, not fatal
        litert, note = None, f"LiteRT cannot run this model: {' '.join(str(error).split())[:120]}"
    return tflm, litert, note


def _difference(board: np.ndarray, host: np.ndarray, tolerance_lsb: int) -> tuple[float, float, bool]:
    """(max difference, share of elements that differ, past the tolerance)."""
    board_flat = np.asarray(board).reshape(-1).astype(np.float64)
    host_flat = np.asarray(host).reshape(-1).astype(np.float64)
    if board_flat.size != host_flat.size:
        raise TinyhilError(f"the board returned {board_flat.size} values for a tensor of {host_flat.size}")
    if not host_flat.size:
        return 0.0, 0.0, False
    diff = np.abs(board_flat - host_flat)
    diff[np.isnan(board_flat) & np.isnan(host_flat)] = 0.0
    diff[np.isnan(diff)] = np.inf
    if np.issubdtype(np.asarray(host).dtype, np.floating):
        allowed = FLOAT_RELATIVE_TOLERANCE * np.maximum(1.0, np.abs(host_flat))
        differs = diff > allowed
        return float(diff.max()), float(differs.mean()), bool(differs.any())
    return float(diff.max()), float((diff > 0).mean()), bool(diff.max() > tolerance_lsb)


def _kernels(info: ModelInfo, esp_nn: bool, esp_nn_version: str) -> dict[int, str]:
    """The kernel the firmware runs for each op: the cost model decides it from esp-tflite-micro's
    wrappers (which ops, which types, which shapes), so there is one table for both."""
    estimate = estimate_latency(info, ChipConfig(esp_nn=esp_nn, esp_nn_version=esp_nn_version))
    return {op.index: op.kernel for op in estimate.ops}


def _unit(layer: TensorDivergence) -> str:
    return "" if layer.dtype.startswith("float") else " LSB"


def _amount(value: float, layer: TensorDivergence) -> str:
    return f"{value:.3g}" if layer.dtype.startswith("float") else f"{value:.0f}"


def _sentence(report_layers: tuple[TensorDivergence, ...], first_tflm: TensorDivergence | None,
              first_litert: TensorDivergence | None, tolerance_lsb: int, litert_note: str, sample_index: int) -> str:
    within = f"within {tolerance_lsb} LSB"
    if first_tflm is not None:
        layer = first_tflm
        text = (f"op {layer.op_index} ({layer.op_name}, {layer.kernel}) is the first to diverge on sample "
                f"{sample_index}: up to {_amount(layer.vs_tflm_max_lsb, layer)}{_unit(layer)} from host TFLM on "
                f"{100 * layer.vs_tflm_share:.0f}% of its {layer.elements} elements")
        if first_litert is None and litert_note:
            return f"{text}; {litert_note}"
        if first_litert is None:
            return f"{text} (LiteRT: every op {within})"
        if first_litert.op_index == layer.op_index:
            return (f"{text} (LiteRT: the same op, up to {_amount(first_litert.vs_litert_max_lsb or 0, first_litert)}"
                    f"{_unit(first_litert)} on {100 * (first_litert.vs_litert_share or 0):.0f}%)")
        return (f"{text} (LiteRT: first op {first_litert.op_index} ({first_litert.op_name}), up to "
                f"{_amount(first_litert.vs_litert_max_lsb or 0, first_litert)}{_unit(first_litert)})")
    if first_litert is not None:
        layer = first_litert
        return (f"every op agrees with host TFLM {within} on sample {sample_index}, but op {layer.op_index} "
                f"({layer.op_name}, {layer.kernel}) is the first to differ from LiteRT's reference kernels: up to "
                f"{_amount(layer.vs_litert_max_lsb or 0, layer)}{_unit(layer)} on "
                f"{100 * (layer.vs_litert_share or 0):.0f}% of its {layer.elements} elements")
    ops = len({layer.op_index for layer in report_layers})
    if litert_note:
        return f"every op's output ({ops} ops) agrees with host TFLM {within} on sample {sample_index}; {litert_note}"
    return f"every op's output ({ops} ops) agrees with host TFLM and LiteRT {within} on sample {sample_index}"


def diagnose_divergence(model_path: Path, sample_index: int, sample: np.ndarray, board_tensors: Mapping[int, np.ndarray],
                        *, tolerance_lsb: int, esp_nn: bool, esp_nn_version: str = "1.1.2",
                        host: tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None, str] | None = None
                        ) -> DivergenceReport:
    """Compare the board's op outputs of one sample with host TFLM's and LiteRT's. `host` takes
    what `host_tensors` returned, when the caller already has it."""
    _, info = _model(model_path)
    tflm, litert, note = host if host is not None else host_tensors(model_path, sample)
    kernels = _kernels(info, esp_nn, esp_nn_version)
    layers, missing = [], []
    first_tflm = first_litert = None
    for op_index, tensor_index in _op_outputs(info):
        if tensor_index not in board_tensors:
            missing.append(tensor_index)
            continue
        board = np.asarray(board_tensors[tensor_index])
        tensor = info.tensors[tensor_index]
        try:
            tflm_max, tflm_share, tflm_past = _difference(board, tflm[tensor_index], tolerance_lsb)
            if litert is not None and tensor_index in litert:
                litert_max, litert_share, litert_past = _difference(board, litert[tensor_index], tolerance_lsb)
            else:
                litert_max = litert_share = None
                litert_past = False
        except TinyhilError as error:
            raise TinyhilError(f"op {op_index} ({info.ops[op_index].name}), tensor {tensor_index} "
                               f"'{tensor.name}': {error.message}", where=str(model_path)) from None
        layer = TensorDivergence(op_index=op_index, op_name=info.ops[op_index].name,
                                 kernel=kernels.get(op_index, "reference"), tensor_index=tensor_index,
                                 tensor_name=tensor.name, dtype=tensor.dtype, elements=int(board.size),
                                 vs_tflm_max_lsb=tflm_max, vs_tflm_share=tflm_share,
                                 vs_litert_max_lsb=litert_max, vs_litert_share=litert_share)
        layers.append(layer)
        if tflm_past and first_tflm is None:
            first_tflm = layer
        if litert_past and first_litert is None:
            first_litert = layer
    if not layers:
        raise TinyhilError(f"the board returned none of the {len(tensors_to_read(model_path))} op output tensors "
                           f"asked for (tensors {', '.join(map(str, missing[:8]))}...)", where=str(model_path))
    text = _sentence(tuple(layers), first_tflm, first_litert, tolerance_lsb, note, sample_index)
    if missing:
        text += f"; the board did not return {len(missing)} tensor(s): {', '.join(map(str, missing[:8]))}"
    return DivergenceReport(sample_index=sample_index, tolerance_lsb=tolerance_lsb, layers=tuple(layers),
                            first_vs_tflm=first_tflm, first_vs_litert=first_litert, text=text, litert_note=note,
                            missing_tensors=tuple(missing))


def pick_sample(board_outputs: np.ndarray, reference_outputs: np.ndarray, tolerance_lsb: int) -> int | None:
    """The sample to diagnose: the one furthest from the reference, when it is past the tolerance
    (relative 1e-5 for float outputs); None when every sample agrees."""
    board = np.asarray(board_outputs)
    reference = np.asarray(reference_outputs)
    if board.shape[0] != reference.shape[0] or board.size != reference.size:
        raise TinyhilError(f"board outputs {board.shape} and reference outputs {reference.shape} differ in shape")
    if not len(board):
        return None
    count = len(board)
    board_flat = board.reshape(count, -1).astype(np.float64)
    ref_flat = reference.reshape(count, -1).astype(np.float64)
    diff = np.abs(board_flat - ref_flat)
    if np.issubdtype(reference.dtype, np.floating):
        excess = diff / (FLOAT_RELATIVE_TOLERANCE * np.maximum(1.0, np.abs(ref_flat)))
        worst = excess.max(axis=1)
        return int(worst.argmax()) if worst.max() > 1.0 else None
    worst = diff.max(axis=1)
    return int(worst.argmax()) if worst.max() > tolerance_lsb else None
