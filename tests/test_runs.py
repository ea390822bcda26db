"""Runs as a user has them: several at once on one checkout and cache, runs resumed after a change,
board processes whose host died, and error rows that still count the board's retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import TinyhilError
from harness.pipeline import FINGERPRINTS, BenchSession
from harness.report import read_results
from harness.suite import load_suite

REPO = Path(__file__).resolve().parents[1]


def _kws(shared_dir: Path) -> Path:
    return shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its entry is left for a parent that never reaps it.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


# --- concurrent runs ------------------------------------------------------------------------------

def test_sessions_started_in_the_same_second_get_their_own_run_ids_and_a_named_id_is_not_shared(tmp_path):
    sessions = [BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results") for _ in range(5)]
    try:
        ids = [session.run_id for session in sessions]
        assert len(set(ids)) == 5, ids
        assert len({run_id.rsplit("-", 1)[0] for run_id in ids}) <= 2  # made within a second or two
        with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="mine"):
            with pytest.raises(TinyhilError, match="'mine' is being written by another tinyhil process"):
                BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="mine")
        # Once its holder closed it, the id is free again (a rerun, or --resume after a crash).
        BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="mine").close()
        with pytest.raises(TinyhilError, match="run id '../x' must be letters"):
            BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="../x")
    finally:
        for session in sessions:
            session.close()


def _concurrent_suite(directory: Path, kws: Path) -> Path:
    # A trained model (data set, training, two conversions and their references go through the
    # cache) and a given one, on the virtual board.
    path = directory / "together.yaml"
    path.write_text(f"""\
suite: together
models:
  - name: keyword_cnn
    architecture: keyword_cnn
    dataset: {{name: keywords, options: {{words: "yes,no", samples_per_class: 20}}}}
    training: {{epochs: 1}}
    eval_samples: 12
    variants:
      - quantization: int8
        calibration_samples: [20, 40]
      - quantization: float32
  - name: kws
    tflite: {kws}
    eval_samples: 20
""")
    return path


def test_two_runs_at_once_on_one_suite_results_dir_and_cache_both_pass_with_their_own_results(tmp_path, shared_dir):
    suite = _concurrent_suite(tmp_path, _kws(shared_dir))
    command = [sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir", str(tmp_path / "results"),
               "--cache-dir", str(tmp_path / "cache")]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    run_dirs = sorted(path for path in (tmp_path / "results" / "together").iterdir() if path.name != "latest")
    assert len(run_dirs) == 2, run_dirs
    expected = {"keyword_cnn[int8-cal20]", "keyword_cnn[int8-cal40]", "keyword_cnn[float32]", "kws[as-is]"}
    digests = []
    for run_dir in run_dirs:
        metadata, rows = read_results(run_dir)
        assert metadata["run_id"] == run_dir.name
        assert {row.case_id for row in rows} == expected and len(rows) == 4
        assert all(row.status == "passed" for row in rows), [(row.case_id, row.error) for row in rows]
        assert set(json.loads((run_dir / FINGERPRINTS).read_text())) == expected
        digests.append({row.case_id: row.output_digest for row in rows})
        # Each run printed its own directory and log.
        assert sum(f"results: {run_dir}" in stdout for stdout, _ in outputs) == 1
        log = tmp_path / "results" / "logs" / f"{run_dir.name}.log"
        assert sum(f"log: {log}" in stdout for stdout, _ in outputs) == 1
    assert digests[0] == digests[1]  # the same models ran, from one cache
    assert (tmp_path / "results" / "together" / "latest").resolve() in run_dirs
    boards = sorted((tmp_path / "results" / "logs").glob("*-board"))
    assert [board.name for board in boards] == [f"{run_dir.name}-board" for run_dir in run_dirs]
    assert all((board / "virtual-board.log").is_file() for board in boards)
    leftovers = [path for path in (tmp_path / "cache").rglob("*") if ".partial" in path.name or ".dropped" in path.name]
    assert not leftovers
    # Each entry was built once: the second run waited for the first's build and then used it.
    logs = "".join(path.read_text() for path in (tmp_path / "results" / "logs").glob("*.log"))
    assert logs.count("training keyword_cnn") == 1 and logs.count("generating data set") == 1
    # The variants converted together in one worker, once; neither run converted one alone.
    assert logs.count("converting 3 variants of keyword_cnn in one worker") == 1
    assert "converting keyword_cnn[" not in logs


# --- resume ---------------------------------------------------------------------------------------

def _resumable_suite(directory: Path, model: Path) -> Path:
    # The full profile holds latency to a limit no model meets: a row reused from a quick run would
    # pass where a real full run fails.
    path = directory / "resumable.yaml"
    path.write_text(f"""\
suite: resumable
defaults:
  eval_samples: 30
  thresholds: {{max_latency_ms: 0.001, min_output_agreement: 0.98}}
quick:
  eval_samples: 5
  thresholds: {{max_latency_ms: null}}
models:
  - name: kws
    tflite: {model}
  - name: kws_again
    tflite: {model}
