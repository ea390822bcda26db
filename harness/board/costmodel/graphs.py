"""Hand-built operator graphs for the published timings: one-kernel graphs in the shapes of esp-nn's
kernel tables (from esp-nn's tests/src, which the README rows are measurements of) and
person_detect's operators, so the fits need no model files."""

from __future__ import annotations

import math

from ...tflite_model import ModelInfo, OpInfo, TensorInfo

__all__ = ["GraphBuilder", "person_detect_graph"]


class GraphBuilder:
    def __init__(self) -> None:
        self._tensors: list[TensorInfo] = []
        self._ops: list[OpInfo] = []

    def tensor(self, shape: tuple[int, ...], dtype: str = "int8", constant: bool = False,
               zero_point: int = -128) -> int:
        itemsize = {"int8": 1, "int16": 2, "int32": 4, "float32": 4}[dtype]
        index = len(self._tensors)
        self._tensors.append(TensorInfo(
            index=index, name=f"t{index}", shape=shape, dtype=dtype, scales=(0.05,) if dtype == "int8" else (),
            zero_points=(zero_point,) if dtype == "int8" else (), quantized_dimension=0,
            nbytes=math.prod(shape) * itemsize, is_constant=constant))
        return index

    def op(self, name: str, inputs: tuple[int, ...], output: int, macs: int = 0, **geometry) -> int:
        tensors = self._tensors
        self._ops.append(OpInfo(
            index=len(self._ops), name=name, is_custom=False, inputs=inputs, outputs=(output,),
            macs=macs, elements=math.prod(tensors[output].shape),
            bytes_in=sum(tensors[i].nbytes for i in inputs), bytes_out=tensors[output].nbytes,
            weight_bytes=sum(tensors[i].nbytes for i in inputs if tensors[i].is_constant), **geometry))
        return output

    def channels(self, tensor: int) -> int:
        return self._tensors[tensor].shape[-1]

    def conv(self, data: int, out_hw: tuple[int, int], out_c: int, kernel: int, stride: int = 1,
             padding: str = "SAME") -> int:
        in_c = self.channels(data)
        filter_ = self.tensor((out_c, kernel, kernel, in_c), constant=True)
        bias = self.tensor((out_c,), "int32", constant=True)
        output = self.tensor((1, *out_hw, out_c))
        macs = out_hw[0] * out_hw[1] * out_c * kernel * kernel * in_c
        return self.op("CONV_2D", (data, filter_, bias), output, macs, stride=(stride, stride), padding=padding)

    def depthwise(self, data: int, out_hw: tuple[int, int], out_c: int, kernel: int, stride: int = 1,
                  padding: str = "SAME") -> int:
        filter_ = self.tensor((1, kernel, kernel, out_c), constant=True)
        bias = self.tensor((out_c,), "int32", constant=True)
        output = self.tensor((1, *out_hw, out_c))
        macs = out_hw[0] * out_hw[1] * out_c * kernel * kernel
        return self.op("DEPTHWISE_CONV_2D", (data, filter_, bias), output, macs, stride=(stride, stride),
                       padding=padding)

    def pool(self, name: str, data: int, out_hw: tuple[int, int], window: int, stride: int,
             padding: str = "VALID") -> int:
        output = self.tensor((1, *out_hw, self.channels(data)))
        return self.op(name, (data,), output, stride=(stride, stride), padding=padding, window=(window, window))

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
            subgraph_count=1, description="hand-built graph")


def person_detect_graph() -> ModelInfo:
    """The operators of tflm-examples/person_detect.tflite (MobileNetV1 0.25, 96x96x1); a test
    checks them against the real model."""
    graph = GraphBuilder()
    x = graph.tensor((1, 96, 96, 1), zero_point=-1)
    # The converter turned the first 3x3 conv over one channel into a depthwise, multiplier 8.
    x = graph.depthwise(x, (48, 48), 8, 3, stride=2)
    x = graph.depthwise(x, (48, 48), 8, 3)
    x = graph.conv(x, (48, 48), 16, 1)
    side = 48
    for stride, channels in ((2, 32), (1, 32), (2, 64), (1, 64), (2, 128), (1, 128), (1, 128),
                             (1, 128), (1, 128), (1, 128), (2, 256), (1, 256)):
        side //= stride
        x = graph.depthwise(x, (side, side), graph.channels(x), 3, stride=stride)
        x = graph.conv(x, (side, side), channels, 1)
    x = graph.pool("AVERAGE_POOL_2D", x, (1, 1), 3, 2)
    x = graph.conv(x, (1, 1), 2, 1)
    x = graph.op("RESHAPE", (x, graph.tensor((2,), "int32", constant=True)), graph.tensor((1, 2)))
    graph.op("SOFTMAX", (x,), graph.tensor((1, 2)))
    return graph.build()
