"""The host under faults: a failed sample is run again from its first byte after a fresh
handshake, so runs complete and every delivered output is the board's answer to that input."""

from __future__ import annotations

import numpy as np
import pytest

from harness.board import VirtualBoard
from harness.board.faults import FaultPlan
from harness.board.virtual import VirtualBoardOptions
from harness.errors import BoardError
from harness.firmware import plan_firmware
from harness.reference import model_io
from harness.tflm import open_interpreter


@pytest.fixture()
def sine(sine_model):
    _, _, arena = model_io(sine_model)
    host = open_interpreter(sine_model.read_bytes(), 1 << 20)
    return plan_firmware("sine", sine_model, arena), (lambda x: host.run([x])[0])


def _board(tmp_path, plan: FaultPlan, timeout_s: float = 0.3) -> VirtualBoard:
    return VirtualBoard(tmp_path, timeout_s=timeout_s, invoke_timeout_s=timeout_s,
                        options=VirtualBoardOptions(emulate_link=False, faults=plan))


def _inputs(count: int) -> list[np.ndarray]:
    # Distinct inputs, so an output attributed to the wrong sample would show.
    return [np.array([[value]], dtype=np.float32) for value in np.linspace(0.0, 6.0, count)]


def test_every_sample_completes_with_its_own_output_under_byte_faults(tmp_path, sine):
    firmware, expected = sine
    plan = FaultPlan(seed=11, start_after=1, flip_rate=0.002, drop_rate=0.001)
    with _board(tmp_path, plan) as board:
        board.attempts = 8  # at these rates about a third of the samples are hit, some repeatedly
        board.load(firmware)
        for sample in _inputs(60):
            np.testing.assert_array_equal(board.infer([sample]).outputs[0], expected(sample))
        assert board.retries > 0


def test_a_reset_is_noticed_by_its_boot_banner_without_waiting_for_a_timeout(tmp_path, sine):
    import time

    firmware, expected = sine
    with VirtualBoard(tmp_path, options=VirtualBoardOptions(emulate_link=False, faults=FaultPlan(reset_at=(1,)))) as board:
        board.load(firmware)  # timeouts of 10 s and 60 s: only the banner can make this quick
        started = time.monotonic()
        sample = _inputs(1)[0]
        np.testing.assert_array_equal(board.infer([sample]).outputs[0], expected(sample))
        assert board.retries == 1 and time.monotonic() - started < 5


def test_resets_and_disappearances_cost_a_retry_not_the_run(tmp_path, sine):
    firmware, expected = sine
    plan = FaultPlan(reset_at=(3, 7), disappear_at=(5,), disappear_s=0.5)
    with _board(tmp_path, plan) as board:
        board.load(firmware)
        for sample in _inputs(10):
            np.testing.assert_array_equal(board.infer([sample]).outputs[0], expected(sample))
        assert 1 <= board.retries <= 3
        log = board.log_tail(40)
    assert log.count("rebooting") == 3


def test_a_board_that_never_comes_back_fails_after_the_resync_budget(tmp_path, sine):
    firmware, _ = sine
    plan = FaultPlan(disappear_at=(1,), disappear_s=30.0)
    with _board(tmp_path, plan) as board:
        board.resync_budget_s = 1.0
        board.load(firmware)
        with pytest.raises(BoardError, match="no answer to HELLO"):
            board.infer(_inputs(1))


def test_retries_are_reported_with_the_results(tmp_path, sine_model):
    from harness.pipeline import BenchSession
    from harness.report import read_results
    from harness.suite import load_suite

    suite = tmp_path / "faulty.yaml"
    suite.write_text(f"""\
board: {{emulate_link: false, faults: {{reset_at: [2, 4]}}}}
models:
  - name: sine
    tflite: {sine_model}
    eval_samples: 6
""")
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="r") as session:
        (row,) = [session.run_case(case) for case in load_suite(suite).cases()]
    # A reset can also land on a request sent before the host noticed the previous one; that
    # costs no retry. So: at least one retry, and every output right.
    assert row.status == "passed" and 1 <= row.retries <= 2 and row.exact_match == 1.0
    _, (stored,) = read_results(tmp_path / "results" / "faulty" / "r")
    assert stored.retries == row.retries
    assert f"{row.retries} sample(s) run again" in (tmp_path / "results" / "faulty" / "r" / "results.md").read_text()


def test_a_killed_run_leaves_valid_results_and_resume_finishes_it(tmp_path, sine_model):
    import csv
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    models = "".join(f"  - name: sine{i}\n    tflite: {sine_model}\n    eval_samples: 4\n" for i in range(4))
    suite = tmp_path / "slow.yaml"
    # 9600 baud makes each model take about a second on the wire: time enough to kill mid-run.
    suite.write_text(f"board: {{link: {{kind: uart, baud: 9600}}}}\nmodels:\n{models}")
    command = [sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir", str(tmp_path / "r"),
               "--cache-dir", str(tmp_path / "c"), "--run-id", "interrupted"]
    results = tmp_path / "r" / "slow" / "interrupted" / "results.json"
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if results.is_file() and len(json.loads(results.read_text())["results"]) >= 1:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    document = json.loads(results.read_text())
    finished = [row["case_id"] for row in document["results"]]
    assert 1 <= len(finished) < 4, finished
    with open(results.parent / "results.csv", newline="") as handle:
        assert [row["case_id"] for row in csv.DictReader(handle)] == finished

    resumed = subprocess.run(command + ["--resume"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(results.read_text())["results"]
    assert [row["case_id"] for row in final] == [f"sine{i}[as-is]" for i in range(4)]
    assert all(row["status"] == "passed" for row in final)
    logs = "".join(path.read_text() for path in (tmp_path / "r" / "logs").glob("*.log"))
    assert all(f"{case}: reusing the finished row of run interrupted" in logs for case in finished)


# CI runs these sizes; `TINYHIL_FULL_FAULT_RUN=1` runs the full 10,000 inferences.
FAULT_RUN_INFERENCES = 10_000 if __import__("os").environ.get("TINYHIL_FULL_FAULT_RUN") else 400


@pytest.mark.parametrize("rate", [1e-4, 1e-3])
def test_fault_run_completes_with_every_output_correct(tmp_path, sine, rate):
    firmware, expected = sine
    count = FAULT_RUN_INFERENCES
    resets = tuple(int(count * (i + 0.5) / 10) for i in range(10))
    plan = FaultPlan(seed=int(rate * 1e6), start_after=1, drop_rate=rate, flip_rate=rate, reset_at=resets)
    values = np.random.default_rng(5).uniform(-1, 7, size=count).astype(np.float32)
    with _board(tmp_path, plan, timeout_s=0.25) as board:
        board.attempts = 8  # at 1e-3 a sample can be hit more than once; a loaded CI adds timeouts
        board.load(firmware)
        for value in values:
            sample = np.array([[value]], dtype=np.float32)
            np.testing.assert_array_equal(board.infer([sample]).outputs[0], expected(sample))
        retries = board.retries
        log = board.log_tail(100_000)
    assert log.count("reset during invoke") == 10
    assert retries > 0
