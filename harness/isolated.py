"""Run a stage's worker in its own Python process, with a timeout.

TensorFlow's converter can die by a signal (seen: TF 2.21 segfaulting while calibrating a Keras 3
LSTM). In a child process that is one model's failure with the child's last output as evidence,
not the end of the session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import TinyhilError

# Quiet, CPU-only, tf-keras (Keras 2): the combination that converts recurrent layers into
# ops TFLite Micro runs.
TF_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1", "CUDA_VISIBLE_DEVICES": "-1",
                  "PYTHONHASHSEED": "0"}


def run_worker(module: str, job: dict[str, Any], workdir: Path, *, timeout_s: float, error: type[TinyhilError],
               where: str) -> dict[str, Any]:
    """Write `job` as JSON, run `python -m module job.json result.json`, return the result.

    The child's stdout and stderr go to workdir/<stage>.log, which is kept with the artifacts.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stage = module.rsplit(".", 1)[-1]
    job_path, result_path, log_path = workdir / f"{stage}-job.json", workdir / f"{stage}-result.json", workdir / f"{stage}.log"
    job_path.write_text(json.dumps(job, indent=1, default=str))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, **TF_ENVIRONMENT}
    command = [sys.executable, "-m", module, str(job_path), str(result_path)]
    with open(log_path, "wb") as log:
        try:
            completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, timeout=timeout_s, cwd=Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            raise error(f"{stage} did not finish within {timeout_s:g} s; log: {log_path}", where=where,
                        details=_tail(log_path, 60)) from None
    if completed.returncode != 0 or not result_path.is_file():
        code = completed.returncode
        how = (f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        reason = _last_error_line(log_path)
        raise error(f"{stage} {how}{': ' + reason if reason else ''} (log: {log_path})", where=where,
                    details=_tail(log_path, 60))
    return json.loads(result_path.read_text())


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _last_error_line(path: Path) -> str:
    """The worker's own one-line error if it wrote one, else the last line of its output."""
    text = _tail(path, 200).splitlines()
    for line in reversed(text):
        if line.startswith("tinyhil-error: "):
            return line[len("tinyhil-error: "):]
    return text[-1].strip()[:300] if text else ""


def worker_main(run) -> None:
    """Entry point shared by the workers: job in, result out, one-line error on failure."""
    job_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    try:
        result = run(job)
    except TinyhilError as failure:
        print(f"tinyhil-error: {failure.one_line()}", flush=True)
        sys.exit(3)
    except Exception as failure:  # a worker reports any crash of the ML stack as its one line
        import traceback

        traceback.print_exc()
        print(f"tinyhil-error: {type(failure).__name__}: {' '.join(str(failure).split())[:300]}", flush=True)
        sys.exit(3)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(result_path)
