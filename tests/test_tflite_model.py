"""harness.tflite_model against real models (cross-checked with the TFLM interpreter) and against
small synthetic flatbuffers for the cases the real models do not cover."""

from __future__ import annotations

import math
import random
import struct
import time
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema_fb

from harness.errors import TinyhilError
from harness.tflite_model import ModelInfo, inspect_model, read_model_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
MODEL_PATHS = {
    "kws_ref_model": MODELS / "mlperf-tiny" / "kws_ref_model.tflite",
    "ad01_int8": MODELS / "mlperf-tiny" / "ad01_int8.tflite",
    "person_detect": MODELS / "tflm-examples" / "person_detect.tflite",
    "micro_speech_quantized": MODELS / "tflm-examples" / "micro_speech_quantized.tflite",
    "hello_world_int8": MODELS / "tflm-examples" / "hello_world_int8.tflite",
    "audio_preprocessor_int8": MODELS / "tflm-examples" / "audio_preprocessor_int8.tflite",
}


def _model_bytes(name: str) -> bytes:
    path = MODEL_PATHS[name]
    if not path.is_file():
        pytest.skip(f"shared model {path} is not available")
    return path.read_bytes()


def _inspect(name: str) -> ModelInfo:
    return inspect_model(_model_bytes(name), where=str(MODEL_PATHS[name]))


# --- real models ------------------------------------------------------------------------------

