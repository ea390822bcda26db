"""Recovery inside a sample: the host side of one pipelined run of samples over a `DeviceLink`.

`DeviceLink.infer_many` hands its samples to an `Exchange`, which keeps the link busy with requests,
matches answers to them by sequence number, and recovers a lost or damaged frame without leaving
the sample (go-back-N from the bytes the device holds; docs/protocol.md, "Recovery inside a
sample"). What it cannot recover it raises as LinkError, and the board falls back to resync and a
rerun. The link's own framing, reads and writes stay in link.py.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import protocol as p
from ..errors import BoardError, LinkError, ProtocolError

if TYPE_CHECKING:
    from .link import DeviceLink

# Requests that may go out together are written in batches of about this many bytes: one write
# (and one pyserial copy) per batch instead of per frame, without holding the first bytes back long.
_WRITE_BATCH_BYTES = 2048

# Recovery inside a sample (docs/protocol.md): requests in flight at most (seq numbers are 8 bits;
# abandoned requests keep theirs until answered or known lost, so no two in flight share one).
_MAX_IN_FLIGHT = 128
# Recoveries of one sample before the exchange fails and the board falls back to resync and rerun.
_MAX_RECOVERIES = 200
# Smallest INPUT_DATA chunk the host sends under noise: below it the frame overhead dominates.
_MIN_CHUNK = 32
# Bytes of frame and answer that each chunk costs besides its data (request framing, INPUT_DATA
# header, the ACK frame): the chunk size that carries most data at a loss rate r is about
# sqrt(_CHUNK_COST / r).
_CHUNK_COST = p.FRAME_OVERHEAD + p.InputData.HEADER + p.FRAME_OVERHEAD + 5
_PROBE = -1  # the sample index of a probe request (GET_OPS at op_count: an empty OPS page)


@dataclass(slots=True)
class Request:
    """One request in flight; `live` False once a recovery went back before it (its answer, when
    it comes, is read and ignored)."""

    seq: int
    kind: p.MsgType
    sample: int
    tensor: int
    offset: int
    end: int
    frame_bytes: int
    live: bool = True

    def position(self, n_tensors: int) -> tuple[int, int, int, int]:
        """Where the request stands in the sample stream, for going back to a point in it."""
        if self.kind == p.MsgType.INPUT_BEGIN:
            return (self.sample, self.tensor, 0, 0)
        if self.kind == p.MsgType.INPUT_DATA:
            return (self.sample, self.tensor, 1, self.offset)
        return (self.sample, n_tensors, 0, 0)


@dataclass(slots=True)
class _Upload:
    """What the device confirmed of one sample's upload, this attempt."""

    begun: list[bool]   # INPUT_BEGIN acknowledged, per tensor
    held: list[int]     # bytes the device said it holds, per tensor
    invoked: bool = False


@dataclass(slots=True)
class _Cursor:
    """The next request to send: INPUT_BEGIN of `tensor` (begin), INPUT_DATA from `offset`, or the
    INVOKE once `tensor` == number of inputs."""

    sample: int = 0
    tensor: int = 0
    begin: bool = True
    offset: int = 0


class NoiseEstimate:
    """Losses per byte sent, decayed so the estimate follows the link: small chunks and a short
    window under noise, max_payload and the full window once the link is clean again."""

    _HORIZON = 1 << 18

    def __init__(self) -> None:
        self.bytes = float(self._HORIZON)
        self.losses = 0.0

    def sent(self, count: int) -> None:
        self.bytes += count
        if self.bytes > 2 * self._HORIZON:
            self.bytes /= 2
            self.losses /= 2

    def loss(self) -> None:
        self.losses += 1

    def chunk(self, largest: int) -> int:
        if self.losses < 0.5:
            return largest
        return max(_MIN_CHUNK, min(largest, int((_CHUNK_COST * self.bytes / self.losses) ** 0.5)))

    def window(self, largest: int, chunk: int) -> int:
        if self.losses < 0.5:
            return largest
        # About one loss per window: going back costs what is in flight.
        return max(3 * (chunk + _CHUNK_COST), min(largest, int(self.bytes / self.losses)))


