"""The firmware's C++ protocol engine (firmware/components/tinyhil), built natively with g++.

Two test programs come with it (firmware/test/native): `golden_vectors` runs the encoder and the
decoder on their own, `native_device` serves the engine on a file descriptor with a small fake
model standing in for TFLite Micro. The Python host drives `native_device` through a real
pseudo-terminal, and the Python `DeviceEngine` gets the same request bytes as the C++ engine and
must answer with the same bytes, errors included.

The engine runs inferences either synchronously (single core) or on a worker thread, as the
firmware does on the ESP32-S3's second core. Both modes must give the same bytes, also when the
host sends many requests without waiting for answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from harness import protocol as p
from harness.board import SerialBoard
from harness.board.device import DeviceEngine, InvokeTiming
from harness.board.link import TensorUnavailableError
from harness.errors import BoardError, ModelTooLargeError
from harness.firmware import FirmwareImage

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "firmware" / "components" / "tinyhil"
LIBRARY = CORE / "src"
LIBRARY_INCLUDE = CORE / "include"
HOST_LAYER = REPO / "firmware" / "host"
NATIVE = REPO / "firmware" / "test" / "native"
GOLDEN = json.loads((Path(__file__).parent / "vectors" / "golden_frames.json").read_text())["frames"]
CXXFLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]
BUILD_TIMEOUT_S = 180
BANNER = (b"ESP-ROM:esp32s3-20210327\r\nrst:0x1 (POWERON),boot:0x8 (SPI_FAST_FLASH_BOOT)\r\n"
          b"tinyhil native ESP32-S3 engine booting\r\n")
# More than one whole frame: whatever partial frame a decoder holds is decided once these arrive.
FLUSH = bytes(p.MAX_PAYLOAD + p.FRAME_OVERHEAD)
# An idle gap (ms) longer than any test: the byte-for-byte comparisons of the two engines send
# requests back to back, and a loaded machine's pause between two of them is no lost frame.
NEVER_IDLE = 3_600_000


@dataclass(frozen=True)
class NativeBuild:
    device: Path
    golden: Path


@pytest.fixture(scope="session")
def native(tmp_path_factory) -> NativeBuild:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not on PATH: the firmware's C++ protocol engine cannot be built natively")
    out = tmp_path_factory.mktemp("native-build")
    jobs = {}
    try:
        for program in ("native_device", "golden_vectors"):
            command = [compiler, *CXXFLAGS, "-I", str(LIBRARY_INCLUDE), "-I", str(HOST_LAYER),
                       str(LIBRARY / "tinyhil_protocol.cpp"), str(NATIVE / f"{program}.cpp"), "-o", str(out / program)]
            jobs[program] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for program, job in jobs.items():
            output, _ = job.communicate(timeout=BUILD_TIMEOUT_S)
            if job.returncode != 0:
                pytest.fail(f"g++ failed to build {program}:\n{output}")
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
                job.wait()
    return NativeBuild(out / "native_device", out / "golden_vectors")


@pytest.fixture(scope="session")
def tsan_device(native, tmp_path_factory) -> Path:
    """native_device under ThreadSanitizer: the worker hand-over must have no data race."""
    out = tmp_path_factory.mktemp("native-tsan") / "native_device"
    command = ["g++", *[flag for flag in CXXFLAGS if flag != "-O2"], "-O1", "-g", "-fsanitize=thread", "-I",
               str(LIBRARY_INCLUDE), "-I", str(HOST_LAYER), str(LIBRARY / "tinyhil_protocol.cpp"),
               str(NATIVE / "native_device.cpp"), "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if result.returncode != 0 and "tsan" in result.stderr.lower():
        pytest.skip(f"g++ cannot build with -fsanitize=thread here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, f"g++ failed to build native_device with ThreadSanitizer:\n{result.stderr}"
    return out


def run_golden(native: NativeBuild, *args: str, stdin: str = "") -> list[str]:
    result = subprocess.run([str(native.golden), *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# --- the fake model, in both languages ------------------------------------------------------------

def fake_output(data: bytes, output_bytes: int) -> bytes:
    """output[i] = sum of the int8 inputs whose index is i modulo output_bytes, clamped to int8."""
    values = np.frombuffer(data, dtype=np.int8).astype(np.int64)
    sums = np.zeros(output_bytes, dtype=np.int64)
    if output_bytes:
        np.add.at(sums, np.arange(values.size) % output_bytes, values)
    return np.clip(sums, -128, 127).astype(np.int8).tobytes()


FLOAT_TENSOR_LENGTH = 2500  # native_device's tensor 2: 10 KB, several TENSOR_DATA chunks
UNCARRIED_TENSOR = 4  # native_device's int64 tensor: the engine refuses its type


def fake_tensor_specs(input_bytes: int, output_bytes: int) -> tuple[p.TensorSpec | None, ...]:
    """native_device --tensors preserve: the descriptors of its six tensors (None: int64)."""
    return (p.TensorSpec(p.DType.INT8, (1, input_bytes), 0.5, -3),
            p.TensorSpec(p.DType.INT16, (1, 2, input_bytes), 0.125, 0),
            p.TensorSpec(p.DType.FLOAT32, (FLOAT_TENSOR_LENGTH,)),
            p.TensorSpec(p.DType.INT32, ()),
            None,
            p.TensorSpec(p.DType.INT8, (1, output_bytes), 0.25, 7))


def fake_tensors(data: bytes, output: bytes) -> list[bytes]:
    """What native_device's tensors hold after a successful invoke of `data` (its header comment)."""
    x = np.frombuffer(data, np.int8).astype(np.int64)
    total = sum(data)
    wide = ((np.tile(x, 2) * 257 + np.arange(2 * x.size)) & 0xFFFF).astype("<u2").tobytes()
    floats = (np.arange(FLOAT_TENSOR_LENGTH, dtype=np.float32) * np.float32(0.5)
              + np.float32(total % 1000)).astype("<f4").tobytes()
    return [data, wide, floats, struct.pack("<I", total), bytes(range(16)), output]


