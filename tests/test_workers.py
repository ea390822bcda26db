"""Stage workers (harness.isolated): they die with the harness however it ends, their progress
reaches the caller while they run, and TensorFlow's startup noise stays in their logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import process_alive
from harness.errors import ConversionError
from harness.isolated import run_worker
from harness.model import ModelSource

REPO = Path(__file__).resolve().parents[1]

# One small trained model: the vibration data set at the quick profile's size.
SMALL_SUITE = """\
suite: small
defaults:
  training: {epochs: 3, batch_size: 32, learning_rate: 0.002, seed: 0}
quick:
  epochs: 3
  samples_per_class: 20
  eval_samples: 8
  latency: {windows: 2, inferences_per_window: 3}
models:
  - name: anomaly
    architecture: anomaly_cnn1d
    dataset: {name: vibration}
    variants:
      - quantization: int8
        calibration_samples: 20
"""

# What TensorFlow 2.21 writes to stderr when it loads (oneDNN, CUDA, CPU features, absl).
TF_NOISE = ("oneDNN", "cuda", "cuInit", "absl::InitializeLog", "cpu_feature_guard", "I0000 ", "E0000 ", "W0000 ")


# --- helpers -------------------------------------------------------------------------------------

def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below `root`, from /proc."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = commands.get(pid, "")
                frontier.append(pid)
    return found


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _gone_within(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(process_alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if process_alive(pid)]


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _assert_kill_9_ends(harness: subprocess.Popen, processes: dict[int, str]) -> None:
    """Kill the harness with SIGKILL: every process of `processes` (pid: command) must be gone
    within 5 s."""
    harness.kill()
    harness.wait(timeout=10)
    survivors = _gone_within(list(processes), 5.0)
    assert not survivors, f"still running 5 s after kill -9 of the harness: {[processes[p] for p in survivors]}"


def _suite(tmp_path: Path, text: str = SMALL_SUITE) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "small.yaml"
    path.write_text(text)
    return path


def _cli(tmp_path: Path, suite: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "run", str(suite), "--profile=quick",
            f"--results-dir={tmp_path / 'results'}", f"--cache-dir={tmp_path / 'cache'}", *extra]


# --- workers die with the harness ----------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_kill_9_of_the_harness_ends_the_training_worker(tmp_path):
    """The issue's finding: after `kill -9` of the harness, the training worker was re-parented and
    kept a core busy. A real `tinyhil run` trains; it is killed as soon as its worker exists."""
    harness = subprocess.Popen(_cli(tmp_path, _suite(tmp_path)), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    workers: dict[int, str] = {}
    try:
        workers = _wait_for(lambda: {pid: cmd for pid, cmd in _descendants(harness.pid).items()
                                     if "harness.model" in cmd}, 240, "the training worker to start")
        time.sleep(1.0)  # into TensorFlow's import: the worker is busy, not blocked
        workers.update(_descendants(harness.pid))
        _assert_kill_9_ends(harness, workers)
    finally:
        harness.kill()
        harness.wait(timeout=10)
        _kill_all(workers)


WORKER_WITH_A_CHILD = """\
import subprocess, sys, time
from pathlib import Path
from harness.isolated import worker_main

def run(job):
    # A library of the worker starting a helper of its own, with no death signal of its own.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(job["pids"]).write_text(f"{child.pid}\\n")
    time.sleep(600)
    return {}

worker_main(run)
"""

# The harness side, run in a thread that is not the main one (as a pipeline under a thread pool
# or an IDE's runner would): PR_SET_PDEATHSIG is tied to the starting thread.
HARNESS_IN_A_THREAD = """\
import sys, threading
from pathlib import Path
from conftest import process_alive
from harness.errors import ConversionError
from harness.isolated import run_worker
from harness.model import ModelSource

def stage():
    try:
        run_worker("child_starting_worker", {"pids": sys.argv[1]}, Path(sys.argv[2]), timeout_s=600,
                   error=ConversionError, where="test")
    except ConversionError:
        pass

