"""The host under faults: a lost frame is recovered inside its sample (protocol v2), and a reset or
a stall costs a fresh handshake and a rerun of the sample, so runs complete and every delivered
output is the board's answer to that input."""

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


# kws_ref_model (MLPerf Tiny keyword spotting: 490-byte int8 inputs, 12 classes) through the whole
# pipeline with the default timeouts. The first case is the issue's: resets alone failed after 21 s
# ("no answer to HELLO after 1 tries of 10 s"), the board's decoder swallowing every HELLO as more of
# a cut INPUT_DATA frame. At byte rates of 1e-3 each, three of four exchanges of a sample are hit.
KWS_FAULT_RUNS = {
    "resets": ("{seed: 1, reset_at: [20, 60, 100]}", 150),
    "drop-flip-1e-4-resets": ("{seed: 1, drop_rate: 1.0e-4, flip_rate: 1.0e-4, reset_at: [20, 60, 100]}", 150),
    "drop-flip-1e-3-resets": ("{seed: 1, drop_rate: 1.0e-3, flip_rate: 1.0e-3, reset_at: [10, 25]}", 40),
}


@pytest.mark.parametrize("name", list(KWS_FAULT_RUNS))
def test_a_realistic_model_completes_under_faults_with_default_timeouts(tmp_path, shared_dir, name):
    import re
    import time

    from harness.pipeline import BenchSession
    from harness.suite import load_suite

    faults, samples = KWS_FAULT_RUNS[name]
    resets = len(re.search(r"reset_at: \[([^]]*)\]", faults).group(1).split(","))
    suite = tmp_path / "kws.yaml"
    suite.write_text(f"""\
board: {{faults: {faults}}}
models:
  - name: kws
    tflite: {shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"}
    eval_samples: {samples}
""")
    started = time.monotonic()
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="r",
                      progress=False) as session:
        (row,) = [session.run_case(case) for case in load_suite(suite).cases()]
    elapsed = time.monotonic() - started
    logs = tmp_path / "results" / "logs"
    assert row.status == "passed", f"{row.status}: {row.error}"
    # Every output the board delivered is host TFLM's for that input: no wrong result slipped through.
    assert row.eval_samples == samples and row.host_tflm_exact_match == 1.0
    assert (logs / "r-board" / "virtual-board.log").read_text().count("rebooting") == resets
    # Each reset fails at least the exchange in flight; every retry is in the row.
    resyncs = (logs / "r.log").read_text().count("resynchronised in")
    assert row.retries >= max(resyncs, 1), (row.retries, resyncs)
    assert elapsed < 90, f"{samples} samples took {elapsed:.0f} s"


def test_a_large_input_completes_under_byte_faults_with_default_timeouts(tmp_path, shared_dir):
    # person_detect's 9,216-byte input at drop and flip rates of 1e-3 each is hit in all but e^-18 of
    # its uploads: with the sample as the unit of retry it never completed. Frames sent again inside
    # the sample (smaller chunks under noise, resumed from the bytes the board holds) carry it.
    model = shared_dir / "models" / "tflm-examples" / "person_detect.tflite"
    _, _, arena = model_io(model)
    host = open_interpreter(model.read_bytes(), 1 << 22)
    rng = np.random.default_rng(3)
    inputs = [rng.integers(-128, 128, size=(1, 96, 96, 1), dtype=np.int8) for _ in range(12)]
    plan = FaultPlan(seed=1, drop_rate=1e-3, flip_rate=1e-3, reset_at=(6,))
    with VirtualBoard(tmp_path, options=VirtualBoardOptions(faults=plan)) as board:
        board.load(plan_firmware("person_detect", model, arena))
        outputs = [result.outputs[0] for result in board.infer_many([[x] for x in inputs], profile=False)]
        retries = board.retries
    assert all(np.array_equal(out, host.run([x])[0]) for out, x in zip(outputs, inputs))
    assert len(outputs) == len(inputs) and retries > len(inputs)