@dataclass(frozen=True)
class FakeDevice:
    """native_device's command line and, from the same values, the equivalent Python engine."""

    firmware_id: str = "0000000000000000"
    model_id: str = "0000000000000000"
    input_bytes: int = 8
    output_bytes: int = 8
    ops: int = 2
    max_payload: int = p.MAX_PAYLOAD
    boot_error: tuple[int, str] | None = None
    invoke_error: str | None = None
    fail_mod: int = 0  # invoke fails when input byte 0 is a multiple of this
    worker: str = "sync"  # "thread": inferences on a worker thread, as on the ESP32-S3's second core
    invoke_sleep_us: int = 0
    rx_ns_per_byte: int = 0  # link speed as the device sees it; 0: as fast as the socket
    tx_ns_per_byte: int = 0
    idle_gap_ms: int = round(p.IDLE_GAP_S * 1000)  # the protocol's; NEVER_IDLE for byte-for-byte twins
    tensors: bool = False  # keeps the last invoke's tensors for GET_TENSOR, as a preserve_all_tensors build

    def args(self) -> list[str]:
        args = ["--firmware-id", self.firmware_id, "--model-id", self.model_id, "--input-bytes",
                str(self.input_bytes), "--output-bytes", str(self.output_bytes), "--ops", str(self.ops),
                "--max-payload", str(self.max_payload), "--worker", self.worker,
                "--invoke-sleep-us", str(self.invoke_sleep_us), "--rx-ns-per-byte", str(self.rx_ns_per_byte),
                "--tx-ns-per-byte", str(self.tx_ns_per_byte), "--idle-gap-ms", str(self.idle_gap_ms),
                "--tensors", "preserve" if self.tensors else "none"]
        if self.boot_error is not None:
            args += ["--boot-error", f"{int(self.boot_error[0])}:{self.boot_error[1]}"]
        if self.invoke_error is not None:
            args += ["--invoke-error", self.invoke_error]
        if self.fail_mod:
            args += ["--fail-mod", str(self.fail_mod)]
        return args

    def invoke_error_for(self, data: bytes) -> str | None:
        if self.invoke_error is not None:
            return self.invoke_error
        if self.fail_mod and data and data[0] % self.fail_mod == 0:
            return f"input byte 0 is {data[0]}, a multiple of {self.fail_mod}"
        return None

    def invoke_ok(self, data: bytes) -> bool:
        return self.invoke_error_for(data) is None

    def op_names(self) -> tuple[str, ...]:
        def name(i: int) -> str:
            if i < 2:
                return ("ADD", "SUM")[i]
            return "LONG" + "X" * 296 if i == 5 else f"OP{i}" + "X" * (i % 7)
        return tuple(name(i) for i in range(self.ops))

    def timing(self, data: bytes) -> InvokeTiming:
        """Op 0 takes 1000 us plus the input's byte sum modulo 251: the timing belongs to one input."""
        op_us = tuple(1000 + sum(data) % 251 if i == 0 else 234 if i == 1 else 10 + i for i in range(self.ops))
        op_cycles = tuple(240 * us for us in op_us)
        return InvokeTiming(sum(op_us), sum(op_cycles), op_us, op_cycles)

    def device_info(self) -> p.DeviceInfo:
        return p.DeviceInfo(
            version=p.PROTOCOL_VERSION, board_kind=p.BOARD_REAL, cpu_mhz=240, sram_bytes=327680,
            psram_bytes=8388608, flash_bytes=3342336, arena_size=4096, arena_used=1024,
            max_payload=self.max_payload, op_count=self.ops,
            flags=p.FLAG_ESP_NN | (p.FLAG_DOUBLE_BUFFERED if self.worker == "thread" and self.boot_error is None else 0)
            | (p.FLAG_PRESERVES_TENSORS if self.tensors else 0),
            chip="ESP32-S3 (native test)",
            firmware_id=self.firmware_id, model_id=self.model_id,
            inputs=(p.TensorSpec(p.DType.INT8, (1, self.input_bytes), 0.5, -3),),
            outputs=(p.TensorSpec(p.DType.INT8, (1, self.output_bytes), 0.25, 7),))

    def python_engine(self) -> DeviceEngine:
        if self.boot_error is not None:
            engine = DeviceEngine(self.device_info(), self.op_names(), None, p.ErrorMsg(*self.boot_error))
        else:
            runtime = FakeTensorRuntime(self) if self.tensors else FakeRuntime(self)
            engine = DeviceEngine(self.device_info(), self.op_names(), runtime)
        engine.idle_gap_s = self.idle_gap_ms / 1000
        return engine


class FakeRuntime:
    def __init__(self, device: FakeDevice) -> None:
        self._device = device
        self._input = b""
        self._output = b""

    def set_input(self, index: int, data: bytes) -> None:
        self._input = data

    def invoke(self) -> InvokeTiming:
        error = self._device.invoke_error_for(self._input)
        if error is not None:
            raise RuntimeError(error)
        self._output = fake_output(self._input, self._device.output_bytes)
        return self._device.timing(self._input)

    def get_output(self, index: int) -> bytes:
        return self._output


class FakeTensorRuntime(FakeRuntime):
    """native_device --tensors preserve: the tensors of the last invoke, 0x5A while one runs."""

    def __init__(self, device: FakeDevice) -> None:
        super().__init__(device)
        self._specs = fake_tensor_specs(device.input_bytes, device.output_bytes)
        sizes = [spec.nbytes if spec is not None else 16 for spec in self._specs]
        self._tensors = [bytes(size) for size in sizes]

    def invoke(self) -> InvokeTiming:
        self._tensors = [b"\x5a" * len(tensor) for tensor in self._tensors]
        timing = super().invoke()
        self._tensors = fake_tensors(self._input, self._output)
        return timing

    def tensor_count(self) -> int:
        return len(self._specs)

    def tensor(self, index: int) -> tuple[p.TensorSpec, bytes]:
        spec = self._specs[index]
        if spec is None:
            raise p.TensorUnavailable.uncarried_type(index, 4)
        return spec, self._tensors[index]


# --- processes and links --------------------------------------------------------------------------

def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class SocketWire:
    """Bytes to and from native_device over a socketpair, never blocking on a full buffer."""

    def __init__(self, sock: socket.socket, process: subprocess.Popen) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.process = process
        self._early = bytearray()  # arrived after the last answer: the start of the next one

    def exchange(self, data: bytes, answer_bytes: int, timeout_s: float = 5.0) -> bytes:
        received = self._early
        self._early = bytearray()
        unsent = memoryview(data)
        deadline = time.monotonic() + timeout_s
        while unsent or len(received) < answer_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, writable, _ = select.select([self._sock], [self._sock] if unsent else [], [], remaining)
            if readable:
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    break  # the device went away: the caller sees the short answer
                received += chunk
            if writable and unsent:
                unsent = unsent[self._sock.send(unsent[:1 << 16]):]
        self._early = received[answer_bytes:]
        return bytes(received[:answer_bytes])


@contextlib.contextmanager
def device_on_socket(native: NativeBuild, device: FakeDevice, program: Path | None = None, **popen):
    host_end, device_end = socket.socketpair()
    process = subprocess.Popen([str(program or native.device), "--fd", str(device_end.fileno()), *device.args()],
                               pass_fds=(device_end.fileno(),), **popen)
    device_end.close()
    try:
        wire = SocketWire(host_end, process)
        assert wire.exchange(b"", len(BANNER)) == BANNER
        yield wire
    finally:
        host_end.close()
        _stop(process)


@contextlib.contextmanager
def device_on_pty(native: NativeBuild, device: FakeDevice):
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    process = subprocess.Popen([str(native.device), "--fd", str(master), *device.args()], pass_fds=(master,))
    os.close(master)
    try:
        yield os.ttyname(slave)
    finally:
        _stop(process)
        os.close(slave)


def frame(message, seq: int) -> bytes:
    return p.encode_frame(message.TYPE, seq, message.pack())


def raw_frame(msg_type: int, seq: int, payload: bytes) -> bytes:
    return p.encode_frame(msg_type, seq, payload)


def describe(stream: bytes) -> list[str]:
    """Frames of an answer stream, readable: `ERROR(seq 3) BAD_PAYLOAD: ...`, `ACK(seq 4) ...`."""
    decoder = p.FrameDecoder()
    lines = []
    for item in decoder.feed(stream):
        try:
            name = p.MsgType(item.type).name
        except ValueError:
            name = f"0x{item.type:02x}"
        try:
            message = p.decode_message(item)
        except p.ProtocolError as error:
            message = f"undecodable: {error}"
        if isinstance(message, p.ErrorMsg):
            lines.append(f"ERROR(seq {item.seq}) {message.code_name}: {message.text}")
        else:
            lines.append(f"{name}(seq {item.seq}) {str(message)[:160]}")
    if decoder.pending():
        lines.append(f"+ {len(decoder.pending())} bytes of no complete frame")
    return lines


def summary(stream: bytes) -> list[str]:
    """Message names, with the code for errors: what a case is meant to provoke."""
    out = []
    for item in p.FrameDecoder().feed(stream):
        if item.type == p.MsgType.ERROR:
            out.append(f"ERROR:{p.decode_message(item).code_name}")
        else:
            out.append(p.MsgType(item.type).name)
    return out


@dataclass
class Twins:
    """One conversation held with both engines: the same bytes in must give the same bytes out."""

    wire: SocketWire
    engine: DeviceEngine
    sent: int = 0
    held: int = 0  # input bytes the device holds, from its ACKs
    log: list[str] = field(default_factory=list)

    def send(self, data: bytes, label: str) -> bytes:
        expected = b"".join(self.engine.receive(data))
        answer = self.wire.exchange(data, len(expected))
        self.sent += 1
        self.log.append(label)
        if answer != expected:
            self._differ(f"request {self.sent} ({label})", data, expected, answer)
        self._track(expected)
        return expected

    def _differ(self, where: str, data: bytes, expected: bytes, answer: bytes) -> None:
        alive = "running" if self.wire.process.poll() is None else f"exited {self.wire.process.returncode}"
        pytest.fail(f"C++ and Python engines differ on {where}; native device {alive}\n"
                    f"request: {data.hex()[:4000]}\nrecent requests: {self.log[-8:]}\n"
                    f"python: {describe(expected)}\nc++:    {describe(answer)}")

    def _track(self, expected: bytes) -> None:
        for item in p.FrameDecoder().feed(expected):
            if item.type == p.MsgType.ACK:
                self.held = p.decode_message(item).value
            elif item.type == p.MsgType.INVOKE_RESULT:
                self.held = 0

    def expect(self, data: bytes, label: str, wanted: list[str]) -> bytes:
        answer = self.send(data, label)
        assert summary(answer) == wanted, f"{label}: {describe(answer)}"
        return answer


