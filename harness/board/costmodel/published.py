"""The published ESP32-S3 timings the cost model is fitted on or checked against, with the shapes
the measurements really ran.

Kernel rows: the S3 tables of esp-nn 1.1.2's and 1.2.3's README ("ticks" at 240 MHz), for the
optimized kernel and the ANSI C one. The shapes are those of esp-nn's tests/src, which the tables
were printed from; where a README label disagrees with the call that was timed, the call wins:
1.2.3's test app prints the profile of the last call of each test, so its pool rows are 14x14x16
outputs without padding and its softmax row is 8 rows of 3, not 8x32. 1.1.2 times the first call
of each kernel, with its code not yet in the instruction cache: its 265 x 3 fully connected row is
mostly cache misses (3.6 times the instruction count) and is left out, and the stall factors of
routines the two versions share come from 1.2.3's warm timings (fit.py). The relu6 rows are not used: esp-tflite-micro 1.3.8 never calls that kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...tflite_model import ModelInfo
from .graphs import GraphBuilder, person_detect_graph

__all__ = ["KernelRow", "kernel_rows", "WholeModelPoint", "whole_model_points"]


@dataclass(frozen=True)
class KernelRow:
    version: str
    name: str
    graph: ModelInfo
    optimized_cycles: int
    ansi_cycles: int
    usable: bool = True             # False: shown beside the fit, not used by it (see module doc)

    @property
    def warm(self) -> bool:
        """1.2.3's test app times a kernel's last call, 1.1.2's its first (code not yet cached)."""
        return self.version != "1.1.2"


def _single(kind: str, input_shape: tuple[int, ...], zero_point: int = -128, **shape) -> ModelInfo:
    graph = GraphBuilder()
    data = graph.tensor(input_shape, zero_point=zero_point)
    if kind == "conv":
        graph.conv(data, (shape["out"], shape["out"]), shape["channels"], shape["kernel"], padding="VALID")
    elif kind == "depthwise":
        graph.depthwise(data, (shape["out"], shape["out"]), shape["channels"], shape["kernel"],
                        padding=shape.get("padding", "VALID"))
    elif kind == "fully_connected":
        graph.fully_connected(data, shape["units"])
    elif kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        graph.pool(kind, data, (shape["out"], shape["out"]), 3, 1, padding=shape["padding"])
    elif kind in ("ADD", "MUL"):
        graph.op(kind, (data, graph.tensor(input_shape)), graph.tensor(input_shape))
    else:
        graph.op(kind, (data,), graph.tensor(input_shape))
    return graph.build()


