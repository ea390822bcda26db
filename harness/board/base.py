"""The board interface: one API, two implementations (virtual, serial) over the same DeviceLink."""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .. import protocol as p
from ..errors import BoardError, LinkError, LinkTimeoutError, ModelTooLargeError, UnsupportedOpError
from ..firmware import FirmwareBuild, FirmwareImage
from .link import DeviceError, DeviceLink


@dataclass(frozen=True)
class Inference:
    outputs: tuple[np.ndarray, ...]
    total_us: int
    total_cycles: int
    op_us: tuple[int, ...]
    op_cycles: tuple[int, ...]


@dataclass(frozen=True)
class BoardTensor:
    """A tensor of the model's main subgraph as the board's debug build left it after an invoke:
    `index` numbers it as the model does; `values` are shaped and typed by the board's descriptor."""

    index: int
    spec: p.TensorSpec
    values: np.ndarray


log = logging.getLogger("tinyhil.board")

# Boot failures the device reports map onto the harness's own error kinds, so a model too big
# for the board fails the same way on both implementations.
_BOOT_ERRORS = {
    p.ErrorCode.ARENA_ALLOCATION_FAILED: ModelTooLargeError,
    p.ErrorCode.MODEL_TOO_LARGE: ModelTooLargeError,
    p.ErrorCode.UNSUPPORTED_OP: UnsupportedOpError,
}


