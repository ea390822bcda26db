"""Benchmark: throughput of the board stage against the number of virtual boards (pytest -n N).

A suite of the MLPerf Tiny and TFLM example models of ../shared (given .tflite files: nothing to
train), each twice under another name, so 12 cases. One warm-up run fills the artifact cache
(references, the native firmware); then each timed run is `pytest SUITE -n N --board=virtual` on
that cache, so what is left per case is the board stage: load the firmware, the evaluation pass,
the comparison. Run from the repository root after `make install`:

    .venv/bin/python bench/farm.py [--boards 1,2,4] [--keep DIR]

Two board settings, because they scale differently on a small machine:
- `realtime: false` (the default of suites): a virtual board answers as fast as the host runs the
  firmware's TFLM, so the board stage is CPU work; it stops scaling at the host's core count.
- `realtime: true`: each invoke also takes the ESP32-S3's estimated time, as a real board does;
  the host mostly waits, so boards keep adding throughput past the core count, until the host's
  own work per case (the reference lookup, comparison, results writing) fills the cores.

Per run: wall time, cases per minute, the sum of the cases' own durations over the wall time (how
many cases were in flight on average), and the CPU time the run took (children included). Not in
`make test`: a timing on a shared machine is a measurement to read, not an assertion.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = {"kws": "mlperf-tiny/kws_ref_model.tflite", "ad01": "mlperf-tiny/ad01_int8.tflite",
          "micro_speech": "tflm-examples/micro_speech_quantized.tflite",
          "hello_world": "tflm-examples/hello_world_int8.tflite",
          "person": "tflm-examples/person_detect.tflite", "preprocessor": "tflm-examples/audio_preprocessor_int8.tflite"}


def write_suite(directory: Path, realtime: bool) -> Path:
    lines = [f"suite: farm-bench-{'realtime' if realtime else 'fast'}",
             f"board: {{realtime: {str(realtime).lower()}}}",
             "defaults:", "  eval_samples: 30", "models:"]
    for copy in ("a", "b"):
        for name, path in MODELS.items():
            lines += [f"  - name: {name}_{copy}", f"    tflite: {SHARED / 'models' / path}",
                      "    thresholds: {agreement_tolerance_lsb: 3}"]
    path = directory / f"farm-{'realtime' if realtime else 'fast'}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(suite: Path, work: Path, boards: int, run_id: str) -> dict:
    command = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider", "-n", str(boards),
               "--board=virtual", f"--cache-dir={work / 'cache'}", f"--results-dir={work / 'results'}",
               f"--run-id={run_id}", f"--junitxml={work / f'{run_id}.xml'}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=3600)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (work / f"{run_id}.out").write_text(completed.stdout)
    cases = ET.parse(work / f"{run_id}.xml").getroot().iter("testcase")
    durations = [float(case.get("time", 0)) for case in cases]
    return {"exit": completed.returncode, "wall": wall, "cases": len(durations), "busy": sum(durations),
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boards", default="1,2,4", help="numbers of virtual boards (xdist workers) to time")
    parser.add_argument("--keep", type=Path, help="directory for the cache and results (default: a temporary one)")
    args = parser.parse_args()
    if not (SHARED / "models").is_dir():
        print(f"needs the third-party models of {SHARED / 'models'}")
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="tinyhil-farm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(part) for part in args.boards.split(",")]
    print(f"{os.cpu_count()} CPUs; work dir {work}")
    failed = False
    for realtime in (False, True):
        suite = write_suite(work, realtime)
        warm = run(suite, work, max(counts), f"warm-{realtime}")
        print(f"\nrealtime: {str(realtime).lower()} ({warm['cases']} cases; warm-up {warm['wall']:.1f} s)")
        print(f"{'boards':>6} {'wall s':>7} {'cases/min':>9} {'speed-up':>8} {'in flight':>9} {'CPU s':>6} "
              f"{'CPU/wall':>8}")
        base = None
        for boards in counts:
            result = run(suite, work, boards, f"n{boards}-{realtime}")
            failed |= result["exit"] != 0
            rate = 60.0 * result["cases"] / result["wall"]
            base = base or rate
            print(f"{boards:>6} {result['wall']:7.1f} {rate:9.1f} {rate / base:8.2f} "
                  f"{result['busy'] / result['wall']:9.2f} {result['cpu']:6.1f} {result['cpu'] / result['wall']:8.2f}"
                  + ("" if result["exit"] == 0 else f"  (pytest exit {result['exit']})"))
    print(f"\ntables: {work / 'results'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
