"""The virtual board's model of the hardware: link timing, memory placement, suite settings, and
the seeded fault knobs. Timing checks are lower bounds (the emulation sleeps at least that long),
so a slow machine cannot make them fail."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from harness import protocol as p
from harness.board import VirtualBoard
from harness.board.faults import FaultInjector, FaultPlan
from harness.board.virtual import VirtualBoardOptions
from harness.errors import LinkError
from harness.firmware import USB_BYTES_PER_S, LinkSettings, plan_firmware
from harness.pipeline import BenchSession
from harness.reference import model_io
from harness.suite import load_suite
from harness.tflm import open_interpreter

SAMPLE = np.array([[1.0]], dtype=np.float32)


@pytest.fixture()
def sine_firmware(sine_model):
    _, _, arena = model_io(sine_model)
    return plan_firmware("sine", sine_model, arena)


def _expected(sine_model) -> np.ndarray:
    return open_interpreter(sine_model.read_bytes(), 1 << 20).run([SAMPLE])[0]


def _wire_time_lower_bound(board: VirtualBoard, link: LinkSettings) -> float:
    """The least time one infer of the sine model can take on `link`: the upload, then the output
    and result frames, which can only follow the INVOKE. (ACKs travel the other way meanwhile.)"""
    info = board.info
    upload = (p.InputBegin(0, 4), p.InputData(0, 0, bytes(4)), p.Invoke())
    after_invoke = (p.OutputData(0, 0, 4, bytes(4)), p.InvokeResult(0, 0, (0,) * info.op_count, (0,) * info.op_count))
    sizes = [len(m.pack()) + p.FRAME_OVERHEAD for m in upload + after_invoke]
    return link.transfer_s(sum(sizes[:3])) + link.transfer_s(sum(sizes[3:]))


def test_link_settings_follow_the_published_rates():
    assert LinkSettings("uart", 115200).bytes_per_s == 11520  # 10 bits per byte on the wire
    assert LinkSettings("uart", 921600).transfer_s(27648) == pytest.approx(0.3, rel=0.001)
    assert LinkSettings("usb").bytes_per_s == USB_BYTES_PER_S == 560 * 1024
    with pytest.raises(ValueError, match="link kind"):
        LinkSettings("spi")


def test_uart_link_takes_at_least_its_wire_time(tmp_path, sine_model, sine_firmware):
    slow = replace(sine_firmware, link=LinkSettings("uart", 9600))
    with VirtualBoard(tmp_path) as board:
        board.load(slow)
        wire_s = _wire_time_lower_bound(board, slow.link)
        started = time.monotonic()
        result = board.infer([SAMPLE])
        elapsed = time.monotonic() - started
    np.testing.assert_array_equal(result.outputs[0], _expected(sine_model))
    assert elapsed >= 0.95 * wire_s, (elapsed, wire_s)
    assert wire_s > 0.1  # 9600 baud makes the link, not the host, the slow part


def test_realtime_pacing_takes_the_estimated_inference_time(tmp_path, sine_firmware):
    options = VirtualBoardOptions(emulate_link=False, realtime=True)
    slow_clock = replace(sine_firmware, cpu_mhz=80, esp_nn=False)
    with VirtualBoard(tmp_path, options=options) as board:
        board.load(slow_clock)
        started = time.monotonic()
        result = board.infer([SAMPLE])
        assert time.monotonic() - started >= result.total_us / 1e6


def test_fault_injector_is_deterministic_per_seed():
    plan = FaultPlan(seed=7, drop_rate=0.01, flip_rate=0.01)
    data = bytes(range(256)) * 40
    first, second = FaultInjector(plan), FaultInjector(plan)
    assert first.corrupt(data) == second.corrupt(data) != data
    assert first.counts == second.counts and first.counts.dropped > 0 and first.counts.flipped > 0
    assert FaultInjector(replace(plan, seed=8)).corrupt(data) != first.corrupt(data)
    with pytest.raises(ValueError, match="drop_rate"):
        FaultPlan(drop_rate=1.5)


def _raw_board(tmp_path, plan: FaultPlan, timeout_s: float = 0.3) -> VirtualBoard:
    """A board whose host does not retry, so that each knob's raw effect shows."""
    board = VirtualBoard(tmp_path, timeout_s=timeout_s, invoke_timeout_s=timeout_s,
                         options=VirtualBoardOptions(emulate_link=False, faults=plan))
    board.attempts = 1
    return board