EXPECTED_OPS = {
    "person_detect": (31, {"CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "RESHAPE",
                           "SOFTMAX"}),
    "kws_ref_model": (13, {"CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "RESHAPE",
                           "FULLY_CONNECTED", "SOFTMAX"}),
    "ad01_int8": (10, {"FULLY_CONNECTED"}),
    "micro_speech_quantized": (4, {"RESHAPE", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"}),
    "hello_world_int8": (3, {"FULLY_CONNECTED"}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_OPS))
def test_op_lists(name: str) -> None:
    info = _inspect(name)
    count, types = EXPECTED_OPS[name]
    assert len(info.ops) == count
    assert set(info.op_types) == types
    assert list(info.op_types) == sorted(info.op_types)
    assert [op.index for op in info.ops] == list(range(count))
    assert info.subgraph_count == 1


def test_deprecated_builtin_code_is_honoured() -> None:
    # kws_ref_model stores CONV_2D only in deprecated_builtin_code (builtin_code is 0 = ADD).
    info = _inspect("kws_ref_model")
    assert info.ops[0].name == "CONV_2D"
    assert "ADD" not in info.op_types


def _tflm_interpreter(data: bytes):
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(data, arena_size=4 * 1024 * 1024)


@pytest.mark.parametrize("name", sorted(MODEL_PATHS))
def test_io_matches_tflm_interpreter(name: str) -> None:
    data = _model_bytes(name)
    info = inspect_model(data)
    interpreter = _tflm_interpreter(data)
    for kind, tensors, details in (
        ("input", info.input_tensors(), interpreter.get_input_details),
        ("output", info.output_tensors(), interpreter.get_output_details),
    ):
        assert tensors, f"{name} has no {kind}s"
        for position, tensor in enumerate(tensors):
            expected = details(position)
            quantization = expected["quantization_parameters"]
            assert tensor.shape == tuple(int(d) for d in expected["shape"]), kind
            assert tensor.dtype == np.dtype(expected["dtype"]).name, kind
            assert tensor.scales == pytest.approx(tuple(float(s) for s in quantization["scales"]))
            assert tensor.zero_points == tuple(int(z) for z in quantization["zero_points"])
            assert tensor.quantized_dimension == int(quantization["quantized_dimension"])
            assert tensor.nbytes == math.prod(tensor.shape) * np.dtype(expected["dtype"]).itemsize
            assert not tensor.is_constant


def test_kws_first_conv_macs_by_hand() -> None:
    info = _inspect("kws_ref_model")
    conv = info.ops[0]
    data, filter_, bias = (info.tensors[i] for i in conv.inputs)
    (output,) = (info.tensors[i] for i in conv.outputs)
    # 49x10x1 MFCCs, 64 filters of 10x4, stride 2 with SAME padding -> 25x5x64.
    assert data.shape == (1, 49, 10, 1)
    assert filter_.shape == (64, 10, 4, 1)
    assert output.shape == (1, 25, 5, 64)
    assert conv.macs == 25 * 5 * 64 * (10 * 4 * 1) == 320_000
    assert conv.elements == 25 * 5 * 64
    assert conv.weight_bytes == 64 * 10 * 4 * 1 + 64 * 4          # int8 filter, int32 bias
    assert conv.bytes_in == 49 * 10 + conv.weight_bytes
    assert conv.bytes_out == 25 * 5 * 64
    assert filter_.is_constant and bias.is_constant and not data.is_constant
    assert filter_.dtype == "int8" and bias.dtype == "int32"
    assert len(filter_.scales) == 64 and filter_.quantized_dimension == 0

    depthwise, pointwise = info.ops[1], info.ops[2]
    assert depthwise.macs == 25 * 5 * 64 * 3 * 3
    assert pointwise.macs == 25 * 5 * 64 * 64
    fully_connected = next(op for op in info.ops if op.name == "FULLY_CONNECTED")
    assert fully_connected.macs == 64 * 12
    for op in info.ops:
        if op.name in ("AVERAGE_POOL_2D", "RESHAPE", "SOFTMAX"):
            assert op.macs == 0 and op.elements > 0


def test_autoencoder_macs_and_weights() -> None:
    info = _inspect("ad01_int8")
    layers = [(640, 128), (128, 128), (128, 128), (128, 128), (128, 8),
              (8, 128), (128, 128), (128, 128), (128, 128), (128, 640)]
    assert [op.macs for op in info.ops] == [i * o for i, o in layers]
    assert info.total_macs == sum(i * o for i, o in layers)
    assert info.weight_bytes == sum(i * o + 4 * o for i, o in layers)


def test_person_detect_totals() -> None:
    info = _inspect("person_detect")
    assert info.input_tensors()[0].shape == (1, 96, 96, 1)
    assert info.output_tensors()[0].shape == (1, 2)
    first = info.ops[0]    # the converter's depthwise form of a 3x3 conv over one channel
    assert first.name == "DEPTHWISE_CONV_2D"
    assert first.macs == 48 * 48 * 8 * 3 * 3
    constant_bytes = sum(t.nbytes for t in info.tensors if t.is_constant)
    assert info.weight_bytes == constant_bytes
    assert sum(op.weight_bytes for op in info.ops) == constant_bytes
    assert info.weight_bytes < info.size_bytes
    assert info.description == "TOCO Converted."


def test_custom_op_names() -> None:
    info = _inspect("audio_preprocessor_int8")
    first = info.ops[0]
    assert first.name == "SignalWindow" and first.is_custom
    assert {"SignalRfft", "SignalFilterBank", "SignalPCAN"} <= set(info.op_types)
    builtins = {op.name for op in info.ops if not op.is_custom}
    assert {"RESHAPE", "CAST", "MUL", "ADD"} <= builtins
    assert all(op.macs == 0 for op in info.ops)
    assert info.input_tensors()[0].dtype == "int16"
    assert info.input_tensors()[0].scales == ()


def test_float_model_shipped_with_tflite_micro() -> None:
    import tflite_micro

    path = Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"
    data = path.read_bytes()
    info = inspect_model(data)
    (data_in,), (data_out,) = info.input_tensors(), info.output_tensors()
    expected_in = _tflm_interpreter(data).get_input_details(0)
    assert data_in.dtype == "float32" == np.dtype(expected_in["dtype"]).name
    assert data_in.shape == tuple(int(d) for d in expected_in["shape"])
    assert data_in.scales == () and data_out.dtype == "float32"
    assert [op.macs for op in info.ops] == [16, 16 * 16, 16]


@pytest.mark.parametrize("data", [
    b"",
    b"TFL3",
    b"this is certainly not a flatbuffer",
    bytes(range(256)) * 4,
    b"\x1c\x00\x00\x00TFL3" + b"\xff" * 200,
    b"\x10\x00\x00\x00TFL3" + b"\x00" * 8,
])
def test_garbage_raises(data: bytes) -> None:
    with pytest.raises(TinyhilError) as caught:
        inspect_model(data, where="garbage.tflite")
    assert caught.value.where == "garbage.tflite"
    assert caught.value.one_line().startswith("garbage.tflite: ")


@pytest.mark.parametrize("keep", [16, 200, 1000, 100_000])
def test_truncated_model_raises(keep: int) -> None:
    data = _model_bytes("person_detect")[:keep]
    with pytest.raises(TinyhilError):
        inspect_model(data, where="truncated")


def _mutants(data: bytes, seed: int, count: int):
    """Truncations at evenly spread lengths, then bit flips and 32-bit overwrites. Overwrites aim
    at the first and last 4 KiB, where the converters put the tables and vtables (the middle is
    mostly weights, where a flip changes numbers, not structure)."""
    rng = random.Random(seed)
    for keep in range(0, len(data), max(1, len(data) // count)):
        yield f"truncated to {keep} bytes", data[:keep]
    edges = [(0, min(len(data), 4096)), (max(0, len(data) - 4096), len(data))]
    for index in range(count):
        mutant = bytearray(data)
        low, high = edges[index % 2]
        changes = []
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(low, high - 4)
            if index % 4 < 2:
                mutant[position] ^= 1 << rng.randrange(8)
                changes.append(f"flip@{position}")
            else:
                word = rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(len(data)), rng.randrange(1 << 32)])
                mutant[position:position + 4] = struct.pack("<I", word)
                changes.append(f"{word:#x}@{position}")
        yield ", ".join(changes), bytes(mutant)


@pytest.mark.parametrize("name", ["sine", "kws_ref_model", "micro_speech_quantized"])
def test_corrupt_models_give_the_clear_message_never_a_low_level_error(name: str, sine_model: Path) -> None:
    data = sine_model.read_bytes() if name == "sine" else _model_bytes(name)
    rejected = 0
    for change, mutant in _mutants(data, seed=len(data), count=400):
        started = time.monotonic()
        try:
            inspect_model(mutant, where="mutant.tflite")
        except TinyhilError as error:
            rejected += 1
            line = error.one_line()
            assert line.startswith(("mutant.tflite: not a TFLite model: expected file identifier b'TFL3'",
                                    "mutant.tflite: not a valid TFLite model (")), (change, line)
            assert "unpack_from" not in line, (change, line)
        except Exception as error:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"{change}: {type(error).__name__}: {error}")
        # A garbage length must not send the reader through billions of iterations.
        assert time.monotonic() - started < 2.0, change
    assert rejected >= 400, rejected  # every truncation, and many of the mutants


def test_read_model_file_refuses_a_huge_file_from_its_first_bytes(tmp_path: Path, sine_model: Path) -> None:
    # Sparse files: a 3 GiB file costs no disk, and reading it whole would cost 3 GiB of memory.
    huge = tmp_path / "core"
    with open(huge, "wb") as handle:
        handle.write(b"\x7fELF\x02\x01\x01\x00")
        handle.truncate(3 << 30)
    started = time.monotonic()
    with pytest.raises(TinyhilError) as caught:
        read_model_file(huge, where="core")
    assert caught.value.one_line() == ("core: not a TFLite model: expected file identifier b'TFL3' at offset 4, "
                                       "found b'\\x02\\x01\\x01\\x00' (3221225472 bytes)")
    with open(huge, "r+b") as handle:
        handle.write(sine_model.read_bytes()[:8])
    with pytest.raises(TinyhilError, match="3221225472 bytes is more than a flatbuffer can hold"):
        read_model_file(huge)
    assert time.monotonic() - started < 2.0
    assert read_model_file(sine_model) == sine_model.read_bytes()
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    with pytest.raises(TinyhilError, match=r"found b'' \(0 bytes\)"):
        read_model_file(empty)


# --- synthetic models ---------------------------------------------------------------------------

def _tensor(shape, type_=schema_fb.TensorType.INT8, buffer=0, name="t", scales=None):
    tensor = schema_fb.TensorT()
    tensor.shape = list(shape)
    tensor.type = type_
    tensor.buffer = buffer
    tensor.name = name
    if scales is not None:
        tensor.quantization = schema_fb.QuantizationParametersT()
        tensor.quantization.scale = list(scales)
        tensor.quantization.zeroPoint = [0] * len(scales)
    return tensor


def _flatbuffer(tensors, operators, codes, buffers, inputs=(0,), outputs=None) -> bytes:
    """A one-subgraph model; `buffers` are the byte strings after the mandatory empty buffer 0."""
    model = schema_fb.ModelT()
    model.version = 3
    model.description = "synthetic"
    model.operatorCodes = codes
    graph = schema_fb.SubGraphT()
    graph.tensors = tensors
    graph.inputs = list(inputs)
    graph.outputs = list(outputs if outputs is not None else [len(tensors) - 1])
    graph.operators = operators
    model.subgraphs = [graph]
    model.buffers = [schema_fb.BufferT()]
    for payload in buffers:
        buffer = schema_fb.BufferT()
        buffer.data = list(payload)
        model.buffers.append(buffer)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _code(builtin: int, *, deprecated: int | None = None, custom: str | None = None):
    code = schema_fb.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127) if deprecated is None else deprecated
    code.customCode = custom
    code.version = 1
    return code


