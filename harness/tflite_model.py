"""What a .tflite file contains, read straight from the flatbuffer: tensors, operators, and the
work each operator does (multiply-accumulates, elements written, bytes read and written).

This runs inside the virtual board, a light process that must start quickly, so it reads the
flatbuffer with the schema module shipped in the tflite-micro package and never imports
TensorFlow or LiteRT. The figures it derives feed the board's cost model and the reports; which
operators a runtime supports is left to that runtime.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema_fb

from .errors import TinyhilError

__all__ = ["TensorInfo", "OpInfo", "ModelInfo", "inspect_model", "read_model_file"]

_FILE_IDENTIFIER = b"TFL3"


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    # Unknown (-1) dimensions are reported as 1: TFLite Micro runs the batch-1 form of a model,
    # and sizes computed from the shape must be the sizes the device allocates.
    shape: tuple[int, ...]
    dtype: str
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int
    nbytes: int
    is_constant: bool

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class OpInfo:
    index: int
    name: str
    is_custom: bool
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    macs: int
    elements: int
    bytes_in: int
    bytes_out: int
    weight_bytes: int
    # Window geometry of convolutions and pools (height, width), from the operator's options: it
    # decides which kernel a library runs (esp-nn has 1x1 and padded paths, for instance).
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: str = ""                      # "SAME" or "VALID"; "" for operators without a window
    window: tuple[int, int] = (0, 0)       # pools only: the filter size in their options


@dataclass(frozen=True)
class ModelInfo:
    size_bytes: int
    ops: tuple[OpInfo, ...]
    tensors: tuple[TensorInfo, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    weight_bytes: int
    subgraph_count: int
    description: str
    # (name, is_custom) of the operators of every subgraph: the bodies of IF, WHILE and CALL_ONCE
    # run ops that the main graph does not list, and the firmware must register them all.
    all_subgraph_ops: tuple[tuple[str, bool], ...] = ()

    @property
    def op_types(self) -> tuple[str, ...]:
        """Operator types of the main subgraph."""
        return tuple(sorted({op.name for op in self.ops}))

    @property
    def all_op_types(self) -> tuple[str, ...]:
        """Operator types of every subgraph: what an op resolver must register."""
        return tuple(sorted({name for name, _ in self.all_subgraph_ops} | set(self.op_types)))

    @property
    def custom_op_types(self) -> tuple[str, ...]:
        return tuple(sorted({name for name, custom in self.all_subgraph_ops if custom}
                            | {op.name for op in self.ops if op.is_custom}))

    @property
    def total_macs(self) -> int:
        return sum(op.macs for op in self.ops)

    def input_tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(self.tensors[i] for i in self.inputs)

    def output_tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(self.tensors[i] for i in self.outputs)


def _dtype_table() -> Mapping[int, tuple[str, int]]:
    """TensorType code -> (numpy dtype name, bits per element); 0 bits means no fixed size."""
    wanted = {
        "FLOAT32": ("float32", 32), "FLOAT16": ("float16", 16), "FLOAT64": ("float64", 64),
        "BFLOAT16": ("bfloat16", 16), "INT64": ("int64", 64), "INT32": ("int32", 32),
        "INT16": ("int16", 16), "INT8": ("int8", 8), "INT4": ("int4", 4), "INT2": ("int2", 2),
        "UINT64": ("uint64", 64), "UINT32": ("uint32", 32), "UINT16": ("uint16", 16),
        "UINT8": ("uint8", 8), "UINT4": ("uint4", 4), "BOOL": ("bool", 8),
        "COMPLEX64": ("complex64", 64), "COMPLEX128": ("complex128", 128),
        "FLOAT8_E4M3FN": ("float8_e4m3fn", 8), "FLOAT8_E5M2": ("float8_e5m2", 8),
        "STRING": ("string", 0), "RESOURCE": ("resource", 0), "VARIANT": ("variant", 0),
    }
    # getattr: the schema grows over releases; a type missing from this one is simply absent.
    return MappingProxyType({
        getattr(schema_fb.TensorType, key): value
        for key, value in wanted.items() if hasattr(schema_fb.TensorType, key)
    })


_DTYPES = _dtype_table()
_BUILTIN_NAMES: Mapping[int, str] = MappingProxyType({
    code: name for name, code in vars(schema_fb.BuiltinOperator).items()
    if not name.startswith("_") and isinstance(code, int)
})


class _Malformed(Exception):
    """Raised while walking the flatbuffer; inspect_model turns it into a TinyhilError."""


# Flatbuffer offsets are signed 32-bit: no TFLite flatbuffer is larger (bigger models keep their
# weights outside it).
MAX_FLATBUFFER_BYTES = 2**31 - 1


def _check_identifier(head: bytes, size: int, where: str) -> None:
    if size < 8 or head[4:8] != _FILE_IDENTIFIER:
        found = head[4:8] if len(head) >= 8 else b""
        raise TinyhilError(
            f"not a TFLite model: expected file identifier {_FILE_IDENTIFIER!r} at offset 4, "
            f"found {found!r} ({size} bytes)",
            where=where,
        )


def read_model_file(path: Path, *, where: str = "") -> bytes:
    """The bytes of a .tflite file. The identifier is checked on the first 8 bytes, so a file that
    is not a model is never read whole (a suite may name /proc/kcore). Raises OSError if the file
    cannot be read, TinyhilError if it is not a TFLite flatbuffer."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        _check_identifier(head, size if size else len(head), where)
        if size > MAX_FLATBUFFER_BYTES:
            raise TinyhilError(f"not a TFLite model: {size} bytes is more than a flatbuffer can hold "
                               f"({MAX_FLATBUFFER_BYTES})", where=where)
        data = head + handle.read(MAX_FLATBUFFER_BYTES + 1 - len(head))
    if len(data) > MAX_FLATBUFFER_BYTES:
        raise TinyhilError(f"not a TFLite model: more than a flatbuffer can hold ({MAX_FLATBUFFER_BYTES} bytes)",
                           where=where)
    return data