@dataclass
class PipelinedTwins(Twins):
    """Twins whose host does not wait: requests go out in batches of random length, and the C++
    engine must answer each batch with the bytes Python gives for its requests one by one, in
    request order (answers compared once the batch is out)."""

    rng: random.Random = field(default_factory=random.Random)
    batch: list[tuple[bytes, bytes, str]] = field(default_factory=list)
    limit: int = 1

    def send(self, data: bytes, label: str) -> bytes:
        expected = b"".join(self.engine.receive(data))
        self.sent += 1
        self.log.append(label)
        self.batch.append((data, expected, label))
        self._track(expected)
        if len(self.batch) >= self.limit:
            self.flush()
        return expected

    def flush(self) -> None:
        data = b"".join(item[0] for item in self.batch)
        expected = b"".join(item[1] for item in self.batch)
        answer = self.wire.exchange(data, len(expected), timeout_s=20.0)
        if answer != expected:
            self._differ(f"a batch of {len(self.batch)} requests ending at request {self.sent} "
                         f"({[item[2] for item in self.batch]})", data, expected, answer)
        self.batch.clear()
        self.limit = self.rng.randint(1, 40)


# --- golden frames and the decoder ----------------------------------------------------------------

def test_crc_check_values(native):
    assert run_golden(native, "crc") == ["crc8 f4", "crc32 cbf43926"]


def test_cpp_encoder_produces_the_golden_frames(native):
    encoded = dict(line.split(" ", 1) for line in run_golden(native, "encode"))
    assert list(encoded) == [vector["name"] for vector in GOLDEN]
    for vector in GOLDEN:
        assert encoded[vector["name"]] == vector["frame"], vector["name"]


def test_cpp_decoder_accepts_and_reencodes_every_golden_frame(native):
    answers = run_golden(native, "roundtrip", stdin="".join(v["frame"] + "\n" for v in GOLDEN))
    assert answers == [f"ok {v['frame']}" for v in GOLDEN]


def _noisy_stream(rng: random.Random, max_payload: int) -> bytes:
    """Valid frames mixed with what a serial line delivers: ROM text, cut, flipped, oversize frames."""
    golden = [bytes.fromhex(v["frame"]) for v in GOLDEN]
    parts = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        good = rng.choice(golden) if rng.random() < 0.5 else raw_frame(
            rng.randrange(256), rng.randrange(256), rng.randbytes(rng.choice((0, 1, 5, 40, max_payload, 700))))
        if kind < 0.3:
            parts.append(good)
        elif kind < 0.45:
            parts.append(good[:rng.randrange(len(good))])
        elif kind < 0.65:
            flipped = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            parts.append(bytes(flipped))
        elif kind < 0.8:
            parts.append(rng.choice((b"\xa5", b"\xa5\x5a", b"\xa5\xa5\x5a", b"ESP-ROM:esp32s3\r\n", b"\x5a\xa5")))
        elif kind < 0.9:
            parts.append(rng.randbytes(rng.randint(1, 64)))
        else:
            # A correct header check on a length the receiver refuses.
            header = bytes([rng.randrange(256), rng.randrange(256)]) + (max_payload + 1).to_bytes(2, "little")
            parts.append(p.SYNC + header + bytes([p.crc8(header)]) + rng.randbytes(16))
    return b"".join(parts)


def _python_decode(pieces: list[bytes], chunk: int, max_payload: int) -> str:
    """What `golden_vectors decode` prints for `pieces` separated by idle gaps, from Python's decoder."""
    decoder = p.FrameDecoder(max_payload)
    frames = []
    for index, piece in enumerate(pieces):
        if index:
            decoder.expire()
        frames += [f for start in range(0, len(piece), chunk) for f in decoder.feed(piece[start:start + chunk])]
    s = decoder.stats
    return (f"{s.garbage_bytes} {s.header_errors} {s.crc_errors} {s.oversize} {s.idle_drops} {len(decoder.pending())}"
            + "".join(f" {f.type}:{f.seq}:{f.payload.hex()}" for f in frames))


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("max_payload", [p.MAX_PAYLOAD, 300])
def test_cpp_decoder_resynchronizes_exactly_like_python(native, chunk, max_payload):
    rng = random.Random(f"decoder-{chunk}-{max_payload}")
    # Noise with idle gaps at random points, a frame cut by one included.
    streams = [[_noisy_stream(rng, max_payload) for _ in range(rng.choice((1, 1, 2, 3)))] for _ in range(400)]
    answers = run_golden(native, "decode", "--chunk", str(chunk), "--max-payload", str(max_payload),
                         stdin="".join("|".join(piece.hex() for piece in pieces) + "\n" for pieces in streams))
    assert len(answers) == len(streams)
    assert any(int(answer.split()[4]) for answer in answers), "no stream had a frame cut by an idle gap"
    for pieces, answer in zip(streams, answers):
        assert answer == _python_decode(pieces, chunk, max_payload), f"stream {'|'.join(x.hex() for x in pieces)}"


def test_an_idle_gap_drops_a_cut_frame_in_both_decoders(native):
    # The case: a device holds 191 bytes of a 506-byte INPUT_DATA frame when the host gives
    # up on the exchange. Without the idle-gap rule every HELLO is swallowed as more of that frame.
    cut = frame(p.InputData(0, 0, bytes(range(245)) * 2), 5)[:191]
    hello = frame(p.Hello(), 6)
    pieces = [cut, hello]
    answer, = run_golden(native, "decode", stdin="|".join(piece.hex() for piece in pieces) + "\n")
    assert answer == _python_decode(pieces, 1 << 20, p.MAX_PAYLOAD)
    assert answer == f"191 0 0 0 1 0 {int(p.MsgType.HELLO)}:6:{p.PROTOCOL_VERSION:02x}"
    # Without a gap the HELLO is still taken for more of the cut frame, in both: the rule is the gap.
    joined, = run_golden(native, "decode", stdin=(cut + hello).hex() + "\n")
    assert joined == _python_decode([cut + hello], 1 << 20, p.MAX_PAYLOAD) == "0 0 0 0 0 203"


# --- the Python host against the native engine over a pty -----------------------------------------

FIRMWARE = FirmwareImage(model_name="fake", model_path=Path("fake.tflite"), model_id="5eed0123456789ab",
                         arena_size=4096, arena_in_psram=False)


@pytest.mark.parametrize("worker", ["sync", "thread"])
@pytest.mark.parametrize("input_bytes, inferences", [(8, 40), (27648, 6)], ids=["small-input", "chunked-input"])
def test_serial_board_runs_the_native_engine_over_a_pty(native, input_bytes, inferences, worker):
    device = FakeDevice(firmware_id=FIRMWARE.firmware_id, model_id=FIRMWARE.model_id, input_bytes=input_bytes,
                        worker=worker)
    rng = np.random.default_rng(input_bytes)
    with device_on_pty(native, device) as port, SerialBoard(port, baudrate=115200) as board:
        info = board.load(FIRMWARE)
        assert info == device.device_info()
        assert info.latency_kind == "measured"
        assert board.op_names == ("ADD", "SUM")
        assert info.inputs[0].nbytes == input_bytes
        if input_bytes == 27648:  # a 96x96x3 image: uploaded in 7 chunks
            assert input_bytes > info.max_payload
        samples = [np.full((1, input_bytes), -128, np.int8), np.full((1, input_bytes), 127, np.int8)]
        samples += [rng.integers(-128, 128, size=(1, input_bytes), dtype=np.int8) for _ in range(inferences)]
        for index, sample in enumerate(samples):
            profile = index % 3 != 2
            result = board.infer([sample], profile=profile)
            expected = np.frombuffer(fake_output(sample.tobytes(), 8), np.int8).reshape(1, 8)
            np.testing.assert_array_equal(result.outputs[0], expected)
            timing = device.timing(sample.tobytes())
            assert (result.total_us, result.total_cycles) == (timing.total_us, timing.total_cycles)
            if profile:
                assert (result.op_us, result.op_cycles) == (timing.op_us, timing.op_cycles)
            else:
                assert (result.op_us, result.op_cycles) == ((), ())
        with pytest.raises(BoardError, match="needs firmware"):
            board.load(FirmwareImage("other", Path("other.tflite"), "ffff0123456789ab", 4096, False))