thread = threading.Thread(target=stage)
thread.start()
thread.join()
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_kill_9_of_the_harness_ends_the_worker_and_what_the_worker_started(tmp_path, monkeypatch):
    (tmp_path / "child_starting_worker.py").write_text(WORKER_WITH_A_CHILD)
    pids_file = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    harness = subprocess.Popen([sys.executable, "-c", HARNESS_IN_A_THREAD, str(pids_file), str(tmp_path / "work")],
                               cwd=REPO, env=env, stdin=subprocess.DEVNULL)
    everything: dict[int, str] = {}
    try:
        _wait_for(lambda: pids_file.is_file() and pids_file.read_text().endswith("\n"), 60, "the worker's child")
        everything = _descendants(harness.pid)
        grandchild = int(pids_file.read_text())
        assert grandchild in everything and len(everything) >= 2, everything
        _assert_kill_9_ends(harness, everything)
    finally:
        harness.kill()
        harness.wait(timeout=10)
        _kill_all(everything)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_a_worker_past_its_timeout_is_killed_with_what_it_started(tmp_path, monkeypatch):
    (tmp_path / "child_starting_worker.py").write_text(WORKER_WITH_A_CHILD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
    pids_file = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(ConversionError, match=r"child_starting_worker did not finish within 8 s"):
        run_worker("child_starting_worker", {"pids": str(pids_file)}, tmp_path / "work", timeout_s=8,
                   error=ConversionError, where="test")
    assert time.monotonic() - started < 20
    grandchild = int(pids_file.read_text())
    try:
        assert not _gone_within([grandchild], 5.0), "the worker's own child outlived the worker's timeout"
    finally:
        _kill_all([grandchild])


def test_a_worker_whose_harness_is_already_gone_does_not_start(tmp_path):
    """The window between fork and the death signal: a worker that finds another parent exits."""
    (tmp_path / "job.json").write_text("{}")
    env = {**os.environ, "TINYHIL_WORKER_PARENT_PID": str(2**22 + 1)}  # no such process
    done = subprocess.run([sys.executable, "-m", "harness.model", str(tmp_path / "job.json"),
                           str(tmp_path / "result.json")], cwd=REPO, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 1 and not (tmp_path / "result.json").exists()


# --- progress and noise --------------------------------------------------------------------------

def _vibration_npz(path: Path, per_class: int = 60) -> Path:
    from harness.datasets import load_dataset

    data = load_dataset("vibration", {}, seed=0)
    keep = np.concatenate([np.flatnonzero(data.y_train == label)[:per_class] for label in np.unique(data.y_train)])
    np.savez(path, x_train=data.x_train[keep], y_train=data.y_train[keep], x_test=data.x_test[:40],
             y_test=data.y_test[:40], labels=np.array(data.labels), task=np.array(data.task),
             source=np.array(data.source))
    return path


ANOMALY = ModelSource("zoo", "anomaly", architecture="anomaly_cnn1d")


def test_training_and_conversion_report_progress_while_they_run(tmp_path):
    from harness.model import train
    from harness.quantize import QuantSettings, quantize

    npz = _vibration_npz(tmp_path / "data.npz")
    seen: list[tuple[str, bool]] = []
    workdir = tmp_path / "train"
    training = {"epochs": 12, "batch_size": 8, "learning_rate": 0.002, "seed": 0}
    trained = train(ANOMALY, training, npz, workdir, where="test", progress=lambda text: seen.append(
        (text, (workdir / "model-result.json").exists())))
    assert [text for text, _ in seen] == [f"epoch {epoch}/12" for epoch in range(1, 13)]
    # The log is read every 0.25 s, so the last epochs may be read after the worker ends; the
    # early ones must not be.
    assert not seen[0][1], "every epoch was reported only after the worker had finished"
    steps: list[str] = []
    quantize(trained, QuantSettings("int8", 20), npz, tmp_path / "q" / "model.tflite", training=training, seed=0,
             where="test", progress=steps.append)
    assert steps == ["converting", "calibrating on 20 samples"]


def test_a_failing_progress_callback_stops_the_worker(tmp_path):
    from harness.model import train

    npz = _vibration_npz(tmp_path / "data.npz")

    def interrupted(text: str) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the terminal shows the first epoch

    with pytest.raises(KeyboardInterrupt):
        train(ANOMALY, {"epochs": 200, "batch_size": 8, "learning_rate": 0.002, "seed": 0}, npz, tmp_path / "w",
              where="test", progress=interrupted)
    assert not (tmp_path / "w" / "model-result.json").exists()
    left = [command for command in _descendants(os.getpid()).values() if "harness.model" in command]
    assert not left, left


def test_tensorflow_startup_noise_stays_out_of_the_terminal(tmp_path):
    """A passing run through the CLI, and a failing one under pytest, whose report shows the
    failing stage's details: neither prints what TensorFlow logs when it loads (it stays in the
    worker's log), and the failure still shows the worker's own error."""
    suite = _suite(tmp_path)
    passing = subprocess.run(_cli(tmp_path, suite), cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert passing.returncode == 0, passing.stdout[-2000:] + passing.stderr[-2000:]
    assert "passed: anomaly[int8]" in passing.stderr
    shown = passing.stdout + passing.stderr
    assert not [word for word in TF_NOISE if word in shown], shown[-3000:]
    logs = list((tmp_path / "cache").rglob("model.log"))
    assert logs and any("cuda" in log.read_text() for log in logs), "TensorFlow's startup lines belong in the log"

    broken = _suite(tmp_path / "broken", SMALL_SUITE.replace("architecture: anomaly_cnn1d",
                                                             "architecture: anomaly_cnn1d\n    params: {kernel: 500}"))
    failing = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(broken), "--profile=quick",
                              f"--results-dir={tmp_path / 'results'}", f"--cache-dir={tmp_path / 'cache'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    shown = failing.stdout + failing.stderr
    assert failing.returncode == 1, shown[-3000:]
    assert "One of the dimensions in the output is <= 0" in shown
    assert not [word for word in TF_NOISE if word in shown], shown[-5000:]


# --- deterministic training ----------------------------------------------------------------------

def _weights(path: Path) -> dict[str, np.ndarray]:
    """The weight arrays of a saved .keras model (a zip holding model.weights.h5)."""
    import io
    import zipfile

    import h5py

    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        weights.visititems(lambda name, item: arrays.__setitem__(name, np.array(item))
                           if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable cores to stand in for a machine with another core count")
def test_training_gives_bit_identical_weights_and_tflite_whatever_the_core_count(tmp_path):
    """Two trainings of the same job in separate worker processes, one of them confined to one core
    (as on a 1-core host: TensorFlow sizes its thread pools by the usable cores), then the int8
    conversion of each: the same bits."""
    import json
    import socket

    from harness.model import train
    from harness.quantize import QuantSettings, quantize

    npz = _vibration_npz(tmp_path / "data.npz", per_class=200)
    settings = {"epochs": 4, "batch_size": 16, "learning_rate": 0.002, "seed": 3}
    usable = os.sched_getaffinity(0)
    models, tflites = [], []
    for attempt, cores in (("one-core", {min(usable)}), ("all-cores", usable)):
        os.sched_setaffinity(0, cores)  # this thread's mask, which the worker inherits
        try:
            trained = train(ANOMALY, settings, npz, tmp_path / attempt, where="test")
            tflites.append(quantize(trained, QuantSettings("int8", 50), npz, tmp_path / attempt / "q.tflite",
                                    training=settings, seed=3, where="test").read_bytes())
        finally:
            os.sched_setaffinity(0, usable)
        models.append(trained)
    first, second = (_weights(model.model_path) for model in models)
    assert first.keys() == second.keys() and first
    differing = [name for name in first if first[name].tobytes() != second[name].tobytes()]
    assert not differing, f"weights differ between two trainings of one job: {differing}"
    assert models[0].float_accuracy == models[1].float_accuracy
    assert tflites[0] == tflites[1], "the int8 .tflite files differ"

    host = json.loads((tmp_path / "all-cores" / "model-result.json").read_text())["host"]
    assert host == models[1].host
    assert models[0].host["usable_cores"] == 1 and host["usable_cores"] == len(usable)
    assert host["cores"] == os.cpu_count() and host["threads"] == 1 and host["op_determinism"] is True
    assert host["python"] == ".".join(map(str, sys.version_info[:3]))
    assert host["tensorflow"].startswith("2.") and host["cpu"] and host["os"] and host["machine"]
    assert socket.gethostname() not in json.dumps(host)
