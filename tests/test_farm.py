"""A farm run: pytest-xdist workers, each with its own board, writing one run (docs/farm.md).

Real pytest-xdist workers run real suites on virtual boards (the native firmware behind a pty);
the models are the MLPerf Tiny and TFLM example models of ../shared, given as .tflite files so no
training is involved.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, run_pytest
from harness.board.labgrid_place import LabgridClient
from harness.native_build import child_dies_with_parent
from labgrid_farm import ser2net_available, start_farm


def farm_suite(directory: Path, shared: Path, *, realtime: bool = False, copies: int = 1) -> Path:
    mlperf, examples = shared / "models" / "mlperf-tiny", shared / "models" / "tflm-examples"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "farm.yaml"
    board = "board: {realtime: true}\n" if realtime else ""
    path.write_text(f"""\
suite: farm
{board}defaults:
  eval_samples: 20
models:
""" + "".join(f"""\
  - name: kws{suffix}
    tflite: {mlperf / 'kws_ref_model.tflite'}
  - name: ad01{suffix}
    tflite: {mlperf / 'ad01_int8.tflite'}
    thresholds: {{agreement_tolerance_lsb: 3}}
  - name: micro_speech{suffix}
    tflite: {examples / 'micro_speech_quantized.tflite'}
  - name: hello_world{suffix}
    tflite: {examples / 'hello_world_int8.tflite'}