@pytest.mark.parametrize("input_bytes", [8, 27648], ids=["small-input", "chunked-input"])
def test_serial_board_pipelines_samples_through_the_native_worker(native, input_bytes):
    # The host's pipelined path (several samples in flight) against the two-job engine: every
    # result must belong to its own sample, in order, with no exchange retried.
    device = FakeDevice(firmware_id=FIRMWARE.firmware_id, model_id=FIRMWARE.model_id, input_bytes=input_bytes,
                        worker="thread", invoke_sleep_us=3000)
    rng = np.random.default_rng(input_bytes + 1)
    samples = [[rng.integers(-128, 128, size=(1, input_bytes), dtype=np.int8)] for _ in range(12)]
    with device_on_pty(native, device) as port, SerialBoard(port, baudrate=115200) as board:
        board.load(FIRMWARE)
        results = list(board.infer_many(samples, profile=True))
        assert board.retries == 0
    assert len(results) == len(samples)
    for index, (sample, result) in enumerate(zip(samples, results)):
        expected = np.frombuffer(fake_output(sample[0].tobytes(), 8), np.int8).reshape(1, 8)
        np.testing.assert_array_equal(result.outputs[0], expected, err_msg=f"sample {index}")
        timing = device.timing(sample[0].tobytes())
        assert (result.total_us, result.op_us, result.op_cycles) == (
            timing.total_us, timing.op_us, timing.op_cycles), f"sample {index}"


def test_measured_latency_windows_come_from_the_board_engine(native):
    # The pipeline's window pass (MLPerf Tiny's practice) against the firmware's engine, whose
    # latency is "measured": every invoke of one input, window by window, in milliseconds.
    from harness.compare import window_latency_stats
    from harness.pipeline import measure_latency_windows
    from harness.suite import LatencyWindows

    device = FakeDevice(firmware_id=FIRMWARE.firmware_id, model_id=FIRMWARE.model_id, input_bytes=64, worker="thread")
    sample = [np.arange(64, dtype=np.int8).reshape(1, 64)]
    with device_on_pty(native, device) as port, SerialBoard(port, baudrate=115200) as board:
        info = board.load(FIRMWARE)
        windows = measure_latency_windows(board, sample, LatencyWindows(windows=3, inferences_per_window=4),
                                          "fake[int8]")
    expected_ms = device.timing(sample[0].tobytes()).total_us / 1000.0
    assert info.latency_kind == "measured"
    assert windows == ((expected_ms,) * 4,) * 3
    stats = window_latency_stats(windows, info.latency_kind)
    assert (stats.median_ms, stats.samples, stats.kind) == (expected_ms, 12, "measured")


def test_serial_board_reports_the_native_boot_error(native):
    text = "heap_caps_malloc(9437184) for the tensor arena failed: PSRAM has 8388608 bytes free"
    device = FakeDevice(firmware_id=FIRMWARE.firmware_id, model_id=FIRMWARE.model_id,
                        boot_error=(p.ErrorCode.ARENA_ALLOCATION_FAILED, text))
    # A board that cannot be reflashed reports its boot error as the harness's own error kind, as
    # the virtual board does, with the code and the whole text.
    reported = r"ARENA_ALLOCATION_FAILED: heap_caps_malloc\(9437184\) for the tensor arena failed: PSRAM has 8388608"
    with device_on_pty(native, device) as port, SerialBoard(port, baudrate=115200) as board:
        with pytest.raises(ModelTooLargeError, match=reported):
            board.load(FIRMWARE)


# --- the same requests to both engines ------------------------------------------------------------

DEVICES = {
    "default": FakeDevice(),
    "chunked-input": FakeDevice(input_bytes=27648),
    "small-payload-many-ops": FakeDevice(input_bytes=1000, output_bytes=700, ops=300, max_payload=300),
    "many-ops": FakeDevice(input_bytes=20, ops=300),
    "boot-error": FakeDevice(boot_error=(p.ErrorCode.ARENA_ALLOCATION_FAILED,
                                         "heap_caps_malloc(9437184) for the tensor arena failed: "
                                         + "PSRAM has 8388608 bytes free; " * 10)),
    "invoke-error": FakeDevice(invoke_error="Node CONV_2D (number 0f) failed to invoke with status 1"),
    # Some inferences fail and others do not: after a failure the input is kept, after a success
    # it is gone, and the engine must not take one outcome for another's.
    "some-invokes-fail": FakeDevice(input_bytes=40, fail_mod=3),
    # A preserve_all_tensors build: GET_TENSOR answers with the last invoke's tensors, failed
    # invokes included (their tensors are what the arena holds then).
    "preserves-tensors": FakeDevice(input_bytes=40, fail_mod=3, tensors=True),
    "preserves-tensors-small-payload": FakeDevice(input_bytes=1000, output_bytes=70, max_payload=300, tensors=True),
}


def _upload(twins: Twins, device: FakeDevice, data: bytes, seq: int, chunk: int | None = None) -> None:
    chunk = chunk or device.max_payload - p.InputData.HEADER
    twins.send(frame(p.InputBegin(0, len(data)), seq), "INPUT_BEGIN")
    for offset in range(0, len(data), chunk):
        twins.send(frame(p.InputData(0, offset, data[offset:offset + chunk]), seq), f"INPUT_DATA at {offset}")


