"""Both board implementations over a real pseudo-terminal, real pyserial and real TFLM kernels."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from dataclasses import replace
from pathlib import Path

import flatbuffers
import numpy as np
import pytest

from harness.board import SerialBoard, VirtualBoard, open_board
from harness.board.flasher import PlatformIOFlasher
from harness.board.serial_board import PortIdentity, port_identity
from harness.board.virtual_device import VirtualDeviceConfig
from harness.errors import BoardError, ModelTooLargeError, PortIdentityError, PortUnavailableError, UnsupportedOpError
from harness.firmware import FirmwareImage, plan_firmware
from harness.reference import model_io
from harness.tflite_model import inspect_model
from harness.tflm import open_interpreter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def sine_firmware(sine_model) -> FirmwareImage:
    _, _, arena = model_io(sine_model)
    return plan_firmware("sine", sine_model, arena)


def _host_output(model: Path, sample: np.ndarray) -> np.ndarray:
    host = open_interpreter(model.read_bytes(), 1 << 20)
    return host.run([sample])[0]


def test_virtual_board_runs_the_model_with_tflm_and_marks_latency_estimated(tmp_path, sine_model, sine_firmware):
    with VirtualBoard(tmp_path) as board:
        info = board.load(sine_firmware)
        assert info.is_virtual and info.latency_kind == "estimated"
        assert info.model_id == sine_firmware.model_id and info.firmware_id == sine_firmware.firmware_id
        assert 0 < info.arena_used <= info.arena_size == sine_firmware.arena_size
        assert board.op_names == tuple(op.name for op in inspect_model(sine_model.read_bytes()).ops)
        for x in (0.0, 1.0, 3.0):
            sample = np.array([[x]], dtype=np.float32)
            result = board.infer([sample])
            np.testing.assert_array_equal(result.outputs[0], _host_output(sine_model, sample))
            assert result.total_us > 0 and len(result.op_us) == len(board.op_names)
            assert abs(result.outputs[0].item() - np.sin(x)) < 0.2


def test_same_firmware_is_not_reflashed_and_a_slower_clock_estimates_slower(tmp_path, sine_firmware):
    with VirtualBoard(tmp_path) as board:
        board.load(sine_firmware)
        fast = board.infer([np.zeros((1, 1), np.float32)]).total_cycles
        fast_us = board.infer([np.zeros((1, 1), np.float32)]).total_us
        board.load(sine_firmware)
        assert board.flash_count == 1
        board.load(replace(sine_firmware, cpu_mhz=160))
        assert board.flash_count == 2 and board.info.cpu_mhz == 160
        slow = board.infer([np.zeros((1, 1), np.float32)])
        # Compute cycles do not change with the clock; memory waits are bus time, so they take
        # fewer CPU cycles at 160 MHz but the model is still slower in microseconds.
        assert slow.total_cycles <= fast and slow.total_us > fast_us


def test_arena_larger_than_psram_fails_as_the_device_allocation(tmp_path, sine_firmware):
    firmware = replace(sine_firmware, arena_size=9 * 1024 * 1024, arena_in_psram=True)
    with VirtualBoard(tmp_path) as board, pytest.raises(ModelTooLargeError, match=r"heap_caps_malloc\(9437184\)"):
        board.load(firmware)


def test_arena_too_small_for_the_model_fails_in_allocate_tensors(tmp_path, sine_firmware):
    firmware = replace(sine_firmware, arena_size=1024)
    with VirtualBoard(tmp_path) as board, pytest.raises(ModelTooLargeError, match="AllocateTensors"):
        board.load(firmware)


def _with_unsupported_op(model: Path, out: Path) -> Path:
    """The same model with its first operator code changed to TOPK_V2, a kernel TFLM lacks."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model.read_bytes(), 0))
    tree.operatorCodes[0].builtinCode = schema.BuiltinOperator.TOPK_V2
    tree.operatorCodes[0].deprecatedBuiltinCode = schema.BuiltinOperator.TOPK_V2
    builder = flatbuffers.Builder(1024)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    out.write_bytes(bytes(builder.Output()))
    return out


def test_unsupported_op_is_named_by_the_board(tmp_path, sine_model, sine_firmware):
    broken = _with_unsupported_op(sine_model, tmp_path / "topk.tflite")
    firmware = plan_firmware("topk", broken, sine_firmware.arena_size)
    with VirtualBoard(tmp_path / "board") as board, pytest.raises(UnsupportedOpError, match="TOPK_V2"):
        board.load(firmware)


def test_a_crashed_board_process_fails_with_the_tail_of_its_log(tmp_path, sine_firmware):
    with VirtualBoard(tmp_path) as board:
        board.load(sine_firmware)
        os.kill(board._process.pid, signal.SIGKILL)
        board._process.wait(timeout=5)
        with pytest.raises(BoardError, match=r"exited with code -9; log tail: .*booted"):
            board.infer([np.zeros((1, 1), np.float32)])