def inspect_model(data: bytes, *, where: str = "") -> ModelInfo:
    """Describe a TFLite model; raise TinyhilError (carrying `where`) if `data` is not one."""
    data = bytes(data)
    _check_identifier(data[:8], len(data), where)
    try:
        return _read_model(data)
    # The generated reader trusts every offset it follows, so a corrupt or truncated file
    # surfaces as whatever low-level error the first bad offset happens to cause.
    except (_Malformed, struct.error, IndexError, ValueError, TypeError, OverflowError,
            UnicodeDecodeError) as exc:
        reason = (str(exc) if isinstance(exc, _Malformed)
                  else "an offset inside it points past the end (truncated or corrupt file)")
        raise TinyhilError(
            f"not a valid TFLite model ({len(data)} bytes): {reason}", where=where,
            details=f"{type(exc).__name__}: {exc}",
        ) from exc


def _bounded(count: int, item_bytes: int, data_len: int, what: str) -> int:
    # A garbage length would otherwise send the loops below through billions of iterations.
    if count < 0 or count * item_bytes > data_len:
        raise _Malformed(f"{what} claims {count} entries in a {data_len}-byte file")
    return count


def _read_model(data: bytes) -> ModelInfo:
    size = len(data)
    model = schema_fb.Model.GetRootAs(data, 0)
    subgraph_count = _bounded(model.SubgraphsLength(), 4, size, "subgraph list")
    if subgraph_count == 0:
        raise _Malformed("the model has no subgraphs")
    buffers = _buffer_sizes(model, size)

    # Weights are the buffers tensors point at: metadata (such as min_runtime_version) also
    # lives in buffers but is not loaded as a tensor, and shared buffers count once.
    weight_buffers: set[int] = set()
    for subgraph_index in range(subgraph_count):
        subgraph = model.Subgraphs(subgraph_index)
        for tensor_index in range(_bounded(subgraph.TensorsLength(), 4, size, "tensor list")):
            buffer_index = subgraph.Tensors(tensor_index).Buffer()
            if 0 < buffer_index < len(buffers) and buffers[buffer_index] > 0:
                weight_buffers.add(buffer_index)

    graph = model.Subgraphs(0)
    tensors = tuple(
        _read_tensor(graph.Tensors(i), i, buffers, size)
        for i in range(_bounded(graph.TensorsLength(), 4, size, "tensor list"))
    )
    op_names = _operator_code_names(model, size)
    ops = tuple(
        _read_operator(graph.Operators(i), i, op_names, tensors, size)
        for i in range(_bounded(graph.OperatorsLength(), 4, size, "operator list"))
    )
    inputs = _tensor_refs(graph.Inputs, graph.InputsLength(), len(tensors), size, "subgraph inputs")
    outputs = _tensor_refs(graph.Outputs, graph.OutputsLength(), len(tensors), size,
                           "subgraph outputs")
    if -1 in inputs or -1 in outputs:
        raise _Malformed("a subgraph input or output refers to no tensor")
    all_subgraph_ops = set()
    for subgraph_index in range(subgraph_count):
        subgraph = model.Subgraphs(subgraph_index)
        for op_index in range(_bounded(subgraph.OperatorsLength(), 4, size, "operator list")):
            code = subgraph.Operators(op_index).OpcodeIndex()
            if not 0 <= code < len(op_names):
                raise _Malformed(f"subgraph {subgraph_index} operator {op_index} has opcode index {code}, "
                                 f"the model has {len(op_names)} operator codes")
            all_subgraph_ops.add(op_names[code])
    description = model.Description()
    return ModelInfo(
        size_bytes=size,
        ops=ops,
        tensors=tensors,
        inputs=inputs,
        outputs=outputs,
        weight_bytes=sum(buffers[i] for i in weight_buffers),
        subgraph_count=subgraph_count,
        description=description.decode("utf-8", errors="replace") if description else "",
        all_subgraph_ops=tuple(sorted(all_subgraph_ops)),
    )