def _scripted_tensors(twins: Twins, device: FakeDevice, only) -> None:
    """GET_TENSOR after an invoke: every tensor chunk by chunk, its end, and the refusals."""
    seq = 40
    if not device.tensors:
        for index in (0, 5, 6, 65535):
            twins.expect(frame(p.GetTensor(index, 0), seq), f"GET_TENSOR {index} of a release build",
                         only("ERROR:TENSOR_UNAVAILABLE"))
        return
    specs = fake_tensor_specs(device.input_bytes, device.output_bytes)
    for index, spec in enumerate(specs):
        if spec is None:
            twins.expect(frame(p.GetTensor(index, 0), seq), "GET_TENSOR of an int64 tensor",
                         only("ERROR:TENSOR_UNAVAILABLE"))
            continue
        room = device.max_payload - p.TensorData.header_size(spec)
        chunks = max(1, -(-spec.nbytes // room))
        for number in range(chunks):
            twins.expect(frame(p.GetTensor(index, number * room), seq), f"GET_TENSOR {index}, chunk {number}",
                         only("TENSOR_DATA"))
        twins.expect(frame(p.GetTensor(index, spec.nbytes), seq), f"GET_TENSOR {index} at its end",
                     only("TENSOR_DATA"))
        twins.expect(frame(p.GetTensor(index, spec.nbytes + 1), seq), f"GET_TENSOR {index} past its end",
                     only("ERROR:BAD_PAYLOAD"))
        twins.expect(frame(p.GetTensor(index, 1), seq), f"GET_TENSOR {index} at an odd offset", only("TENSOR_DATA"))
    assert -(-specs[2].nbytes // (device.max_payload - p.TensorData.header_size(specs[2]))) >= 3
    for index in (len(specs), 65535):
        twins.expect(frame(p.GetTensor(index, 0), seq), f"GET_TENSOR {index}: no such tensor",
                     only("ERROR:BAD_PAYLOAD"))


def _scripted(twins: Twins, device: FakeDevice) -> None:
    """Every answer device.py can give, each case labelled with what it must provoke."""
    booted = device.boot_error is None
    boot = f"ERROR:{p.ErrorCode(device.boot_error[0]).name}" if not booted else ""
    only = (lambda *names: list(names)) if booted else (lambda *names: [boot])
    size = device.input_bytes
    data = bytes(random.Random(size).randbytes(size))
    twins.expect(frame(p.Hello(), 1), "HELLO", ["DEVICE_INFO"] if booted else [boot])
    twins.expect(frame(p.Hello(p.PROTOCOL_VERSION + 1), 2), "HELLO from a newer host", ["ERROR:VERSION_MISMATCH"])
    twins.expect(frame(p.GetOps(0), 3), "GET_OPS from 0", only("OPS"))
    twins.expect(frame(p.GetOps(device.ops), 4), "GET_OPS at the end", only("OPS"))
    twins.expect(frame(p.GetOps(device.ops + 1), 5), "GET_OPS past the end", only("ERROR:BAD_PAYLOAD"))
    twins.expect(raw_frame(p.MsgType.GET_OPS, 6, b"\0\0\0"), "GET_OPS with a trailing byte", ["ERROR:BAD_PAYLOAD"])
    twins.expect(raw_frame(p.MsgType.HELLO, 7, b""), "HELLO without a version", ["ERROR:BAD_PAYLOAD"])
    twins.expect(frame(p.Invoke(), 8), "INVOKE before any input", only("ERROR:NOT_READY"))
    twins.expect(frame(p.GetTensor(0, 0), 8), "GET_TENSOR before any invoke",
                 only("TENSOR_DATA" if device.tensors else "ERROR:TENSOR_UNAVAILABLE"))
    twins.expect(frame(p.InputBegin(1, size), 9), "INPUT_BEGIN of a missing tensor", only("ERROR:BAD_PAYLOAD"))
    twins.expect(frame(p.InputBegin(0, size + 1), 10), "INPUT_BEGIN of the wrong size", only("ERROR:INPUT_SIZE"))
    twins.expect(frame(p.InputBegin(0, size), 11), "INPUT_BEGIN", only("ACK"))
    twins.expect(frame(p.InputData(3, 0, data[:4]), 12), "INPUT_DATA of a missing tensor", only("ERROR:BAD_PAYLOAD"))
    twins.expect(frame(p.InputData(0, 1, data[:4]), 13), "INPUT_DATA with an offset gap: ACK of 0 held", only("ACK"))
    twins.expect(raw_frame(p.MsgType.INPUT_DATA, 14, b"\0\0\0"), "INPUT_DATA too short", ["ERROR:BAD_PAYLOAD"])
    part = min(size // 2, device.max_payload - p.InputData.HEADER)
    twins.expect(frame(p.InputData(0, 0, data[:part]), 15), "part of an input", only("ACK"))
    # Recovery inside a sample: a chunk sent again, one overlapping what is held, and a gap after
    # them are all answered with the bytes held (docs/protocol.md, "Recovery inside a sample").
    twins.expect(frame(p.InputData(0, 0, data[:part]), 15), "the same chunk again", only("ACK"))
    twins.expect(frame(p.InputData(0, 0, data[:max(1, part // 2)]), 15), "a chunk below the bytes held", only("ACK"))
    twins.expect(frame(p.InputData(0, part + 1, data[part + 1:part + 2]), 15), "a gap after part", only("ACK"))
    twins.expect(frame(p.Invoke(), 16), "INVOKE with part of an input", only("ERROR:NOT_READY"))
    _upload(twins, device, data, 17)
    twins.expect(frame(p.InputData(0, size, b"x"), 18), "INPUT_DATA past the tensor", only("ERROR:INPUT_SIZE"))
    outputs = -(-device.output_bytes // (device.max_payload - p.OutputData.HEADER))

    def invoked(data: bytes) -> list[str]:
        return ["OUTPUT_DATA"] * outputs + ["INVOKE_RESULT"] if device.invoke_ok(data) else ["ERROR:INVOKE_FAILED"]

    twins.expect(frame(p.Invoke(p.INVOKE_PROFILE), 19), "INVOKE with per-op timing", only(*invoked(data)))
    again = ["ERROR:NOT_READY"] if device.invoke_ok(data) else ["ERROR:INVOKE_FAILED"]
    twins.expect(frame(p.Invoke(), 20), "INVOKE again without new inputs", only(*again))
    _upload(twins, device, data[::-1], 21)
    twins.expect(frame(p.Invoke(0), 22), "INVOKE without per-op timing", only(*invoked(data[::-1])))
    _upload(twins, device, bytes(size), 23, chunk=max(1, min(size // 3, device.max_payload - p.InputData.HEADER)))
    twins.expect(frame(p.Invoke(0xFE), 24), "INVOKE with every flag but timing", only(*invoked(bytes(size))))
    _scripted_tensors(twins, device, only)

    twins.expect(raw_frame(0x42, 25, b"abc"), "unknown type", ["ERROR:UNKNOWN_TYPE"])
    twins.expect(raw_frame(0x00, 26, b""), "type zero", ["ERROR:UNKNOWN_TYPE"])
    info = device.device_info()
    for message in (info, p.OpsPage(0, ("A", "B" * 300)), p.Ack(3, 7), p.OutputData(0, 0, 2, b"ab"),
                    p.InvokeResult(1, 2, (3,), (4,)), p.ErrorMsg(4, "x"),
                    p.TensorData(3, 0, 4, p.TensorSpec(p.DType.INT32, ()), b"abcd")):
        twins.expect(frame(message, 27), f"{message.TYPE.name} sent to the device",
                     only("ERROR:UNKNOWN_TYPE"))
    packed = info.pack()
    # The first input descriptor starts after the fixed fields, three str8 and n_inputs.
    dtype_at = 29 + sum(1 + len(text) for text in (info.chip, info.firmware_id, info.model_id)) + 1
    rank_at = dtype_at + 1
    for label, payload in [
        ("DEVICE_INFO cut short", packed[:10]),
        ("DEVICE_INFO cut in a string", packed[:35]),
        ("DEVICE_INFO cut in a tensor", packed[:-3]),
        ("DEVICE_INFO with a trailing byte", packed + b"\0"),
        ("DEVICE_INFO with rank 9", packed[:rank_at] + b"\x09" + packed[rank_at + 1:]),
        ("DEVICE_INFO with an unknown dtype", packed[:dtype_at] + b"\x05" + packed[dtype_at + 1:]),
    ]:
        twins.expect(raw_frame(p.MsgType.DEVICE_INFO, 28, payload), label, ["ERROR:BAD_PAYLOAD"])
    for msg_type, payload, label in [
        (p.MsgType.OPS, b"\0\0\x02\x03AB", "OPS with a name past the end"),
        (p.MsgType.OPS, b"\0\0\x01\x01A!", "OPS with a trailing byte"),
        (p.MsgType.INVOKE_RESULT, p.InvokeResult(1, 2, (3, 4), (5, 6)).pack()[:-1], "INVOKE_RESULT cut short"),
        (p.MsgType.INVOKE_RESULT, bytes(12) + b"\xff\xff", "INVOKE_RESULT claiming 65535 ops"),
        (p.MsgType.ERROR, b"\x01\x00\x09abc", "ERROR with its text cut"),
        (p.MsgType.ACK, b"\x04", "ACK cut short"),
        (p.MsgType.OUTPUT_DATA, bytes(8), "OUTPUT_DATA without its header"),
        (p.MsgType.INPUT_BEGIN, bytes(6), "INPUT_BEGIN with a trailing byte"),
        (p.MsgType.INVOKE, b"", "INVOKE without flags"),
        (p.MsgType.GET_TENSOR, bytes(5), "GET_TENSOR cut short"),
        (p.MsgType.GET_TENSOR, bytes(7), "GET_TENSOR with a trailing byte"),
        (p.MsgType.TENSOR_DATA, bytes(9), "TENSOR_DATA without its header"),
        (p.MsgType.TENSOR_DATA, bytes(10) + b"\x09\x09", "TENSOR_DATA with rank 9"),
        (p.MsgType.TENSOR_DATA, bytes(10) + b"\x04\x00" + bytes(8), "TENSOR_DATA of an int64 tensor"),
        (p.MsgType.TENSOR_DATA, bytes(10) + b"\x09\x02" + bytes(12), "TENSOR_DATA cut in its descriptor"),
    ]:
        twins.expect(raw_frame(msg_type, 29, payload), label, ["ERROR:BAD_PAYLOAD"])

    hello = frame(p.Hello(), 30)
    greeting = ["DEVICE_INFO"] if booted else [boot]
    twins.expect(b"ESP-ROM:esp32s3-20210327\r\n\xa5" + hello + b"\xa5", "HELLO in boot noise", greeting)
    twins.expect(hello[:5], "the first bytes of a HELLO", [])
    twins.expect(hello[5:], "the rest of it", greeting)
    corrupt = bytearray(frame(p.GetOps(0), 31))
    corrupt[-1] ^= 0x01
    twins.expect(bytes(corrupt) + hello, "bad CRC, then HELLO", greeting)
    corrupt = bytearray(frame(p.GetOps(0), 32))
    corrupt[4] ^= 0x80
    twins.expect(bytes(corrupt) + hello, "bad header check, then HELLO", greeting)
    header = bytes([p.MsgType.INPUT_DATA, 33]) + (device.max_payload + 1).to_bytes(2, "little")
    oversize = p.SYNC + header + bytes([p.crc8(header)])
    twins.expect(oversize + hello, "oversize length, then HELLO", greeting)
    twins.expect(frame(p.Hello(), 255), "HELLO with seq 255", greeting)


@pytest.mark.parametrize("worker", ["sync", "thread"])
@pytest.mark.parametrize("name", list(DEVICES))
def test_both_engines_give_the_same_bytes_for_the_same_requests(native, name, worker):
    device = dataclasses.replace(DEVICES[name], worker=worker, idle_gap_ms=NEVER_IDLE)
    with device_on_socket(native, device) as wire:
        twins = Twins(wire, device.python_engine())
        _scripted(twins, device)
        _random_requests(twins, device, random.Random(name), steps=1000)
        answer = p.FrameDecoder().feed(twins.send(FLUSH + frame(p.Hello(), 77), "HELLO at the end"))
        assert (answer[-1].type, answer[-1].seq) == (
            p.MsgType.DEVICE_INFO if device.boot_error is None else p.MsgType.ERROR, 77)


@pytest.mark.parametrize("worker", ["sync", "thread"])
def test_both_engines_drop_a_cut_frame_after_an_idle_gap_and_say_so(native, worker):
    # The device holds 191 bytes of a 506-byte INPUT_DATA frame and the line falls silent: after
    # the protocol's idle gap both engines drop them and answer ERROR BAD_FRAME on their own, so the
    # host learns of the loss at once and the next HELLO is a HELLO again, not more of that frame.
    device = FakeDevice(input_bytes=490, worker=worker)
    engine = device.python_engine()
    gap = device.idle_gap_ms / 1000
    with device_on_socket(native, device) as wire:
        for request in (frame(p.Hello(), 1), frame(p.InputBegin(0, 490), 2)):
            expected = b"".join(engine.receive(request, 0.0))
            assert wire.exchange(request, len(expected)) == expected
        cut = frame(p.InputData(0, 0, bytes(range(245)) * 2), 3)[:191]
        assert engine.receive(cut, 0.0) == [] and wire.exchange(cut, 0) == b""
        assert engine.idle(gap * 0.9) == []
        nack = b"".join(engine.idle(gap))
        assert describe(nack) == [f"ERROR(seq 3) BAD_FRAME: frame lost: 191 bytes held, then no byte for "
                                  f"{device.idle_gap_ms} ms"]
        started = time.monotonic()
        assert wire.exchange(b"", len(nack), timeout_s=5.0) == nack
        assert time.monotonic() - started < 1.0
        hello = frame(p.Hello(), 4)
        expected = b"".join(engine.receive(hello, 1.0))
        assert summary(expected) == ["DEVICE_INFO"]
        assert wire.exchange(hello, len(expected)) == expected


@pytest.mark.parametrize("name", [name for name in DEVICES if name != "boot-error"])
def test_pipelined_requests_get_the_same_bytes_from_the_worker(native, name):
    # Requests arrive while inferences run on the worker: answers held back, requests that wait for
    # an inference's outcome, both staging sets and both jobs in use. The bytes must still be the
    # synchronous Python engine's, in request order.
    device = dataclasses.replace(DEVICES[name], worker="thread", invoke_sleep_us=2000, idle_gap_ms=NEVER_IDLE)
    with device_on_socket(native, device) as wire:
        rng = random.Random(f"pipelined-{name}")
        twins = PipelinedTwins(wire, device.python_engine(), rng=rng, limit=rng.randint(1, 40))
        _scripted(twins, device)
        _random_requests(twins, device, rng, steps=600)
        twins.send(FLUSH + frame(p.Hello(), 77), "HELLO at the end")
        twins.flush()
        assert twins.sent > 600


def test_worker_has_no_data_race_under_thread_sanitizer(native, tsan_device):
    # With tensors kept: GET_TENSOR reads memory the worker's invoke writes, so it must wait for it.
    device = FakeDevice(input_bytes=300, max_payload=128, worker="thread", invoke_sleep_us=500, idle_gap_ms=NEVER_IDLE,
                        tensors=True)
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}
    failure: BaseException | None = None
    with device_on_socket(native, device, program=tsan_device, stderr=subprocess.PIPE, env=env) as wire:
        try:
            rng = random.Random("tsan")
            twins = PipelinedTwins(wire, device.python_engine(), rng=rng, limit=8)
            _random_requests(twins, device, rng, steps=300)
            twins.send(FLUSH + frame(p.Hello(), 78), "HELLO at the end")
            twins.flush()
        except BaseException as error:  # pytest.fail's exception too: the sanitizer's report explains it
            failure = error
    errors = wire.process.communicate(timeout=30)[1].decode(errors="replace")
    assert "ThreadSanitizer" not in errors, errors[-3000:]
    if failure is not None:
        raise failure
    assert wire.process.returncode == 0, errors[-3000:]


def _timed_answers(wire: SocketWire, data: bytes, answer_bytes: int, timeout_s: float) -> list[tuple[float, p.Frame]]:
    """Sends `data` at once and returns each answer frame with its arrival time (monotonic s)."""
    decoder = p.FrameDecoder()
    frames: list[tuple[float, p.Frame]] = []
    received = 0
    unsent = memoryview(data)
    sock = wire._sock
    deadline = time.monotonic() + timeout_s
    while received < answer_bytes:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{received} of {answer_bytes} answer bytes after {timeout_s} s"
        readable, writable, _ = select.select([sock], [sock] if unsent else [], [], remaining)
        if writable and unsent:
            unsent = unsent[sock.send(unsent[:1 << 16]):]
        if readable:
            chunk = sock.recv(1 << 16)
            assert chunk, "the native device went away"
            now = time.monotonic()
            received += len(chunk)
            frames += [(now, item) for item in decoder.feed(chunk)]
    return frames


@pytest.mark.parametrize("scenario", ["upload", "results"])
def test_worker_overlaps_the_link_with_the_inference(native, scenario):
    # Inferences of 80 ms, and a link that moves a 96x96x3 tensor in about 40 ms: the input
    # ("upload") or the output ("results", as an image-to-image model returns). On one thread each
    # sample costs link time plus inference. With the worker, sample k+1's upload is taken in while
    # sample k is inferred, and sample k+1 is inferred while result k goes out, so a run costs about
    # one transfer plus the inferences. The synchronous run is the control: the same measurement
    # must tell the two apart.
    big, link_s, invoke_s, samples = 27648, 0.040, 0.080, 5
    input_bytes, output_bytes = (big, 8) if scenario == "upload" else (8, big)
    ns_per_byte = int(link_s * 1e9 / big)
    rng = np.random.default_rng(7)
    inputs = [rng.integers(-128, 128, size=input_bytes, dtype=np.int8).tobytes() for _ in range(samples)]
    chunk = p.MAX_PAYLOAD - p.InputData.HEADER
    requests = []
    for index, data in enumerate(inputs):
        seq = 2 * index + 1
        requests.append(frame(p.InputBegin(0, input_bytes), seq))
        requests += [frame(p.InputData(0, offset, data[offset:offset + chunk]), seq)
                     for offset in range(0, input_bytes, chunk)]
        requests.append(frame(p.Invoke(p.INVOKE_PROFILE), seq + 1))
    measured = {}
    for worker in ("sync", "thread"):
        device = FakeDevice(input_bytes=input_bytes, output_bytes=output_bytes, worker=worker,
                            invoke_sleep_us=int(invoke_s * 1e6),
                            rx_ns_per_byte=ns_per_byte if scenario == "upload" else 0,
                            tx_ns_per_byte=ns_per_byte if scenario == "results" else 0)
        engine = device.python_engine()
        expected = b"".join(b"".join(engine.receive(request)) for request in requests)
        with device_on_socket(native, device) as wire:
            start = time.monotonic()
            frames = _timed_answers(wire, b"".join(requests), len(expected), timeout_s=20.0)
        answer = b"".join(p.encode_frame(item.type, item.seq, item.payload) for _, item in frames)
        assert answer == expected, f"{worker}: python {describe(expected)}\nc++ {describe(answer)}"
        outputs = [b"".join(p.decode_message(item).data for _, item in frames
                            if item.type == p.MsgType.OUTPUT_DATA and item.seq == 2 * index + 2)
                   for index in range(samples)]
        assert outputs == [fake_output(data, output_bytes) for data in inputs], worker
        results = [at for at, item in frames if item.type == p.MsgType.INVOKE_RESULT]
        last_acks = [at for at, item in frames if item.type == p.MsgType.ACK and p.decode_message(item).value
                     == input_bytes]
        # The last ACK of sample k+1's upload comes after result k (answers stay in order); the gap
        # is how long the upload still took once result k was out.
        gaps = sorted(ack - result for result, ack in zip(results, last_acks[1:]))
        measured[worker] = (results[-1] - start, gaps[len(gaps) // 2])
    serial = samples * (link_s + invoke_s)
    overlapped = link_s + samples * max(link_s, invoke_s)
    (sync_total, sync_gap), (thread_total, thread_gap) = measured["sync"], measured["thread"]
    report = (f"{scenario}: sync {sync_total * 1e3:.0f} ms (median gap {sync_gap * 1e3:.1f} ms), worker "
              f"{thread_total * 1e3:.0f} ms (median gap {thread_gap * 1e3:.1f} ms); serial {serial * 1e3:.0f} ms, "
              f"overlapped {overlapped * 1e3:.0f} ms")
    assert sync_total >= 0.95 * serial, report
    assert thread_total < (serial + overlapped) / 2, report
    if scenario == "upload":
        # Direct evidence: sample k+1 was in before result k went out.
        assert sync_gap >= 0.8 * link_s and thread_gap < 0.25 * link_s, report


def test_host_window_lets_a_double_buffered_device_take_the_whole_next_upload(native):
    # The host's own pipelined path (harness/board/link.py) against the worker: inferences of
    # 80 ms and a 96x96x3 upload of 40 ms. A double-buffered device advertises it in DEVICE_INFO
    # and the host keeps a whole sample beyond its four frames unanswered, so every upload after the
    # first hides under the previous inference. Forced back to four frames, part of each upload
    # waits for the previous result: the control that the measurement tells the two apart.
    big, link_s, invoke_s, count = 27648, 0.040, 0.080, 6
    device = FakeDevice(firmware_id=FIRMWARE.firmware_id, model_id=FIRMWARE.model_id, input_bytes=big,
                        worker="thread", invoke_sleep_us=int(invoke_s * 1e6), rx_ns_per_byte=int(link_s * 1e9 / big))
    rng = np.random.default_rng(11)
    samples = [[rng.integers(-128, 128, size=(1, big), dtype=np.int8)] for _ in range(count)]
    payloads = [[sample[0].tobytes()] for sample in samples]
    elapsed: dict[str, float] = {}
    overlapped = link_s + count * invoke_s  # every upload but the first hidden
    with device_on_pty(native, device) as port, SerialBoard(port, baudrate=115200) as board:
        info = board.load(FIRMWARE)
        assert info.flags & p.FLAG_DOUBLE_BUFFERED
        four_frames = 4 * (info.max_payload + p.FRAME_OVERHEAD)
        # The best of up to three rounds: `make test` runs two workers, and a round in which the
        # other worker took the core at the wrong moment measures the machine, not the window.
        for _ in range(3):
            for name, window in (("advertised", None), ("four frames", four_frames)):
                start = time.monotonic()
                results = list(board._link.infer_many(payloads, profile=False, window_bytes=window))
                elapsed[name] = min(elapsed.get(name, float("inf")), time.monotonic() - start)
                assert [r.outputs[0] for r in results] == [fake_output(d[0], 8) for d in payloads], name
            if elapsed["advertised"] < overlapped + 0.35 * count * link_s:
                break
    report = ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in elapsed.items())
    report += f"; fully overlapped {overlapped * 1e3:.0f} ms"
    print(report)
    assert elapsed["advertised"] < overlapped + 0.35 * count * link_s, report
    assert elapsed["four frames"] > elapsed["advertised"] + 0.2 * count * link_s, report


def _random_requests(twins: Twins, device: FakeDevice, rng: random.Random, steps: int) -> None:
    """Requests a host may send, right and wrong, in random order; the engines must agree on all."""
    size = device.input_bytes
    chunk_limit = device.max_payload - p.InputData.HEADER
    for _ in range(steps):
        seq = rng.randrange(256)
        roll = rng.random()
        if roll < 0.2:
            # Chunks of any size, but never so small that a large input takes thousands of frames.
            chunk = rng.randint(max(1, min(chunk_limit, size // 16)), chunk_limit)
            _upload(twins, device, rng.randbytes(size), seq, chunk=chunk)
            if rng.random() < 0.8:
                twins.send(frame(p.Invoke(rng.randrange(256)), seq), "INVOKE after an upload")
        elif roll < 0.35:
            length = min(rng.choice((0, 1, rng.randint(0, chunk_limit), size - twins.held + rng.randint(0, 2))),
                         chunk_limit)
            twins.send(frame(p.InputData(0, twins.held, rng.randbytes(max(0, length))), seq), "INPUT_DATA in place")
        elif roll < 0.4:
            # Sent again: at or below the bytes held, as a host recovering inside a sample does.
            offset = rng.randint(0, twins.held)
            length = min(rng.randint(0, chunk_limit), size - offset + rng.randint(0, 1))
            twins.send(frame(p.InputData(0, offset, rng.randbytes(max(0, length))), seq), "INPUT_DATA again")
        elif roll < 0.45:
            offset = rng.choice((0, twins.held + 1, rng.randrange(1 << 32)))
            twins.send(frame(p.InputData(rng.choice((0, 0, 1, 255)), offset, rng.randbytes(rng.randint(0, 9))), seq),
                       "INPUT_DATA elsewhere")
        elif roll < 0.55:
            twins.send(frame(p.Invoke(rng.randrange(256)), seq), "INVOKE")
        elif roll < 0.62:
            total = rng.choice((size, size, 0, size + 1, rng.randrange(1 << 32)))
            twins.send(frame(p.InputBegin(rng.choice((0, 0, 0, 1, 200)), total), seq), "INPUT_BEGIN")
        elif roll < 0.7:
            twins.send(frame(p.GetOps(rng.choice((0, rng.randint(0, device.ops + 2), 65535))), seq), "GET_OPS")
        elif roll < 0.75:
            version = p.PROTOCOL_VERSION
            twins.send(frame(p.Hello(rng.choice((version, version, 0, version - 1, version + 1, 255))), seq), "HELLO")
        elif roll < 0.8:
            index = rng.choice((0, 1, 2, 3, 4, 5, 6, rng.randrange(1 << 16)))
            offset = rng.choice((0, 0, rng.randint(0, 10001), rng.randrange(1 << 32)))
            twins.send(frame(p.GetTensor(index, offset), seq), "GET_TENSOR")
        elif roll < 0.88:
            msg_type = rng.choice(sorted(p.MESSAGES)) if rng.random() < 0.7 else rng.randrange(256)
            payload = rng.randbytes(rng.choice((0, 1, 2, 5, 9, 14, 29, rng.randint(0, 120))))
            twins.send(raw_frame(msg_type, seq, payload), f"type 0x{msg_type:02x} with random payload")
        else:
            valid = frame(rng.choice((p.Hello(), p.GetOps(0), p.Invoke(0), p.InputBegin(0, size), p.GetTensor(2, 0))),
                          seq)
            mutated = bytearray(valid)
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            twins.send(rng.randbytes(rng.randint(0, 20)) + bytes(mutated) + valid, "noise and a flipped frame")


def _ask(wire: SocketWire, message, seq: int) -> list[str]:
    """Message names of the answer, error texts for errors; for requests Python cannot answer."""
    decoder = p.FrameDecoder()
    frames: list[p.Frame] = []
    data = frame(message, seq)
    while not frames or frames[-1].type == p.MsgType.OUTPUT_DATA:
        byte = wire.exchange(data, 1)
        assert byte, f"no complete answer to {message}; frames so far: {[f.type for f in frames]}"
        data = b""
        frames += decoder.feed(byte)
    return [p.decode_message(f).text if f.type == p.MsgType.ERROR else p.MsgType(f.type).name for f in frames]


def test_worker_answers_get_tensor_after_the_invoke_with_that_invokes_tensors(native):
    # GET_TENSOR right behind an INVOKE, and the next sample's upload and INVOKE right behind it,
    # all in one write while each inference takes 150 ms on the worker. The worker writes the arena
    # the tensors live in: the engine must leave GET_TENSOR unread until that invoke's answers are
    # out, so it reads that invoke's tensors and the next invoke waits for it.
    device = FakeDevice(input_bytes=300, max_payload=512, worker="thread", invoke_sleep_us=150_000,
                        idle_gap_ms=NEVER_IDLE, tensors=True)
    specs = fake_tensor_specs(device.input_bytes, device.output_bytes)
    first, second = bytes(random.Random(1).randbytes(300)), bytes(random.Random(2).randbytes(300))
    chunk = device.max_payload - p.InputData.HEADER

    def upload(data: bytes, seq: int) -> list[bytes]:
        return [frame(p.InputBegin(0, len(data)), seq)] + [
            frame(p.InputData(0, offset, data[offset:offset + chunk]), seq) for offset in range(0, len(data), chunk)]

    requests = (upload(first, 1) + [frame(p.Invoke(p.INVOKE_PROFILE), 2), frame(p.GetTensor(2, 0), 3),
                                    frame(p.GetTensor(0, 0), 4)]
                + upload(second, 5) + [frame(p.Invoke(0), 6), frame(p.GetTensor(0, 0), 7), frame(p.GetTensor(5, 0), 8)])
    engine = device.python_engine()
    expected = b"".join(b"".join(engine.receive(request)) for request in requests)
    with device_on_socket(native, device) as wire:
        frames = _timed_answers(wire, b"".join(requests), len(expected), timeout_s=20.0)
    answer = b"".join(p.encode_frame(item.type, item.seq, item.payload) for _, item in frames)
    assert answer == expected, f"python {describe(expected)}\nc++ {describe(answer)}"
    order = [(item.type, item.seq) for _, item in frames if item.type != p.MsgType.ACK]
    assert order == [(p.MsgType.OUTPUT_DATA, 2), (p.MsgType.INVOKE_RESULT, 2), (p.MsgType.TENSOR_DATA, 3),
                     (p.MsgType.TENSOR_DATA, 4), (p.MsgType.OUTPUT_DATA, 6), (p.MsgType.INVOKE_RESULT, 6),
                     (p.MsgType.TENSOR_DATA, 7), (p.MsgType.TENSOR_DATA, 8)]
    chunks = {item.seq: p.decode_message(item) for _, item in frames if item.type == p.MsgType.TENSOR_DATA}
    room = device.max_payload - p.TensorData.header_size(specs[2])
    assert chunks[3].data == fake_tensors(first, b"")[2][:room]
    assert (chunks[4].data, chunks[7].data) == (first, second)
    assert chunks[8].data == fake_output(second, device.output_bytes)


def test_host_reads_the_native_engines_tensors_over_a_pty(native):
    # The host's read_tensors (harness/board/link.py) against the C++ engine and its worker: a
    # 20 KB int16 tensor in five chunks, the others whole, each that of the last invoke.
    device = FakeDevice(firmware_id=FIRMWARE.firmware_id, model_id=FIRMWARE.model_id, input_bytes=5000,
                        worker="thread", tensors=True)
    specs = fake_tensor_specs(device.input_bytes, device.output_bytes)
    rng = np.random.default_rng(14)
    samples = [[rng.integers(-128, 128, size=(1, 5000), dtype=np.int8)] for _ in range(3)]
    with device_on_pty(native, device) as port, SerialBoard(port, baudrate=115200) as board:
        info = board.load(FIRMWARE)
        assert info.flags & p.FLAG_PRESERVES_TENSORS
        results = list(board.infer_many(samples))
        last = samples[-1][0].tobytes()
        before = board._link.retries  # set-up may retry on a loaded machine (the banner races HELLO)
        tensors = board._link.read_tensors([0, 1, 2, 3, 5])
        output = results[-1].outputs[0].tobytes()
        assert tensors == {index: (specs[index], fake_tensors(last, output)[index]) for index in (0, 1, 2, 3, 5)}
        assert specs[1].nbytes > 4 * p.MAX_PAYLOAD
        with pytest.raises(TensorUnavailableError, match="tensor 4 has type code 4"):
            board._link.read_tensor(UNCARRIED_TENSOR)
        assert board._link.retries == before
    plain = dataclasses.replace(device, tensors=False)
    with device_on_pty(native, plain) as port, SerialBoard(port, baudrate=115200) as board:
        board.load(FIRMWARE)
        board.infer(samples[0])
        with pytest.raises(TensorUnavailableError, match="not built with preserve_all_tensors"):
            board._link.read_tensor(0)


def test_invoke_result_too_large_for_a_frame_is_an_error_not_silence(native):
    # Python's engine has no answer here (its encoder raises); the firmware must still answer.
    with device_on_socket(native, FakeDevice(ops=600)) as wire:
        assert _ask(wire, p.InputBegin(0, 8), 1) == ["ACK"]
        assert _ask(wire, p.InputData(0, 0, bytes(8)), 2) == ["ACK"]
        assert _ask(wire, p.Invoke(p.INVOKE_PROFILE), 3) == [
            "invoke failed: per-op timing of 600 ops does not fit one INVOKE_RESULT; invoke without profiling"]
        assert _ask(wire, p.Invoke(0), 4) == ["input 0 has 0 of 8 bytes"]
        assert _ask(wire, p.InputBegin(0, 8), 5) == ["ACK"]
        assert _ask(wire, p.InputData(0, 0, bytes(8)), 6) == ["ACK"]
        assert _ask(wire, p.Invoke(0), 7) == ["OUTPUT_DATA", "INVOKE_RESULT"]


# --- hostile input --------------------------------------------------------------------------------

def test_malformed_frames_never_crash_or_hang_the_native_device(native):
    device = FakeDevice(input_bytes=64, idle_gap_ms=NEVER_IDLE)
    rng = random.Random("malformed")
    valid = [frame(m, rng.randrange(256)) for m in (
        p.Hello(), p.GetOps(0), p.InputBegin(0, 64), p.InputData(0, 0, bytes(range(64))), p.Invoke(1),
        device.device_info(), p.ErrorMsg(3, "x" * 200))]
    valid += [bytes.fromhex(v["frame"]) for v in GOLDEN]
    with device_on_socket(native, device) as wire:
        twins = Twins(wire, device.python_engine())
        for step in range(2000):
            good = rng.choice(valid)
            roll = rng.random()
            if roll < 0.25:
                blob = rng.randbytes(rng.randint(1, 300))
            elif roll < 0.5:
                blob = good[:rng.randrange(1, len(good))]
            elif roll < 0.75:
                flipped = bytearray(good)
                for _ in range(rng.randint(1, 4)):
                    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
                blob = bytes(flipped)
            elif roll < 0.85:
                # A header whose check passes, claiming any length up to 64 KB.
                header = bytes([rng.randrange(256), rng.randrange(256)]) + rng.randbytes(2)
                blob = p.SYNC + header + bytes([p.crc8(header)]) + rng.randbytes(rng.randint(0, 50))
            else:
                blob = bytes([rng.choice((0xA5, 0x5A, 0x00))]) * rng.randint(1, 20) + good
            twins.send(blob, f"malformed #{step}")
            assert wire.process.poll() is None, f"native device exited with {wire.process.returncode}"
        # The flush may complete a frame the noise left half-sent; both engines answer it alike.
        answer = p.FrameDecoder().feed(twins.send(FLUSH + frame(p.Hello(), 99), "HELLO after the noise"))
        assert (answer[-1].type, answer[-1].seq) == (p.MsgType.DEVICE_INFO, 99)
        assert p.decode_message(answer[-1]) == device.device_info()
        assert twins.engine.decode_stats.garbage_bytes > 0
