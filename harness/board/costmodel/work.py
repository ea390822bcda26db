"""What one operator asks of the chip, before any fitted constant: which kernel runs it (the
code path), how many instructions that kernel issues for this shape, and which bytes it moves
through which memory.

`Work` is the meeting point of the two halves of the cost model: the path modules
(`espnn_paths`, `reference_paths`) fill it from the operator's shape by reading the kernels'
code; `model.estimate_latency` turns it into cycles with the fitted constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ...tflite_model import OpInfo, TensorInfo

__all__ = ["Work", "asm", "batched", "Traffic", "Window", "window_of", "activation_dtype", "tensor_at", "ceil_to"]


@dataclass(frozen=True)
class Traffic:
    """Bytes a kernel moves, by where they live. `*_passes` is how often the kernel streams the
    same bytes again (a filter read once per output pixel, say): the cache model decides whether
    a pass after the first reaches memory."""

    activation_read: float = 0.0       # tensors in the arena (SRAM or PSRAM)
    activation_write: float = 0.0
    scratch: float = 0.0               # bytes written to and read back from arena scratch
    weight_read: float = 0.0           # constant tensors, in flash behind the data cache
    weight_passes: float = 1.0
    activation_passes: float = 1.0
    # The kernel reads its weights from a copy it made in arena scratch (realigned, padded or
    # widened), not from the model in flash.
    weights_in_arena: bool = False


@dataclass(frozen=True)
class Work:
    """One operator on one kernel path: how often it pays each of the model's constants.

    Assembly paths pay their own constant (a stall factor, cycles per counted instruction) once
    per instruction counted in their code, per-call copies included; C and TFLM reference paths
    pay per-tap, per-output or per-element constants fitted on published timings. The cycles
    are the sum of count x constant, plus the memory term of `traffic`.
    """

    path: str
    counts: Mapping[str, float]
    traffic: Traffic = field(default_factory=Traffic)
    # Best MAC/cycle the path reaches for this window: instructions of its inner loop for
    # assembly paths (at one instruction per cycle); for fitted C paths, None and `ceiling_term`
    # names the per-MAC constant whose inverse it is.
    ceiling: float | None = None
    ceiling_term: str = ""
    ceiling_scale: float = 1.0         # MACs per count of `ceiling_term`


def asm(path: str, instructions: float, traffic: Traffic, ceiling: float | None, factor: str = "") -> Work:
    """An assembly (or PIE-intrinsic) path: instruction count times the stall factor of the
    routine that does the work (`factor`, when a variant such as a row-tiled call shares it)."""
    return Work(path, {factor or path: instructions}, traffic, ceiling=ceiling)


@dataclass(frozen=True)
class Window:
    """A convolution's or pool's geometry as the kernels see it (batch 1, NHWC)."""

    in_h: int
    in_w: int
    in_c: int
    out_h: int
    out_w: int
    out_c: int
    f_h: int
    f_w: int
    stride_h: int
    stride_w: int
    dilation: tuple[int, int]
    pad_h: int                         # TFLM's padding.height: what esp-nn is told
    pad_w: int
    pad_end_h: int                     # extra bottom / right padding TFLM keeps to itself
    pad_end_w: int
    input_zero_point: int
    filter_c: int                      # channels per filter (in_c for an ungrouped conv)
    batches: int = 1                   # the wrappers call the kernel once per batch

    @property
    def espnn_pad_end(self) -> tuple[int, int]:
        """The bottom and right padding esp-nn adds itself when told "no padding":
        `out * stride + filter - 1 - in` (esp_nn_conv_esp32s3.c:516-517 in 1.2.3, and the
        depthwise pad-0 branches), larger than TFLM's for strided layers."""
        return (max(0, self.out_h * self.stride_h + self.f_h - 1 - self.in_h),
                max(0, self.out_w * self.stride_w + self.f_w - 1 - self.in_w))

    @property
    def degenerate(self) -> bool:
        return min(self.in_c, self.out_c, self.pixels, self.f_h, self.f_w, self.in_h, self.in_w) <= 0

    @property
    def pixels(self) -> int:
        return self.out_h * self.out_w

    @property
    def taps(self) -> int:
        return self.f_h * self.f_w

    @property
    def multiplier(self) -> int:
        return max(1, self.out_c // max(1, self.in_c))

    @property
    def padded_input_bytes(self) -> int:
        return (self.in_h + 2 * self.pad_h + self.pad_end_h) * (self.in_w + 2 * self.pad_w + self.pad_end_w) * self.in_c

    @property
    def valid_taps(self) -> int:
        """Taps that land inside the image, summed over the output pixels (the s16 depthwise
        kernels and TFLM's reference kernels skip the others)."""
        return _inside(self.out_h, self.stride_h, self.pad_h, self.f_h, self.in_h) * _inside(
            self.out_w, self.stride_w, self.pad_w, self.f_w, self.in_w)


def _inside(out: int, stride: int, pad: int, size: int, extent: int) -> int:
    total = 0
    for o in range(out):
        start = o * stride - pad
        total += max(0, min(start + size, extent) - max(start, 0))
    return total


def ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


def tensor_at(op: OpInfo, tensors: Sequence[TensorInfo], position: int) -> TensorInfo | None:
    if position >= len(op.inputs) or not 0 <= op.inputs[position] < len(tensors):
        return None
    return tensors[op.inputs[position]]


def activation_dtype(op: OpInfo, tensors: Sequence[TensorInfo]) -> str:
    # The first non-constant input decides the kernel (int8 with int32 bias is still int8).
    for index in op.inputs:
        if 0 <= index < len(tensors) and not tensors[index].is_constant:
            return tensors[index].dtype
    if op.outputs and 0 <= op.outputs[0] < len(tensors):
        return tensors[op.outputs[0]].dtype
    return ""


def _padding(size: int, out: int, stride: int, filter_size: int, dilation: int, padding: str) -> tuple[int, int]:
    # TFLM's ComputePaddingHeightWidth: the total is split, the odd byte going to the end.
    if padding != "SAME":
        return 0, 0
    effective = (filter_size - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total % 2


def window_of(op: OpInfo, tensors: Sequence[TensorInfo]) -> Window | None:
    """The geometry of a 2-D convolution or pool, or None when the tensors do not have it."""
    data = tensor_at(op, tensors, 0)
    output = tensors[op.outputs[0]] if op.outputs and 0 <= op.outputs[0] < len(tensors) else None
    if data is None or output is None or len(data.shape) != 4 or len(output.shape) != 4:
        return None
    if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        filter_ = tensor_at(op, tensors, 1)
        if filter_ is None or len(filter_.shape) != 4:
            return None
        f_h, f_w = filter_.shape[1], filter_.shape[2]
        filter_c = filter_.shape[3] if op.name == "CONV_2D" else 1
    else:
        f_h, f_w = op.window
        filter_c = 1
    batches, in_h, in_w, in_c = data.shape
    _, out_h, out_w, out_c = output.shape
    pad_h, end_h = _padding(in_h, out_h, op.stride[0], f_h, op.dilation[0], op.padding)
    pad_w, end_w = _padding(in_w, out_w, op.stride[1], f_w, op.dilation[1], op.padding)
    zero_point = data.zero_points[0] if data.zero_points else 0
    return Window(in_h, in_w, in_c, out_h, out_w, out_c, f_h, f_w, op.stride[0], op.stride[1], op.dilation,
                  pad_h, pad_w, end_h, end_w, zero_point, filter_c, max(1, batches))


def batched(work: Work, batches: int) -> Work:
    """`work` done once per batch: the wrappers call the kernel for each (conv.cc, pooling.cc)."""
    if batches <= 1:
        return work
    t = work.traffic
    return Work(work.path, {name: count * batches for name, count in work.counts.items()},
                Traffic(activation_read=t.activation_read * batches, activation_write=t.activation_write * batches,
                        scratch=t.scratch * batches, weight_read=t.weight_read, weight_passes=t.weight_passes * batches,
                        activation_passes=t.activation_passes, weights_in_arena=t.weights_in_arena),
                ceiling=work.ceiling, ceiling_term=work.ceiling_term, ceiling_scale=work.ceiling_scale)