def _operator(code_index, inputs, outputs, options_type=0, options=None):
    op = schema_fb.OperatorT()
    op.opcodeIndex = code_index
    op.inputs = list(inputs)
    op.outputs = list(outputs)
    op.builtinOptionsType = options_type
    op.builtinOptions = options
    return op


def test_new_style_builtin_code_above_127() -> None:
    # Codes past 127 only fit builtin_code; deprecated_builtin_code then holds the placeholder.
    gelu = schema_fb.BuiltinOperator.GELU
    assert gelu > 127
    data = _flatbuffer(
        tensors=[_tensor((1, 8)), _tensor((1, 8))],
        operators=[_operator(0, [0], [1])],
        codes=[_code(gelu, deprecated=schema_fb.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)],
        buffers=[],
    )
    info = inspect_model(data)
    assert info.op_types == ("GELU",)
    assert info.description == "synthetic"


def test_unknown_dims_count_as_one_and_float_sizes() -> None:
    data = _flatbuffer(
        tensors=[_tensor((-1, 10), schema_fb.TensorType.FLOAT32),
                 _tensor((4, 10), schema_fb.TensorType.FLOAT32, buffer=1),
                 _tensor((-1, 4), schema_fb.TensorType.FLOAT32)],
        operators=[_operator(0, [0, 1, -1], [2])],
        codes=[_code(schema_fb.BuiltinOperator.FULLY_CONNECTED)],
        buffers=[bytes(4 * 10 * 4)],
    )
    info = inspect_model(data)
    data_in, weights, out = info.tensors
    assert data_in.shape == (1, 10) and out.shape == (1, 4)
    assert data_in.dtype == "float32" and data_in.nbytes == 40
    assert weights.is_constant and not data_in.is_constant
    (op,) = info.ops
    assert op.inputs == (0, 1, -1)
    assert op.macs == 10 * 4
    assert op.bytes_in == 40 + 160 and op.weight_bytes == 160 and op.bytes_out == 16
    assert info.weight_bytes == 160


