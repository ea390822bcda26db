"""Wire protocol v2 between the harness and a board (docs/protocol.md is the specification).

Both ends live here as pure code with no I/O: `encode_frame` and `FrameDecoder` do the framing,
the message dataclasses pack and unpack payloads. The host client and the Python device engine
use them; the firmware's C++ engine implements the same bytes, checked against the same golden
frames. Everything is little-endian and fixed-layout so a microcontroller can parse it in place
with bounded buffers: no text on the hot path, no allocation proportional to anything but
MAX_PAYLOAD.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import ClassVar, Mapping

from .errors import ProtocolError

PROTOCOL_VERSION = 2
SYNC = b"\xa5\x5a"
HEADER_SIZE = 7  # sync(2) type(1) seq(1) length(2) header-crc8(1)
TRAILER_SIZE = 4  # crc32
FRAME_OVERHEAD = HEADER_SIZE + TRAILER_SIZE
# The device keeps one receive buffer of this size; the host never sends a longer payload than the
# device announced in its DeviceInfo.
MAX_PAYLOAD = 4096
# A receiver that holds part of a frame (or bytes it threw away since its last good frame) and gets
# no byte for this long drops them and hunts for a sync pair again: a sender writes a frame without
# pausing, so silence inside a frame means its rest is lost. Without this rule a decoder left
# holding a cut frame swallows the next requests as that frame's payload (docs/protocol.md,
# "Idle gap").
IDLE_GAP_S = 0.050
# A host that resynchronises keeps the link silent at least this long before its HELLO (twice the
# device's gap, so a device whose clock is coarse or whose loop is busy has still seen the gap).
RESYNC_SILENCE_S = 2 * IDLE_GAP_S


class MsgType(enum.IntEnum):
    HELLO = 0x01
    GET_OPS = 0x02
    INPUT_BEGIN = 0x03
    INPUT_DATA = 0x04
    INVOKE = 0x05
    GET_TENSOR = 0x06
    DEVICE_INFO = 0x81
    OPS = 0x82
    ACK = 0x84
    OUTPUT_DATA = 0x85
    INVOKE_RESULT = 0x86
    TENSOR_DATA = 0x87
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1
    BAD_SEQUENCE = 2
    UNKNOWN_TYPE = 3
    BAD_PAYLOAD = 4
    INPUT_SIZE = 5
    INVOKE_FAILED = 6
    MODEL_LOAD_FAILED = 7
    ARENA_ALLOCATION_FAILED = 8
    MODEL_TOO_LARGE = 9
    UNSUPPORTED_OP = 10
    NOT_READY = 11
    VERSION_MISMATCH = 12
    TENSOR_UNAVAILABLE = 13


class DType(enum.IntEnum):
    """Tensor element types, numbered as in the TFLite schema's TensorType."""

    FLOAT32 = 0
    INT32 = 2
    UINT8 = 3
    INT16 = 7
    INT8 = 9

    @property
    def numpy_name(self) -> str:
        return _NUMPY_NAMES[self]

    @classmethod
    def from_numpy_name(cls, name: str) -> DType:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ProtocolError(f"tensor type {name!r} has no wire code; expected one of "
                                f"{', '.join(t.numpy_name for t in cls)}") from None

    @property
    def itemsize(self) -> int:
        return _ITEMSIZES[self]


# Looked up on every sample the host sends (the input checks), so computed once here.
_NUMPY_NAMES = {dtype: dtype.name.lower() for dtype in DType}
_ITEMSIZES = {DType.FLOAT32: 4, DType.INT32: 4, DType.UINT8: 1, DType.INT16: 2, DType.INT8: 1}


def _crc8_table() -> bytes:
    table = bytearray(256)
    for value in range(256):
        crc = value
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table[value] = crc
    return bytes(table)


_CRC8_TABLE = _crc8_table()


def crc8(data: bytes) -> int:
    """CRC-8 (polynomial 0x07, init 0): guards the header so a corrupt length is caught at once
    instead of making the receiver wait for a payload that never comes. Table-driven, one lookup
    per byte (it runs on every frame, both ways)."""
    crc = 0
    table = _CRC8_TABLE
    for byte in data:
        crc = table[crc ^ byte]
    return crc