def _buffer_sizes(model: schema_fb.Model, size: int) -> tuple[int, ...]:
    sizes = []
    for i in range(_bounded(model.BuffersLength(), 4, size, "buffer list")):
        buffer = model.Buffers(i)
        inline = buffer.DataLength()
        # Models over 2 GB keep data after the flatbuffer; offset 0 and 1 both mean "none".
        external = buffer.Size() if buffer.Offset() > 1 else 0
        sizes.append(inline or external)
    return tuple(sizes)


def _operator_code_names(model: schema_fb.Model, size: int) -> tuple[tuple[str, bool], ...]:
    names = []
    for i in range(_bounded(model.OperatorCodesLength(), 4, size, "operator code list")):
        code = model.OperatorCodes(i)
        # Codes below 127 live in the old int8 field and newer ones in the int32 field; a file
        # written by either converter generation has the real code in whichever is larger
        # (the rule tflite_micro's runtime.py applies).
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema_fb.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            names.append((custom.decode("utf-8", errors="replace") if custom else "CUSTOM", True))
        else:
            names.append((_BUILTIN_NAMES.get(builtin, f"BUILTIN_{builtin}"), False))
    return tuple(names)


def _tensor_refs(get: Callable[[int], int], count: int, tensor_count: int, size: int,
                 what: str) -> tuple[int, ...]:
    refs = tuple(get(j) for j in range(_bounded(count, 4, size, what)))
    for ref in refs:
        if ref < -1 or ref >= tensor_count:
            raise _Malformed(f"{what} refer to tensor {ref}, but there are {tensor_count}")
    return refs


def _read_tensor(tensor: schema_fb.Tensor, index: int, buffers: Sequence[int],
                 size: int) -> TensorInfo:
    raw_shape = (tensor.Shape(j)
                 for j in range(_bounded(tensor.ShapeLength(), 4, size, "tensor shape")))
    shape = tuple(1 if dim < 0 else dim for dim in raw_shape)
    type_code = tensor.Type()
    dtype, bits = _DTYPES.get(type_code, (f"tensor_type_{type_code}", 0))
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension = 0
    quantization = tensor.Quantization()
    if quantization is not None:
        # Per-channel models carry thousands of scales; element-wise accessors would dominate
        # the parse time, so the vectors are read whole.
        scales = tuple(_vector(quantization.ScaleAsNumpy()))
        zero_points = tuple(int(z) for z in _vector(quantization.ZeroPointAsNumpy()))
        quantized_dimension = quantization.QuantizedDimension()
    buffer_index = tensor.Buffer()
    if buffer_index >= len(buffers):
        raise _Malformed(f"tensor {index} refers to buffer {buffer_index}, "
                         f"but there are {len(buffers)}")
    name = tensor.Name()
    return TensorInfo(
        index=index,
        name=name.decode("utf-8", errors="replace") if name else "",
        shape=shape,
        dtype=dtype,
        scales=scales,
        zero_points=zero_points,
        quantized_dimension=quantized_dimension,
        # Rounded up so that packed 4-bit and 2-bit tensors count the bytes they occupy.
        nbytes=(math.prod(shape) * bits + 7) // 8,
        is_constant=buffer_index > 0 and buffers[buffer_index] > 0,
    )


def _vector(values: object) -> list:
    # The generated *AsNumpy accessors return the int 0 when the field is absent.
    return [] if isinstance(values, int) else values.tolist()