@dataclass(frozen=True)
class RawInference:
    outputs: tuple[bytes, ...]
    total_us: int
    total_cycles: int
    op_us: tuple[int, ...]
    op_cycles: tuple[int, ...]


class DeviceError(BoardError):
    """The device answered a request with an ERROR frame."""

    def __init__(self, message: str, *, code: int, code_name: str, where: str = "") -> None:
        super().__init__(message, where=where)
        self.code = code
        self.code_name = code_name


class Exchange:
    """One pipelined run of samples with go-back-N recovery (docs/protocol.md). The device answers
    requests in order, so an answer to a later request means the earlier ones' answers are lost;
    the ACK of a chunk says how many bytes the device holds, which is where the upload resumes.

    Results are only ever taken from the answers to a live INVOKE of a sample whose every
    INPUT_BEGIN was acknowledged in this attempt: the device then held nothing but this attempt's
    chunks of this sample (nothing else was sent between them), so a result cannot belong to
    another input."""

    def __init__(self, link: DeviceLink, samples: Sequence[Sequence[bytes]], profile: bool, window: int) -> None:
        self.link = link
        self.samples = samples
        self.flags = p.INVOKE_PROFILE if profile else 0
        self.window = window
        info = link._require_info()
        self.n_tensors = len(info.inputs)
        self.outputs = [bytearray(spec.nbytes) for spec in info.outputs]
        self.filled = [0] * len(self.outputs)
        self.outstanding: collections.deque[Request] = collections.deque()
        self.unanswered = 0
        self.cursor = _Cursor()
        self.uploads: dict[int, _Upload] = {}
        self.recoveries: dict[int, int] = {}
        self.done = 0
        self.largest_chunk = link._max_payload - p.InputData.HEADER

    # --- sending --------------------------------------------------------------------------------

    def _next_request(self, chunk: int, noisy: bool):
        """The message at the cursor and its record fields, or None when nothing may go yet."""
        cursor = self.cursor
        if cursor.sample >= len(self.samples):
            return None
        inputs = self.samples[cursor.sample]
        if cursor.tensor == self.n_tensors:
            upload = self.uploads.get(cursor.sample)
            # Under noise the INVOKE waits until the upload is confirmed, so a lost chunk is
            # resumed from the bytes held instead of costing the whole sample.
            if noisy and (upload is None or not self._confirmed(cursor.sample, upload)):
                return None
            return p.Invoke(self.flags), p.MsgType.INVOKE, -1, 0, 0
        data = inputs[cursor.tensor]
        if cursor.begin:
            return p.InputBegin(cursor.tensor, len(data)), p.MsgType.INPUT_BEGIN, cursor.tensor, 0, 0
        # At the end of a tensor (only under noise, see _advance) an empty chunk: its ACK says at
        # once whether the last chunks arrived, instead of the device's idle gap saying so later.
        end = min(len(data), cursor.offset + chunk)
        return (p.InputData(cursor.tensor, cursor.offset, data[cursor.offset:end]), p.MsgType.INPUT_DATA,
                cursor.tensor, cursor.offset, end)

    def _advance(self, kind: p.MsgType, offset: int, end: int, noisy: bool) -> None:
        cursor = self.cursor
        if kind == p.MsgType.INVOKE:
            self.uploads[cursor.sample].invoked = True
            self.cursor = _Cursor(cursor.sample + 1)
            return
        if kind == p.MsgType.INPUT_BEGIN:
            if cursor.tensor == 0 or cursor.sample not in self.uploads:
                self.uploads[cursor.sample] = _Upload([False] * self.n_tensors, [0] * self.n_tensors)
            upload = self.uploads[cursor.sample]
            upload.begun[cursor.tensor] = False  # until this INPUT_BEGIN's own ACK
            upload.held[cursor.tensor] = 0
            cursor.begin = False
            cursor.offset = 0
        else:
            cursor.offset = end
        total = len(self.samples[cursor.sample][cursor.tensor])
        if noisy and total and kind == p.MsgType.INPUT_DATA and end > offset:
            return  # the empty chunk at the end comes next
        if cursor.offset >= total:
            cursor.tensor += 1
            cursor.begin = True
            cursor.offset = 0

    def _send_what_fits(self) -> None:
        link = self.link
        noise = link._noise
        chunk = noise.chunk(self.largest_chunk)
        noisy = chunk < self.largest_chunk
        window = noise.window(self.window, chunk)
        batch: list[bytes] = []
        first: Request | None = None
        batch_bytes = 0
        while len(self.outstanding) < _MAX_IN_FLIGHT:
            request = self._next_request(chunk, noisy)
            if request is None:
                break
            message, kind, tensor, offset, end = request
            payload = message.pack()
            frame_bytes = len(payload) + p.FRAME_OVERHEAD
            if self.outstanding and self.unanswered + frame_bytes > window:
                break
            seq = link._next_seq()
            record = Request(seq, kind, self.cursor.sample, tensor, offset, end, frame_bytes)
            batch.append(p.encode_frame(kind, seq, payload))
            first = first or record
            self.outstanding.append(record)
            self.unanswered += frame_bytes
            batch_bytes += frame_bytes
            noise.sent(frame_bytes)
            self._advance(kind, offset, end, noisy)
            if batch_bytes >= _WRITE_BATCH_BYTES:
                link._write_batch(batch, first)
                batch_bytes = 0
                first = None
        if batch:
            link._write_batch(batch, first)
        if not any(item.live for item in self.outstanding):
            self._unstick()

    def _unstick(self) -> None:
        """Nothing live is in flight, so no answer will move things on: an upload whose last
        chunks' ACKs were lost goes on from the bytes confirmed, and a window full of abandoned
        requests gets a probe, whose answer shows which of them are gone."""
        cursor = self.cursor
        upload = self.uploads.get(cursor.sample)
        if (cursor.tensor == self.n_tensors and upload is not None and not upload.invoked
                and not self._confirmed(cursor.sample, upload)):
            why = "the last ACKs of an upload were lost"
            for tensor in range(self.n_tensors):
                if not upload.begun[tensor]:
                    self._rewind_to_begin(cursor.sample, why)
                    break
                if upload.held[tensor] < len(self.samples[cursor.sample][tensor]):
                    self._rewind_to_data(cursor.sample, tensor, upload.held[tensor], why)
                    break
            self._send_what_fits()
            return
        if self.outstanding and self.done < len(self.samples):
            self._send_probe()

    def _send_probe(self) -> None:
        link = self.link
        seq = link._next_seq()
        payload = link._probe_request().pack()
        record = Request(seq, p.MsgType.GET_OPS, _PROBE, -1, 0, 0, len(payload) + p.FRAME_OVERHEAD)
        self.outstanding.append(record)
        self.unanswered += record.frame_bytes
        link._write(p.encode_frame(p.MsgType.GET_OPS, seq, payload), "GET_OPS (probe)")

    # --- going back -----------------------------------------------------------------------------

    def _recovered(self, sample: int, why: str) -> None:
        link = self.link
        link.retries += 1
        link._noise.loss()
        count = self.recoveries.get(sample, 0) + 1
        self.recoveries[sample] = count
        if count > _MAX_RECOVERIES:
            raise LinkError(f"sample {sample}: {count - 1} recoveries without a result (last: {why}); "
                            f"last bytes: {link.last_bytes()}", where=link._where())

    def _abandon_from(self, position: tuple[int, int, int, int]) -> None:
        for item in self.outstanding:
            if item.live and item.sample != _PROBE and item.position(self.n_tensors) >= position:
                item.live = False

    def _rewind_to_begin(self, sample: int, why: str = "") -> None:
        if why:
            self._recovered(sample, why)
        self._abandon_from((sample, 0, 0, 0))
        for later in [key for key in self.uploads if key >= sample]:
            del self.uploads[later]
        self.cursor = _Cursor(sample)
        if sample == self.done:
            self.filled = [0] * len(self.outputs)

    def _rewind_to_data(self, sample: int, tensor: int, offset: int, why: str = "") -> None:
        if why:
            self._recovered(sample, why)
        self._abandon_from((sample, tensor, 1, offset))
        self.cursor = _Cursor(sample, tensor, False, offset)

    def _lost(self, item: Request) -> None:
        """`item` is live and will get no answer: its request or its answer was lost."""
        if item.kind == p.MsgType.INPUT_BEGIN:
            self._rewind_to_begin(item.sample, "an INPUT_BEGIN or its ACK was lost")
        elif item.kind == p.MsgType.INVOKE:
            self._rewind_to_begin(item.sample, "an INVOKE or its answer was lost")
        # A chunk or its ACK: a later ACK says what the device holds (or _unstick asks again).

    def _confirmed(self, sample: int, upload: _Upload) -> bool:
        inputs = self.samples[sample]
        return all(upload.begun[t] and upload.held[t] >= len(inputs[t]) for t in range(self.n_tensors))

    # --- answers --------------------------------------------------------------------------------

    def _pop(self) -> Request:
        item = self.outstanding.popleft()
        self.unanswered -= item.frame_bytes
        return item

    def _all_lost(self) -> None:
        """The device reported a lost frame after its idle gap: it answered everything it got
        before, so every request still without an answer is gone."""
        while self.outstanding:
            item = self._pop()
            if item.live:
                self._lost(item)
        self.link._noise.loss()

    def _on_frame(self, frame: p.Frame) -> RawInference | None:
        if frame.type == p.MsgType.ERROR and frame.payload[:2] == bytes((p.ErrorCode.BAD_FRAME, 0)):
            self._all_lost()
            return None
        index = next((i for i, item in enumerate(self.outstanding) if item.seq == frame.seq), -1)
        if index < 0:
            return None  # an answer to a request of an earlier exchange
        for _ in range(index):
            item = self._pop()
            if item.live:
                self._lost(item)
        item = self.outstanding[0]
        try:
            message = p.decode_message(frame)
        except ProtocolError:
            message = None
        final = item.kind != p.MsgType.INVOKE or not isinstance(message, p.OutputData)
        if not item.live:
            if final:
                self._pop()
            return None
        if final:
            self._pop()
        if isinstance(message, p.ErrorMsg):
            return self._on_error(item, message)
        if item.sample == _PROBE:
            return None
        if item.kind == p.MsgType.INVOKE:
            return self._on_invoke_answer(item, message)
        if not isinstance(message, p.Ack) or message.acked_type != item.kind:
            self._rewind_to_begin(item.sample, f"expected an ACK of {item.kind.name}, got {message}")
            return None
        upload = self.uploads.get(item.sample)
        assert upload is not None  # a live request's sample has its upload record
        if item.kind == p.MsgType.INPUT_BEGIN:
            if message.value != 0:
                self._rewind_to_begin(item.sample, f"INPUT_BEGIN acknowledged holding {message.value} bytes")
            else:
                upload.begun[item.tensor] = True
            return None
        held = message.value
        if not upload.begun[item.tensor]:
            # Without the INPUT_BEGIN's ACK the bytes held may be another upload's.
            self._rewind_to_begin(item.sample, "a chunk was acknowledged before its INPUT_BEGIN")
        elif held >= item.end:
            upload.held[item.tensor] = max(upload.held[item.tensor], held)
            cursor = self.cursor
            if (cursor.sample, cursor.tensor) == (item.sample, item.tensor) and not cursor.begin and cursor.offset < held:
                self._rewind_to_data(item.sample, item.tensor, held)  # skip what the device already holds
        elif held < item.offset and not upload.invoked:
            self._rewind_to_data(item.sample, item.tensor, held, f"a chunk before offset {item.offset} was lost")
        else:
            self._rewind_to_begin(item.sample, f"a chunk at {item.offset} was acknowledged holding {held} bytes")
        return None

    def _on_error(self, item: Request, message: p.ErrorMsg) -> None:
        link = self.link
        if item.sample == _PROBE:
            raise DeviceError(f"board reported {message.code_name}: {message.text}", code=message.code,
                              code_name=message.code_name, where=link._where())
        if message.code in (p.ErrorCode.NOT_READY, p.ErrorCode.BAD_PAYLOAD):
            # A lost frame explains it: the upload was incomplete, or a request arrived damaged.
            self._rewind_to_begin(item.sample, f"board reported {message.code_name}: {message.text}")
            return None
        raise DeviceError(f"board reported {message.code_name}: {message.text}", code=message.code,
                          code_name=message.code_name, where=link._where())

    def _on_invoke_answer(self, item: Request, message) -> RawInference | None:
        upload = self.uploads.get(item.sample)
        if item.sample != self.done or upload is None or not all(upload.begun):
            self._rewind_to_begin(item.sample, "an INVOKE answered for an upload not confirmed")
            return None
        if isinstance(message, p.OutputData):
            if not self._store_output(message):
                self._pop()  # the rest of this answer is of no use
                self._rewind_to_begin(item.sample, f"OUTPUT_DATA out of place: {message.tensor} at {message.offset}")
            return None
        if not isinstance(message, p.InvokeResult):
            self._rewind_to_begin(item.sample, f"expected OUTPUT_DATA or INVOKE_RESULT, got {message}")
            return None
        if any(self.filled[i] != len(buffer) for i, buffer in enumerate(self.outputs)):
            self._rewind_to_begin(item.sample, "INVOKE_RESULT arrived before all of the outputs")
            return None
        result = RawInference(tuple(bytes(b) for b in self.outputs), message.total_us, message.total_cycles,
                              message.op_us, message.op_cycles)
        self.filled = [0] * len(self.outputs)
        del self.uploads[item.sample]
        self.recoveries.pop(item.sample, None)
        self.done += 1
        return result

    def _store_output(self, chunk: p.OutputData) -> bool:
        if chunk.tensor >= len(self.outputs):
            return False
        buffer = self.outputs[chunk.tensor]
        end = chunk.offset + len(chunk.data)
        if chunk.total != len(buffer) or end > len(buffer) or chunk.offset != self.filled[chunk.tensor]:
            return False
        buffer[chunk.offset:end] = chunk.data
        self.filled[chunk.tensor] = end
        return True

    def run(self) -> Iterator[RawInference]:
        link = self.link
        while self.done < len(self.samples):
            self._send_what_fits()
            live = next((item for item in self.outstanding if item.live), None)
            waiting_for_invoke = live is not None and live.kind == p.MsgType.INVOKE
            timeout = link.invoke_timeout_s if waiting_for_invoke else link.timeout_s
            expected = "OUTPUT_DATA or INVOKE_RESULT" if waiting_for_invoke else "ACK"
            frame = link._receive_frame(time.monotonic() + timeout, expected, idle_fails=True, recovering=True)
            if frame is None:
                # An answer was cut off and the line went quiet: whatever it was, a probe's answer
                # shows which requests are still to be answered. It counts against the sample
                # being waited for, like every recovery.
                self._recovered(self.done, "an answer was cut off, then silence")
                self._send_probe()
                continue
            result = self._on_frame(frame)
            if result is not None:
                yield result