def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC, the zlib one; the firmware uses the same table-driven variant."""
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class Frame:
    type: int
    seq: int
    payload: bytes


_HEADER_BODY = struct.Struct("<BBH")
_U32 = struct.Struct("<I")
_ONE_BYTE = tuple(bytes([value]) for value in range(256))


def encode_frame(msg_type: int, seq: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {length} bytes exceeds the protocol maximum {MAX_PAYLOAD}")
    header_body = _HEADER_BODY.pack(msg_type & 0xFF, seq & 0xFF, length)
    # CRC-32 over header body then payload, continued rather than over a concatenated copy.
    crc = zlib.crc32(payload, zlib.crc32(header_body))
    return b"".join((SYNC, header_body, _ONE_BYTE[crc8(header_body)], payload, _U32.pack(crc)))


@dataclass
class DecodeStats:
    """What the decoder threw away; the link reports these instead of failing silently."""

    garbage_bytes: int = 0
    header_errors: int = 0
    crc_errors: int = 0
    oversize: int = 0
    idle_drops: int = 0  # partial frames or thrown-away bytes ended by an idle gap


class FrameDecoder:
    """Incremental frame parser: feed it whatever the link delivered, get whole frames back.

    Bytes that are not part of a valid frame (boot messages, line noise, a frame cut by a reset)
    are skipped by hunting for the next sync pair, so the decoder recovers by itself. A frame cut
    off for good (its rest was lost and the sender went quiet) is dropped by `expire`, which the
    owner calls once the line was idle for IDLE_GAP_S: the decoder keeps no clock itself. Memory is
    bounded by one frame plus what was fed in one call.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD, stats: DecodeStats | None = None) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload
        self.stats = stats if stats is not None else DecodeStats()
        self._damaged = False  # bytes were thrown away since the last good frame

    @property
    def damaged(self) -> bool:
        """Something since the last good frame was not a frame: bytes are buffered that do not
        make one yet, or bytes were thrown away. After an idle gap this means a frame was lost."""
        return self._damaged or bool(self._buffer)

    def expire(self) -> int:
        """The line has been idle for IDLE_GAP_S: what is buffered will never complete a frame.
        Drops it, returns how many bytes that was, and clears `damaged`."""
        dropped = len(self._buffer)
        if self.damaged:
            self.stats.idle_drops += 1
            self.stats.garbage_bytes += dropped
        self._buffer.clear()
        self._damaged = False
        return dropped

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        self._decode(data, frames, None)
        return frames

    def feed_with_ends(self, data: bytes) -> list[tuple[int, Frame]]:
        """Like `feed`, with each frame's end: how many bytes of `data` up to and including the
        frame's last byte (a receiver that paces the wire handles a frame once that much crossed)."""
        frames: list[Frame] = []
        ends: list[int] = []
        self._decode(data, frames, ends)
        return list(zip(ends, frames))

    def pending(self) -> bytes:
        return bytes(self._buffer)

    def _decode(self, data: bytes, frames: list[Frame], ends: list[int] | None) -> None:
        """Parses the buffer from a read position and deletes what was consumed once, at the end,
        rather than shifting the buffer after every frame."""
        buf = self._buffer
        carried = len(buf)  # bytes of earlier calls still in the buffer
        buf += data
        size = len(buf)
        stats = self.stats
        max_payload = self._max_payload
        crc32_ = zlib.crc32
        garbage_before = stats.garbage_bytes
        pos = 0
        while True:
            start = buf.find(SYNC, pos)
            if start < 0:
                # Keep a trailing 0xA5: it may be the first half of a sync pair still in flight.
                keep = 1 if size > pos and buf[size - 1] == 0xA5 else 0
                stats.garbage_bytes += size - keep - pos
                pos = size - keep
                break
            if start > pos:
                stats.garbage_bytes += start - pos
                pos = start
            if size - pos < HEADER_SIZE:
                break
            header_body = buf[pos + 2:pos + 6]
            if crc8(header_body) != buf[pos + 6]:
                stats.header_errors += 1
                stats.garbage_bytes += 1
                pos += 1
                continue
            length = header_body[2] | header_body[3] << 8
            if length > max_payload:
                stats.oversize += 1
                stats.garbage_bytes += 1
                pos += 1
                continue
            end = pos + HEADER_SIZE + length + TRAILER_SIZE
            if size < end:
                break
            payload = bytes(buf[pos + HEADER_SIZE:end - TRAILER_SIZE])
            if crc32_(payload, crc32_(header_body)) != _U32.unpack_from(buf, end - TRAILER_SIZE)[0]:
                stats.crc_errors += 1
                stats.garbage_bytes += 1
                pos += 1
                continue
            frames.append(Frame(header_body[0], header_body[1], payload))
            if ends is not None:
                ends.append(end - carried)
            pos = end
            garbage_before = stats.garbage_bytes
            self._damaged = False
        if stats.garbage_bytes != garbage_before:
            self._damaged = True
        if pos:
            del buf[:pos]