def test_serial_board_on_a_missing_port_names_the_port():
    board = SerialBoard("/dev/ttyACM_tinyhil_missing")
    with pytest.raises(PortUnavailableError, match="/dev/ttyACM_tinyhil_missing does not exist"):
        board.load(FirmwareImage("m", Path("m.tflite"), "0" * 16, 1024, False))


@pytest.fixture
def sine_device_pty(tmp_path, sine_firmware):
    """A pseudo-terminal with the virtual device running the sine firmware behind it: a port that
    answers like an ESP32-S3 but has no USB identity. Yields the port's path."""
    config = tmp_path / "device.json"
    config.write_text(VirtualDeviceConfig.for_firmware(sine_firmware).to_json())
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    device = subprocess.Popen([sys.executable, "-m", "harness.board.virtual_device", "--config", str(config),
                               "--fd", str(master)], pass_fds=(master,), cwd=REPO)
    os.close(master)
    try:
        yield os.ttyname(slave)
    finally:
        device.terminate()
        device.wait(timeout=5)
        os.close(slave)


def test_serial_board_speaks_to_a_device_on_a_pty_through_pyserial(sine_device_pty, sine_model, sine_firmware):
    """The real-board code path end to end, with the virtual device standing in for the ESP32-S3."""
    with SerialBoard(sine_device_pty, baudrate=115200) as board:
        info = board.load(sine_firmware)
        assert info.firmware_id == sine_firmware.firmware_id
        sample = np.array([[0.5]], dtype=np.float32)
        np.testing.assert_array_equal(board.infer([sample]).outputs[0], _host_output(sine_model, sample))
        with pytest.raises(BoardError, match="opened without a build directory"):
            board.load(replace(sine_firmware, cpu_mhz=160))


def test_large_inputs_are_uploaded_in_chunks(tmp_path, shared_dir):
    model = shared_dir / "models" / "tflm-examples" / "person_detect.tflite"
    input_quant, _, arena = model_io(model)
    firmware = plan_firmware("person_detect", model, arena)
    sample = np.random.default_rng(1).integers(-128, 127, size=input_quant.shape, dtype=np.int8)
    with VirtualBoard(tmp_path) as board:
        board.load(firmware)
        assert board.info.inputs[0].nbytes > board.info.max_payload
        np.testing.assert_array_equal(board.infer([sample]).outputs[0], _host_output(model, sample))


class FakeUploadFlasher:
    """Stands in for PlatformIO's upload, which cannot run here (no ESP32-S3, no toolchain): it
    "flashes" by restarting a device process on the same pty with the firmware image the rendered
    project was made for. Rendering, the decision to flash or not, reopening the port and the
    handshake after flashing are the real code."""

    def __init__(self, master_fd: int) -> None:
        self.master_fd = master_fd
        self.device: subprocess.Popen | None = None
        self.uploads: list[Path] = []

    def build(self, project):
        assert (project.directory / "src" / "model_config.h").is_file()
        return project.directory

    def upload(self, project, port: str) -> None:
        self.uploads.append(project.directory)
        self.stop()
        config = project.directory / "device.json"
        config.write_text(VirtualDeviceConfig.for_firmware(project.firmware).to_json())
        self.device = subprocess.Popen([sys.executable, "-m", "harness.board.virtual_device", "--config",
                                        str(config), "--fd", str(self.master_fd)], pass_fds=(self.master_fd,),
                                       cwd=REPO)

    def stop(self) -> None:
        if self.device is not None:
            self.device.terminate()
            self.device.wait(timeout=5)
            self.device = None


def test_serial_board_flashes_only_when_the_board_runs_other_firmware(tmp_path, sine_model, sine_firmware):
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    flasher = FakeUploadFlasher(master)
    port = os.ttyname(slave)
    try:
        # A pty has no USB identity: flashing it is the user's explicit choice.
        with SerialBoard(port, baudrate=115200, timeout_s=1.0, build_root=tmp_path / "fw",
                         flasher=flasher, flash_anyway=True) as board:
            # Nothing answers yet (a blank board): the first load must flash.
            info = board.load(sine_firmware)
            assert board.flash_count == 1 and info.firmware_id == sine_firmware.firmware_id
            board.load(sine_firmware)
            assert board.flash_count == 1
            slower = replace(sine_firmware, cpu_mhz=160)
            assert board.load(slower).cpu_mhz == 160 and board.flash_count == 2
            sample = np.array([[0.25]], dtype=np.float32)
            np.testing.assert_array_equal(board.infer([sample]).outputs[0], _host_output(sine_model, sample))
        # A new session finds the right firmware already running: no build, no upload.
        with SerialBoard(port, baudrate=115200, build_root=tmp_path / "fw", flasher=flasher) as board:
            board.load(slower)
            assert board.flash_count == 0 and len(flasher.uploads) == 2
    finally:
        flasher.stop()
        os.close(master)
        os.close(slave)


# --- which ports are flashed ----------------------------------------------------------------------

