"""The host end of the wire protocol over a pyserial port (a real one, a pty, or any URL).

Both board implementations talk through `DeviceLink`, so the virtual board exercises exactly the
code that drives hardware. Every wait has a deadline; a failure names the port, what was
expected, and the last bytes that arrived.
"""

from __future__ import annotations

import collections
import random
import termios
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from .. import protocol as p
from ..errors import BoardError, LinkError, ProtocolError

_TAIL_BYTES = 48
# Longest wait of one read: a deadline is checked at least this often.
_READ_SLICE_S = 0.2
# Requests that may go out together are written in batches of about this many bytes: one write
# (and one pyserial copy) per batch instead of per frame, without holding the first bytes back long.
_WRITE_BATCH_BYTES = 2048
# The ESP32-S3 ROM prints this first after every reset; between frames it means the board rebooted
# and whatever it was doing is lost.
BOOT_BANNER_MARK = b"ESP-ROM:"
# The host's own idle gap: an answer cut off (or bytes thrown away) and then this long without a
# byte is a lost answer, reported at once rather than at the deadline. Longer than the device's,
# because USB-serial bridges hold received bytes back for up to 16 ms.
_ANSWER_GAP_S = 2 * p.IDLE_GAP_S
# One HELLO of a resync waits this long for its DEVICE_INFO before the next is sent (every HELLO
# of the resync counts: a board still finishing an inference answers them all, late).
_RESYNC_TRY_S = 1.0


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
class _Request:
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


class _NoiseEstimate:
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


