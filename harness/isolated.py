"""Run a stage's worker in its own Python process, with a timeout.

TensorFlow's converter can die by a signal (seen: TF 2.21 segfaulting while calibrating a Keras 3
LSTM). In a child process that is one model's failure with the child's last output as evidence,
not the end of the session.

A worker never outlives the harness, however the harness ends (a `kill -9` of pytest included): a
worker left behind keeps a core busy and races the next run for the same cache entry. Three
mechanisms, because each one alone has a gap:

- PR_SET_PDEATHSIG (Linux, set between fork and exec): the kernel kills the worker the moment the
  harness dies. It fires when the *thread* that started the worker ends; that thread is blocked in
  `run_worker` until the worker has ended, so the signal cannot come early.
- The worker watches its original parent (`TINYHIL_WORKER_PARENT_PID`) from a thread and kills its
  process group when it is re-parented: the same guarantee where there is no PR_SET_PDEATHSIG.
- The worker leads its own process group, and a small reaper process forked before TensorFlow
  loads kills that group as soon as the worker is gone: whatever the worker started (libraries
  included) goes with it, even when the worker itself was killed by SIGKILL and ran no code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import TinyhilError
from .native_build import child_dies_with_parent

# TensorFlow reads these when it loads, so they must be in the worker's environment before its
# first import: tf-keras (Keras 2) converts recurrent layers into ops TFLite Micro runs; CPU only.
# TF 2.21 ignores TF_CPP_MIN_LOG_LEVEL for what it logs before absl is initialised (oneDNN, CUDA):
# that goes to the worker's log, and error details leave it out (STARTED_LINE).
TF_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1", "CUDA_VISIBLE_DEVICES": "-1",
                  "PYTHONHASHSEED": "0"}

PARENT_PID_VARIABLE = "TINYHIL_WORKER_PARENT_PID"
PROGRESS_PREFIX = "tinyhil-progress: "
ERROR_PREFIX = "tinyhil-error: "
# A worker prints this once TensorFlow has loaded and started its runtime. What TensorFlow logged
# until then (oneDNN, CUDA, CPU features, absl) stays in the worker's log; an error's details,
# which reach the session log and pytest's report, start after it.
STARTED_LINE = "tinyhil-started: TensorFlow runtime ready"
_POLL_S = 0.25
_WATCH_S = 0.1


def run_worker(module: str, job: dict[str, Any], workdir: Path, *, timeout_s: float, error: type[TinyhilError],
               where: str, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write `job` as JSON, run `python -m module job.json result.json`, return the result.

    The child's stdout and stderr go to workdir/<stage>.log, which is kept with the artifacts.
    Every `tinyhil-progress: TEXT` line the worker prints is passed to `progress(TEXT)` while it
    runs (polled from the log, so the worker's output is never held in a pipe).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stage = module.rsplit(".", 1)[-1]
    job_path, result_path, log_path = workdir / f"{stage}-job.json", workdir / f"{stage}-result.json", workdir / f"{stage}.log"
    job_path.write_text(json.dumps(job, indent=1, default=str))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, **TF_ENVIRONMENT, PARENT_PID_VARIABLE: str(os.getpid())}
    command = [sys.executable, "-m", module, str(job_path), str(result_path)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                                   preexec_fn=child_dies_with_parent())
        try:
            code = _wait(process, log_path, timeout_s, progress)
        except BaseException:
            _kill_group(process)  # Ctrl-C or a failing progress callback: no worker left behind
            raise
    if code is None:
        raise error(f"{stage} did not finish within {timeout_s:g} s; log: {log_path}", where=where,
                    details=_worker_output(log_path, 60))
    if code != 0 or not result_path.is_file():
        how = (f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        reason = _last_error_line(log_path)
        raise error(f"{stage} {how}{': ' + reason if reason else ''} (log: {log_path})", where=where,
                    details=_worker_output(log_path, 60))
    return json.loads(result_path.read_text())


def _wait(process: subprocess.Popen, log_path: Path, timeout_s: float,
          progress: Callable[[str], None] | None) -> int | None:
    """The worker's exit code, or None (and the worker killed) when it ran past the timeout."""
    deadline = time.monotonic() + timeout_s
    reader = _ProgressReader(log_path)
    while True:
        try:
            code = process.wait(timeout=max(0.0, min(_POLL_S, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            code = None
        if progress is not None:
            for text in reader.new_lines():
                progress(text)
        if code is not None:
            return code
        if time.monotonic() >= deadline:
            _kill_group(process)
            return None


class _ProgressReader:
    """The progress lines appended to a log since the last call; a partly written line waits."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0

    def new_lines(self) -> list[str]:
        try:
            with open(self._path, "rb") as log:
                log.seek(self._offset)
                chunk = log.read()
        except OSError:
            return []
        complete = chunk.rfind(b"\n") + 1
        self._offset += complete
        lines = chunk[:complete].decode("utf-8", errors="replace").splitlines()
        return [line[len(PROGRESS_PREFIX):].strip() for line in lines if line.startswith(PROGRESS_PREFIX)]


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the worker and everything in its process group, then reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _worker_output(path: Path, lines: int) -> str:
    """The last `lines` lines the worker wrote after TensorFlow's startup (all of them if it never
    got that far: then the startup is the evidence), without progress lines."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    if STARTED_LINE in text:
        text = text[len(text) - text[::-1].index(STARTED_LINE):]
    return "\n".join([line for line in text if not line.startswith(PROGRESS_PREFIX)][-lines:])


def _last_error_line(path: Path) -> str:
    """The worker's own one-line error if it wrote one, else the last line of its output."""
    text = _worker_output(path, 200).splitlines()
    for line in reversed(text):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):]
    return text[-1].strip()[:300] if text else ""


