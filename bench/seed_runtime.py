"""Benchmark: wall time of the seed suite's full profile on the virtual board.

Targets (issue 2): the first run after set-up (empty artifact cache) within 10 minutes on 2 cores,
an unchanged rerun within 60 s. Run from the repository root after `make install`:

    .venv/bin/python bench/seed_runtime.py [--profile full] [--keep DIR]

It runs `pytest suites/seed.yaml` twice on a fresh cache and prints both times. It exits 1 when a
target is missed, so it can gate a change, but it is not part of `make test`: a timing on a
shared CI machine is a measurement to read, not an assertion to flake.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS_S = {"first run": 600.0, "unchanged rerun": 60.0}


def _run(profile: str, work: Path, run_id: str) -> tuple[float, int]:
    command = [sys.executable, "-m", "pytest", "suites/seed.yaml", f"--profile={profile}", "-q",
               "-p", "no:cacheprovider", f"--cache-dir={work / 'cache'}", f"--results-dir={work / 'results'}",
               f"--run-id={run_id}"]
    started = time.monotonic()
    completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=3600)
    elapsed = time.monotonic() - started
    (work / f"{run_id}.out").write_text(completed.stdout)
    return elapsed, completed.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", choices=("full", "quick"))
    parser.add_argument("--keep", type=Path, help="directory for the cache and results (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="tinyhil-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"seed suite, profile {args.profile}, {os.cpu_count()} CPUs, work dir {work}")
    failed = False
    for label, run_id in (("first run", "first"), ("unchanged rerun", "rerun")):
        elapsed, code = _run(args.profile, work, run_id)
        target = TARGETS_S[label]
        verdict = "within" if elapsed <= target else "OVER"
        print(f"{label:16s} {elapsed:7.1f} s  (target {target:.0f} s: {verdict}; pytest exit {code})")
        failed |= elapsed > target
    print(f"tables: {work / 'results' / 'seed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