def test_corrupted_bytes_are_detected_never_delivered_as_results(tmp_path, sine_model, sine_firmware):
    """Protocol v2 recovers lost frames inside a sample, so every sample comes through even with
    one attempt; the corruption shows as recoveries, never as a wrong output."""
    # One clean invoke first, so the faults hit inference traffic, not the handshake.
    plan = FaultPlan(seed=3, start_after=1, flip_rate=0.003, drop_rate=0.001)
    with _raw_board(tmp_path / "a", plan) as board:
        board.load(sine_firmware)
        outputs = [board.infer([SAMPLE]).outputs[0] for _ in range(30)]
        assert board.retries > 0, "the faults were never noticed"
    for output in outputs:
        np.testing.assert_array_equal(output, _expected(sine_model))


def test_a_reset_mid_run_reboots_the_board_with_its_banner(tmp_path, sine_model, sine_firmware):
    plan = FaultPlan(reset_at=(2,))
    with _raw_board(tmp_path, plan, timeout_s=0.5) as board:
        board.load(sine_firmware)
        board.infer([SAMPLE])
        with pytest.raises(LinkError) as caught:
            board.infer([SAMPLE])
        assert "its ROM boot banner arrived" in str(caught.value) and "board reset while waiting for" in str(caught.value)
        np.testing.assert_array_equal(board.infer([SAMPLE]).outputs[0], _expected(sine_model))
        assert "reset during invoke 2: rebooting" in board.log_tail()


def test_a_board_that_drops_off_the_bus_comes_back(tmp_path, sine_model, sine_firmware):
    plan = FaultPlan(disappear_at=(1,), disappear_s=0.8)
    with _raw_board(tmp_path, plan) as board:
        board.load(sine_firmware)
        with pytest.raises(LinkError):
            board.infer([SAMPLE])
        with pytest.raises(LinkError):  # still away: requests vanish
            board.infer([SAMPLE])
        time.sleep(0.5)  # 0.6 s gone in two timeouts; 0.8 s away in all
        np.testing.assert_array_equal(board.infer([SAMPLE]).outputs[0], _expected(sine_model))
        assert "back on the bus: rebooting" in board.log_tail()


def test_stalls_delay_every_answer(tmp_path, sine_firmware):
    plan = FaultPlan(stall_rate=1.0, stall_s=0.1)
    with VirtualBoard(tmp_path, options=VirtualBoardOptions(emulate_link=False, faults=plan)) as board:
        board.load(sine_firmware)
        started = time.monotonic()
        board.infer([SAMPLE])
        # INPUT_BEGIN, INPUT_DATA and INVOKE each wait for a stall before their answer.
        assert time.monotonic() - started >= 3 * 0.1


def test_board_settings_from_a_suite_reach_the_board(tmp_path, shared_dir):
    model = shared_dir / "models" / "tflm-examples" / "person_detect.tflite"
    rows = {}
    for label, board in (("default", "{}"), ("psram-160-ansi", "{arena: psram, cpu_mhz: 160, esp_nn: false}"),
                         ("sram", "{arena: sram}")):
        suite = tmp_path / f"{label}.yaml"
        suite.write_text(f"suite: {label}\nboard: {board}\nmodels:\n  - name: person\n    tflite: {model}\n"
                         f"    eval_samples: 2\n")
        with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results") as session:
            (rows[label],) = [session.run_case(case) for case in load_suite(suite).cases()]
    default, slow, sram = rows["default"], rows["psram-160-ansi"], rows["sram"]
    assert default.status == slow.status == sram.status == "passed", (default.error, slow.error, sram.error)
    assert not default.arena_in_psram and slow.arena_in_psram and not sram.arena_in_psram
    assert (slow.cpu_mhz, slow.esp_nn) == (160, False) and (default.cpu_mhz, default.esp_nn) == (240, True)
    assert slow.latency_median_ms > 10 * default.latency_median_ms  # reference kernels, slower clock, PSRAM


def test_uart_link_and_faults_parse_from_a_suite(tmp_path, sine_model):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""\
board:
  link: {{kind: uart, baud: 921600}}
  faults: {{seed: 4, flip_rate: 0.001, reset_at: [10, 20], disappear_s: 0.5}}
models:
  - name: sine
    tflite: {sine_model}
""")
    settings = load_suite(suite).board
    assert settings.link == LinkSettings("uart", 921600)
    assert settings.virtual.faults == FaultPlan(seed=4, flip_rate=0.001, reset_at=(10, 20), disappear_s=0.5)
    suite.write_text(suite.read_text().replace("flip_rate: 0.001", "flip_rate: 2"))
    with pytest.raises(Exception, match=r"suite.yaml:\d+: board.faults: flip_rate must be a probability"):
        load_suite(suite)
