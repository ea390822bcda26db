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
from typing import Iterator, Sequence

from .. import protocol as p
from ..errors import BoardError, LinkError, LinkTimeoutError, ProtocolError
from .exchange import DeviceError, Exchange, NoiseEstimate, RawInference, Request

_TAIL_BYTES = 48
# Longest wait of one read: a deadline is checked at least this often.
_READ_SLICE_S = 0.2
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
# One chunk of GET_TENSOR is asked for this many times before the read fails: losses are rare, and
# each costs a RESYNC_SILENCE_S settle before the request goes out again.
_TENSOR_ATTEMPTS = 8


class TensorUnavailableError(DeviceError):
    """The board cannot give a tensor (ERROR TENSOR_UNAVAILABLE): its firmware does not keep
    intermediate tensors, or the tensor's type has no wire code."""


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
        self._noise = NoiseEstimate()  # losses seen, for the chunk size and window under noise
        # The device's tensors are those of the last sample of the last exchange, once that exchange
        # has delivered every result: before that, another invoke may still be in flight.
        self._tensors_ready = False
        self._resets = 0  # ROM boot banners seen: a reset takes the device's tensors with it
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

    def _write_batch(self, batch: list[bytes], first: Request) -> None:
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
                raise LinkTimeoutError(f"expected {expected}, nothing complete arrived in time; last bytes: "
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
                    self._resets += 1
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
                if BOOT_BANNER_MARK in self._tail[-len(BOOT_BANNER_MARK):] + data:
                    self._resets += 1
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
            self._tensors_ready = False
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
                self._tensors_ready = False
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
        self._tensors_ready = False
        exchange = Exchange(self, samples, profile, window_bytes or self._default_window(samples)).run()
        for count, result in enumerate(exchange, 1):
            # Requests are answered in order and every one of them was sent before the last
            # sample's INVOKE was answered: after its result the device runs nothing more.
            self._tensors_ready = count == len(samples)
            yield result

    def _probe_request(self) -> p.GetOps:
        """A request that changes nothing and is answered in order: its answer proves that every
        earlier request was answered (or its answer lost)."""
        return p.GetOps(self._require_info().op_count)

    def read_tensor(self, index: int) -> tuple[p.TensorSpec, bytes]:
        """Tensor `index` of the model's main subgraph (flatbuffer numbering) as the last invoke
        left it, read with GET_TENSOR chunk after chunk (docs/protocol.md, "Intermediate tensors")."""
        return self.read_tensors([index])[index]

    def read_tensors(self, indices: Sequence[int]) -> dict[int, tuple[p.TensorSpec, bytes]]:
        """Tensors `indices` of the last invoke, each with its descriptor; only after infer_many
        has delivered its last result (the device then runs nothing more) and before the next one.

        A chunk whose request or answer is lost or damaged is asked for again, after the link was
        silent long enough for the device to drop a cut frame. Raises TensorUnavailableError when
        the firmware cannot give a tensor (not a preserve_all_tensors build, or a type without a
        wire code), DeviceError for the board's other errors (an index past the model's tensors),
        LinkError when a chunk does not arrive intact in _TENSOR_ATTEMPTS requests or the board
        resets meanwhile (its tensors are then gone)."""
        self._require_info()
        if not self._tensors_ready:
            raise BoardError("the board's tensors are read after an inference: run one (infer or infer_many "
                             "to its last result) first; a reset or a new handshake loses them", where=self._where())
        self._drain_idle_bytes()
        tensors: dict[int, tuple[p.TensorSpec, bytes]] = {}
        for index in indices:
            if index not in tensors:
                tensors[index] = self._read_one_tensor(index)
        return tensors

    def _read_one_tensor(self, index: int) -> tuple[p.TensorSpec, bytes]:
        if not 0 <= index <= 0xFFFF:
            raise BoardError(f"tensor index {index} is outside the protocol's u16 range", where=self._where())
        data = bytearray()
        first: p.TensorData | None = None
        while True:
            chunk = self._tensor_chunk(index, len(data))
            if first is None:
                if chunk.total != chunk.spec.nbytes:
                    raise ProtocolError(f"TENSOR_DATA of tensor {index} says {chunk.total} bytes, its descriptor "
                                        f"{chunk.spec.dtype.numpy_name}{list(chunk.spec.shape)} takes "
                                        f"{chunk.spec.nbytes}; last bytes: {self.last_bytes()}", where=self._where())
                first = chunk
            elif (chunk.total, chunk.spec) != (first.total, first.spec):
                raise ProtocolError(f"TENSOR_DATA of tensor {index} at offset {len(data)} describes "
                                    f"{chunk.spec} of {chunk.total} bytes, the first chunk {first.spec} of "
                                    f"{first.total}; last bytes: {self.last_bytes()}", where=self._where())
            if len(data) + len(chunk.data) > first.total or (not chunk.data and len(data) < first.total):
                raise ProtocolError(f"TENSOR_DATA of tensor {index} at offset {len(data)} carries {len(chunk.data)} "
                                    f"bytes of {first.total}; last bytes: {self.last_bytes()}", where=self._where())
            data += chunk.data
            if len(data) == first.total:
                return first.spec, bytes(data)

    def _tensor_chunk(self, index: int, offset: int) -> p.TensorData:
        """The TENSOR_DATA answering GET_TENSOR(index, offset), asked for again when lost or damaged."""
        resets = self._resets
        last: LinkError | None = None
        for attempt in range(_TENSOR_ATTEMPTS):
            if attempt:
                self._settle()
            if self._resets != resets:
                break
            try:
                chunk = self.request(p.GetTensor(index, offset), p.TensorData)
            except DeviceError as error:
                text = error.message.split(": ", 1)[-1]
                kind = TensorUnavailableError if error.code == p.ErrorCode.TENSOR_UNAVAILABLE else DeviceError
                raise kind(f"board reported {error.code_name} for tensor {index} at offset {offset}: {text}",
                           code=error.code, code_name=error.code_name, where=self._where()) from error
            except LinkError as error:  # ProtocolError included: a frame that decodes wrong is damage too
                last = error
                if self._resets != resets:
                    break
                continue
            if (chunk.tensor, chunk.offset) == (index, offset):
                return chunk
            last = ProtocolError(f"GET_TENSOR of tensor {index} at offset {offset} was answered with tensor "
                                 f"{chunk.tensor} at offset {chunk.offset}", where=self._where())
        if self._resets != resets:
            self._tensors_ready = False
            raise LinkError(f"the board reset while tensor {index} was read (at offset {offset}): the tensors of "
                            f"its last inference are gone; last bytes: {self.last_bytes()}", where=self._where())
        assert last is not None
        raise LinkError(f"tensor {index}: no intact TENSOR_DATA for offset {offset} in {_TENSOR_ATTEMPTS} requests; "
                        f"last error: {last.message}; last bytes: {self.last_bytes()}", where=self._where())