def kernel_rows() -> list[KernelRow]:
    conv_64 = _single("conv", (1, 10, 10, 64), out=10, channels=64, kernel=1)
    conv_16 = _single("conv", (1, 8, 8, 16), out=8, channels=16, kernel=1)
    conv_3x3 = _single("conv", (1, 10, 10, 3), out=8, channels=64, kernel=3)
    dw_3x3 = _single("depthwise", (1, 18, 18, 16), out=16, channels=16, kernel=3)
    # Channel multiplier 8 on 4 channels, a 12x12 output (tests/src case 5). The test pads by 1 and
    # lets the kernel clip the rest; TFLM's SAME, the nearest a graph can say, pads by 2: 3.8% more
    # taps in the image, which this row's stall factor absorbs.
    dw_5x5 = _single("depthwise", (1, 12, 12, 4), out=12, channels=32, kernel=5, padding="SAME")
    add = _single("ADD", (1, 1615))
    mul = _single("MUL", (1, 1615))
    rows = []
    for version, table in (("1.1.2", (
        ("conv 1x1, 64 -> 64 ch, 10x10", conv_64, 461_398, 4_642_259, True),
        ("conv 1x1, 16 -> 16 ch, 8x8", conv_16, 43_578, 300_032, True),
        ("conv 3x3, 3 -> 64 ch, 10x10 in", conv_3x3, 643_689, 2_106_801, True),
        ("depthwise 3x3, 16 ch, 18x18", dw_3x3, 191_931, 1_192_832, True),
        ("depthwise 5x5, 4 ch x mult 8, 12x12", dw_5x5, 366_102, 1_679_406, True),
        ("max pool 3x3, 16 ch, 16x16 padded", _single("MAX_POOL_2D", (1, 16, 16, 16), out=16, padding="SAME"),
         76_747, 485_714, True),
        ("avg pool 3x3, 16 ch, 16x16 padded", _single("AVERAGE_POOL_2D", (1, 16, 16, 16), out=16, padding="SAME"),
         160_580, 541_462, True),
        ("fully connected, 265 in x 3 out", _single("fully_connected", (1, 265), units=3), 4_439, 12_290, False),
        ("elementwise add, 1615", add, 71_644, 312_327, True),
        ("elementwise mul, 1615", mul, 30_950, 122_046, True),
    )), ("1.2.3", (
        ("conv 1x1, 64 -> 64 ch, 10x10", conv_64, 331_008, 4_712_500, True),
        ("conv 1x1, 16 -> 16 ch, 8x8", conv_16, 39_022, 312_754, True),
        ("conv 3x3, 3 -> 64 ch, 10x10 in", conv_3x3, 394_842, 2_193_289, True),
        ("depthwise 3x3, 16 ch, 18x18", dw_3x3, 184_176, 1_159_831, True),
        ("depthwise 5x5, 4 ch x mult 8, 12x12", dw_5x5, 372_435, 1_671_363, True),
        ("max pool 3x3, 16 ch, 14x14 out", _single("MAX_POOL_2D", (1, 16, 16, 16), out=14, padding="VALID"),
         48_069, 376_294, True),
        ("avg pool 3x3, 16 ch, 14x14 out", _single("AVERAGE_POOL_2D", (1, 16, 16, 16), out=14, padding="VALID"),
         118_052, 427_293, True),
        # tests/src/fully_connected_test.c:36-50: input offset 0, so no filter sums.
        ("fully connected, 271 in x 3 out", _single("fully_connected", (1, 271), zero_point=0, units=3),
         1_078, 8_443, True),
        ("softmax, 8 rows of 3", _single("SOFTMAX", (8, 3)), 11_107, 15_209, True),
        ("elementwise add, 1615", add, 74_440, 281_337, True),
        ("elementwise mul, 1615", mul, 35_002, 122_703, True),
    ))):
        rows += [KernelRow(version, name, graph, optimized, ansi, usable)
                 for name, graph, optimized, ansi, usable in table]
    return rows


@dataclass(frozen=True)
class WholeModelPoint:
    """A published whole-model `invoke()` time, ESP32-S3 at 240 MHz."""

    name: str
    model: str                      # "person_detect" or "mobilenet_v3_small"
    esp_nn: bool
    arena_in_psram: bool
    published_ms: float
    source: str
    fitted: bool                    # True: spent on the fit; False: held out for prediction


def whole_model_points() -> list[WholeModelPoint]:
    readme = "esp-nn 1.2.3 README (model-level table and notes); esp-tflite-micro 1.3.8 README"
    return [
        WholeModelPoint("person_detect, reference kernels", "person_detect", False, True, 2300.0, readme, True),
        WholeModelPoint("person_detect, ESP-NN, arena in PSRAM", "person_detect", True, True, 54.0, readme, False),
        WholeModelPoint("person_detect, ESP-NN, arena in internal RAM", "person_detect", True, False, 47.0, readme,
                        False),
        WholeModelPoint("MobileNetV3-Small 224 int8, ESP-NN, arena in PSRAM", "mobilenet_v3_small", True, True,
                        1434.0, "esp-nn 1.2.3 README", False),
        WholeModelPoint("MobileNetV3-Small 224 int8, reference kernels, arena in PSRAM", "mobilenet_v3_small",
                        False, True, 26000.0, "esp-nn 1.2.3 README", False),
    ]


def person_detect() -> ModelInfo:
    return person_detect_graph()
