"""The host's GET_TENSOR reads (harness/board/link.py) over a real pseudo-terminal and pyserial,
against the Python device engine (harness/board/device.py) served in a thread of this process.

The device loop here can lose or damage chosen frames in either direction, the way a noisy wire
does, so the tests can check that a read recovers a lost chunk and never returns wrong bytes.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
import time
import tty
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import serial

from harness import protocol as p
from harness.board.device import DeviceEngine, InvokeTiming
from harness.board.link import DeviceLink, TensorUnavailableError
from harness.board.exchange import DeviceError
from harness.errors import BoardError, LinkError, ProtocolError

INPUT = p.TensorSpec(p.DType.INT8, (1, 16), 0.5, -3)
OUTPUT = p.TensorSpec(p.DType.INT8, (1, 16), 0.25, 7)
# A float32 [50, 60] activation: 12,000 bytes, three TENSOR_DATA chunks of a 4096-byte payload.
ACTIVATION = p.TensorSpec(p.DType.FLOAT32, (50, 60))
BIAS = p.TensorSpec(p.DType.INT32, (4,), 0.0009765625, 0)  # scales travel as float32


class KeepingRuntime:
    """Doubles the input into the output; keeps input, activation, bias and output as tensors 0..3,
    the activation a function of the input so that every invoke leaves different bytes."""

    def __init__(self) -> None:
        self._input = bytes(INPUT.nbytes)
        self._tensors = [bytes(spec.nbytes) for spec in (INPUT, ACTIVATION, BIAS, OUTPUT)]

    def set_input(self, index: int, data: bytes) -> None:
        self._input = data

    def invoke(self) -> InvokeTiming:
        x = np.frombuffer(self._input, np.int8)
        activation = (np.arange(ACTIVATION.nbytes // 4, dtype=np.float32) * np.float32(0.25)
                      + np.float32(int(x.astype(np.int64).sum())))
        output = np.clip(x.astype(np.int16) * 2, -128, 127).astype(np.int8).tobytes()
        self._tensors = [self._input, activation.astype("<f4").tobytes(), struct.pack("<4i", 1, -2, 3, -4), output]
        return InvokeTiming(100, 24000, (100,), (24000,))

    def get_output(self, index: int) -> bytes:
        return self._tensors[3]

    def tensor_count(self) -> int:
        return 5

    def tensor(self, index: int) -> tuple[p.TensorSpec, bytes]:
        if index == 4:
            raise p.TensorUnavailable.uncarried_type(4, 4)
        return (INPUT, ACTIVATION, BIAS, OUTPUT)[index], self._tensors[index]


def device_info(flags: int) -> p.DeviceInfo:
    return p.DeviceInfo(p.PROTOCOL_VERSION, p.BOARD_VIRTUAL, 240, 327680, 8388608, 3342336, 65536, 20000,
                        p.MAX_PAYLOAD, 1, flags, "ESP32-S3 (test)", "0123456789abcdef", "fedcba9876543210",
                        (INPUT,), (OUTPUT,))


Mangle = Callable[[p.Frame, bytes], bytes]


@dataclass
class PtyDevice:
    """A DeviceEngine behind the master end of a pty. `to_board` and `to_host` may change the bytes
    of any frame (a request as the device reads it, an answer as it is written): each gets the
    frame and its bytes and returns what crosses the wire instead."""

    engine: DeviceEngine
    to_board: Mangle | None = None
    to_host: Mangle | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def serve(self, master: int) -> None:
        watcher = p.FrameDecoder()  # finds the request frames in what the host wrote
        while not self.stop.is_set():
            readable, _, _ = select.select([master], [], [], 0.005)
            now = time.monotonic()
            if readable:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:
                    return
                if self.to_board is not None:
                    # The host writes each request in one write, so a request is whole in one read.
                    frames = watcher.feed(data)
                    if len(frames) == 1 and len(data) == p.FRAME_OVERHEAD + len(frames[0].payload):
                        data = self.to_board(frames[0], data)
                answers = self.engine.receive(data, now)
            else:
                answers = self.engine.idle(now)
            for answer in answers:
                if self.to_host is not None:
                    (frame,) = p.FrameDecoder().feed(answer)
                    answer = self.to_host(frame, answer)
                os.write(master, answer)


@contextlib.contextmanager
def link_to(device: PtyDevice):
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    thread = threading.Thread(target=device.serve, args=(master,), daemon=True)
    thread.start()
    port = serial.serial_for_url(os.ttyname(slave), baudrate=115200, timeout=0.2)
    try:
        link = DeviceLink(port, name=os.ttyname(slave), timeout_s=2.0)
        link.handshake()
        yield link
    finally:
        device.stop.set()
        thread.join(timeout=5)
        port.close()
        os.close(slave)
        os.close(master)


def nth_frame_of(msg_type: int, n: int, change: Callable[[bytes], bytes]) -> Mangle:
    """Applies `change` to the n-th frame (1-based) of `msg_type` only."""
    seen = 0

    def mangle(frame: p.Frame, data: bytes) -> bytes:
        nonlocal seen
        if frame.type != msg_type:
            return data
        seen += 1
        return change(data) if seen == n else data
    return mangle


def run_one(link: DeviceLink, seed: int) -> bytes:
    sample = np.random.default_rng(seed).integers(-128, 128, size=INPUT.nbytes, dtype=np.int8).tobytes()
    link.infer([sample])
    return sample


def expected_tensors(sample: bytes) -> dict[int, tuple[p.TensorSpec, bytes]]:
    runtime = KeepingRuntime()
    runtime.set_input(0, sample)
    runtime.invoke()
    return {index: runtime.tensor(index) for index in range(4)}


def test_read_tensors_reassembles_every_tensor_of_the_last_invoke():
    device = PtyDevice(DeviceEngine(device_info(p.FLAG_PRESERVES_TENSORS), ("FULLY_CONNECTED",), KeepingRuntime()))
    with link_to(device) as link:
        with pytest.raises(BoardError, match="after an inference"):
            link.read_tensor(1)
        run_one(link, 1)
        sample = run_one(link, 2)
        before = link.retries
        tensors = link.read_tensors([3, 1, 0, 2, 1])
        assert list(tensors) == [3, 1, 0, 2]
        assert tensors == expected_tensors(sample)
        assert ACTIVATION.nbytes > 2 * (p.MAX_PAYLOAD - p.TensorData.header_size(ACTIVATION))  # three chunks
        assert link.retries == before
        # The same tensors again: reading changes nothing on the device.
        assert link.read_tensor(1) == tensors[1]


def test_read_tensor_raises_the_boards_errors_with_their_text():
    device = PtyDevice(DeviceEngine(device_info(p.FLAG_PRESERVES_TENSORS), ("FULLY_CONNECTED",), KeepingRuntime()))
    with link_to(device) as link:
        run_one(link, 3)
        with pytest.raises(TensorUnavailableError, match="TENSOR_UNAVAILABLE for tensor 4 at offset 0: tensor 4 "
                                                         "has type code 4, which the wire protocol cannot carry"):
            link.read_tensor(4)
        with pytest.raises(DeviceError, match="BAD_PAYLOAD for tensor 5 at offset 0: tensor 5 does not exist; "
                                              "the model's main subgraph has 5") as caught:
            link.read_tensor(5)
        assert not isinstance(caught.value, TensorUnavailableError)
        assert link.read_tensor(2)[1] == struct.pack("<4i", 1, -2, 3, -4)  # the link is still in step


def test_read_tensor_from_a_firmware_that_keeps_no_tensors_says_why():
    device = PtyDevice(DeviceEngine(device_info(0), ("FULLY_CONNECTED",), KeepingRuntime()))
    with link_to(device) as link:
        run_one(link, 4)
        with pytest.raises(TensorUnavailableError, match="not built with preserve_all_tensors") as caught:
            link.read_tensor(0)
        assert caught.value.code == p.ErrorCode.TENSOR_UNAVAILABLE
        assert link.info.flags & p.FLAG_PRESERVES_TENSORS == 0


def _drop_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + data[middle + 1:]


def _flip_byte(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[-9] ^= 0x10
    return bytes(flipped)


@pytest.mark.parametrize("loss", [
    "answer cut",      # a byte of the second chunk's answer lost: the host's idle gap finds it
    "answer damaged",  # a bit flipped in it: its CRC fails
    "request cut",     # a byte of the second GET_TENSOR lost: the device reports the frame lost
])
def test_read_tensor_asks_again_for_a_lost_chunk(loss):
    kind, _ = loss.split()
    change = _drop_byte if loss.endswith("cut") else _flip_byte
    mangle = nth_frame_of(p.MsgType.TENSOR_DATA if kind == "answer" else p.MsgType.GET_TENSOR, 2, change)
    device = PtyDevice(DeviceEngine(device_info(p.FLAG_PRESERVES_TENSORS), ("FULLY_CONNECTED",), KeepingRuntime()),
                       **{"to_host" if kind == "answer" else "to_board": mangle})
    with link_to(device) as link:
        sample = run_one(link, 5)
        before, started = link.retries, time.monotonic()
        assert link.read_tensor(1) == expected_tensors(sample)[1]
        assert link.retries == before + 1
        assert time.monotonic() - started < 1.5  # found by the gap or the CRC, not at the 2 s deadline


def test_read_tensor_gives_up_on_a_chunk_that_never_arrives_and_names_it():
    always = PtyDevice(DeviceEngine(device_info(p.FLAG_PRESERVES_TENSORS), ("FULLY_CONNECTED",), KeepingRuntime()))
    with link_to(always) as link:
        run_one(link, 6)
        always.to_host = lambda frame, data: _flip_byte(data) if frame.type == p.MsgType.TENSOR_DATA and \
            struct.unpack_from("<I", frame.payload, 2)[0] > 0 else data
        with pytest.raises(LinkError, match=r"tensor 1: no intact TENSOR_DATA for offset 4068 in 8 requests; last "
                                            r"error: a corrupted frame arrived while waiting for TENSOR_DATA; "
                                            r"last bytes: [0-9a-f ]+") as caught:
            link.read_tensor(1)
        assert caught.value.where == f"port {link.name}"


def test_read_tensor_checks_the_size_the_device_claims():
    # A device whose chunk says 8 bytes more than its descriptor holds: the host refuses it rather
    # than hand back a tensor that does not match its shape.
    def inflate(frame: p.Frame, data: bytes) -> bytes:
        if frame.type != p.MsgType.TENSOR_DATA:
            return data
        chunk = p.TensorData.unpack(frame.payload)
        wrong = p.TensorData(chunk.tensor, chunk.offset, chunk.total + 8, chunk.spec, chunk.data)
        return p.encode_frame(frame.type, frame.seq, wrong.pack())

    device = PtyDevice(DeviceEngine(device_info(p.FLAG_PRESERVES_TENSORS), ("FULLY_CONNECTED",), KeepingRuntime()),
                       to_host=inflate)
    with link_to(device) as link:
        run_one(link, 7)
        with pytest.raises(ProtocolError, match=r"TENSOR_DATA of tensor 2 says 24 bytes, its descriptor "
                                                r"int32\[4\] takes 16"):
            link.read_tensor(2)


def test_a_board_reset_during_a_read_is_an_error_not_the_tensors_of_a_fresh_boot():
    device = PtyDevice(DeviceEngine(device_info(p.FLAG_PRESERVES_TENSORS), ("FULLY_CONNECTED",), KeepingRuntime()))
    with link_to(device) as link:
        run_one(link, 8)
        device.to_host = nth_frame_of(p.MsgType.TENSOR_DATA, 2,
                                      lambda data: b"ESP-ROM:esp32s3-20210327\r\nrst:0x1 (POWERON)\r\n")
        with pytest.raises(LinkError, match="the board reset while tensor 1 was read"):
            link.read_tensor(1)
        with pytest.raises(BoardError, match="after an inference"):
            link.read_tensor(1)