# --- payload helpers -------------------------------------------------------------------------

# Layouts of the messages on the per-sample path, unpacked directly when the length is right.
_U8_U32 = struct.Struct("<BI")
_OUTPUT_HEADER = struct.Struct("<BII")
_RESULT_HEADER = struct.Struct("<IQH")
_U16_U32 = struct.Struct("<HI")
_TENSOR_HEADER = struct.Struct("<HII")

class _Reader:
    """Bounds-checked reads from a payload; any overrun is a ProtocolError, never an IndexError."""

    def __init__(self, payload: bytes, what: str) -> None:
        self._data = payload
        self._offset = 0
        self._what = what

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self._offset + size > len(self._data):
            raise ProtocolError(f"{self._what} payload too short: needed {self._offset + size} bytes, "
                                f"got {len(self._data)}")
        values = struct.unpack_from(fmt, self._data, self._offset)
        self._offset += size
        return values

    def one(self, fmt: str):
        return self.take(fmt)[0]

    def raw(self, size: int) -> bytes:
        if self._offset + size > len(self._data):
            raise ProtocolError(f"{self._what} payload too short: needed {self._offset + size} bytes, "
                                f"got {len(self._data)}")
        chunk = self._data[self._offset:self._offset + size]
        self._offset += size
        return chunk

    def str8(self) -> str:
        return self.raw(self.one("<B")).decode("utf-8", errors="replace")

    def rest(self) -> bytes:
        chunk = self._data[self._offset:]
        self._offset = len(self._data)
        return chunk

    def done(self) -> None:
        if self._offset != len(self._data):
            raise ProtocolError(f"{self._what} payload has {len(self._data) - self._offset} unexpected "
                                f"trailing bytes")


def _str8(text: str) -> bytes:
    encoded = text.encode("utf-8")[:255]
    return bytes([len(encoded)]) + encoded


# --- messages ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    version: int = PROTOCOL_VERSION

    def pack(self) -> bytes:
        return struct.pack("<B", self.version)

    @classmethod
    def unpack(cls, payload: bytes) -> Hello:
        reader = _Reader(payload, "HELLO")
        version = reader.one("<B")
        reader.done()
        return cls(version)


@dataclass(frozen=True)
class TensorSpec:
    dtype: DType
    shape: tuple[int, ...]
    scale: float = 0.0
    zero_point: int = 0

    @cached_property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize

    def pack(self) -> bytes:
        return (struct.pack("<BB", self.dtype, len(self.shape))
                + struct.pack(f"<{len(self.shape)}I", *self.shape)
                + struct.pack("<fi", self.scale, self.zero_point))

    @classmethod
    def read(cls, reader: _Reader) -> TensorSpec:
        dtype_code, ndim = reader.take("<BB")
        if ndim > 8:
            raise ProtocolError(f"tensor rank {ndim} is above the protocol maximum 8")
        try:
            dtype = DType(dtype_code)
        except ValueError:
            raise ProtocolError(f"unknown tensor type code {dtype_code}") from None
        shape = reader.take(f"<{ndim}I")
        scale, zero_point = reader.take("<fi")
        return cls(dtype, tuple(shape), scale, zero_point)


