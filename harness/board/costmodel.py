"""How long TFLite Micro takes to invoke a model on an ESP32-S3: a small analytic model,
calibrated to published figures (shared/reference/esp32s3-facts.md), that the virtual board uses
to report timings a real board would plausibly report.

The whole model, per operator:

    cycles = OP_DISPATCH_CYCLES
           + macs    x cycles per MAC      (kernel family; ESP-NN divides by the SIMD lane use)
           + outputs x cycles per output   (requantization, accumulator reduction)
           + outputs x filter taps x cycles per tap              (CONV_2D only)
           + work elements x cycles per element                 (operators without MACs)
           + bytes read / written x cycles per byte of the memory they live in

and per invoke, INVOKE_OVERHEAD_CYCLES plus the sum over operators. Compute terms are in CPU
cycles and do not change with the clock; PSRAM and flash terms are bus time, so they cost fewer
cycles at 160 MHz but the same microseconds.

Three kernel flavours share these terms:
  * "esp-nn": ESP-NN's optimized S3 kernels, for int8 operators esp-tflite-micro routes to it.
    Constants fitted to the ESP-NN column of the ESP-NN kernel table.
  * ESP-NN's own ANSI C kernels (internal, used only to calibrate): fitted to the "ANSI C" column.
  * "reference": TFLite Micro's reference kernels, what runs without ESP-NN and for every other
    operator. Its conv and depthwise kernels are far slower than ESP-NN's ANSI C: person_detect's
    7.16 M MACs take 2300 ms, about 77 cycles per MAC, against 9 to 20 in the ANSI C rows (most
    likely because they index every input and filter element through a 4-D Offset(), but no
    published profile says so). The model keeps the ANSI C
    cost structure and multiplies the conv and depthwise per-MAC term by one factor,
    TFLM_REFERENCE_MAC_SLOWDOWN, fitted to that one published model time; reference conv
    estimates of other shapes are the least certain figures here. TFLM's reference fully
    connected kernel walks plain pointers like the ANSI C one, so it keeps the ANSI C cost.

Float32 operators always run reference kernels (ESP-NN is int8 only). Constants marked
"assumption" have no published figure behind them; each is small next to the calibrated terms
on the calibration models, but dominates tiny models (a few hundred MACs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

from ..tflite_model import ModelInfo, OpInfo, TensorInfo

__all__ = [
    "ChipConfig", "OpCost", "LatencyEstimate", "ESP_NN_OPS", "PIE_PEAK_MACS_PER_CYCLE",
    "estimate_latency", "calibration_points", "person_detect_graph",
]


@dataclass(frozen=True)
class ChipConfig:
    cpu_mhz: int = 240
    esp_nn: bool = True
    tensors_in_psram: bool = True
    weights_in_psram: bool = False

    def __post_init__(self) -> None:
        if self.cpu_mhz not in (80, 160, 240):
            raise ValueError(f"ESP32-S3 CPU clock must be 80, 160 or 240 MHz, not {self.cpu_mhz}")


@dataclass(frozen=True)
class OpCost:
    index: int
    name: str
    macs: int
    cycles: int
    kernel: str

    @property
    def macs_per_cycle(self) -> float:
        return self.macs / self.cycles if self.cycles else 0.0


@dataclass(frozen=True)
class LatencyEstimate:
    ops: tuple[OpCost, ...]
    overhead_cycles: int
    cpu_mhz: int

    @property
    def total_cycles(self) -> int:
        return self.overhead_cycles + sum(op.cycles for op in self.ops)

    @property
    def total_us(self) -> float:
        return self.total_cycles / self.cpu_mhz

    def op_us(self) -> tuple[float, ...]:
        return tuple(op.cycles / self.cpu_mhz for op in self.ops)


# Facts file: operators esp-tflite-micro routes to ESP-NN on the S3.
ESP_NN_OPS = frozenset({
    "ADD", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MUL", "AVERAGE_POOL_2D",
    "MAX_POOL_2D", "SOFTMAX",
})
# Facts file: one EE.VMULAS.S8.QACC does 16 int8 MACs; the hard ceiling for any estimate.
PIE_PEAK_MACS_PER_CYCLE = 16

_ESP_NN = "esp-nn"
_REFERENCE = "reference"
_ESP_NN_ANSI_C = "esp-nn-ansi-c"


# ================================ every constant of the model ================================
# Kernel fits: each solves the ESP-NN kernel table rows of its family exactly, after removing the
# memory term those rows pay (conv and depthwise rows ran on external memory, the FC row on
# internal). Row shapes, from the esp-nn README and its tests: 1x1 convs keep 10x10 / 8x8; the
# 3x3 conv reads 10x10x3 and writes 8x8x64 (test case 2); the 3x3 depthwise reads 18x18 unpadded
# and writes 16x16; the 5x5 depthwise (mult 4) is padded by 1 and writes 12x12x32.

@dataclass(frozen=True)
class _MacKernel:
    cycles_per_mac: float      # for ESP-NN: with all 16 SIMD lanes busy
    cycles_per_output: float
    cycles_per_tap: float = 0.0


_ESP_NN_MAC_KERNELS: Mapping[str, _MacKernel] = MappingProxyType({
    # 1x1 64->64, 1x1 16->16 and 3x3 3->64 rows: 4.19 MAC/cycle on full lanes (26% of the PIE
    # peak), 18.6 cycles to requantize an output, 4.0 per filter tap per output.
    "conv": _MacKernel(cycles_per_mac=0.2385, cycles_per_output=18.6, cycles_per_tap=4.0),
    # 3x3x16 and 5x5x(8x4) rows: depthwise gets no channel reduction to vectorize over.
    "depthwise": _MacKernel(cycles_per_mac=2.56, cycles_per_output=10.3),
    # 271 -> 3 row, with the conv MAC rate: the rest is per-output reduction and requantization.
    "fully_connected": _MacKernel(cycles_per_mac=0.2385, cycles_per_output=173.0),
})
_ANSI_C_MAC_KERNELS: Mapping[str, _MacKernel] = MappingProxyType({
    "conv": _MacKernel(cycles_per_mac=8.93, cycles_per_output=133.9, cycles_per_tap=17.0),
    "depthwise": _MacKernel(cycles_per_mac=5.29, cycles_per_output=223.9),
    "fully_connected": _MacKernel(cycles_per_mac=8.93, cycles_per_output=272.3),
})
# person_detect, 2300 ms with reference kernels at 240 MHz (facts file), over what the ANSI C
# fits predict for it: TFLM's Offset()-indexed inner loops cost this many times ESP-NN's ANSI C
# ones. person_detect is all conv and depthwise, so nothing calibrates other families' slowdown.
TFLM_REFERENCE_MAC_SLOWDOWN = 8.36
OFFSET_INDEXED_FAMILIES = frozenset({"conv", "depthwise"})
# ESP-NN vectorizes conv and FC over input channels and depthwise over channels, 16 int8 lanes
# per instruction (facts file): a depth of 3 leaves 13 lanes idle.
SIMD_LANES = 16

# Cycles per work element of operators without MACs: esp-nn README, ESP32-S3 kernel table (the
# facts file's source; it gives these rows' speed-ups), per output element after the memory
# term. Pools: 16x16x16 in and out, 3x3 window; softmax 8x32; ADD and MUL 1615 elements.
_ESP_NN_ELEMENT_CYCLES: Mapping[str, float] = MappingProxyType({
    "MAX_POOL_2D": 11.1, "AVERAGE_POOL_2D": 28.2, "SOFTMAX": 43.4, "ADD": 30.4, "MUL": 6.0,
})
_ANSI_C_ELEMENT_CYCLES: Mapping[str, float] = MappingProxyType({
    "MAX_POOL_2D": 91.2, "AVERAGE_POOL_2D": 103.7, "SOFTMAX": 59.4, "ADD": 158.5, "MUL": 60.3,
})
# The pool rows average or compare a 3x3 window per output; a larger window (global pooling)
# costs in proportion to the inputs it reads.
POOL_ROW_WINDOW = 9
# Assumption: other integer element-wise reference kernels cost about what a requantized
# element-wise multiply does (the ANSI C MUL row).
OTHER_INT_CYCLES_PER_ELEMENT = 60.0
# Assumption: operators that only move data, or compare and clamp it, cost little beyond the
# memory term.
MEMORY_BOUND_CYCLES_PER_ELEMENT = 1.0
MEMORY_BOUND_OPS = frozenset({
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "CONCATENATION", "PACK", "UNPACK", "SPLIT", "SPLIT_V",
    "SLICE", "STRIDED_SLICE", "GATHER", "TRANSPOSE", "PAD", "PADV2", "SHAPE", "BROADCAST_TO",
    "TILE", "ZEROS_LIKE", "FILL", "REVERSE_V2", "CAST", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE",
    "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND", "MIRROR_PAD", "RELU", "RELU6", "MAXIMUM",
    "MINIMUM",
})
# Assumption: a float32 output or element needs bias, activation and clamp but no
# requantization; its MACs run the same reference loops as int8, with the LX7 FPU's multiply-add.
FLOAT_CYCLES_PER_OUTPUT = 20.0
FLOAT_CYCLES_PER_ELEMENT = 20.0
FLOAT_DTYPES = frozenset({"float32", "float16", "float64", "bfloat16"})
# Assumption: TFLM's per-operator dispatch (node lookup, kernel prologue) and per-invoke setup.
OP_DISPATCH_CYCLES = 500
INVOKE_OVERHEAD_CYCLES = 2000

# Memory, facts file (community memcpy on an N8R8 module at 240 MHz): SRAM->SRAM 362 MB/s,
# PSRAM->SRAM 38.6 MB/s, SRAM->PSRAM 56.7 MB/s. A memcpy reads and writes every byte: half the
# SRAM copy cost (in 240 MHz cycles) is one SRAM access; the rest of each PSRAM copy is the
# PSRAM side, in seconds because the bus clock does not follow the CPU's. Flash-mapped weights
# share the PSRAM bus and cache, so they are costed as PSRAM reads.
SRAM_CYCLES_PER_BYTE = 240 / 362.0 / 2
PSRAM_READ_SECONDS_PER_BYTE = 1 / 38.6e6 - 0.5 / 362e6
PSRAM_WRITE_SECONDS_PER_BYTE = 1 / 56.7e6 - 0.5 / 362e6
# =============================================================================================

_MAC_FAMILY: Mapping[str, str] = MappingProxyType({
    "CONV_2D": "conv", "TRANSPOSE_CONV": "conv", "CONV_3D": "conv", "CONV_3D_TRANSPOSE": "conv",
    "DEPTHWISE_CONV_2D": "depthwise",
    "FULLY_CONNECTED": "fully_connected", "BATCH_MATMUL": "fully_connected",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "fully_connected", "LSTM": "fully_connected",
    "UNIDIRECTIONAL_SEQUENCE_RNN": "fully_connected", "RNN": "fully_connected",
    "SVDF": "fully_connected",
})


def estimate_latency(info: ModelInfo, chip: ChipConfig) -> LatencyEstimate:
    """Estimated `invoke()` time of `info` on a board configured as `chip`."""
    ops = []
    for op in info.ops:
        kernel = _kernel_for(op, info.tensors, chip)
        cycles = OP_DISPATCH_CYCLES + _kernel_cycles(op, info.tensors, chip, kernel)
        ops.append(OpCost(index=op.index, name=op.name, macs=op.macs, cycles=cycles,
                          kernel=kernel))
    return LatencyEstimate(ops=tuple(ops), overhead_cycles=INVOKE_OVERHEAD_CYCLES,
                           cpu_mhz=chip.cpu_mhz)


def _kernel_for(op: OpInfo, tensors: Sequence[TensorInfo], chip: ChipConfig) -> str:
    if not chip.esp_nn or op.name not in ESP_NN_OPS or _activation_dtype(op, tensors) != "int8":
        return _REFERENCE
    if op.name == "CONV_2D" and _is_grouped_conv(op, tensors):
        return _REFERENCE    # facts file: grouped conv falls back to C
    return _ESP_NN


def _kernel_cycles(op: OpInfo, tensors: Sequence[TensorInfo], chip: ChipConfig,
                   flavour: str) -> int:
    """Cycles inside the kernel, without dispatch: what the ESP-NN kernel table measures."""
    is_float = _activation_dtype(op, tensors) in FLOAT_DTYPES
    family = _MAC_FAMILY.get(op.name)
    if family is not None:
        compute = _mac_op_cycles(op, tensors, family, flavour, is_float)
    else:
        compute = _element_work(op, tensors) * _cycles_per_element(op.name, flavour, is_float)
    cycles = math.ceil(compute + _memory_cycles(op, chip))
    # Nothing beats the PIE peak; the fits stay far below it, this only guards extrapolation.
    return max(cycles, math.ceil(op.macs / PIE_PEAK_MACS_PER_CYCLE))


def _mac_op_cycles(op: OpInfo, tensors: Sequence[TensorInfo], family: str, flavour: str,
                   is_float: bool) -> float:
    if flavour == _ESP_NN and not is_float:
        kernel = _ESP_NN_MAC_KERNELS[family]
        cycles_per_mac = kernel.cycles_per_mac / _lane_use(_vector_depth(op, tensors))
    else:
        kernel = _ANSI_C_MAC_KERNELS[family]
        slow = flavour == _REFERENCE and family in OFFSET_INDEXED_FAMILIES
        cycles_per_mac = kernel.cycles_per_mac * (TFLM_REFERENCE_MAC_SLOWDOWN if slow else 1.0)
    per_output = FLOAT_CYCLES_PER_OUTPUT if is_float else kernel.cycles_per_output
    taps = _filter_taps(op, tensors) if op.name == "CONV_2D" else 0
    return (op.macs * cycles_per_mac + op.elements * per_output
            + op.elements * taps * kernel.cycles_per_tap)


def _cycles_per_element(name: str, flavour: str, is_float: bool) -> float:
    if is_float:
        return FLOAT_CYCLES_PER_ELEMENT
    if flavour == _ESP_NN and name in _ESP_NN_ELEMENT_CYCLES:
        return _ESP_NN_ELEMENT_CYCLES[name]
    if name in _ANSI_C_ELEMENT_CYCLES:
        return _ANSI_C_ELEMENT_CYCLES[name]
    if name in MEMORY_BOUND_OPS:
        return MEMORY_BOUND_CYCLES_PER_ELEMENT
    return OTHER_INT_CYCLES_PER_ELEMENT


def _element_work(op: OpInfo, tensors: Sequence[TensorInfo]) -> float:
    if op.name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        return max(op.elements, _activation_input_elements(op, tensors) / POOL_ROW_WINDOW)
    return op.elements


def _memory_cycles(op: OpInfo, chip: ChipConfig) -> float:
    cpu_hz = chip.cpu_mhz * 1e6
    psram_read = PSRAM_READ_SECONDS_PER_BYTE * cpu_hz
    psram_write = PSRAM_WRITE_SECONDS_PER_BYTE * cpu_hz
    activation_read = op.bytes_in - op.weight_bytes
    if chip.tensors_in_psram:
        activations = activation_read * psram_read + op.bytes_out * psram_write
    else:
        activations = (activation_read + op.bytes_out) * SRAM_CYCLES_PER_BYTE
    weights = op.weight_bytes * (psram_read if chip.weights_in_psram else SRAM_CYCLES_PER_BYTE)
    return activations + weights


def _lane_use(depth: int) -> float:
    if depth <= 0:
        return 1.0
    return depth / (SIMD_LANES * math.ceil(depth / SIMD_LANES))


def _tensor(tensors: Sequence[TensorInfo], index: int) -> TensorInfo | None:
    return tensors[index] if 0 <= index < len(tensors) else None


def _input_at(op: OpInfo, tensors: Sequence[TensorInfo], position: int) -> TensorInfo | None:
    return _tensor(tensors, op.inputs[position]) if position < len(op.inputs) else None


def _vector_depth(op: OpInfo, tensors: Sequence[TensorInfo]) -> int:
    # Conv filters end in input channels per group, FC weights in input depth, depthwise
    # filters in output channels: the innermost axis is the one ESP-NN vectorizes.
    weights = _input_at(op, tensors, 1)
    return weights.shape[-1] if weights is not None and weights.shape else 0


def _filter_taps(op: OpInfo, tensors: Sequence[TensorInfo]) -> int:
    filter_ = _input_at(op, tensors, 1)
    if filter_ is None or len(filter_.shape) != 4:
        return 1
    return filter_.shape[1] * filter_.shape[2]


def _is_grouped_conv(op: OpInfo, tensors: Sequence[TensorInfo]) -> bool:
    data, filter_ = _input_at(op, tensors, 0), _input_at(op, tensors, 1)
    if data is None or filter_ is None or not data.shape or not filter_.shape:
        return False
    return data.shape[-1] != filter_.shape[-1]


def _activation_dtype(op: OpInfo, tensors: Sequence[TensorInfo]) -> str:
    # The first non-constant input decides the kernel (int8 with int32 bias is still int8).
    for index in op.inputs:
        tensor = _tensor(tensors, index)
        if tensor is not None and not tensor.is_constant:
            return tensor.dtype
    output = _tensor(tensors, op.outputs[0]) if op.outputs else None
    return output.dtype if output is not None else ""


def _activation_input_elements(op: OpInfo, tensors: Sequence[TensorInfo]) -> int:
    return sum(math.prod(t.shape) for t in (_tensor(tensors, i) for i in op.inputs)
               if t is not None and not t.is_constant)


# ===================================== calibration ==========================================

class _GraphBuilder:
    """Builds the int8 single-kernel and whole-model graphs the calibration points describe."""

    def __init__(self) -> None:
        self._tensors: list[TensorInfo] = []
        self._ops: list[OpInfo] = []

    def tensor(self, shape: tuple[int, ...], dtype: str = "int8", constant: bool = False) -> int:
        itemsize = 4 if dtype == "int32" else 1
        index = len(self._tensors)
        self._tensors.append(TensorInfo(
            index=index, name=f"t{index}", shape=shape, dtype=dtype, scales=(), zero_points=(),
            quantized_dimension=0, nbytes=math.prod(shape) * itemsize, is_constant=constant))
        return index

    def op(self, name: str, inputs: tuple[int, ...], output: int, macs: int = 0) -> int:
        tensors = self._tensors
        self._ops.append(OpInfo(
            index=len(self._ops), name=name, is_custom=False, inputs=inputs, outputs=(output,),
            macs=macs, elements=math.prod(tensors[output].shape),
            bytes_in=sum(tensors[i].nbytes for i in inputs),
            bytes_out=tensors[output].nbytes,
            weight_bytes=sum(tensors[i].nbytes for i in inputs if tensors[i].is_constant)))
        return output

    def channels(self, tensor: int) -> int:
        return self._tensors[tensor].shape[-1]

    def conv(self, data: int, out_hw: tuple[int, int], out_c: int, kernel: int) -> int:
        in_c = self.channels(data)
        filter_ = self.tensor((out_c, kernel, kernel, in_c), constant=True)
        bias = self.tensor((out_c,), "int32", constant=True)
        output = self.tensor((1, *out_hw, out_c))
        macs = out_hw[0] * out_hw[1] * out_c * kernel * kernel * in_c
        return self.op("CONV_2D", (data, filter_, bias), output, macs)

    def depthwise(self, data: int, out_hw: tuple[int, int], out_c: int, kernel: int) -> int:
        filter_ = self.tensor((1, kernel, kernel, out_c), constant=True)
        bias = self.tensor((out_c,), "int32", constant=True)
        output = self.tensor((1, *out_hw, out_c))
        macs = out_hw[0] * out_hw[1] * out_c * kernel * kernel
        return self.op("DEPTHWISE_CONV_2D", (data, filter_, bias), output, macs)

    def fully_connected(self, data: int, units: int) -> int:
        depth = self.channels(data)
        weights = self.tensor((units, depth), constant=True)
        bias = self.tensor((units,), "int32", constant=True)
        output = self.tensor((1, units))
        return self.op("FULLY_CONNECTED", (data, weights, bias), output, units * depth)

    def build(self) -> ModelInfo:
        outputs = self._ops[-1].outputs if self._ops else ()
        return ModelInfo(
            size_bytes=0, ops=tuple(self._ops), tensors=tuple(self._tensors), inputs=(0,),
            outputs=outputs, weight_bytes=sum(t.nbytes for t in self._tensors if t.is_constant),
            subgraph_count=1, description="calibration graph")


def _single_kernel(kind: str, input_shape: tuple[int, ...], **shape: int) -> ModelInfo:
    graph = _GraphBuilder()
    data = graph.tensor(input_shape)
    if kind == "conv":
        graph.conv(data, (shape["out"], shape["out"]), shape["channels"], shape["kernel"])
    elif kind == "depthwise":
        graph.depthwise(data, (shape["out"], shape["out"]), shape["channels"], shape["kernel"])
    elif kind == "fully_connected":
        graph.fully_connected(data, shape["units"])
    else:
        graph.op(kind, (data,), graph.tensor(input_shape))
    return graph.build()


def person_detect_graph() -> ModelInfo:
    """The operators of tflm-examples/person_detect.tflite (MobileNetV1 0.25, 96x96x1), so the
    whole-model calibration needs no file; tests check it against the real model."""
    graph = _GraphBuilder()
    x = graph.tensor((1, 96, 96, 1))
    # The converter turned the first 3x3 conv over one channel into a depthwise, multiplier 8.
    x = graph.depthwise(x, (48, 48), 8, 3)
    x = graph.depthwise(x, (48, 48), 8, 3)
    x = graph.conv(x, (48, 48), 16, 1)
    side = 48
    for stride, channels in ((2, 32), (1, 32), (2, 64), (1, 64), (2, 128), (1, 128), (1, 128),
                             (1, 128), (1, 128), (1, 128), (2, 256), (1, 256)):
        side //= stride
        x = graph.depthwise(x, (side, side), graph.channels(x), 3)
        x = graph.conv(x, (side, side), channels, 1)
    x = graph.op("AVERAGE_POOL_2D", (x,), graph.tensor((1, 1, 1, 256)))
    x = graph.conv(x, (1, 1), 2, 1)
    x = graph.op("RESHAPE", (x, graph.tensor((2,), "int32", constant=True)),
                 graph.tensor((1, 2)))
    graph.op("SOFTMAX", (x,), graph.tensor((1, 2)))
    return graph.build()


_EXTERNAL = ChipConfig(tensors_in_psram=True, weights_in_psram=True)
_INTERNAL = ChipConfig(tensors_in_psram=False, weights_in_psram=False)


def calibration_points() -> list[tuple[str, float, float]]:
    """(point, published, estimated) for every published figure the model is calibrated to.

    Kernel rows are cycles of the kernel alone (no TFLM dispatch), in the memory the table
    names; speed-up rows are ANSI C over ESP-NN cycles; person_detect rows are milliseconds of
    `invoke()` at 240 MHz, with the model in flash as in esp-tflite-micro's example.
    """
    kernel_rows = (
        ("conv 1x1, 64 -> 64 ch, 10x10", 4_712_500, 331_008, _EXTERNAL,
         _single_kernel("conv", (1, 10, 10, 64), out=10, channels=64, kernel=1)),
        ("conv 1x1, 16 -> 16 ch, 8x8", 312_754, 39_022, _EXTERNAL,
         _single_kernel("conv", (1, 8, 8, 16), out=8, channels=16, kernel=1)),
        ("conv 3x3, 3 -> 64 ch, 8x8", 2_193_289, 394_842, _EXTERNAL,
         _single_kernel("conv", (1, 10, 10, 3), out=8, channels=64, kernel=3)),
        ("depthwise 3x3, 16 ch, 18x18", 1_159_831, 184_176, _EXTERNAL,
         _single_kernel("depthwise", (1, 18, 18, 16), out=16, channels=16, kernel=3)),
        ("depthwise 5x5, 8 ch x mult 4, 12x12", 1_671_363, 372_435, _EXTERNAL,
         _single_kernel("depthwise", (1, 12, 12, 8), out=12, channels=32, kernel=5)),
        ("fully connected, 271 in x 3 out", 8_443, 1_078, _INTERNAL,
         _single_kernel("fully_connected", (1, 271), units=3)),
    )
    points: list[tuple[str, float, float]] = []
    for name, ansi_c, esp_nn, chip, graph in kernel_rows:
        points.append((f"{name}: ANSI C cycles", float(ansi_c),
                       float(_single_kernel_cycles(graph, chip, _ESP_NN_ANSI_C))))
        points.append((f"{name}: ESP-NN cycles", float(esp_nn),
                       float(_single_kernel_cycles(graph, chip, _ESP_NN))))
    for name, speed_up, graph in (
        ("max pool", 7.8, _single_kernel("MAX_POOL_2D", (1, 16, 16, 16))),
        ("avg pool", 3.6, _single_kernel("AVERAGE_POOL_2D", (1, 16, 16, 16))),
        ("softmax", 1.37, _single_kernel("SOFTMAX", (8, 32))),
    ):
        ratio = (_single_kernel_cycles(graph, _INTERNAL, _ESP_NN_ANSI_C)
                 / _single_kernel_cycles(graph, _INTERNAL, _ESP_NN))
        points.append((f"{name}: ESP-NN speed-up (x)", speed_up, ratio))
    person_detect = person_detect_graph()
    for name, published_ms, chip in (
        ("person_detect, reference kernels (ms)", 2300.0,
         ChipConfig(esp_nn=False, tensors_in_psram=True, weights_in_psram=True)),
        ("person_detect, ESP-NN, tensors in PSRAM (ms)", 54.0,
         ChipConfig(esp_nn=True, tensors_in_psram=True, weights_in_psram=True)),
        ("person_detect, ESP-NN, tensors in internal RAM (ms)", 47.0,
         ChipConfig(esp_nn=True, tensors_in_psram=False, weights_in_psram=True)),
    ):
        points.append((name, published_ms, estimate_latency(person_detect, chip).total_us / 1000))
    return points


def _single_kernel_cycles(graph: ModelInfo, chip: ChipConfig, flavour: str) -> int:
    (op,) = graph.ops
    return _kernel_cycles(op, graph.tensors, chip, flavour)
