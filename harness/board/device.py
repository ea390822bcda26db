"""The device end of the wire protocol, without I/O.

`DeviceEngine` turns received bytes into bytes to send, calling an `InferenceRuntime` for the
model work. The virtual board runs it behind a pseudo-terminal; the firmware's C++ engine
(firmware/) implements the same behaviour, and both are checked against the same golden frames.
Buffers are sized once from the model's tensor sizes, as on the microcontroller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .. import protocol as p
from ..errors import ProtocolError


@dataclass(frozen=True)
class InvokeTiming:
    total_us: int
    total_cycles: int
    op_us: tuple[int, ...]
    op_cycles: tuple[int, ...]


class InferenceRuntime(Protocol):
    """What the engine calls for the model work. A runtime whose interpreter keeps every tensor
    (DeviceInfo flag FLAG_PRESERVES_TENSORS) also has, for GET_TENSOR:

        tensor_count() -> int      tensors of the main subgraph
        tensor(index) -> tuple[protocol.TensorSpec, bytes]
                                   as the last invoke left it; raises protocol.TensorUnavailable

    The engine calls them only when the flag is set, with index < tensor_count(). A runtime
    without them has no tensors, as the C++ Inference's defaults."""

    def set_input(self, index: int, data: bytes) -> None: ...

    def invoke(self) -> InvokeTiming: ...

    def get_output(self, index: int) -> bytes: ...