BOARD_VIRTUAL = 1
BOARD_REAL = 0
FLAG_ESP_NN = 0x01
FLAG_ARENA_IN_PSRAM = 0x02
# The device stages the next sample while it runs this one (two cores, two input buffers): the host
# may then keep one whole sample's requests unanswered on top of its usual four frames, since the
# device parses them into the other buffer instead of leaving them in its receive buffer.
FLAG_DOUBLE_BUFFERED = 0x04
# The firmware's interpreter keeps every tensor after an invoke (TFLM `preserve_all_tensors`, the
# debug build): only then does GET_TENSOR answer with data. Without it every GET_TENSOR is answered
# TENSOR_UNAVAILABLE with NO_PRESERVED_TENSORS_TEXT, whatever the index (docs/protocol.md).
FLAG_PRESERVES_TENSORS = 0x08
NO_PRESERVED_TENSORS_TEXT = ("this firmware does not keep intermediate tensors: it was not built with "
                             "preserve_all_tensors (tinyhil's debug build)")


class TensorUnavailable(Exception):
    """Raised by a device runtime's `tensor(index)` when it cannot give that tensor; the device
    engine answers ERROR TENSOR_UNAVAILABLE with `text`."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    @classmethod
    def uncarried_type(cls, index: int, type_code: int) -> TensorUnavailable:
        """A tensor whose TFLite TensorType (int64, bool, ...) has no wire code; worded as the C++
        engine words it when an Inference hands it such a descriptor."""
        return cls(f"tensor {index} has type code {type_code}, which the wire protocol cannot carry")


@dataclass(frozen=True)
class DeviceInfo:
    TYPE: ClassVar[MsgType] = MsgType.DEVICE_INFO
    version: int
    board_kind: int  # BOARD_REAL or BOARD_VIRTUAL: decides "measured" or "estimated"
    cpu_mhz: int
    sram_bytes: int
    psram_bytes: int
    flash_bytes: int
    arena_size: int
    arena_used: int
    max_payload: int
    op_count: int
    flags: int
    chip: str
    firmware_id: str
    model_id: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def is_virtual(self) -> bool:
        return self.board_kind == BOARD_VIRTUAL

    @property
    def latency_kind(self) -> str:
        return "estimated" if self.is_virtual else "measured"

    def pack(self) -> bytes:
        head = struct.pack("<BBHIIIIIHHB", self.version, self.board_kind, self.cpu_mhz, self.sram_bytes,
                           self.psram_bytes, self.flash_bytes, self.arena_size, self.arena_used,
                           self.max_payload, self.op_count, self.flags)
        tensors = bytes([len(self.inputs)]) + b"".join(t.pack() for t in self.inputs)
        tensors += bytes([len(self.outputs)]) + b"".join(t.pack() for t in self.outputs)
        return head + _str8(self.chip) + _str8(self.firmware_id) + _str8(self.model_id) + tensors

    @classmethod
    def unpack(cls, payload: bytes) -> DeviceInfo:
        reader = _Reader(payload, "DEVICE_INFO")
        head = reader.take("<BBHIIIIIHHB")
        chip, firmware_id, model_id = reader.str8(), reader.str8(), reader.str8()
        inputs = tuple(TensorSpec.read(reader) for _ in range(reader.one("<B")))
        outputs = tuple(TensorSpec.read(reader) for _ in range(reader.one("<B")))
        reader.done()
        return cls(*head, chip=chip, firmware_id=firmware_id, model_id=model_id, inputs=inputs,
                   outputs=outputs)


@dataclass(frozen=True)
class GetOps:
    TYPE: ClassVar[MsgType] = MsgType.GET_OPS
    start: int

    def pack(self) -> bytes:
        return struct.pack("<H", self.start)

    @classmethod
    def unpack(cls, payload: bytes) -> GetOps:
        reader = _Reader(payload, "GET_OPS")
        start = reader.one("<H")
        reader.done()
        return cls(start)


@dataclass(frozen=True)
class OpsPage:
    """Names of operators start..start+len(names)-1; the host pages until it has op_count names."""

    TYPE: ClassVar[MsgType] = MsgType.OPS
    start: int
    names: tuple[str, ...]

    def pack(self) -> bytes:
        return struct.pack("<HB", self.start, len(self.names)) + b"".join(_str8(n) for n in self.names)

    @classmethod
    def unpack(cls, payload: bytes) -> OpsPage:
        reader = _Reader(payload, "OPS")
        start, count = reader.take("<HB")
        names = tuple(reader.str8() for _ in range(count))
        reader.done()
        return cls(start, names)


@dataclass(frozen=True)
class InputBegin:
    TYPE: ClassVar[MsgType] = MsgType.INPUT_BEGIN
    tensor: int
    total: int

    def pack(self) -> bytes:
        return struct.pack("<BI", self.tensor, self.total)

    @classmethod
    def unpack(cls, payload: bytes) -> InputBegin:
        if len(payload) == 5:  # the well-formed case without the bounds-checked reader
            return cls(*_U8_U32.unpack(payload))
        reader = _Reader(payload, "INPUT_BEGIN")
        tensor, total = reader.take("<BI")
        reader.done()
        return cls(tensor, total)


@dataclass(frozen=True)
class InputData:
    TYPE: ClassVar[MsgType] = MsgType.INPUT_DATA
    HEADER: ClassVar[int] = 5
    tensor: int
    offset: int
    data: bytes

    def pack(self) -> bytes:
        return struct.pack("<BI", self.tensor, self.offset) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> InputData:
        if len(payload) >= 5:
            tensor, offset = _U8_U32.unpack_from(payload)
            return cls(tensor, offset, payload[5:])
        reader = _Reader(payload, "INPUT_DATA")
        tensor, offset = reader.take("<BI")
        return cls(tensor, offset, reader.rest())


@dataclass(frozen=True)
class Ack:
    """Acknowledges a request; `value` is the number of input bytes the device now holds."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    acked_type: int
    value: int

    def pack(self) -> bytes:
        return struct.pack("<BI", self.acked_type, self.value)

    @classmethod
    def unpack(cls, payload: bytes) -> Ack:
        if len(payload) == 5:
            return cls(*_U8_U32.unpack(payload))
        reader = _Reader(payload, "ACK")
        acked_type, value = reader.take("<BI")
        reader.done()
        return cls(acked_type, value)