class DeviceLink:
    def __init__(self, port, *, name: str, timeout_s: float = 5.0, invoke_timeout_s: float = 60.0) -> None:
        self._port = port
        self.name = name
        self.timeout_s = timeout_s
        self.invoke_timeout_s = invoke_timeout_s
        self._decoder_max = p.MAX_PAYLOAD
        self._decoder = p.FrameDecoder(self._decoder_max)
        self._frames: collections.deque[p.Frame] = collections.deque()
        self._tail = bytearray()  # the last _TAIL_BYTES bytes received, for error messages
        # A random start keeps answers to an earlier link's requests (still buffered in the OS or
        # the device after a reset) from matching this link's first requests.
        self._seq = random.randrange(256)
        self._max_payload = p.MAX_PAYLOAD
        self.info: p.DeviceInfo | None = None
        self._last_rx = time.monotonic()  # when the last byte arrived
        self._read_error = ""  # the last failure of the port during a resync, for its message
        # Set-up requests (HELLO, GET_OPS) sent again after a lost or damaged answer; the board adds
        # them to its own count of retries.
        self.retries = 0
        self._noise = _NoiseEstimate()  # losses seen, for the chunk size and window under noise
        self._discard_stale_bytes()

    def _discard_stale_bytes(self) -> None:
        """Drop what an earlier session left in the OS buffers, both ways."""
        for method in ("reset_input_buffer", "reset_output_buffer"):
            try:
                getattr(self._port, method)()
            except (AttributeError, OSError, NotImplementedError, termios.error):
                # Some URL handlers (socket://) cannot flush, and a pty whose device end is gone
                # fails in termios; the sequence numbers still guard, and the read says what broke.
                pass

    @property
    def decode_stats(self) -> p.DecodeStats:
        return self._decoder.stats

    def last_bytes(self) -> str:
        return bytes(self._tail).hex(" ") or "nothing"

    def _where(self) -> str:
        return f"port {self.name}"

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _send(self, message, seq: int, payload: bytes | None = None) -> None:
        self._write(p.encode_frame(message.TYPE, seq, message.pack() if payload is None else payload),
                    message.TYPE.name)

    def _write(self, data: bytes, what: str) -> None:
        try:
            self._port.write(data)
        except Exception as error:  # pyserial raises SerialException/OSError subclasses by backend
            raise LinkError(f"writing {what} failed: {error}", where=self._where()) from error

    def _write_batch(self, batch: list[bytes], first: _Request) -> None:
        """The frames in `batch` (the first of them `first`) in one write; empties it."""
        if len(batch) == 1:
            self._write(batch[0], first.kind.name)
        else:
            self._write(b"".join(batch), f"{first.kind.name} (seq {first.seq}) and {len(batch) - 1} more requests")
        batch.clear()

    def _remember(self, data: bytes) -> None:
        if len(data) >= _TAIL_BYTES:
            self._tail[:] = data[-_TAIL_BYTES:]
        else:
            self._tail += data
            del self._tail[:-_TAIL_BYTES]

    def _read_some(self, timeout: float) -> bytes:
        """What has arrived, waiting up to `timeout` for the first byte when nothing has."""
        port = self._port
        waiting = getattr(port, "in_waiting", 0)
        if waiting:
            return port.read(waiting)
        if port.timeout != timeout:  # pyserial reconfigures the port (tcsetattr) on every set
            port.timeout = timeout
        data = port.read(1)
        if data:
            # The rest of what arrived with the first byte, in the same pass.
            waiting = getattr(port, "in_waiting", 0)
            if waiting:
                data += port.read(waiting)
        return data

    def _corruptions(self) -> int:
        stats = self._decoder.stats
        return stats.crc_errors + stats.header_errors + stats.oversize

    def _receive_frame(self, deadline: float, expected: str, *, idle_fails: bool = False,
                       recovering: bool = False) -> p.Frame | None:
        """The next frame. `idle_fails`: an answer cut off, or bytes thrown away, and then the
        host's idle gap without a byte, fail the exchange at once (the device's answers come in
        one stream, so the rest of that answer is lost). `recovering`: the caller recovers by
        itself, so a cut answer returns None and a corrupted frame is no failure."""
        corruptions = self._corruptions()
        while not self._frames:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise LinkError(f"expected {expected}, nothing complete arrived in time; last bytes: "
                                f"{self.last_bytes()}", where=self._where())
            slice_s = _READ_SLICE_S
            if idle_fails and self._decoder.damaged:
                silent = now - self._last_rx
                if silent >= _ANSWER_GAP_S:
                    held = self._decoder.expire()
                    if recovering:
                        return None
                    raise LinkError(f"expected {expected}; an answer was cut off ({held} bytes held, then "
                                    f"{silent * 1000:.0f} ms without a byte); last bytes: {self.last_bytes()}",
                                    where=self._where())
                slice_s = _ANSWER_GAP_S - silent
            try:
                data = self._read_some(min(slice_s, remaining))
            except Exception as error:
                raise LinkError(f"reading while waiting for {expected} failed: {error}; last bytes: "
                                f"{self.last_bytes()}", where=self._where()) from error
            if data:
                self._last_rx = time.monotonic()
                window = self._tail[-len(BOOT_BANNER_MARK):] + data
                self._remember(data)
                self._frames.extend(self._decoder.feed(data))
                if BOOT_BANNER_MARK in window:
                    # Whatever decoded alongside the banner is either from before the reset or an
                    # answer of the rebooted board to requests it only half saw: neither can finish
                    # this exchange.
                    self._frames.clear()
                    raise LinkError(f"board reset while waiting for {expected}: its ROM boot banner arrived; "
                                    f"last bytes: {self.last_bytes()}", where=self._where())
                if self._corruptions() != corruptions and not self._frames and not recovering:
                    # A frame failed its checks: most likely the answer being waited for, so say so now
                    # rather than at the deadline.
                    raise LinkError(f"a corrupted frame arrived while waiting for {expected}; last bytes: "
                                    f"{self.last_bytes()}", where=self._where())
        return self._frames.popleft()

    def _await(self, seq: int, expected: type, deadline: float):
        """The next message for request `seq`; frames of earlier requests are stale and skipped."""
        name = expected.TYPE.name
        while True:
            frame = self._receive_frame(deadline, name, idle_fails=True)
            if frame.seq != seq:
                continue
            try:
                message = p.decode_message(frame)
            except ProtocolError as error:
                raise ProtocolError(f"expected {name}: {error}; last bytes: {self.last_bytes()}",
                                    where=self._where()) from error
            if isinstance(message, p.ErrorMsg):
                if message.code == p.ErrorCode.BAD_FRAME:
                    raise LinkError(f"the board lost a request: {message.text}", where=self._where())
                raise DeviceError(f"board reported {message.code_name}: {message.text}", code=message.code,
                                  code_name=message.code_name, where=self._where())
            if not isinstance(message, expected):
                raise ProtocolError(f"expected {name}, got {type(message).TYPE.name}; last bytes: "
                                    f"{self.last_bytes()}", where=self._where())
            return message

    def request(self, message, expected: type, timeout_s: float | None = None):
        seq = self._next_seq()
        self._send(message, seq)
        return self._await(seq, expected, time.monotonic() + (timeout_s or self.timeout_s))

    def _settle(self) -> None:
        """Before a request is sent again: the link silent for RESYNC_SILENCE_S, so the device has
        dropped whatever part of a frame it holds, and what arrived meanwhile set aside."""
        self.retries += 1
        until = time.monotonic() + p.RESYNC_SILENCE_S
        while (remaining := until - time.monotonic()) > 0:
            try:
                data = self._read_some(min(_READ_SLICE_S, remaining))
            except Exception as error:
                raise LinkError(f"reading the port failed: {error}", where=self._where()) from error
            if data:
                self._remember(data)
                self._decoder.feed(data)
        self._decoder.expire()
        self._frames.clear()

    def handshake(self, attempts: int = 3) -> p.DeviceInfo:
        """HELLO until the device answers; a board still booting may miss the first one."""
        last_error: LinkError | None = None
        for attempt in range(attempts):
            if attempt:
                self._settle()
            try:
                info = self.request(p.Hello(), p.DeviceInfo)
            except DeviceError:
                raise
            except LinkError as error:
                last_error = error
                continue
            self.info = info
            self._max_payload = min(p.MAX_PAYLOAD, info.max_payload)
            return info
        assert last_error is not None
        raise LinkError(f"no answer to HELLO after {attempts} tries of {self.timeout_s:g} s (is the board "
                        f"running tinyhil firmware?); last bytes: {self.last_bytes()}", where=self._where())

    def resync(self, budget_s: float) -> p.DeviceInfo:
        """After a failed exchange: forget what is in flight and handshake again, for as long as
        `budget_s` allows (a board that reset or dropped off the bus takes a while to answer).

        Before each HELLO the host keeps the link silent for RESYNC_SILENCE_S, twice the device's
        idle gap, so a device left holding part of a frame has dropped it and reads the HELLO as a
        HELLO (docs/protocol.md, "Idle gap"). A DEVICE_INFO answering any HELLO of this resync
        ends it; a HELLO lost on the way costs one try of _RESYNC_TRY_S, not a full timeout."""
        started = time.monotonic()
        deadline = started + budget_s
        self._discard_stale_bytes()
        self._frames.clear()
        self._decoder = p.FrameDecoder(self._decoder_max, stats=self._decoder.stats)
        sent: set[int] = set()
        self._read_error = ""
        while True:
            info = self._await_resync_answer(sent, time.monotonic() + p.RESYNC_SILENCE_S, silence=True)
            if info is None:
                seq = self._next_seq()
                sent.add(seq)
                try:
                    self._send(p.Hello(), seq)
                except LinkError as error:
                    self._read_error = error.message
                info = self._await_resync_answer(sent, min(deadline, time.monotonic() + min(_RESYNC_TRY_S, self.timeout_s)))
            if info is not None:
                self.info = info
                self._max_payload = min(p.MAX_PAYLOAD, info.max_payload)
                return info
            if time.monotonic() >= deadline:
                port_error = f"; the port failed: {self._read_error}" if self._read_error else ""
                raise LinkError(f"no answer to HELLO after {len(sent)} tries in {time.monotonic() - started:.1f} s "
                                f"(is the board running tinyhil firmware?){port_error}; last bytes: "
                                f"{self.last_bytes()}", where=self._where())

    def _await_resync_answer(self, seqs: set[int], until: float, *, silence: bool = False) -> p.DeviceInfo | None:
        """The DEVICE_INFO answering one of the HELLOs `seqs`, if it arrives before `until`. Anything
        else (boot banners, answers to abandoned requests, damaged frames) is what a resync expects
        to wade through. Unless this is the `silence` before a HELLO, None comes early when the
        HELLO or its answer was lost: the device reports a lost frame (ERROR BAD_FRAME), or an
        answer was cut off and the line stayed idle for the host's gap."""
        while True:
            while self._frames:
                frame = self._frames.popleft()
                try:
                    message = p.decode_message(frame)
                except ProtocolError:
                    continue
                if isinstance(message, p.ErrorMsg) and message.code == p.ErrorCode.BAD_FRAME:
                    if not silence:
                        return None
                    continue
                if frame.seq not in seqs:
                    continue
                if isinstance(message, p.DeviceInfo):
                    return message
                if isinstance(message, p.ErrorMsg):
                    raise DeviceError(f"board reported {message.code_name}: {message.text}", code=message.code,
                                      code_name=message.code_name, where=self._where())
            now = time.monotonic()
            remaining = until - now
            if remaining <= 0:
                return None
            if not silence and self._decoder.damaged and now - self._last_rx >= _ANSWER_GAP_S:
                self._decoder.expire()
                return None
            try:
                data = self._read_some(min(_READ_SLICE_S, remaining))
            except Exception as error:
                # A port that fails now may be back within the budget (a board that re-enumerates);
                # the resync's deadline decides, and its message names this error.
                self._read_error = f"{type(error).__name__}: {error}"
                time.sleep(min(0.05, remaining))
                continue
            if data:
                self._last_rx = time.monotonic()
                self._remember(data)
                self._frames.extend(self._decoder.feed(data))

    def op_names(self, attempts: int = 8) -> tuple[str, ...]:
        """The model's operator names, page by page; a page lost on the way is asked for again, up
        to `attempts` times (GET_OPS changes nothing on the device)."""
        info = self._require_info()
        names: list[str] = []
        while len(names) < info.op_count:
            for attempt in range(attempts):
                if attempt:
                    self._settle()
                try:
                    page = self.request(p.GetOps(len(names)), p.OpsPage)
                    break
                except DeviceError:
                    raise
                except (LinkError, ProtocolError):
                    if attempt + 1 == attempts:
                        raise
            if page.start != len(names) or not page.names:
                raise ProtocolError(f"OPS page starts at {page.start} with {len(page.names)} names, expected "
                                    f"names from {len(names)}", where=self._where())
            names.extend(page.names)
        return tuple(names[:info.op_count])

    def _require_info(self) -> p.DeviceInfo:
        if self.info is None:
            raise BoardError("no handshake yet: call handshake() first", where=self._where())
        return self.info

    def _drain_idle_bytes(self) -> None:
        """What arrived while no request was out (a reboot banner, late answers to abandoned
        requests) belongs to no exchange: read it off before starting one."""
        try:
            waiting = getattr(self._port, "in_waiting", 0)
            stale = self._port.read(waiting) if waiting else b""
        except Exception as error:  # pyserial raises SerialException/OSError subclasses by backend
            raise LinkError(f"reading the port failed: {error}", where=self._where()) from error
        if stale:
            self._remember(stale)
            self._decoder.feed(stale)
        # Whatever stale bytes left half-decoded belongs to no exchange either.
        self._decoder.expire()
        self._frames.clear()

    def infer(self, inputs: Sequence[bytes], *, profile: bool = True) -> RawInference:
        return next(self.infer_many([inputs], profile=profile))

    def _default_window(self, samples: Sequence[Sequence[bytes]]) -> int:
        """Four full frames: what the firmware's receive buffer holds while it cannot parse. A
        double-buffered device also parses a whole next sample into its second input buffer while
        it runs this one; without the extra room its held-back ACKs would stall that upload."""
        frames = 4 * (self._max_payload + p.FRAME_OVERHEAD)
        info = self._require_info()
        if not samples or not info.flags & p.FLAG_DOUBLE_BUFFERED:
            return frames
        chunk = self._max_payload - p.InputData.HEADER
        sample = 2 * p.FRAME_OVERHEAD + 1  # INVOKE
        for data in samples[0]:
            sample += 5 + p.FRAME_OVERHEAD + len(data) + (-(-len(data) // chunk)) * (p.InputData.HEADER + p.FRAME_OVERHEAD)
        return frames + sample

    def infer_many(self, samples: Sequence[Sequence[bytes]], *, profile: bool = True,
                   window_bytes: int | None = None) -> Iterator[RawInference]:
        """Results of `samples`, in order, with the link kept busy.

        Requests go out without waiting for each answer, as long as the bytes not yet answered
        stay within `window_bytes` (default: four full frames, what the firmware's receive buffer
        holds while it runs an inference, plus one whole sample on a double-buffered device), so the
        next sample's upload overlaps this one's inference and answers. The device answers in
        order; every answer is matched to its request by sequence number.

        A lost or damaged frame is recovered inside the sample (docs/protocol.md, "Recovery inside
        a sample"): the upload goes on from the bytes the device holds, a lost INVOKE answer gets
        the sample uploaded and invoked again, and the chunk size and window shrink while the link
        is noisy. A reset or silence raises LinkError (the board then resyncs and reruns); the
        results already yielded stand."""
        info = self._require_info()
        for inputs in samples:
            if len(inputs) != len(info.inputs):
                raise BoardError(f"model takes {len(info.inputs)} inputs, got {len(inputs)}", where=self._where())
        self._drain_idle_bytes()
        yield from _Exchange(self, samples, profile, window_bytes or self._default_window(samples)).run()

    def _probe_request(self) -> p.GetOps:
        """A request that changes nothing and is answered in order: its answer proves that every
        earlier request was answered (or its answer lost)."""
        return p.GetOps(self._require_info().op_count)


class _Exchange:
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
        self.outstanding: collections.deque[_Request] = collections.deque()
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
        first: _Request | None = None
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
            record = _Request(seq, kind, self.cursor.sample, tensor, offset, end, frame_bytes)
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
        record = _Request(seq, p.MsgType.GET_OPS, _PROBE, -1, 0, 0, len(payload) + p.FRAME_OVERHEAD)
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
            raise LinkError(f"sample {self.done}: {count - 1} recoveries without a result (last: {why}); "
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

    def _lost(self, item: _Request) -> None:
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

    def _pop(self) -> _Request:
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

    def _on_error(self, item: _Request, message: p.ErrorMsg) -> None:
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

    def _on_invoke_answer(self, item: _Request, message) -> RawInference | None:
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
                # shows which requests are still to be answered.
                link._noise.loss()
                self._send_probe()
                continue
            result = self._on_frame(frame)
            if result is not None:
                yield result