""")
    return path


def _run(suite: Path, tmp_path: Path, profile: str, *, resume: bool = False, board: str = "virtual"):
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="r",
                      resume=resume, board=board) as session:
        before = session.log_path.stat().st_size if session.log_path.is_file() else 0
        rows = [session.run_case(case) for case in load_suite(suite, profile).cases()]
        log = session.log_path.read_text()[before:]  # this session's part of the run's log
    return rows, log


def test_resume_reruns_rows_whose_profile_model_or_settings_changed_and_says_why(tmp_path, shared_dir):
    model = tmp_path / "model.tflite"
    model.write_bytes(_kws(shared_dir).read_bytes())
    suite = _resumable_suite(tmp_path, model)
    rows, _ = _run(suite, tmp_path, "quick")
    assert [row.status for row in rows] == ["passed", "passed"]
    run_dir = tmp_path / "results" / "resumable" / "r"

    # quick -> full: nothing may be reused; the full profile's limits are checked.
    rows, log = _run(suite, tmp_path, "full", resume=True)
    assert [row.status for row in rows] == ["failed", "failed"], [row.violations for row in rows]
    assert all(row.eval_samples == 30 and "latency_ms" in row.violations[0] for row in rows)
    assert "kws[as-is]: running again, not reusing the row of run r: the profile changed (quick -> full)" in log
    assert "reusing the finished row" not in log
    recorded = json.loads((run_dir / FINGERPRINTS).read_text())
    assert recorded["kws[as-is]"]["parts"]["profile"] == "full"
    assert "the profile changed (quick -> full)" in recorded["kws[as-is]"]["rerun_because"]

    # Unchanged: the finished rows stand.
    rows, log = _run(suite, tmp_path, "full", resume=True)
    assert log.count("reusing the finished row of run r") == 2 and "running again" not in log

    # The model file changes under the same path; another board setting; an edited threshold.
    model.write_bytes(_kws(shared_dir).read_bytes() + b"\0" * 16)
    _, log = _run(suite, tmp_path, "full", resume=True)
    assert "kws[as-is]: running again, not reusing the row of run r: the model file or its training data changed" in log
    suite.write_text(suite.read_text().replace("suite: resumable\n", "suite: resumable\nboard: {cpu_mhz: 160}\n"))
    _, log = _run(suite, tmp_path, "full", resume=True)
    assert "the board or its settings changed" in log
    suite.write_text(suite.read_text().replace("min_output_agreement: 0.98", "min_output_agreement: 0.9"))
    _, log = _run(suite, tmp_path, "full", resume=True)
    assert "the suite's settings for it changed" in log
    _, rows = read_results(run_dir)
    assert len(rows) == 2


# --- processes die with their host ----------------------------------------------------------------

_ORPHAN = """\
import os, sys
from pathlib import Path
from harness.board.virtual import VirtualBoard, VirtualBoardOptions, VirtualDeviceConfig
from harness.firmware import plan_firmware
from harness.reference import model_io

model, work = Path(sys.argv[1]), Path(sys.argv[2])
board = VirtualBoard(work, options=VirtualBoardOptions(engine=sys.argv[3]))
firmware = plan_firmware("kws", model, model_io(model)[2])
native = board._firmware_build(firmware)
# Start the board process and die at once, before it is up: the window in which it cannot yet
# know its parent. (VirtualBoard.load would wait for the boot; the host may die at any moment.)
board._start(VirtualDeviceConfig.for_firmware(firmware, board.options, workdir=work,
                                              native_program=native.program if native else None))
print(board._process.pid, flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("engine", ["python", "auto"])
def test_a_board_process_dies_with_a_host_that_died_while_it_started(tmp_path, shared_dir, engine):
    script = tmp_path / "host.py"
    script.write_text(_ORPHAN)
    started = subprocess.run([sys.executable, str(script), str(_kws(shared_dir)), str(tmp_path / "board"), engine],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.split()[-1])
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(pid)
    if alive:
        os.kill(pid, 9)
    assert not alive, f"board process {pid} outlived its host"
    # Nor did it leave a native firmware behind (engine auto runs it when it can be built).
    strays = subprocess.run(["pgrep", "-f", str(tmp_path / "board")], capture_output=True, text=True, timeout=30)
    assert strays.stdout.strip() == ""


# --- retries of error rows ------------------------------------------------------------------------

def test_an_error_row_reports_the_retries_the_board_made_for_it(tmp_path, shared_dir):
    # The board resets during every invoke: each sample is retried until the attempts run out.
    # kws_ref_model (490-byte inputs) and the default timeouts: a reset is noticed by its banner.
    from harness.board import VirtualBoard

    suite = tmp_path / "resets.yaml"
    # More resets than one sample has attempts, counting the requests in flight when one lands.
    resets = range(1, 2 * VirtualBoard.attempts + 10)
    suite.write_text(f"""\
board: {{faults: {{reset_at: [{", ".join(map(str, resets))}]}}}}
models:
  - name: kws
    tflite: {_kws(shared_dir)}
    eval_samples: 4
""")
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="r") as session:
        (case,) = load_suite(suite).cases()
        row = session.run_case(case)
        board = session._board
        assert board is not None
        made = board.retries
    assert row.status == "error", row
    assert row.retries == made and row.retries >= board.attempts - 1, (row.retries, row.error)
    _, (stored,) = read_results(tmp_path / "results" / "resets" / "r")
    assert stored.retries == row.retries