# --- The worker's side ---------------------------------------------------------------------------

def report_progress(text: str) -> None:
    """From a worker: one progress line for `run_worker`'s callback (and the log)."""
    print(f"{PROGRESS_PREFIX}{text}", flush=True)


def report_started() -> None:
    """From a worker, once TensorFlow has loaded and initialised its runtime (see STARTED_LINE)."""
    sys.stderr.flush()
    print(STARTED_LINE, flush=True)


def _die_with_harness() -> None:
    """Make this worker end with the harness that started it (see the module's docstring)."""
    announced = os.environ.get(PARENT_PID_VARIABLE)
    if announced is None:
        return  # started by hand, not by run_worker: nothing to watch
    harness = int(announced)
    if os.getppid() != harness:
        os._exit(1)  # the harness died before we got here
    worker = os.getpid()
    leads_group = os.getpgrp() == worker
    if leads_group and os.fork() == 0:
        # The reaper: forked before TensorFlow loads, so it is small and never waits for a GIL.
        try:
            while os.getppid() == worker:
                time.sleep(_WATCH_S)
            os.killpg(worker, signal.SIGKILL)
        finally:
            os._exit(0)

    def watch() -> None:
        while os.getppid() == harness:
            time.sleep(_WATCH_S)
        if leads_group:
            os.killpg(worker, signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)

    threading.Thread(target=watch, name="harness-watch", daemon=True).start()


def worker_main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point shared by the workers: job in, result out, one-line error on failure."""
    _die_with_harness()
    job_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    try:
        result = run(job)
    except TinyhilError as failure:
        print(f"{ERROR_PREFIX}{failure.one_line()}", flush=True)
        sys.exit(3)
    except Exception as failure:  # a worker reports any crash of the ML stack as its one line
        import traceback

        traceback.print_exc()
        print(f"{ERROR_PREFIX}{type(failure).__name__}: {' '.join(str(failure).split())[:300]}", flush=True)
        sys.exit(3)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(result_path)