class DeviceEngine:
    """Protocol state of one device: input buffers, the last sequence number, the boot state.

    A device whose model failed to load (arena allocation, unsupported op, too large) still speaks
    the protocol: it answers every request with the boot error, the way the firmware reports
    `AllocateTensors()` failing instead of going silent.
    """

    def __init__(self, info: p.DeviceInfo, op_names: tuple[str, ...], runtime: InferenceRuntime | None,
                 boot_error: p.ErrorMsg | None = None) -> None:
        if runtime is None and boot_error is None:
            raise ValueError("a device without a runtime must have a boot error")
        self.info = info
        self.op_names = op_names
        self._runtime = runtime
        self._boot_error = boot_error
        self._decoder = p.FrameDecoder(info.max_payload)
        self._inputs = [bytearray(spec.nbytes) for spec in info.inputs]
        self._received = [0] * len(info.inputs)
        self._last_rx = 0.0  # when bytes last arrived, on the caller's clock (seconds)
        self._last_seq = 0   # of the last frame handled: a lost frame's seq is likely the next
        self.idle_gap_s = p.IDLE_GAP_S  # the protocol's; a test may set another, as native_device does

    @property
    def decode_stats(self) -> p.DecodeStats:
        return self._decoder.stats

    def receive(self, data: bytes, now: float = 0.0) -> list[bytes]:
        """Answers to what `data` completes; `now` (seconds, any origin) times the idle gap."""
        out: list[bytes] = []
        for _end, frame in self.frames(data, now):
            out.extend(self.handle(frame))
        return out

    def frames(self, data: bytes, now: float = 0.0) -> list[tuple[int, p.Frame]]:
        """The frames `data` completes, each with how many bytes of `data` it took to complete it,
        for a caller that handles each frame (`handle`) once its last byte could have arrived."""
        if data:
            self._last_rx = now
        return self._decoder.feed_with_ends(data)

    def idle_deadline(self) -> float | None:
        """When `idle` will drop what the decoder holds, if no byte comes first; None: it holds nothing."""
        return self._last_rx + self.idle_gap_s if self._decoder.damaged else None

    def idle(self, now: float) -> list[bytes]:
        """No byte since the last `receive`: once that lasted IDLE_GAP_S, a frame the decoder holds
        (or threw away) is lost. The decoder drops it and the host is told (ERROR BAD_FRAME), so it
        need not wait for its own deadline; the firmware's Engine does the same."""
        deadline = self.idle_deadline()
        if deadline is None or now < deadline:
            return []
        dropped = self._decoder.expire()
        return [self._error((self._last_seq + 1) & 0xFF, p.ErrorCode.BAD_FRAME,
                            f"frame lost: {dropped} bytes held, then no byte for {round(self.idle_gap_s * 1000)} ms")]

    def handle(self, frame: p.Frame) -> list[bytes]:
        self._last_seq = frame.seq
        try:
            message = p.decode_message(frame)
        except ProtocolError as error:
            code = p.ErrorCode.UNKNOWN_TYPE if frame.type not in p.MESSAGES else p.ErrorCode.BAD_PAYLOAD
            return [self._error(frame.seq, code, str(error))]
        if isinstance(message, p.Hello):
            return [self._hello(frame.seq, message)]
        if self._boot_error is not None:
            return [p.encode_frame(p.MsgType.ERROR, frame.seq, self._boot_error.pack())]
        if isinstance(message, p.GetOps):
            return [self._ops(frame.seq, message)]
        if isinstance(message, p.InputBegin):
            return [self._input_begin(frame.seq, message)]
        if isinstance(message, p.InputData):
            return [self._input_data(frame.seq, message)]
        if isinstance(message, p.Invoke):
            return self._invoke(frame.seq, message)
        if isinstance(message, p.GetTensor):
            return [self._get_tensor(frame.seq, message)]
        return [self._error(frame.seq, p.ErrorCode.UNKNOWN_TYPE,
                            f"message type 0x{frame.type:02x} is not a request")]

    def _error(self, seq: int, code: p.ErrorCode, text: str) -> bytes:
        return p.encode_frame(p.MsgType.ERROR, seq, p.ErrorMsg(code, text).pack())

    def _hello(self, seq: int, hello: p.Hello) -> bytes:
        if hello.version != p.PROTOCOL_VERSION:
            return self._error(seq, p.ErrorCode.VERSION_MISMATCH,
                               f"device speaks protocol v{p.PROTOCOL_VERSION}, host sent v{hello.version}")
        if self._boot_error is not None:
            return p.encode_frame(p.MsgType.ERROR, seq, self._boot_error.pack())
        return p.encode_frame(p.MsgType.DEVICE_INFO, seq, self.info.pack())

    def _ops(self, seq: int, request: p.GetOps) -> bytes:
        if request.start > len(self.op_names):
            return self._error(seq, p.ErrorCode.BAD_PAYLOAD,
                               f"op index {request.start} past the model's {len(self.op_names)} ops")
        count = p.ops_page_capacity(self.op_names, request.start, self.info.max_payload)
        page = p.OpsPage(request.start, tuple(self.op_names[request.start:request.start + count]))
        return p.encode_frame(p.MsgType.OPS, seq, page.pack())

    def _input_begin(self, seq: int, request: p.InputBegin) -> bytes:
        if request.tensor >= len(self._inputs):
            return self._error(seq, p.ErrorCode.BAD_PAYLOAD,
                               f"input tensor {request.tensor} does not exist; the model has {len(self._inputs)}")
        expected = len(self._inputs[request.tensor])
        if request.total != expected:
            return self._error(seq, p.ErrorCode.INPUT_SIZE,
                               f"input {request.tensor} takes {expected} bytes, host announced {request.total}")
        self._received[request.tensor] = 0
        return p.encode_frame(p.MsgType.ACK, seq, p.Ack(p.MsgType.INPUT_BEGIN, 0).pack())

    def _input_data(self, seq: int, chunk: p.InputData) -> bytes:
        if chunk.tensor >= len(self._inputs):
            return self._error(seq, p.ErrorCode.BAD_PAYLOAD, f"input tensor {chunk.tensor} does not exist")
        buffer = self._inputs[chunk.tensor]
        received = self._received[chunk.tensor]
        if chunk.offset > received:
            # A gap: a chunk before this one was lost. The ACK says how many bytes are held, which
            # is where the host resumes (docs/protocol.md, "Recovery inside a sample").
            return p.encode_frame(p.MsgType.ACK, seq, p.Ack(p.MsgType.INPUT_DATA, received).pack())
        end = chunk.offset + len(chunk.data)
        if end > len(buffer):
            return self._error(seq, p.ErrorCode.INPUT_SIZE,
                               f"input {chunk.tensor} chunk ends at byte {end}, tensor has {len(buffer)}")
        # At or below the bytes held: a chunk sent again (its ACK was lost, or the host went back
        # to where it knew the count) carries the same bytes, so it is simply taken again.
        buffer[chunk.offset:end] = chunk.data
        held = max(received, end)
        self._received[chunk.tensor] = held
        return p.encode_frame(p.MsgType.ACK, seq, p.Ack(p.MsgType.INPUT_DATA, held).pack())

    def _invoke(self, seq: int, request: p.Invoke) -> list[bytes]:
        assert self._runtime is not None
        for index, buffer in enumerate(self._inputs):
            if self._received[index] != len(buffer):
                return [self._error(seq, p.ErrorCode.NOT_READY,
                                    f"input {index} has {self._received[index]} of {len(buffer)} bytes")]
        try:
            for index, buffer in enumerate(self._inputs):
                self._runtime.set_input(index, bytes(buffer))
            timing = self._runtime.invoke()
            outputs = [self._runtime.get_output(i) for i in range(len(self.info.outputs))]
        except Exception as error:  # the runtime is foreign code; its failure is the device's answer
            return [self._error(seq, p.ErrorCode.INVOKE_FAILED, f"invoke failed: {error}")]
        for index in range(len(self._received)):
            self._received[index] = 0
        frames = []
        chunk_size = self.info.max_payload - p.OutputData.HEADER
        for index, data in enumerate(outputs):
            for offset in range(0, max(len(data), 1), chunk_size):
                piece = p.OutputData(index, offset, len(data), data[offset:offset + chunk_size])
                frames.append(p.encode_frame(p.MsgType.OUTPUT_DATA, seq, piece.pack()))
        profiled = bool(request.flags & p.INVOKE_PROFILE)
        result = p.InvokeResult(timing.total_us, timing.total_cycles,
                                timing.op_us if profiled else (), timing.op_cycles if profiled else ())
        frames.append(p.encode_frame(p.MsgType.INVOKE_RESULT, seq, result.pack()))
        return frames

    def _get_tensor(self, seq: int, request: p.GetTensor) -> bytes:
        """One chunk of a tensor the last invoke left, checked in the C++ engine's order: the flag,
        the index, what the runtime gives, the offset."""
        if not self.info.flags & p.FLAG_PRESERVES_TENSORS:
            return self._error(seq, p.ErrorCode.TENSOR_UNAVAILABLE, p.NO_PRESERVED_TENSORS_TEXT)
        count_of = getattr(self._runtime, "tensor_count", None)
        count = count_of() if count_of is not None else 0
        if request.tensor >= count:
            return self._error(seq, p.ErrorCode.BAD_PAYLOAD,
                               f"tensor {request.tensor} does not exist; the model's main subgraph has {count}")
        tensor_of = getattr(self._runtime, "tensor", None)
        try:
            if tensor_of is None:
                raise p.TensorUnavailable(p.NO_PRESERVED_TENSORS_TEXT)
            spec, data = tensor_of(request.tensor)
        except p.TensorUnavailable as error:
            return self._error(seq, p.ErrorCode.TENSOR_UNAVAILABLE, error.text)
        except Exception as error:  # the runtime is foreign code; its failure is the device's answer
            return self._error(seq, p.ErrorCode.TENSOR_UNAVAILABLE, f"reading tensor {request.tensor} failed: {error}")
        if len(spec.shape) > 8:
            return self._error(seq, p.ErrorCode.TENSOR_UNAVAILABLE,
                               f"tensor {request.tensor} has rank {len(spec.shape)}, above the protocol maximum 8")
        if len(data) != spec.nbytes:
            return self._error(seq, p.ErrorCode.TENSOR_UNAVAILABLE,
                               f"tensor {request.tensor}: {len(data)} bytes on the device for a descriptor of "
                               f"{spec.nbytes} bytes")
        total = len(data)
        if request.offset > total:
            return self._error(seq, p.ErrorCode.BAD_PAYLOAD,
                               f"tensor {request.tensor} has {total} bytes; offset {request.offset} is past its end")
        size = min(total - request.offset, self.info.max_payload - p.TensorData.header_size(spec))
        chunk = p.TensorData(request.tensor, request.offset, total, spec,
                             bytes(data[request.offset:request.offset + size]))
        return p.encode_frame(p.MsgType.TENSOR_DATA, seq, chunk.pack())