def test_lstm_macs() -> None:
    steps, width, hidden = 5, 3, 4
    tensors = [_tensor((1, steps, width))]
    inputs = [0]
    for _ in range(4):                       # inputs 1-4: input-to-gate weights
        tensors.append(_tensor((hidden, width), buffer=1))
        inputs.append(len(tensors) - 1)
    for _ in range(4):                       # inputs 5-8: recurrent weights
        tensors.append(_tensor((hidden, hidden), buffer=2))
        inputs.append(len(tensors) - 1)
    inputs += [-1, -1, -1]                   # no peepholes
    for _ in range(4):                       # gate biases
        tensors.append(_tensor((hidden,), schema_fb.TensorType.INT32, buffer=3))
        inputs.append(len(tensors) - 1)
    inputs += [-1, -1]                       # no projection
    tensors += [_tensor((1, hidden)), _tensor((1, hidden))]    # output and cell state
    inputs += [len(tensors) - 2, len(tensors) - 1]
    tensors.append(_tensor((1, steps, hidden)))
    data = _flatbuffer(
        tensors=tensors,
        operators=[_operator(0, inputs, [len(tensors) - 1])],
        codes=[_code(schema_fb.BuiltinOperator.UNIDIRECTIONAL_SEQUENCE_LSTM)],
        buffers=[bytes(hidden * width), bytes(hidden * hidden), bytes(4 * hidden)],
    )
    (op,) = inspect_model(data).ops
    # time steps x 4 gates x hidden x (input + hidden), plus 3 products per hidden unit per step.
    assert op.macs == steps * (4 * hidden * (width + hidden) + 3 * hidden)