INVOKE_PROFILE = 0x01


@dataclass(frozen=True)
class Invoke:
    TYPE: ClassVar[MsgType] = MsgType.INVOKE
    flags: int = INVOKE_PROFILE

    def pack(self) -> bytes:
        return struct.pack("<B", self.flags)

    @classmethod
    def unpack(cls, payload: bytes) -> Invoke:
        if len(payload) == 1:
            return cls(payload[0])
        reader = _Reader(payload, "INVOKE")
        flags = reader.one("<B")
        reader.done()
        return cls(flags)


@dataclass(frozen=True)
class GetTensor:
    """Asks for bytes [offset, ...) of tensor `tensor` of the main subgraph (flatbuffer numbering),
    as the last invoke left it; one TENSOR_DATA (or ERROR) answers it."""

    TYPE: ClassVar[MsgType] = MsgType.GET_TENSOR
    tensor: int
    offset: int = 0

    def pack(self) -> bytes:
        return _U16_U32.pack(self.tensor, self.offset)

    @classmethod
    def unpack(cls, payload: bytes) -> GetTensor:
        reader = _Reader(payload, "GET_TENSOR")
        tensor, offset = reader.take("<HI")
        reader.done()
        return cls(tensor, offset)


@dataclass(frozen=True)
class OutputData:
    TYPE: ClassVar[MsgType] = MsgType.OUTPUT_DATA
    HEADER: ClassVar[int] = 9
    tensor: int
    offset: int
    total: int
    data: bytes

    def pack(self) -> bytes:
        return struct.pack("<BII", self.tensor, self.offset, self.total) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> OutputData:
        if len(payload) >= 9:
            tensor, offset, total = _OUTPUT_HEADER.unpack_from(payload)
            return cls(tensor, offset, total, payload[9:])
        reader = _Reader(payload, "OUTPUT_DATA")
        tensor, offset, total = reader.take("<BII")
        return cls(tensor, offset, total, reader.rest())