""" for suffix in ([""] if copies == 1 else [f"_{copy}" for copy in range(copies)])) + """\
""")
    return path


def _rows(run_dir: Path) -> dict[str, dict]:
    """Rows by model (each model of the farm suite has the one variant, as-is)."""
    return {row["model"]: row for row in json.loads((run_dir / "results.json").read_text())["results"]}


@pytest.fixture(scope="module")
def farm_run(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("farm")
    suite = farm_suite(root, shared_dir)
    common = [str(suite), f"--results-dir={root / 'results'}", f"--cache-dir={root / 'cache'}"]
    first = run_pytest(*common, "-n", "2", "--board=virtual", "--run-id=farm")
    return root, suite, common, first


def test_virtual_boards_in_parallel_write_one_run_that_names_each_rows_board_and_host(farm_run):
    root, _, _, first = farm_run
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    run_dir = root / "results" / "farm" / "farm"
    rows = _rows(run_dir)
    assert sorted(rows) == ["ad01", "hello_world", "kws", "micro_speech"]
    assert {row["status"] for row in rows.values()} == {"passed"}
    # Each worker its own virtual board (its own pty), each row naming it and the host.
    assert {row["worker"] for row in rows.values()} == {"gw0", "gw1"}
    boards = {row["worker"]: row["board"] for row in rows.values()}
    assert len(set(boards.values())) == 2 and all(board.startswith("virtual (/dev/pts/") for board in boards.values())
    assert {row["board_host"] for row in rows.values()} == {socket.gethostname()}
    assert all(row["latency_kind"] == "estimated" for row in rows.values())
    # The tables have every worker's rows too, with the board beside each.
    table = pd.read_csv(run_dir / "results.csv")
    assert sorted(table["model"]) == sorted(rows) and set(table["board"]) == set(boards.values())
    layers = pd.read_csv(run_dir / "layers.csv")
    assert set(layers["model"]) == set(rows) and set(layers["board"]) == set(boards.values())
    assert "Boards (a farm run" in (run_dir / "results.md").read_text()
    # The controller prints one table of all of them, and the run's one log has both workers.
    assert first.stdout.count("tinyhil results") == 1 and f"results: {run_dir}" in first.stdout
    log = (root / "results" / "logs" / "farm.log").read_text()
    assert "[gw0]" in log and "[gw1]" in log
    assert "4 passed" in first.stdout


def test_resume_and_baseline_work_with_workers(farm_run):
    root, _, common, first = farm_run
    assert first.returncode == 0, first.stdout[-3000:]
    run_dir = root / "results" / "farm" / "farm"
    baseline = root / "baseline"
    shutil.copytree(run_dir, baseline)
    # An interrupted run: two rows on file, the other two never written.
    document = json.loads((run_dir / "results.json").read_text())
    kept = {"kws", "hello_world"}
    document["results"] = [row for row in document["results"] if row["model"] in kept]
    (run_dir / "results.json").write_text(json.dumps(document))
    resumed = run_pytest(*common, "-n", "2", "--board=virtual", "--run-id=farm", "--resume",
                         f"--baseline={baseline}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    rows = _rows(run_dir)
    assert sorted(rows) == ["ad01", "hello_world", "kws", "micro_speech"]
    log = (root / "results" / "logs" / "farm.log").read_text()
    assert log.count("reusing the finished row of run farm") == 2
    for model in kept:
        assert f"{model}[as-is]: reusing the finished row" in log
    # Estimates and outputs are deterministic: every case is unchanged against the baseline.
    assert "tinyhil baseline comparison" in resumed.stdout
    assert "regression" not in resumed.stdout.split("tinyhil baseline comparison")[1].lower() or \
        "0 regression" in resumed.stdout


def test_a_board_list_shorter_than_the_workers_is_refused_before_any_worker_starts(farm_run, tmp_path):
    _, suite, _, _ = farm_run
    result = run_pytest(str(suite), "-n", "3", "--board=/dev/ttyACM0,/dev/ttyACM1",
                        f"--results-dir={tmp_path}")
    assert result.returncode == 4, result.stdout[-2000:]
    assert ("-n 3 needs a board per worker and --board names 2 (/dev/ttyACM0, /dev/ttyACM1): name more boards, "
            "or run fewer workers") in result.stderr
    assert not (tmp_path / "logs").exists()


class StandingBoard:
    """A standing virtual board (python -m harness.board.standing) at `link`: a board on the shelf,
    its console in a file, dying with the test."""

    def __init__(self, link: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.link = link
        self.console = open(workdir / "console.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "harness.board.standing", "--link", str(link),
                                         "--workdir", str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=self.console, stdin=subprocess.DEVNULL,
                                        preexec_fn=child_dies_with_parent())
        ready = self.process.stdout.readline().decode()  # the board says when it serves
        assert ready == f"ready {link}\n", (ready, (workdir / "console.log").read_text())

    def unplug(self) -> None:
        """Gone at once, as a board pulled out: its port vanishes."""
        self.process.kill()
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process.stdout.close()
        self.console.close()


@pytest.fixture()
def two_standing_boards(tmp_path):
    boards = [StandingBoard(tmp_path / f"ttyESP{index}", tmp_path / f"board{index}") for index in range(2)]
    yield boards
    for board in boards:
        board.close()


def _wait_for_rows(results: Path, count: int, process: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(json.loads(results.read_text())["results"]) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no {count} rows in {results} within {timeout_s} s (pytest exit {process.poll()})")


def test_a_board_unplugged_mid_run_is_taken_out_and_its_case_runs_again_on_the_other(
        tmp_path, shared_dir, two_standing_boards):
    first, second = two_standing_boards
    suite = farm_suite(tmp_path / "suite", shared_dir, realtime=True, copies=2)
    results = tmp_path / "results"
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite), "-n", "2",
                                f"--board={first.link},{second.link}", "--flasher=virtual", "--run-id=pool",
                                f"--results-dir={results}", f"--cache-dir={tmp_path / 'cache'}"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_rows(results / "farm" / "pool" / "results.json", 1, process)
        second.unplug()
        out, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out[-4000:]
    rows = json.loads((results / "farm" / "pool" / "results.json").read_text())["results"]
    assert len(rows) == 8 and {row["status"] for row in rows} == {"passed"}, out[-3000:]
    # One line says which board went and why; the case it was running (or about to run) ran again
    # on the other board, and every row after that is the other board's.
    lines = [line for line in out.splitlines() if "taken out of the pool" in line]
    assert len(lines) == 1, out[-3000:]
    assert f"board {second.link} ({socket.gethostname()}) taken out of the pool: " in lines[0]
    assert lines[0].endswith(f"ran again on {first.link}")
    noted = [row for row in rows if row["board_note"]]
    assert len(noted) == 1 and noted[0]["board"] == str(first.link)
    assert {row["board"] for row in rows} <= {str(first.link), str(second.link)}
    assert all(row["latency_kind"] == "estimated" and row["firmware_build"] in ("native", "python") for row in rows)
    pool = results / "logs" / "pool-board" / "pool" / "out"
    assert [json.loads(path.read_text())["name"] for path in pool.glob("*.json")] == [str(second.link)]


@pytest.fixture()
def labgrid_farm(tmp_path, two_standing_boards):
    """A labgrid farm on 127.0.0.1 (tests/labgrid_farm.py): a coordinator, and an exporter per
    standing board exporting its pty through ser2net, as a place tagged board=esp32s3."""
    reason = ser2net_available()
    if reason:
        pytest.skip(reason)
    farm = start_farm(tmp_path, [str(board.link) for board in two_standing_boards])
    yield farm
    farm.stop()


def _labgrid_run(tmp_path, shared_dir, farm, run_id: str, *, realtime: bool, copies: int) -> subprocess.Popen:
    suite = farm_suite(tmp_path / "suite", shared_dir, realtime=realtime, copies=copies)
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite), "-n", "2",
                             "--board=labgrid", f"--labgrid-coordinator={farm.coordinator}",
                             "--labgrid-tags=board=esp32s3", f"--run-id={run_id}",
                             f"--results-dir={tmp_path / 'results'}", f"--cache-dir={tmp_path / 'cache'}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _places_free(farm) -> bool:
    """Both places can be acquired at once by another client: the run released them."""
    with LabgridClient(farm.coordinator) as client:
        for place in farm.places:
            client.acquire(place, wait_s=5)
    return True


def test_two_workers_reserve_two_labgrid_places_and_release_them(tmp_path, shared_dir, labgrid_farm):
    process = _labgrid_run(tmp_path, shared_dir, labgrid_farm, "lab", realtime=False, copies=1)
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-4000:]
    rows = json.loads((tmp_path / "results" / "farm" / "lab" / "results.json").read_text())["results"]
    assert len(rows) == 4 and {row["status"] for row in rows} == {"passed"}
    # Each worker its own place, named with the exporter (host) its port hangs off.
    places = {row["worker"]: (row["board"], row["board_host"]) for row in rows}
    assert sorted(places.values()) == [(f"labgrid:{place}", host) for place, host in
                                       zip(labgrid_farm.places, labgrid_farm.exporters)]
    assert all(row["latency_kind"] == "estimated" for row in rows)
    assert _places_free(labgrid_farm)


def test_an_exporter_killed_mid_run_takes_its_place_out_and_the_run_finishes_on_the_other(
        tmp_path, shared_dir, labgrid_farm):
    process = _labgrid_run(tmp_path, shared_dir, labgrid_farm, "lab", realtime=True, copies=2)
    results = tmp_path / "results" / "farm" / "lab" / "results.json"
    try:
        _wait_for_rows(results, 1, process)
        labgrid_farm.kill_exporter(1)  # its host goes away: ser2net with it
        out, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out[-4000:]
    rows = json.loads(results.read_text())["results"]
    assert len(rows) == 8 and {row["status"] for row in rows} == {"passed"}, out[-3000:]
    lines = [line for line in out.splitlines() if "taken out of the pool" in line]
    gone, kept = labgrid_farm.places[1], labgrid_farm.places[0]
    assert len(lines) == 1 and f"board labgrid:{gone} ({labgrid_farm.exporters[1]}) taken out" in lines[0], out[-3000:]
    assert lines[0].endswith(f"ran again on labgrid:{kept}")
    # Released at the end, the dead one too (its comment says why it was taken out).
    with LabgridClient(labgrid_farm.coordinator) as client:
        client.acquire(kept, wait_s=5)
        assert "tinyhil took it out" in (client.place_problem(gone) or "")
