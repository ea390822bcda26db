"""TFLite Micro's reference kernels, as esp-tflite-micro 1.3.8 builds them for the firmware (-O3,
assertions on: ESP-IDF's default leaves NDEBUG unset, so every TFLITE_DCHECK is a live branch).

They run for every operator esp-nn does not take (HARD_SWISH, MEAN, broadcast ADD and MUL, ...),
for everything when the firmware is built without esp-nn, and for float32.

No Xtensa compiler is reachable here, so the instruction counts per unit of work are dynamic
counts of the same TFLM sources built for x86-64 with the same flags (-O3, no vectorization, no
unrolling, assertions on) under valgrind (docs/board-model.md, "Reference kernels"). One factor,
cycles of the ESP32-S3 per proxy instruction of the MAC kernels (`tflm-reference`), is fitted on
the one whole-model figure spent on these kernels: person_detect without esp-nn, 2300 ms. Nothing
published times the element-wise ones alone; they take an assumed 1.5 cycles per proxy
instruction (`tflm-reference.element`: byte loads need a sign extension, 64-bit products two
multiplies, and there are no memory operands).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from .work import Traffic, Window, Work

__all__ = ["REFERENCE_FACTOR", "ELEMENT_FACTOR", "reference_window_work", "reference_mac_work", "reference_element_work",
           "MEMORY_BOUND_OPS"]

REFERENCE_FACTOR = "tflm-reference"
ELEMENT_FACTOR = "tflm-reference.element"

# Proxy instructions, fitted to counts of the kernels at several shapes given at run time (a shape
# known at compile time lets the compiler fold the index arithmetic away, which the firmware's
# does not): CONV_2D 14.0 per MAC, 41.9 per tap visited (entering the in-channel loop, with
# the assertions of two Offset() calls), 126 per output (requantization, clamp, store);
# DEPTHWISE_CONV_2D 21.0 per MAC and 180 per output; FULLY_CONNECTED 9.0 per MAC and 75 per output.
CONV_PER_MAC, CONV_PER_TAP, CONV_PER_OUTPUT = 14.0, 41.9, 126.0
DEPTHWISE_PER_MAC, DEPTHWISE_PER_OUTPUT = 21.0, 180.0
FULLY_CONNECTED_PER_MAC, FULLY_CONNECTED_PER_OUTPUT = 9.0, 75.0
# Average pooling: 218 per output of a 3x3 window (24 per tap); max pooling walks the same loops.
POOL_PER_TAP = 24.2

# Proxy instructions per output element (per input element for MEAN and the reductions).
_PER_ELEMENT: Mapping[str, float] = MappingProxyType({
    "ADD": 35.0, "MUL": 65.0, "SUB": 35.0, "SQUARED_DIFFERENCE": 65.0,
    "HARD_SWISH": 46.0, "LOGISTIC": 391.0, "TANH": 391.0, "SOFTMAX": 315.0, "LOG_SOFTMAX": 315.0,
    "QUANTIZE": 38.0, "DEQUANTIZE": 10.0, "PAD": 19.5, "PADV2": 19.5, "MIRROR_PAD": 19.5,
    "MEAN": 90.0, "SUM": 90.0, "REDUCE_MAX": 90.0, "REDUCE_MIN": 90.0, "REDUCE_PROD": 90.0,
    "LEAKY_RELU": 40.0, "PRELU": 65.0, "ELU": 391.0, "GELU": 391.0, "EXP": 391.0, "LOG": 391.0,
    "RSQRT": 391.0, "SQRT": 391.0,
})
_BROADCAST_PER_ELEMENT: Mapping[str, float] = MappingProxyType({"ADD": 147.0, "MUL": 69.0, "SUB": 147.0})
REDUCTIONS = frozenset({"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"})
# Assumption: an integer element-wise kernel nobody counted costs about what MUL does.
OTHER_PER_ELEMENT = 65.0
# Operators that only move, compare or clamp data: a few instructions per element (assumption;
# RESHAPE is usually in place and costs only its dispatch).
MEMORY_BOUND_PER_ELEMENT = 3.0
MEMORY_BOUND_OPS = frozenset({
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "CONCATENATION", "PACK", "UNPACK", "SPLIT", "SPLIT_V",
    "SLICE", "STRIDED_SLICE", "GATHER", "TRANSPOSE", "SHAPE", "BROADCAST_TO", "TILE", "ZEROS_LIKE",
    "FILL", "REVERSE_V2", "CAST", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE", "BATCH_TO_SPACE_ND",
    "SPACE_TO_BATCH_ND", "RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "MAXIMUM", "MINIMUM",
})
IN_PLACE_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE"})


def reference_window_work(op_name: str, w: Window, weight_bytes: int) -> Work:
    """CONV_2D, DEPTHWISE_CONV_2D and the pools: loops out_y, out_x, channel, filter_y, filter_x
    (and in-channel for CONV_2D), with the whole filter read again for every output pixel."""
    outputs = w.pixels * w.out_c
    if op_name == "CONV_2D":
        executed = w.valid_taps * w.out_c * w.filter_c      # taps in the padding are skipped
        proxy = CONV_PER_MAC * executed + CONV_PER_TAP * w.valid_taps * w.out_c + CONV_PER_OUTPUT * outputs
    elif op_name == "DEPTHWISE_CONV_2D":
        proxy = DEPTHWISE_PER_MAC * w.valid_taps * w.out_c + DEPTHWISE_PER_OUTPUT * outputs
    else:
        return Work(f"tflm-reference/{op_name.lower()}", {ELEMENT_FACTOR: POOL_PER_TAP * w.valid_taps * w.in_c},
                    Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c))
    return Work(f"tflm-reference/{op_name.lower()}", {REFERENCE_FACTOR: proxy},
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                        weight_read=weight_bytes, weight_passes=w.pixels),
                ceiling_term=REFERENCE_FACTOR, ceiling_scale=1.0 / (CONV_PER_MAC if op_name == "CONV_2D"
                                                                    else DEPTHWISE_PER_MAC))


def reference_mac_work(op_name: str, macs: int, outputs: int, rows: int, activation_bytes: int, output_bytes: int,
                       weight_bytes: int) -> Work:
    """FULLY_CONNECTED and the other matrix kernels (BATCH_MATMUL, LSTM, RNN, SVDF, ...)."""
    proxy = FULLY_CONNECTED_PER_MAC * macs + FULLY_CONNECTED_PER_OUTPUT * outputs
    return Work(f"tflm-reference/{op_name.lower()}", {REFERENCE_FACTOR: proxy},
                Traffic(activation_read=activation_bytes, activation_write=output_bytes,
                        weight_read=weight_bytes, weight_passes=max(1, rows)),
                ceiling_term=REFERENCE_FACTOR, ceiling_scale=1.0 / FULLY_CONNECTED_PER_MAC)


def reference_element_work(op_name: str, elements: int, input_elements: int, broadcast: bool,
                           activation_bytes: int, output_bytes: int, weight_bytes: int) -> Work:
    if op_name in IN_PLACE_OPS:
        proxy = 0.0
    elif op_name in MEMORY_BOUND_OPS:
        proxy = MEMORY_BOUND_PER_ELEMENT * elements
    elif op_name in REDUCTIONS:
        proxy = _PER_ELEMENT[op_name] * input_elements
    elif broadcast and op_name in _BROADCAST_PER_ELEMENT:
        proxy = _BROADCAST_PER_ELEMENT[op_name] * elements
    else:
        proxy = _PER_ELEMENT.get(op_name, OTHER_PER_ELEMENT) * elements
    moved = 0 if op_name in IN_PLACE_OPS else activation_bytes
    suffix = "_broadcast" if broadcast and op_name in _BROADCAST_PER_ELEMENT else ""
    return Work(f"tflm-reference/{op_name.lower()}{suffix}", {ELEMENT_FACTOR: proxy},
                Traffic(activation_read=moved, activation_write=0 if op_name in IN_PLACE_OPS else output_bytes,
                        weight_read=weight_bytes))