@dataclass(frozen=True)
class InvokeResult:
    """Ends an invoke: total time, and per operator (microseconds, CPU cycles) when profiled."""

    TYPE: ClassVar[MsgType] = MsgType.INVOKE_RESULT
    total_us: int
    total_cycles: int
    op_us: tuple[int, ...] = field(default=())
    op_cycles: tuple[int, ...] = field(default=())

    def pack(self) -> bytes:
        count = len(self.op_us)
        return (struct.pack("<IQH", self.total_us, self.total_cycles, count)
                + struct.pack(f"<{count}I", *self.op_us) + struct.pack(f"<{count}I", *self.op_cycles))

    @classmethod
    def unpack(cls, payload: bytes) -> InvokeResult:
        if len(payload) >= 14:
            total_us, total_cycles, count = _RESULT_HEADER.unpack_from(payload)
            if len(payload) == 14 + 8 * count:
                ops = struct.unpack_from(f"<{2 * count}I", payload, 14) if count else ()
                return cls(total_us, total_cycles, tuple(ops[:count]), tuple(ops[count:]))
        reader = _Reader(payload, "INVOKE_RESULT")
        total_us, total_cycles, count = reader.take("<IQH")
        op_us = reader.take(f"<{count}I")
        op_cycles = reader.take(f"<{count}I")
        reader.done()
        return cls(total_us, total_cycles, tuple(op_us), tuple(op_cycles))


@dataclass(frozen=True)
class TensorData:
    """One chunk of a tensor: its bytes [offset, offset + len(data)) of `total`, with the tensor's
    descriptor in every chunk, so that any one answer says what the tensor is."""

    TYPE: ClassVar[MsgType] = MsgType.TENSOR_DATA
    tensor: int
    offset: int
    total: int
    spec: TensorSpec
    data: bytes

    @staticmethod
    def header_size(spec: TensorSpec) -> int:
        """Bytes before the data: tensor, offset, total, and the descriptor."""
        return 10 + 2 + 4 * len(spec.shape) + 8

    def pack(self) -> bytes:
        return _TENSOR_HEADER.pack(self.tensor, self.offset, self.total) + self.spec.pack() + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> TensorData:
        reader = _Reader(payload, "TENSOR_DATA")
        tensor, offset, total = reader.take("<HII")
        spec = TensorSpec.read(reader)
        return cls(tensor, offset, total, spec, reader.rest())


@dataclass(frozen=True)
class ErrorMsg:
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: int
    text: str

    def pack(self) -> bytes:
        return struct.pack("<H", self.code) + _str8(self.text)

    @classmethod
    def unpack(cls, payload: bytes) -> ErrorMsg:
        reader = _Reader(payload, "ERROR")
        code = reader.one("<H")
        text = reader.str8()
        reader.done()
        return cls(code, text)

    @property
    def code_name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"code {self.code}"


MESSAGES: Mapping[int, type] = MappingProxyType({cls.TYPE: cls for cls in (
    Hello, DeviceInfo, GetOps, OpsPage, InputBegin, InputData, Ack, Invoke, GetTensor, OutputData, InvokeResult,
    TensorData, ErrorMsg)})


def decode_message(frame: Frame):
    """The message a frame carries; a ProtocolError names the type when the payload is malformed."""
    cls = MESSAGES.get(frame.type)
    if cls is None:
        raise ProtocolError(f"unknown message type 0x{frame.type:02x}")
    return cls.unpack(frame.payload)


def ops_page_capacity(names: list[str] | tuple[str, ...], start: int, max_payload: int) -> int:
    """How many op names from `start` fit in one OPS payload."""
    used = 3
    count = 0
    for name in names[start:]:
        size = 1 + min(len(name.encode("utf-8")), 255)
        if used + size > max_payload or count == 255:
            break
        used += size
        count += 1
    return count