class Board(abc.ABC):
    """A device running one model. `load` makes it run a firmware image; `infer` runs inputs."""

    kind: str = ""
    reflash_hint: str = ""
    # Lost and damaged frames are recovered inside the sample by the link (exchange.py; protocol.md,
    # "Recovery inside a sample"), so byte faults alone seldom reach this level. What the link cannot
    # recover fails the exchange: the board reset (its boot banner), a deadline passed in silence, or
    # more than 200 recoveries of one sample. The sample (and those in flight after it) then runs
    # again from its first byte after a resync, up to this many attempts in all; each failed attempt
    # costs its detection (at once for a reset, the timeout for silence) and a resync of about 0.1 s.
    attempts: int = 64
    # Of those, attempts that fail by silence at the deadline: a board that hangs on a sample (still
    # answering HELLO) costs an invoke timeout each time, so it is given up on after a few.
    silent_attempts: int = 4
    resync_budget_s: float = 20.0
    # Device errors that a lost frame or a reset explains; any other device error is the answer.
    _RETRYABLE_DEVICE_ERRORS = frozenset({p.ErrorCode.NOT_READY, p.ErrorCode.BAD_PAYLOAD})

    def __init__(self) -> None:
        self._link: DeviceLink | None = None
        self.info: p.DeviceInfo | None = None
        self.op_names: tuple[str, ...] = ()
        self.retries = 0
        # Which build of the firmware answers (chip, native or the Python engine), set by load().
        self.build: FirmwareBuild | None = None

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The port or description users see in messages."""

    @abc.abstractmethod
    def load(self, firmware: FirmwareImage) -> p.DeviceInfo:
        """Make the board run `firmware` (flashing only when it runs something else)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def log_tail(self, lines: int = 20) -> str:
        """The end of the board's console, for failure messages; empty when there is none."""
        return ""

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handshake(self, link: DeviceLink, firmware: FirmwareImage) -> p.DeviceInfo:
        before = link.retries
        try:
            try:
                info = link.handshake()
            except DeviceError as error:
                kind = _BOOT_ERRORS.get(error.code, BoardError)
                raise kind(f"board refused {firmware.model_name}: {error.message}", where=self.name) from error
            if info.firmware_id != firmware.firmware_id:
                raise BoardError(f"board runs firmware {info.firmware_id} (model {info.model_id}); "
                                 f"{firmware.model_name} needs firmware {firmware.firmware_id}. {self.reflash_hint}",
                                 where=self.name)
            self._link = link
            self.info = info
            self.op_names = link.op_names()
        finally:
            # Requests of the set-up sent again count as retries too, also when the set-up fails.
            self.retries += link.retries - before
        return info

    def infer(self, inputs: Sequence[np.ndarray], *, profile: bool = True) -> Inference:
        return next(self.infer_many([inputs], profile=profile))

    def infer_many(self, samples: Sequence[Sequence[np.ndarray]], *, profile: bool = True) -> Iterator[Inference]:
        """Results of `samples`, in order, over a pipelined link. The link recovers lost and damaged
        frames inside the sample; a sample whose exchange fails all the same (see `attempts`) runs
        again, from its first byte, after a resync; so do the samples after it that were in flight.
        Results already delivered stand."""
        if self._link is None or self.info is None:
            raise BoardError("no firmware loaded: call load() first", where=self.name)
        payloads = [self._payloads(inputs) for inputs in samples]
        done = 0
        attempt, silences = 1, 0
        while done < len(payloads):
            before = self._link.retries
            try:
                for raw in self._link.infer_many(payloads[done:], profile=profile):
                    done += 1
                    attempt, silences = 1, 0
                    self.retries += self._link.retries - before
                    before = self._link.retries
                    yield self._inference(raw)
            except (DeviceError, LinkError) as error:
                # Recoveries inside the exchange (frames sent again) count as retries too.
                self.retries += self._link.retries - before
                if isinstance(error, DeviceError) and error.code not in self._RETRYABLE_DEVICE_ERRORS:
                    raise
                fatal = self._unrecoverable(error)
                if fatal is not None:
                    raise fatal from error
                silences += isinstance(error, LinkTimeoutError)
                if attempt >= self.attempts or silences >= self.silent_attempts:
                    raise
                attempt += 1
                self.retries += 1
                started = time.monotonic()
                try:
                    info = self._link.resync(self.resync_budget_s)
                    log.info("sample %d, attempt %d: %s; resynchronised in %.2f s", done, attempt, error.message,
                             time.monotonic() - started)
                except LinkError as lost:
                    # A board that died meanwhile explains the silence better than the link does.
                    raise (self._unrecoverable(lost) or lost) from error
                if info.firmware_id != self.info.firmware_id:
                    raise BoardError(f"after a failed exchange the board came back running firmware "
                                     f"{info.firmware_id}, not {self.info.firmware_id}", where=self.name) from error

    # Runs of one sample and its reads that a link failure may cost before read_tensors gives up.
    tensor_read_attempts: int = 3

    def read_tensors(self, sample: Sequence[np.ndarray], indices: Sequence[int]) -> dict[int, BoardTensor]:
        """Tensors `indices` of the main subgraph after the board ran `sample` once: what the
        first-diverging-operator diagnosis compares with the reference interpreters. Needs the
        debug build, which keeps every tensor (harness.firmware.plan_debug_firmware)."""
        if self._link is None or self.info is None:
            raise BoardError("no firmware loaded: call load() first", where=self.name)
        if not self.info.flags & p.FLAG_PRESERVES_TENSORS:
            raise BoardError(f"the board runs firmware {self.info.firmware_id}, which reuses tensor memory between "
                             f"operators: reading intermediate tensors needs the debug build, which keeps every "
                             f"tensor (harness.firmware.plan_debug_firmware; on a chip, the esp32s3-debug-tensors "
                             f"PlatformIO env)", where=self.name)
        wanted = list(dict.fromkeys(int(index) for index in indices))
        attempt = 1
        while True:
            # The tensors are those of the last invoke: the sample runs again before every read, so a
            # board that reset in between never answers with a fresh boot's memory.
            for _ in self.infer_many([sample], profile=False):
                pass
            before = self._link.retries
            try:
                raw = self._link.read_tensors(wanted)
                break
            except DeviceError as error:  # TENSOR_UNAVAILABLE, or BAD_PAYLOAD for an index past the last tensor
                raise BoardError(f"the board cannot give the tensors asked for ({error.code_name}): {error.message}",
                                 where=self.name) from error
            except LinkError as error:
                fatal = self._unrecoverable(error)
                if fatal is not None:
                    raise fatal from error
                if attempt >= self.tensor_read_attempts:
                    raise
                attempt += 1
                self.retries += 1
                log.info("reading tensors, attempt %d: %s; running the sample again", attempt, error.message)
            finally:
                self.retries += self._link.retries - before
        missing = [index for index in wanted if index not in raw]
        if missing:
            raise BoardError(f"the link returned no tensor {missing[0]} (asked for {len(wanted)} tensors)",
                             where=self.name)
        return {index: self._board_tensor(index, *raw[index]) for index in wanted}

    def _board_tensor(self, index: int, spec: p.TensorSpec, data: bytes) -> BoardTensor:
        if len(data) != spec.nbytes:
            raise BoardError(f"tensor {index}: the board sent {len(data)} bytes, its descriptor "
                             f"{spec.dtype.numpy_name}{list(spec.shape)} says {spec.nbytes}", where=self.name)
        values = np.frombuffer(data, dtype=spec.dtype.numpy_name).reshape(spec.shape)
        return BoardTensor(index, spec, values)

    def _payloads(self, inputs: Sequence[np.ndarray]) -> list[bytes]:
        assert self.info is not None
        if len(inputs) != len(self.info.inputs):
            raise BoardError(f"model takes {len(self.info.inputs)} inputs, got {len(inputs)}", where=self.name)
        payloads = []
        for index, (array, spec) in enumerate(zip(inputs, self.info.inputs)):
            # Compare dtype objects, not names: building the name string cost more than the copy for
            # small inputs, and every sample of a run passes through here before the link starts.
            if array.dtype != np.dtype(spec.dtype.numpy_name) or array.nbytes != spec.nbytes:
                raise BoardError(f"input {index} must be {spec.dtype.numpy_name}{list(spec.shape)}, got "
                                 f"{array.dtype.name}{list(array.shape)}", where=self.name)
            payloads.append(np.ascontiguousarray(array).tobytes())
        return payloads

    def _inference(self, raw) -> Inference:
        assert self.info is not None
        outputs = tuple(np.frombuffer(data, dtype=spec.dtype.numpy_name).reshape(spec.shape)
                        for data, spec in zip(raw.outputs, self.info.outputs))
        return Inference(outputs, raw.total_us, raw.total_cycles, raw.op_us, raw.op_cycles)

    def _unrecoverable(self, error: BoardError) -> BoardError | None:
        """An error no retry can help (the board process died, the port vanished), or None."""
        return None
