"""How long TFLite Micro takes to invoke a model on an ESP32-S3: which kernel runs each operator,
what that kernel's code costs for the operator's shape, and what the bytes it moves cost where
they live. docs/board-model.md explains the model and its validation.

Per operator:

    cycles = dispatch + sum over the constants it pays of (count x constant) + memory

where the counts come from the kernel's code (`espnn_conv`, `espnn_other`, `reference`) and the
constants from the fit to published timings (`fit.py`) or from a calibration on a real board
(`calibration.py`). Compute is in CPU cycles, which do not change with the clock; PSRAM and flash
are bus time, the same microseconds at 160 and 240 MHz.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ...tflite_model import ModelInfo, OpInfo, TensorInfo
from . import espnn_conv, espnn_other, reference
from .work import Traffic, Window, Work, activation_dtype, batched, tensor_at, window_of

__all__ = [
    "ChipConfig", "OpCost", "LatencyEstimate", "Constants", "ESP_NN_OPS", "PIE_PEAK_MACS_PER_CYCLE",
    "CACHE_BYTES", "op_work", "op_cycles", "memory_terms", "layer_terms", "estimate_with",
]

ESP_NN_VERSIONS = ("1.1.2", "1.2.3")


@dataclass(frozen=True)
class ChipConfig:
    cpu_mhz: int = 240
    esp_nn: bool = True
    tensors_in_psram: bool = True
    # Weights are part of the model, a const array in flash, read through the data cache; the
    # kernel tables' "Internal" rows had them in SRAM.
    weights_in_flash: bool = True
    esp_nn_version: str = "1.1.2"

    def __post_init__(self) -> None:
        if self.cpu_mhz not in (80, 160, 240):
            raise ValueError(f"ESP32-S3 CPU clock must be 80, 160 or 240 MHz, not {self.cpu_mhz}")
        if self.esp_nn_version not in ESP_NN_VERSIONS:
            raise ValueError(f"esp-nn version must be one of {', '.join(ESP_NN_VERSIONS)}, not {self.esp_nn_version}")


@dataclass(frozen=True)
class OpCost:
    index: int
    name: str
    macs: int
    cycles: int
    kernel: str                    # "esp-nn" or "reference"
    path: str = ""                 # the code path (see docs/board-model.md, "Paths")
    ceiling: float | None = None   # best MAC/cycle of that path for this window; None without MACs
    clamped: bool = False          # the count came out above the ceiling, which then set the cycles

    @property
    def macs_per_cycle(self) -> float:
        return self.macs / self.cycles if self.cycles else 0.0


@dataclass(frozen=True)
class LatencyEstimate:
    ops: tuple[OpCost, ...]
    overhead_cycles: int
    cpu_mhz: int
    relative_error: float = 0.0    # the stated uncertainty of the estimate (0.15 is +-15%)
    cost_model: str = ""           # which constants made it: the published fit or a calibration

    @property
    def total_cycles(self) -> int:
        return self.overhead_cycles + sum(op.cycles for op in self.ops)

    @property
    def total_us(self) -> float:
        return self.total_cycles / self.cpu_mhz

    def op_us(self) -> tuple[float, ...]:
        return tuple(op.cycles / self.cpu_mhz for op in self.ops)


# esp-tflite-micro 1.3.8 replaces these seven kernels with esp-nn wrappers (CMakeLists.txt:65-75).
ESP_NN_OPS = frozenset({
    "ADD", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MUL", "AVERAGE_POOL_2D",
    "MAX_POOL_2D", "SOFTMAX",
})
# One EE.VMULAS.S8.QACC does 16 int8 MACs (facts file): no kernel beats it.
PIE_PEAK_MACS_PER_CYCLE = 16
# The firmware keeps ESP-IDF's default 32 KB data cache (firmware/sdkconfig.defaults).
CACHE_BYTES = 32 * 1024
# Assumptions (memory_terms): what of a just-written tensor is still cached, and what a kernel
# re-reading one stream keeps beside it (input rows, outputs, stack).
RESIDENT_BYTES = CACHE_BYTES // 2
STREAM_BUDGET_BYTES = CACHE_BYTES - 4 * 1024


# Every assembly routine a path can run (espnn_conv.py, espnn_other.py): each has a stall factor,
# fitted where a kernel row times it, else its version's `asm-default`.
ASM_ROUTINES = frozenset({
    "conv_1x1_mult8", "conv_1x1_c", "conv_im2col", "conv_filter_aligned", "dw_mult1_3x3_s8", "dw_mult1_3x3_s16",
    "dw_mult1_s16", "dw_mult8_s16", "dw_mult8_3x3_s16", "dw_mult4_s16", "dw_mult1_chpad8_s16", "fc_s16",
    "fc_dot_s8", "max_pool_8ch", "max_pool_4ch", "avg_pool_8ch", "avg_pool_4ch", "add_s8", "mul_s8", "softmax_c",
})


@dataclass(frozen=True)
class Constants:
    """The model's constants by name (`fit.py` lists them). An assembly path without a fitted
    stall factor of its own takes its esp-nn version's `asm-default`."""

    values: Mapping[str, float]

    def __getitem__(self, name: str) -> float:
        if name in self.values:
            return self.values[name]
        library, _, routine = name.partition("/")
        if library in (f"esp-nn-{version}" for version in ESP_NN_VERSIONS) and routine in ASM_ROUTINES:
            return self.values[f"{library}/asm-default"]
        raise KeyError(f"the cost model has no constant {name!r}")