def _read_operator(op: schema_fb.Operator, index: int,
                   op_names: Sequence[tuple[str, bool]], tensors: Sequence[TensorInfo],
                   size: int) -> OpInfo:
    code_index = op.OpcodeIndex()
    if code_index >= len(op_names):
        raise _Malformed(f"operator {index} uses operator code {code_index}, "
                         f"but there are {len(op_names)}")
    name, is_custom = op_names[code_index]
    inputs = _tensor_refs(op.Inputs, op.InputsLength(), len(tensors), size, "operator inputs")
    outputs = _tensor_refs(op.Outputs, op.OutputsLength(), len(tensors), size,
                           "operator outputs")
    input_tensors = tuple(tensors[i] if i >= 0 else None for i in inputs)
    output_tensors = tuple(tensors[i] for i in outputs if i >= 0)
    present_inputs = [t for t in input_tensors if t is not None]
    mac_counter = None if is_custom else _MAC_COUNTERS.get(name)
    return OpInfo(
        index=index,
        name=name,
        is_custom=is_custom,
        inputs=inputs,
        outputs=outputs,
        macs=mac_counter(input_tensors, output_tensors, op) if mac_counter else 0,
        elements=sum(t.elements for t in output_tensors),
        bytes_in=sum(t.nbytes for t in present_inputs),
        bytes_out=sum(t.nbytes for t in output_tensors),
        weight_bytes=sum(t.nbytes for t in present_inputs if t.is_constant),
        **_window_geometry(op, name),
    )


_PADDINGS = {schema_fb.Padding.SAME: "SAME", schema_fb.Padding.VALID: "VALID"}
_WINDOW_OPTIONS = MappingProxyType({
    "CONV_2D": (schema_fb.BuiltinOptions.Conv2DOptions, schema_fb.Conv2DOptions),
    "DEPTHWISE_CONV_2D": (schema_fb.BuiltinOptions.DepthwiseConv2DOptions, schema_fb.DepthwiseConv2DOptions),
    "AVERAGE_POOL_2D": (schema_fb.BuiltinOptions.Pool2DOptions, schema_fb.Pool2DOptions),
    "MAX_POOL_2D": (schema_fb.BuiltinOptions.Pool2DOptions, schema_fb.Pool2DOptions),
})


def _window_geometry(op: schema_fb.Operator, name: str) -> dict:
    kinds = _WINDOW_OPTIONS.get(name)
    table = op.BuiltinOptions()
    if kinds is None or table is None or op.BuiltinOptionsType() != kinds[0]:
        return {}
    options = kinds[1]()
    options.Init(table.Bytes, table.Pos)
    geometry = {"stride": (max(1, options.StrideH()), max(1, options.StrideW())),
                "padding": _PADDINGS.get(options.Padding(), "")}
    if hasattr(options, "DilationHFactor"):
        geometry["dilation"] = (max(1, options.DilationHFactor()), max(1, options.DilationWFactor()))
    if hasattr(options, "FilterHeight"):
        geometry["window"] = (options.FilterHeight(), options.FilterWidth())
    return geometry


# --- multiply-accumulate counts -------------------------------------------------------------
# Each counter gets the operator's inputs (None where an optional input is absent), its outputs
# and the raw operator for options. They count the nominal work of one invoke: taps that fall in
# the padding are counted, as an output-stationary kernel still visits them.

_Inputs = Sequence[TensorInfo | None]
_Outputs = Sequence[TensorInfo]


def _input(inputs: _Inputs, position: int) -> TensorInfo | None:
    return inputs[position] if position < len(inputs) else None


def _out_elements(outputs: _Outputs) -> int:
    return outputs[0].elements if outputs else 0


def _per_output_channel(filter_: TensorInfo | None, channel_axis: int) -> int:
    """Filter taps that feed one output value: the filter's size over its output-channel axis."""
    if filter_ is None or not filter_.shape or filter_.shape[channel_axis] == 0:
        return 0
    return filter_.elements // filter_.shape[channel_axis]


def _conv_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Filter [out_c, k_h, k_w, in_c / groups]: grouped convs carry the group split in the filter.
    return _out_elements(outputs) * _per_output_channel(_input(inputs, 1), 0)


def _depthwise_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Filter [1, k_h, k_w, out_c]: every output value sees k_h * k_w inputs.
    return _out_elements(outputs) * _per_output_channel(_input(inputs, 1), -1)


def _conv3d_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Filter [k_d, k_h, k_w, in_c, out_c].
    return _out_elements(outputs) * _per_output_channel(_input(inputs, 1), -1)


