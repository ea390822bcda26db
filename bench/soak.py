"""Soak benchmark: many inferences on the virtual board, with the host's memory watched.

    .venv/bin/python bench/soak.py [--inferences 100000] [--faults]

Runs TFLM's sine model (shipped in the tflite-micro package) through the full host path (board
interface, protocol, pyserial, pty) and samples the resident memory of the harness process and
of the board process ten times. It prints the growth after warm-up; flat memory is the goal.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.board import VirtualBoard  # noqa: E402
from harness.board.faults import FaultPlan  # noqa: E402
from harness.board.virtual import VirtualBoardOptions  # noqa: E402
from harness.firmware import plan_firmware  # noqa: E402
from harness.reference import model_io  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inferences", type=int, default=100_000)
    parser.add_argument("--faults", action="store_true", help="flip and drop bytes at 1e-4 and reset 10 times")
    args = parser.parse_args()
    import tflite_micro

    model = Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"
    _, _, arena = model_io(model)
    firmware = plan_firmware("sine", model, arena)
    count = args.inferences
    plan = FaultPlan(seed=1, start_after=1, drop_rate=1e-4, flip_rate=1e-4,
                     reset_at=tuple(int(count * (i + 0.5) / 10) for i in range(10))) if args.faults else FaultPlan()
    samples = [np.array([[v]], dtype=np.float32) for v in np.linspace(0, 6, 97)]
    with tempfile.TemporaryDirectory() as work, \
            VirtualBoard(Path(work), timeout_s=0.5, invoke_timeout_s=0.5,
                         options=VirtualBoardOptions(emulate_link=False, faults=plan)) as board:
        board.load(firmware)
        device_pid = board._process.pid  # the board process's memory is watched too
        marks = []
        started = time.monotonic()
        for index in range(count):
            board.infer([samples[index % len(samples)]])
            if index % max(1, count // 10) == 0 or index == count - 1:
                marks.append((index + 1, rss_kib(os.getpid()), rss_kib(device_pid)))
        elapsed = time.monotonic() - started
    print(f"{count} inferences in {elapsed:.1f} s ({count / elapsed:.0f}/s), retries {board.retries}")
    print(f"{'after':>10} {'host RSS KiB':>14} {'board RSS KiB':>14}")
    for done, host, device in marks:
        print(f"{done:>10} {host:>14} {device:>14}")
    warm = marks[1] if len(marks) > 1 else marks[0]
    print(f"growth after warm-up ({warm[0]} inferences): host {marks[-1][1] - warm[1]:+d} KiB, "
          f"board {marks[-1][2] - warm[2]:+d} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