def op_work(op: OpInfo, tensors: Sequence[TensorInfo], chip: ChipConfig) -> Work:
    """The kernel that runs `op` on a firmware built as `chip`, and what it does."""
    window = window_of(op, tensors) if op.name in WINDOW_OPS else None
    if window is not None and window.degenerate:
        window = None                     # nothing to convolve: costed as an element-wise op
    work = _kernel_work(op, tensors, chip, window)
    return batched(work, window.batches) if window is not None else work


WINDOW_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D"})


def _kernel_work(op: OpInfo, tensors: Sequence[TensorInfo], chip: ChipConfig, window: Window | None) -> Work:
    """One batch of `op` on the kernel esp-tflite-micro's wrapper picks."""
    version = chip.esp_nn_version
    filter_ = tensor_at(op, tensors, 1)
    esp_nn = chip.esp_nn and op.name in ESP_NN_OPS and activation_dtype(op, tensors) == "int8"
    if esp_nn and window is not None and op.name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        # conv.cc:181 / depthwise_conv.cc:62: int8 weights and no dilation, else reference.
        if filter_ is not None and filter_.dtype == "int8" and window.dilation == (1, 1):
            if op.name == "CONV_2D":
                return espnn_conv.conv_work(window, version)
            return espnn_conv.depthwise_work(window, version)
    elif esp_nn and window is not None:
        return espnn_other.pool_work(window, "max" if op.name == "MAX_POOL_2D" else "avg", version)
    elif esp_nn and op.name == "FULLY_CONNECTED" and filter_ is not None and filter_.dtype == "int8" \
            and len(filter_.shape) >= 2 and min(filter_.shape) > 0:
        units, depth = filter_.shape[0], filter_.shape[-1]
        data = tensor_at(op, tensors, 0)
        zero_point = data.zero_points[0] if data is not None and data.zero_points else 0
        return espnn_other.fully_connected_work(depth, units, max(1, op.elements // units), zero_point,
                                                version, op.weight_bytes)
    elif esp_nn and op.name in ("ADD", "MUL") and not _broadcasts(op, tensors):
        return espnn_other.elementwise_work(op.name.lower(), op.elements, version)
    elif esp_nn and op.name == "SOFTMAX" and op.outputs and 0 <= op.outputs[0] < len(tensors):
        output = tensors[op.outputs[0]]
        depth = output.shape[-1] if output.shape else 1
        if output.dtype == "int8" and depth > 0:
            return espnn_other.softmax_work(max(1, op.elements // depth), depth, version)
    return _reference(op, tensors, window)


def _reference(op: OpInfo, tensors: Sequence[TensorInfo], window: Window | None) -> Work:
    activations = op.bytes_in - op.weight_bytes
    if window is not None:
        return reference.reference_window_work(op.name, window, op.weight_bytes)
    if op.macs:
        return reference.reference_mac_work(op.name, op.macs, op.elements, _rows(op, tensors), activations,
                                            op.bytes_out, op.weight_bytes)
    inputs = sum(t.elements for t in (tensors[i] for i in op.inputs if 0 <= i < len(tensors)) if not t.is_constant)
    return reference.reference_element_work(op.name, op.elements, inputs, _broadcasts(op, tensors), activations,
                                            op.bytes_out, op.weight_bytes)


def _rows(op: OpInfo, tensors: Sequence[TensorInfo]) -> int:
    weights = tensor_at(op, tensors, 1)
    units = weights.shape[0] if weights is not None and weights.shape else 1
    return max(1, op.elements // max(1, units))


def _broadcasts(op: OpInfo, tensors: Sequence[TensorInfo]) -> bool:
    shapes = [tensors[i].elements for i in op.inputs if 0 <= i < len(tensors)]
    return len(set(shapes)) > 1


def memory_terms(traffic: Traffic, chip: ChipConfig) -> dict[str, float]:
    """The memory constants the bytes of `traffic` pay, with how many times: SRAM bytes pay its
    cycle cost; PSRAM and flash bytes their time per byte (in cycles at this clock). Linear in
    the constants, so a calibration can fit them.

    The cache, an assumption no published figure checks: of a tensor in PSRAM, the first 16 KB
    (half the data cache) are still cached from the operator that wrote it, the rest misses. A
    stream read again (a filter per output pixel) misses, on every pass after the first, by as
    much as it outgrows the cache left beside what the kernel reads alongside it."""
    cycles_per_ns = chip.cpu_mhz / 1000.0
    terms: dict[str, float] = {}

    def add(name: str, amount: float) -> None:
        if amount:
            terms[name] = terms.get(name, 0.0) + amount

    sram, read, write = ("memory.sram_cycles_per_byte", "memory.psram_read_ns_per_byte",
                         "memory.psram_write_ns_per_byte")
    activation_reads = _stream(traffic.activation_read, traffic.activation_passes)
    if chip.tensors_in_psram:
        for size, names in ((activation_reads, (read,)), (traffic.activation_write, (write,)),
                            (traffic.scratch, (read, write))):
            missed = max(0.0, size - RESIDENT_BYTES)
            add(sram, (size - missed) * len(names))
            for name in names:
                add(name, missed * cycles_per_ns)
    else:
        add(sram, activation_reads + traffic.activation_write + 2 * traffic.scratch)
    weights = traffic.weight_read
    again = max(0.0, traffic.weight_passes - 1) * max(0.0, weights - STREAM_BUDGET_BYTES)
    if traffic.weights_in_arena and chip.tensors_in_psram:
        # A copy in scratch, just written: cached as a tensor is, then missed as a stream is.
        missed = max(0.0, weights - RESIDENT_BYTES) + again
        add(sram, weights - max(0.0, weights - RESIDENT_BYTES))
        add(read, missed * cycles_per_ns)
    elif traffic.weights_in_arena or not chip.weights_in_flash:
        add(sram, weights)                 # SRAM: re-reads are loads the instruction counts hold
    else:
        add("memory.flash_read_ns_per_byte", (weights + again) * cycles_per_ns)
    return terms


def _stream(size: float, passes: float) -> float:
    return size + max(0.0, passes - 1) * max(0.0, size - STREAM_BUDGET_BYTES)


def layer_terms(work: Work, chip: ChipConfig) -> dict[str, float]:
    """Every constant one operator pays, with how many times (dispatch included)."""
    terms = {"dispatch.op_cycles": 1.0}
    for name, amount in (*work.counts.items(), *memory_terms(work.traffic, chip).items()):
        terms[name] = terms.get(name, 0.0) + amount
    return terms


def op_cycles(work: Work, chip: ChipConfig, constants: Constants, macs: int) -> tuple[int, float | None, bool]:
    """Cycles of one operator (dispatch included), its path's ceiling in MAC/cycle, and whether
    the ceiling had to hold the count back."""
    ceiling = work.ceiling
    if ceiling is None and work.ceiling_term and constants[work.ceiling_term] > 0:
        ceiling = work.ceiling_scale / constants[work.ceiling_term]
    cycles = sum(amount * constants[name] for name, amount in layer_terms(work, chip).items())
    floor = macs / min(ceiling or PIE_PEAK_MACS_PER_CYCLE, PIE_PEAK_MACS_PER_CYCLE) if macs else 0.0
    # The instruction counts are per executed tap; the nominal MACs also count taps in the
    # padding, which a kernel may skip. No layer is reported above its path's ceiling: where the
    # count would put it there, the ceiling holds it back, and the estimate says so (`clamped`).
    return math.ceil(max(cycles, floor)), ceiling, floor > cycles


def estimate_with(info: ModelInfo, chip: ChipConfig, constants: Constants, *, relative_error: float,
                  cost_model: str) -> LatencyEstimate:
    ops = []
    for op in info.ops:
        work = op_work(op, info.tensors, chip)
        cycles, ceiling, clamped = op_cycles(work, chip, constants, op.macs)
        kernel = "esp-nn" if work.path.startswith("esp-nn") else "reference"
        ops.append(OpCost(index=op.index, name=op.name, macs=op.macs, cycles=cycles, kernel=kernel,
                          path=work.path, ceiling=ceiling, clamped=clamped))
    return LatencyEstimate(ops=tuple(ops), overhead_cycles=math.ceil(constants["dispatch.invoke_cycles"]),
                           cpu_mhz=chip.cpu_mhz, relative_error=relative_error, cost_model=cost_model)