@pytest.mark.parametrize("adjoint_lhs", [False, True])
def test_batch_matmul_macs(adjoint_lhs: bool) -> None:
    batch, rows, depth, cols = 2, 3, 5, 7
    lhs_shape = (batch, depth, rows) if adjoint_lhs else (batch, rows, depth)
    options = schema_fb.BatchMatMulOptionsT()
    options.adjX = adjoint_lhs
    data = _flatbuffer(
        tensors=[_tensor(lhs_shape), _tensor((batch, depth, cols)), _tensor((batch, rows, cols))],
        operators=[_operator(0, [0, 1], [2], schema_fb.BuiltinOptions.BatchMatMulOptions,
                             options)],
        codes=[_code(schema_fb.BuiltinOperator.BATCH_MATMUL)],
        buffers=[],
        inputs=(0, 1),
    )
    (op,) = inspect_model(data).ops
    assert op.macs == batch * rows * cols * depth


def test_custom_op_in_synthetic_model() -> None:
    data = _flatbuffer(
        tensors=[_tensor((1, 16), schema_fb.TensorType.INT16), _tensor((1, 16))],
        operators=[_operator(0, [0], [1])],
        codes=[_code(schema_fb.BuiltinOperator.CUSTOM, custom="MyCustomThing")],
        buffers=[],
    )
    (op,) = inspect_model(data).ops
    assert op.name == "MyCustomThing" and op.is_custom and op.macs == 0
    assert op.elements == 16 and op.bytes_in == 32 and op.bytes_out == 16


def test_bad_tensor_reference_raises() -> None:
    data = _flatbuffer(
        tensors=[_tensor((1, 4)), _tensor((1, 4))],
        operators=[_operator(0, [0], [7])],
        codes=[_code(schema_fb.BuiltinOperator.RELU)],
        buffers=[],
    )
    with pytest.raises(TinyhilError, match="tensor 7"):
        inspect_model(data, where="bad.tflite")


_UNTRAINED_CLASSIFIER = """
import os, sys
import numpy as np, tensorflow as tf, tf_keras as keras
inputs = keras.Input((8,))
hidden = keras.layers.Dense(16, activation="relu")(inputs)
# Logits that barely vary, as an untrained deep model's do once its activations have shrunk.
logits = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(stddev=1e-9, seed=0))(hidden)
model = keras.Model(inputs, keras.layers.Softmax()(logits))
converter = tf.lite.TFLiteConverter.from_keras_model(model)
converter.optimizations = [tf.lite.Optimize.DEFAULT]
rng = np.random.default_rng(0)
converter.representative_dataset = lambda: ([rng.normal(size=(1, 8)).astype(np.float32)] for _ in range(20))
converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
converter.inference_input_type = converter.inference_output_type = tf.int8
open(sys.argv[1], "wb").write(converter.convert())
"""


def test_a_softmax_scale_tflm_would_abort_on_is_refused_with_its_reason(tmp_path) -> None:
    """An int8 classifier whose logits barely vary converts fine, but TFLM aborts the whole process
    on it (SIGABRT, no message: a softmax input scale under 2^-26). The harness refuses it before
    TFLM sees it, and says why; the same model loaded directly kills its process."""
    import os
    import subprocess
    import sys

    from harness.errors import ConversionError
    from harness.isolated import TF_ENVIRONMENT
    from harness.tflm import open_interpreter

    path = tmp_path / "untrained.tflite"
    subprocess.run([sys.executable, "-c", _UNTRAINED_CLASSIFIER, str(path)], env={**os.environ, **TF_ENVIRONMENT},
                   check=True, capture_output=True, timeout=300)
    with pytest.raises(ConversionError, match=r"op 2 \(SOFTMAX\) has an int8 input scale of [0-9.e-]+: TFLite Micro"):
        open_interpreter(path.read_bytes(), 64 * 1024, where=str(path))
    direct = subprocess.run([sys.executable, "-c", "import sys; from tflite_micro.python.tflite_micro import runtime; "
                             "runtime.Interpreter.from_bytes(open(sys.argv[1], 'rb').read(), arena_size=65536)",
                             str(path)], capture_output=True, timeout=120)
    assert direct.returncode == -6, direct
