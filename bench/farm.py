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

With `--labgrid`, the time labgrid adds per case instead: the same suite on one standing virtual
board (harness.board.standing), once through its local pty and once through a labgrid place on a
farm on 127.0.0.1 (tests/labgrid_farm.py: coordinator, exporter, ser2net; labgrid's stock ser2net
settings, and again with TCP_NODELAY), in one process, with the per-case durations from JUnit.

Per number of boards: the wall time of the run; the same run with every case deselected (pytest,
xdist and each worker starting: importing TensorFlow, collecting), whose wall time is taken off to
give the board stage's own time; the board stage's throughput in samples per second and its
speed-up over one board; the sum of the cases' own durations over the board stage's time (how
many cases were in flight on average); and the CPU time of the run (children included) over its
wall time (2.0 is both cores busy). Not in
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
SAMPLES = 500
LABGRID_SAMPLES = 100
SHARED = REPO.parent / "shared"
MODELS = {"kws": "mlperf-tiny/kws_ref_model.tflite", "ad01": "mlperf-tiny/ad01_int8.tflite",
          "micro_speech": "tflm-examples/micro_speech_quantized.tflite",
          "hello_world": "tflm-examples/hello_world_int8.tflite",
          "person": "tflm-examples/person_detect.tflite", "preprocessor": "tflm-examples/audio_preprocessor_int8.tflite"}


def write_suite(directory: Path, realtime: bool, samples: int = SAMPLES) -> Path:
    lines = [f"suite: farm-bench-{'realtime' if realtime else 'fast'}",
             f"board: {{realtime: {str(realtime).lower()}}}",
             "defaults:", f"  eval_samples: {samples}", "models:"]
    for copy in ("a", "b"):
        for name, path in MODELS.items():
            lines += [f"  - name: {name}_{copy}", f"    tflite: {SHARED / 'models' / path}",
                      "    thresholds: {agreement_tolerance_lsb: 3}"]
    path = directory / f"farm-{'realtime' if realtime else 'fast'}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(suite: Path, work: Path, boards: int, run_id: str, *extra: str) -> dict:
    command = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider", "-n", str(boards),
               "--board=virtual", f"--cache-dir={work / 'cache'}", f"--results-dir={work / 'results'}",
               f"--run-id={run_id}", f"--junitxml={work / f'{run_id}.xml'}", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=3600)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (work / f"{run_id}.out").write_text(completed.stdout)
    durations = _durations(work / f"{run_id}.xml")
    return {"exit": completed.returncode, "wall": wall, "cases": len(durations), "busy": sum(durations),
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def _durations(xml: Path) -> list[float]:
    return [float(case.get("time", 0)) for case in ET.parse(xml).getroot().iter("testcase")]


def labgrid_overhead(work: Path) -> int:
    """Per-case time on one standing board: its local pty, then a labgrid place on it."""
    import signal
    import statistics

    sys.path.insert(0, str(REPO / "tests"))
    from labgrid_farm import ser2net_available, start_farm

    from harness.native_build import child_dies_with_parent

    reason = ser2net_available()
    if reason:
        print(f"cannot measure: {reason}")
        return 2
    suite = write_suite(work, realtime=False, samples=LABGRID_SAMPLES)
    link = work / "ttyBENCH"
    board = subprocess.Popen([sys.executable, "-m", "harness.board.standing", "--link", str(link),
                              "--workdir", str(work / "standing")], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                             preexec_fn=child_dies_with_parent())
    failed = False
    try:
        assert board.stdout.readline().decode().startswith("ready"), "the standing board did not start"
        common = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
                  f"--cache-dir={work / 'cache'}", f"--results-dir={work / 'results'}"]

        def timed(label: str, *extra: str) -> list[float]:
            nonlocal failed
            xml = work / f"{label}.xml"
            completed = subprocess.run([*common, f"--run-id={label}", f"--junitxml={xml}", *extra], cwd=REPO,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
            (work / f"{label}.out").write_text(completed.stdout)
            failed |= completed.returncode != 0
            return _durations(xml)

        timed("warm-local", f"--board={link}", "--flasher=virtual")  # references and firmware cached
        local = timed("local", f"--board={link}", "--flasher=virtual")
        results = {"local pty": local}
        for nodelay in (False, True):
            farm = start_farm(work / f"farm-{nodelay}", [str(link)], nodelay=nodelay)
            try:
                results[f"labgrid{' (nodelay)' if nodelay else ''}"] = timed(
                    f"labgrid-{nodelay}", f"--board=labgrid:{farm.places[0]}",
                    f"--labgrid-coordinator={farm.coordinator}")
            finally:
                farm.stop()
        print(f"{len(local)} cases of {LABGRID_SAMPLES} samples, one standing board, one process; seconds per case")
        print(f"{'route':>18} {'median':>7} {'mean':>7} {'total':>7} {'added/case':>10}")
        base = statistics.mean(local)
        for label, values in results.items():
            print(f"{label:>18} {statistics.median(values):7.2f} {statistics.mean(values):7.2f} {sum(values):7.1f} "
                  f"{statistics.mean(values) - base:10.2f}")
    finally:
        board.send_signal(signal.SIGTERM)
        board.wait(timeout=30)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boards", default="1,2,4", help="numbers of virtual boards (xdist workers) to time")
    parser.add_argument("--keep", type=Path, help="directory for the cache and results (default: a temporary one)")
    parser.add_argument("--labgrid", action="store_true", help="measure the time labgrid adds per case instead")
    args = parser.parse_args()
    if not (SHARED / "models").is_dir():
        print(f"needs the third-party models of {SHARED / 'models'}")
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="tinyhil-farm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.labgrid:
        return labgrid_overhead(work)
    counts = [int(part) for part in args.boards.split(",")]
    print(f"{os.cpu_count()} CPUs; work dir {work}")
    failed = False
    for realtime in (False, True):
        suite = write_suite(work, realtime)
        warm = run(suite, work, max(counts), f"warm-{realtime}")
        print(f"\nrealtime: {str(realtime).lower()} ({warm['cases']} cases of {SAMPLES} samples; warm-up "
              f"{warm['wall']:.1f} s)")
        print(f"{'boards':>6} {'wall s':>7} {'start s':>7} {'board s':>7} {'samples/s':>9} {'speed-up':>8} "
              f"{'in flight':>9} {'CPU/wall':>8}")
        base = None
        for boards in counts:
            result = run(suite, work, boards, f"n{boards}-{realtime}")
            empty = run(suite, work, boards, f"empty{boards}-{realtime}", "-k", "no_case_has_this_name")
            failed |= result["exit"] != 0
            board_s = result["wall"] - empty["wall"]
            rate = result["cases"] * SAMPLES / board_s
            base = base or rate
            print(f"{boards:>6} {result['wall']:7.1f} {empty['wall']:7.1f} {board_s:7.1f} {rate:9.0f} "
                  f"{rate / base:8.2f} {result['busy'] / board_s:9.2f} {result['cpu'] / result['wall']:8.2f}"
                  + ("" if result["exit"] == 0 else f"  (pytest exit {result['exit']})"))
    print(f"\ntables: {work / 'results'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