@pytest.fixture()
def silent_pty():
    """A real pseudo-terminal with nobody answering on it: what a built-in /dev/ttyS0 looks like
    (it exists, opens, and says nothing), with no USB identity either."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


class UploadRecorder:
    """Stands in for PlatformIO's build and upload (no toolchain, no chip here); records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def build(self, project):
        self.calls.append(("build", str(project.directory)))
        return project.directory

    def upload(self, project, port: str) -> None:
        self.calls.append(("upload", port))


@pytest.mark.parametrize("vid, pid, accepted", [
    (0x303A, 0x1001, True),    # ESP32-S3 native USB Serial/JTAG
    (0x303A, 0x0002, True),    # ESP32-S3 USB-OTG (TinyUSB CDC)
    (0x10C4, 0xEA60, True),    # CP210x bridge of a DevKitC-1 v1.0
    (0x1A86, 0x55D3, True),    # CH343 bridge
    (0x1A86, 0x7523, True),    # CH340 bridge
    (0x10C4, 0xEA70, False),   # CP2105 dual UART: not what ESP32-S3 kits carry
    (0x0403, 0x6001, False),   # FTDI cable
    (None, None, False),       # a built-in UART, a pty
])
def test_only_esp32s3_usb_identities_are_taken_for_a_board(vid, pid, accepted):
    assert PortIdentity("/dev/x", vid, pid).could_be_esp32s3 is accepted


def test_open_board_refuses_a_silent_port_without_usb_identity_at_once_and_flashes_nothing(
        tmp_path, silent_pty, sine_firmware, monkeypatch):
    # The one thing replaced: PlatformIO's build and upload, which cannot run here. Opening the
    # port, reading its identity (pyserial's port list) and refusing are the real code.
    recorder = UploadRecorder()
    monkeypatch.setattr(PlatformIOFlasher, "build", lambda self, project: recorder.build(project))
    monkeypatch.setattr(PlatformIOFlasher, "upload", lambda self, project, port: recorder.upload(project, port))
    assert not port_identity(silent_pty).is_usb
    started = time.monotonic()
    with pytest.raises(PortIdentityError) as caught:
        board = open_board(silent_pty, tmp_path / "logs", tmp_path / "fw")
        board.load(sine_firmware)  # only reached if open_board let the port through
    elapsed = time.monotonic() - started
    line = caught.value.one_line()
    assert line == (f"{silent_pty}: no USB identity (not a USB device), so not taken for an ESP32-S3 (Espressif "
                    f"USB 303A:*, or a dev kit's CP210x 10C4:EA60 or CH34x 1A86:* bridge): nothing sent, nothing "
                    f"flashed; pass --flash-anyway to use it all the same")
    assert isinstance(caught.value, PortUnavailableError)  # the pipeline fails every case with it at once
    assert elapsed < 3.0, elapsed
    assert recorder.calls == [] and not (tmp_path / "fw").exists()


def test_flash_anyway_opens_a_port_without_usb_identity(tmp_path, sine_device_pty, sine_firmware):
    with open_board(sine_device_pty, tmp_path / "logs", tmp_path / "fw", flash_anyway=True) as board:
        assert board.load(sine_firmware).firmware_id == sine_firmware.firmware_id


def test_a_serial_board_does_not_flash_a_port_without_usb_identity_unless_asked(tmp_path, silent_pty,
                                                                                  sine_firmware):
    recorder = UploadRecorder()
    with SerialBoard(silent_pty, timeout_s=1.0, build_root=tmp_path / "fw", flasher=recorder) as board:
        with pytest.raises(PortIdentityError, match=rf"^{silent_pty}: no USB identity .*--flash-anyway"):
            board.load(sine_firmware)
    assert recorder.calls == [] and board.flash_count == 0


@pytest.fixture()
def silent_tcp_port():
    """A real TCP server on 127.0.0.1 that accepts and never answers: a remote serial bridge
    (ser2net, esp_rfc2217_server) with nothing running behind it."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        server.close()


def test_a_pyserial_url_is_talked_to_but_flashed_only_when_asked(tmp_path, silent_tcp_port, sine_firmware,
                                                                 monkeypatch):
    url = f"socket://127.0.0.1:{silent_tcp_port}"
    recorder = UploadRecorder()
    monkeypatch.setattr(PlatformIOFlasher, "build", lambda self, project: recorder.build(project))
    monkeypatch.setattr(PlatformIOFlasher, "upload", lambda self, project, port: recorder.upload(project, port))
    board = open_board(url, tmp_path / "logs", tmp_path / "fw")  # an explicit remote setup: not refused
    board._timeout_s = 0.5  # three HELLOs of 0.5 s instead of 5 s; the decision after them is what is tested
    with board, pytest.raises(PortIdentityError, match=rf"^{url}: .*pyserial URL has no USB identity.*--flash-anyway"):
        board.load(sine_firmware)
    assert recorder.calls == []
    board = open_board(url, tmp_path / "logs", tmp_path / "fw", flash_anyway=True)
    board._timeout_s = 0.5
    with board, pytest.raises(BoardError):
        board.load(sine_firmware)  # flashed (recorded), then nothing answers after the "upload"
    assert [call for call, _ in recorder.calls] == ["build", "upload"] and recorder.calls[1][1] == url