def _transpose_conv_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Inputs (output_shape, weights [out_c, k_h, k_w, in_c], input): each input value is
    # scattered over k_h * k_w * out_c outputs.
    data = _input(inputs, 2)
    return data.elements * _per_output_channel(_input(inputs, 1), -1) if data else 0


def _conv3d_transpose_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Inputs (output_shape, filter [k_d, k_h, k_w, out_c, in_c], input).
    data = _input(inputs, 2)
    return data.elements * _per_output_channel(_input(inputs, 1), -1) if data else 0


def _fully_connected_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Weights [out, in]; the batch is whatever the output holds beyond `out`.
    weights = _input(inputs, 1)
    if weights is None or len(weights.shape) < 2:
        return 0
    return _out_elements(outputs) * weights.shape[-1]


def _batch_matmul_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    lhs = _input(inputs, 0)
    if lhs is None or len(lhs.shape) < 2:
        return 0
    adjoint_lhs = False
    table = op.BuiltinOptions()
    if table is not None and op.BuiltinOptionsType() == schema_fb.BuiltinOptions.BatchMatMulOptions:
        options = schema_fb.BatchMatMulOptions()
        options.Init(table.Bytes, table.Pos)
        adjoint_lhs = bool(options.AdjX())
    depth = lhs.shape[-2] if adjoint_lhs else lhs.shape[-1]
    return _out_elements(outputs) * depth


def _steps(data: TensorInfo | None, width: int) -> int:
    """Time steps times batch of a sequence input whose innermost axis is `width`."""
    return data.elements // width if data is not None and width > 0 else 0


def _lstm_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Inputs 1-4: input-to-gate weights [hidden, input] (1 is absent with coupled input and
    # forget gates); 5-8: recurrent weights [hidden, output]; 9-11: peepholes; 16: projection.
    # Each weight is used once per step; the cell update adds three products per hidden unit
    # (forget * cell, input * candidate, output * tanh(cell)).
    input_weights = [w for w in (_input(inputs, i) for i in (1, 2, 3, 4)) if w is not None]
    if not input_weights or len(input_weights[0].shape) < 2:
        return 0
    hidden, width = input_weights[0].shape[0], input_weights[0].shape[-1]
    matrices = [w for w in (_input(inputs, i) for i in (1, 2, 3, 4, 5, 6, 7, 8, 16))
                if w is not None]
    peepholes = [p for p in (_input(inputs, i) for i in (9, 10, 11)) if p is not None]
    per_step = (sum(w.elements for w in matrices) + sum(p.elements for p in peepholes)
                + 3 * hidden)
    return _steps(_input(inputs, 0), width) * per_step


def _rnn_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Inputs: data, weights [units, input], recurrent weights [units, units], bias, state.
    weights, recurrent = _input(inputs, 1), _input(inputs, 2)
    if weights is None or len(weights.shape) < 2:
        return 0
    per_step = weights.elements + (recurrent.elements if recurrent is not None else 0)
    return _steps(_input(inputs, 0), weights.shape[-1]) * per_step


def _svdf_macs(inputs: _Inputs, outputs: _Outputs, op: schema_fb.Operator) -> int:
    # Inputs: data [batch, input], feature weights [filters, input], time weights
    # [filters, memory]; the rank reduction afterwards is additions only.
    features, time = _input(inputs, 1), _input(inputs, 2)
    if features is None or len(features.shape) < 2:
        return 0
    per_batch = features.elements + (time.elements if time is not None else 0)
    return _steps(_input(inputs, 0), features.shape[-1]) * per_batch


_MacCounter = Callable[[_Inputs, _Outputs, schema_fb.Operator], int]
_MAC_COUNTERS: Mapping[str, _MacCounter] = MappingProxyType({
    "CONV_2D": _conv_macs,
    "DEPTHWISE_CONV_2D": _depthwise_macs,
    "CONV_3D": _conv3d_macs,
    "TRANSPOSE_CONV": _transpose_conv_macs,
    "CONV_3D_TRANSPOSE": _conv3d_transpose_macs,
    "FULLY_CONNECTED": _fully_connected_macs,
    "BATCH_MATMUL": _batch_matmul_macs,
    "UNIDIRECTIONAL_SEQUENCE_LSTM": _lstm_macs,
    "LSTM": _lstm_macs,
    "UNIDIRECTIONAL_SEQUENCE_RNN": _rnn_macs,
    "RNN": _rnn_macs,
    "SVDF": _svdf_macs,
})
