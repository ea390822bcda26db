"""Standing virtual boards (harness.board.standing): long-lived processes on pseudo-terminals at
stable paths, reached and flashed through the ordinary SerialBoard code (pyserial, a path or an
rfc2217:// URL through a real ser2net). Everything is real: the board process, its pty, the
virtual device with the native firmware (or the Python engine without ../shared/vendor), TFLM on
the host. Only PlatformIO's build and upload are replaced, where a chip's flasher is checked."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import tty
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import serial

from harness.board import SerialBoard
from harness.board.flasher import (
    ANSWER_MAGIC,
    DOWNLOAD_MAGIC,
    PlatformIOFlasher,
    VirtualBoardFlasher,
    flash_command,
    info_command,
)
from harness.board.standing import COMMAND_IDLE_S
from harness.board.virtual import VirtualBoardOptions, VirtualDeviceConfig
from harness.errors import BoardError, PortUnavailableError
from harness.firmware import chip_build, plan_firmware
from harness.native_build import child_dies_with_parent
from harness.reference import model_io
from harness.tflm import open_interpreter

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KWS = Path("models") / "mlperf-tiny" / "kws_ref_model.tflite"
AD = Path("models") / "mlperf-tiny" / "ad01_int8.tflite"
READY_TIMEOUT_S = 60.0


class StandingProcess:
    """`python -m harness.board.standing` as the farm starts it: argument list, timeout, and it dies
    with the test."""

    def __init__(self, link: Path, workdir: Path, *extra: str) -> None:
        self.link = link
        self.process = subprocess.Popen([sys.executable, "-m", "harness.board.standing", "--link", str(link),
                                         "--workdir", str(workdir), *extra], cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                        preexec_fn=child_dies_with_parent())
        self.first_line = self._line(READY_TIMEOUT_S)

    def _line(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        out = b""
        while not out.endswith(b"\n") and time.monotonic() < deadline:
            if select.select([self.process.stdout], [], [], 0.2)[0]:
                chunk = os.read(self.process.stdout.fileno(), 1)
                if not chunk:
                    break
                out += chunk
        return out.decode()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.process.stdout.close()
        self.process.stderr.close()
        return code


@pytest.fixture()
def standing(tmp_path):
    board = StandingProcess(tmp_path / "ttyVIRT0", tmp_path / "board")
    assert board.first_line == f"ready {board.link}\n", board.process.stderr.read1().decode()
    try:
        yield board
    finally:
        board.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def kws(shared_dir):
    model = shared_dir / KWS
    _, _, arena = model_io(model)
    return plan_firmware("kws", model, arena)


def _samples(firmware, count: int, seed: int = 0) -> list[list[np.ndarray]]:
    input_quant, _, _ = model_io(firmware.model_path)
    rng = np.random.default_rng(seed)
    return [[rng.integers(-128, 128, size=input_quant.shape, dtype=np.int8)] for _ in range(count)]


def _expected_build_kind() -> str:
    native = (SHARED / "vendor" / "esp-tflite-micro").is_dir() and shutil.which("g++") is not None
    return "native" if native else "python"


def _assert_agrees_with_host_tflm(board: SerialBoard, firmware, samples) -> None:
    host = open_interpreter(firmware.model_path.read_bytes(), 1 << 20)
    results = list(board.infer_many(samples))
    assert len(results) == len(samples)
    for sample, result in zip(samples, results):
        np.testing.assert_array_equal(result.outputs[0], host.run(sample)[0])
        assert result.total_us > 0 and len(result.op_us) == len(board.op_names)


def test_a_standing_board_is_flashed_over_its_own_port_runs_kws_and_keeps_its_firmware(tmp_path, standing, kws):
    flasher = VirtualBoardFlasher(tmp_path / "logs")
    assert flasher.is_virtual and not PlatformIOFlasher.is_virtual
    assert flasher.running_build(str(standing.link)) is None  # blank: nothing flashed yet
    # No build directory and no flash_anyway: a standing board is no chip, and builds its own firmware.
    with SerialBoard(str(standing.link), flasher=flasher) as board:
        assert board.flasher is flasher
        info = board.load(kws)
        assert board.flash_count == 1 and info.firmware_id == kws.firmware_id
        assert info.is_virtual and info.latency_kind == "estimated"
        assert board.build.kind == _expected_build_kind()
        _assert_agrees_with_host_tflm(board, kws, _samples(kws, 4))
        first_build = board.build
    # Another host process (new state) on the same port: the firmware is still there, and INFO
    # tells which build it is. The board outlived the first host closing the port.
    with SerialBoard(str(standing.link), flasher=VirtualBoardFlasher(tmp_path / "logs2")) as board:
        board.load(kws)
        assert board.flash_count == 0 and board.build == first_build
        _assert_agrees_with_host_tflm(board, kws, _samples(kws, 2, seed=1))
        # Another model flashes again, and runs.
        ad = plan_firmware("ad01", SHARED / AD, model_io(SHARED / AD)[2])
        board.load(ad)
        assert board.flash_count == 1 and board.info.firmware_id == ad.firmware_id
        assert board.build.kind == _expected_build_kind()
        _assert_agrees_with_host_tflm(board, ad, _samples(ad, 2))
    assert "flashed ad01" in (tmp_path / "logs2" / "flash.log").read_text()
    # SIGTERM: the path goes, and the board exits 0.
    assert standing.stop(signal.SIGTERM) == 0
    assert not os.path.lexists(standing.link)


@pytest.fixture()
def port_opens(monkeypatch):
    """Every pyserial port opened from now on, by URL: the board and the flasher both open theirs
    through serial.serial_for_url (a pty path or an rfc2217:// URL alike)."""
    opened: list[str] = []
    real = serial.serial_for_url

    def counting(url, *args, **kwargs):
        opened.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(serial, "serial_for_url", counting)
    return opened


def _loads_open_the_port_once(tmp_path, port: str, opened: list[str], kws) -> None:
    """A load that flashes: INFO, FLASH and the handshake over one open port; the next model's load
    on the same board opens none (its port stays open between cases); a new host on a board that
    already runs the firmware opens one."""
    ad = plan_firmware("ad01", SHARED / AD, model_io(SHARED / AD)[2])
    with SerialBoard(port, flasher=VirtualBoardFlasher(tmp_path / "logs")) as board:
        board.load(kws)
        assert board.flash_count == 1 and len(opened) == 1, opened
        _assert_agrees_with_host_tflm(board, kws, _samples(kws, 2))
        board.load(ad)
        assert board.flash_count == 2 and len(opened) == 1, opened
        _assert_agrees_with_host_tflm(board, ad, _samples(ad, 2))
    with SerialBoard(port, flasher=VirtualBoardFlasher(tmp_path / "logs")) as board:
        board.load(ad)
        assert board.flash_count == 0 and len(opened) == 2, opened
        _assert_agrees_with_host_tflm(board, ad, _samples(ad, 2, seed=1))


def test_a_load_opens_the_standing_boards_port_once(tmp_path, standing, kws, port_opens):
    _loads_open_the_port_once(tmp_path, str(standing.link), port_opens, kws)


def test_a_kept_port_whose_standing_board_restarted_is_opened_again(tmp_path, standing, kws, port_opens):
    """The port a board keeps between cases leads nowhere once its standing board is restarted on the
    same path (a new pty): the next load opens the path again and flashes the new, blank board."""
    board = SerialBoard(str(standing.link), flasher=VirtualBoardFlasher(tmp_path / "logs"))
    try:
        board.load(kws)
        assert len(port_opens) == 1
        standing.stop(signal.SIGTERM)
        again = StandingProcess(standing.link, tmp_path / "again")
        try:
            assert again.first_line == f"ready {standing.link}\n"
            ad = plan_firmware("ad01", SHARED / AD, model_io(SHARED / AD)[2])
            board.load(ad)
            assert len(port_opens) == 2 and board.flash_count == 2
            _assert_agrees_with_host_tflm(board, ad, _samples(ad, 2))
        finally:
            board.close()
            assert again.stop() == 0
    finally:
        board.close()


def test_a_blank_standing_board_answers_nothing_until_flashed(tmp_path, standing, sine_model):
    """As a chip without an app: the host's handshake goes unanswered (and the board's log stays blank)."""
    _, _, arena = model_io(sine_model)
    sine = plan_firmware("sine", sine_model, arena)
    started = time.monotonic()
    with SerialBoard(str(standing.link), timeout_s=0.5) as board, \
            pytest.raises(BoardError, match="opened without a build directory"):
        board.load(sine)
    assert time.monotonic() - started < 10
    assert not (standing.link.parent / "board" / "virtual-board.log").exists()


def test_the_suites_virtual_options_travel_with_the_image(tmp_path, standing, sine_model):
    """engine: python in the suite's board section is what the standing board runs."""
    _, _, arena = model_io(sine_model)
    sine = plan_firmware("sine", sine_model, arena)
    flasher = VirtualBoardFlasher(tmp_path / "logs")
    flasher.options = VirtualBoardOptions(engine="python")
    with SerialBoard(str(standing.link), flasher=flasher) as board:
        board.load(sine)
        assert board.build.kind == "python" and "asked for the Python engine" in board.build.note
        sample = np.array([[0.5]], dtype=np.float32)
        expected = open_interpreter(sine_model.read_bytes(), 1 << 20).run([sample])[0]
        np.testing.assert_array_equal(board.infer([sample]).outputs[0], expected)
    stored = list((standing.link.parent / "board" / "models").glob("*.tflite"))
    assert [path.read_bytes() for path in stored] == [sine_model.read_bytes()]  # kept by the board itself


def _answer(port, timeout_s: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    seen = b""
    while time.monotonic() < deadline:
        seen += port.read(max(1, port.in_waiting))
        start = seen.find(ANSWER_MAGIC)
        if start >= 0 and b"\n" in seen[start + len(ANSWER_MAGIC):]:
            return seen[start + len(ANSWER_MAGIC):].split(b"\n", 1)[0]
    raise AssertionError(f"no answer within {timeout_s} s; got {seen[-200:]!r}")


def test_a_half_received_command_times_out_and_a_damaged_image_is_refused(tmp_path, standing, sine_model):
    _, _, arena = model_io(sine_model)
    sine = plan_firmware("sine", sine_model, arena)
    config = VirtualDeviceConfig.for_firmware(sine).to_json()
    model = sine_model.read_bytes()
    with serial.serial_for_url(str(standing.link), timeout=0.2) as port:
        # A host that dies mid-flash: its FLASH line and part of the image, then nothing.
        whole = flash_command(config, model, "auto")
        port.write(whole[:len(whole) - 100])
        started = time.monotonic()
        assert _answer(port).startswith(b'ERROR "command cut off after')
        assert COMMAND_IDLE_S <= time.monotonic() - started < COMMAND_IDLE_S + 5
        # The board reads the next command as a command, and is still blank.
        port.write(info_command())
        assert _answer(port) == b'INFO {"state": "blank"}'
        # An image damaged on the way (the model's hash does not match) is refused, nothing flashed.
        damaged = bytearray(whole)
        damaged[-1] ^= 0xFF
        port.write(bytes(damaged))
        answer = _answer(port)
        assert answer.startswith(b"ERROR ") and b"SHA-256" in answer and b"nothing flashed" in answer
    assert VirtualBoardFlasher(tmp_path).running_build(str(standing.link)) is None


def test_killing_the_standing_board_makes_its_port_unavailable_within_seconds(tmp_path, standing, kws):
    """What the farm's pool needs to take the board out at once: PortUnavailableError, from
    infer_many mid-run and from load, in seconds (the bound is only a hang guard)."""
    flasher = VirtualBoardFlasher(tmp_path / "logs")
    board = SerialBoard(str(standing.link), flasher=flasher)
    board.load(kws)
    samples = _samples(kws, 400)
    results = board.infer_many(samples)
    next(results)
    os.kill(standing.process.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(PortUnavailableError, match=rf"^{standing.link}: "):
        for _ in results:
            pass
    assert time.monotonic() - started < 20
    board.close()
    started = time.monotonic()
    with pytest.raises(PortUnavailableError, match="does not exist|no longer exists"):
        SerialBoard(str(standing.link), flasher=flasher).load(replace(kws, cpu_mhz=160))
    assert time.monotonic() - started < 20


def test_one_standing_board_per_path_and_a_stale_link_is_replaced(tmp_path, standing):
    target = os.readlink(standing.link)
    second = StandingProcess(standing.link, tmp_path / "second")
    assert second.first_line == "" and second.process.wait(timeout=30) == 2
    assert b"another standing board" in second.process.stderr.read()
    second.stop()
    assert os.readlink(standing.link) == target  # the first board's port untouched
    # A board killed outright leaves its symlink; the pty number it names is soon another pty's.
    # The next board on that path replaces the link instead of following it.
    standing.stop(signal.SIGKILL)
    master, slave = os.openpty()
    try:
        os.unlink(standing.link)
        os.symlink(os.ttyname(slave), standing.link)
        third = StandingProcess(standing.link, tmp_path / "third")
        try:
            assert third.first_line == f"ready {standing.link}\n"
            assert os.readlink(standing.link) != os.ttyname(slave)
        finally:
            assert third.stop() == 0
    finally:
        os.close(master)
        os.close(slave)


def test_platformio_flasher_has_the_flash_shape_and_knows_no_running_build(tmp_path, sine_model, monkeypatch):
    # PlatformIO's build and upload cannot run here (no toolchain, no chip): recorded instead.
    calls = []
    monkeypatch.setattr(PlatformIOFlasher, "build", lambda self, project: calls.append(("build", project.directory)))
    monkeypatch.setattr(PlatformIOFlasher, "upload", lambda self, project, port: calls.append(("upload", port)))
    _, _, arena = model_io(sine_model)
    sine = plan_firmware("sine", sine_model, arena)
    flasher = PlatformIOFlasher(tmp_path / "logs")
    assert flasher.flash(sine, "/dev/ttyACM7", tmp_path / "fw") == chip_build(sine)
    assert [call for call, _ in calls] == ["build", "upload"] and calls[1][1] == "/dev/ttyACM7"
    assert (calls[0][1] / "src" / "model_config.h").is_file()
    assert flasher.running_build("/dev/ttyACM7") is None


# --- through ser2net, as a farm exports a board -----------------------------------------------------

def _free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def ser2net(tmp_path, standing):
    """ser2net 4 exporting the standing board's port over RFC 2217 on 127.0.0.1. Yields the URL."""
    if shutil.which("ser2net") is None:
        pytest.skip("ser2net is not installed: the rfc2217:// path is not tested here")
    tcp = _free_tcp_port()
    config = tmp_path / "ser2net.yaml"
    config.write_text(f"%YAML 1.1\n---\nconnection: &board0\n  accepter: telnet(rfc2217),tcp,127.0.0.1,{tcp}\n"
                      f"  connector: serialdev,{standing.link},115200n81,local\n"
                      f"  options:\n    kickolduser: true\n")
    process = subprocess.Popen(["ser2net", "-n", "-u", "-c", str(config), "-P", str(tmp_path / "ser2net.pid")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=child_dies_with_parent())
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"ser2net did not listen on 127.0.0.1:{tcp} (exit {process.poll()})")
            time.sleep(0.1)
    # The URL as a labgrid place gives it: the flasher and the board add ign_set_control themselves.
    try:
        yield f"rfc2217://127.0.0.1:{tcp}", process
    finally:
        process.kill()
        process.wait(timeout=10)


def test_a_standing_board_behind_ser2net_is_flashed_and_run_over_rfc2217(tmp_path, standing, ser2net, kws):
    url, server = ser2net
    with SerialBoard(url, flasher=VirtualBoardFlasher(tmp_path / "logs")) as board:
        info = board.load(kws)
        assert board.flash_count == 1 and info.is_virtual and board.build.kind == _expected_build_kind()
        _assert_agrees_with_host_tflm(board, kws, _samples(kws, 4))
    with SerialBoard(url, flasher=VirtualBoardFlasher(tmp_path / "logs")) as board:
        board.load(kws)
        assert board.flash_count == 0 and board.build.kind == _expected_build_kind()
        results = board.infer_many(_samples(kws, 400))
        next(results)
        server.kill()  # the exporter goes: the connection drops
        started = time.monotonic()
        with pytest.raises(PortUnavailableError, match="connection .* is gone"):
            for _ in results:
                pass
        assert time.monotonic() - started < 20
    started = time.monotonic()
    with pytest.raises(PortUnavailableError, match="cannot open serial port"):
        SerialBoard(url, flasher=VirtualBoardFlasher(tmp_path / "logs")).load(kws)
    assert time.monotonic() - started < 20


def test_a_load_over_rfc2217_opens_the_port_once(tmp_path, standing, ser2net, kws, port_opens):
    """Each open of an rfc2217:// port costs its telnet negotiation, each close pyserial's 0.3 s sleep."""
    url, _ = ser2net
    _loads_open_the_port_once(tmp_path, url, port_opens, kws)
    assert all(opened.startswith(url) and opened.endswith("ign_set_control") for opened in port_opens)


def test_bytes_that_could_start_a_command_are_held_only_briefly(tmp_path):
    """A frame may end with bytes that begin DOWNLOAD_MAGIC (its CRC is any bytes): they reach the
    firmware after the short hold, and a magic split over two reads still starts a command."""
    from harness.board.standing import StandingBoard

    board = StandingBoard(tmp_path / "ttyX", tmp_path / "board")
    ours, firmware = socket.socketpair()
    master, host = os.openpty()
    tty.setraw(master)
    tty.setraw(host)
    board._child_socket, board._master = ours, master
    try:
        frame_end = b"\xa5\x5a\x01\x02" + DOWNLOAD_MAGIC[:3]
        board._scan(frame_end, now=100.0)
        board._write_child()
        firmware.settimeout(0.5)
        assert firmware.recv(100) == frame_end[:4]
        board._expire(100.0 + 0.001)
        assert not board._to_child  # still held: the rest of a command may follow
        board._expire(100.0 + 0.05)
        board._write_child()
        assert firmware.recv(100) == DOWNLOAD_MAGIC[:3]
        board._scan(DOWNLOAD_MAGIC[:10], now=200.0)
        board._scan(DOWNLOAD_MAGIC[10:] + b"INFO\n", now=200.001)
        assert not board._to_child
        assert os.read(host, 200) == ANSWER_MAGIC + b'INFO {"state": "blank"}\n'
    finally:
        board._child_socket, board._master = None, -1
        for end in (ours, firmware):
            end.close()
        os.close(master)
        os.close(host)
