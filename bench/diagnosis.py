"""Diagnosis benchmark: what reading a case's intermediate tensors costs, per model.

    .venv/bin/python bench/diagnosis.py [--samples 20] [--link usb|uart]

For each model of ../shared/models, on the virtual board (native firmware, link paced like the
hardware unless --no-emulate-link), it runs the case twice on one cache: `--diagnose=off`, then
`--diagnose=all` (the debug firmware loaded, one sample invoked, every operator's output read with
GET_TENSOR and compared with host TFLM and LiteRT). It prints the normal and the debug arena, the
bytes the host read, and the time the diagnosis added to the case. The virtual board's link timing
is an emulation; on a board the same bytes cross the real link.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.firmware import plan_debug_firmware, plan_firmware  # noqa: E402
from harness.pipeline import BenchSession  # noqa: E402
from harness.reference import model_io  # noqa: E402
from harness.suite import load_suite  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
MODELS = ("mlperf-tiny/kws_ref_model.tflite", "mlperf-tiny/ad01_int8.tflite", "tflm-examples/person_detect.tflite",
          "tflm-examples/micro_speech_quantized.tflite")


def _case_seconds(suite: Path, root: Path, run_id: str, diagnose: str):
    cases = load_suite(suite).cases()
    with BenchSession(cache_dir=root / "cache", results_dir=root / "results", run_id=run_id, progress=False,
                      diagnose=diagnose) as session:
        started = time.monotonic()
        (row,) = [session.run_case(case) for case in cases]
        return time.monotonic() - started, row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--link", choices=("usb", "uart"), default="usb")
    parser.add_argument("--no-emulate-link", action="store_true")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: nothing to measure", file=sys.stderr)
        return 2
    print(f"{'model':<30} {'arena':>9} {'debug arena':>12} {'tensors':>8} {'bytes read':>11} "
          f"{'case s':>7} {'+diagnosis s':>13}")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for relative in MODELS:
            model = SHARED / relative
            link = "{kind: uart, baud: 921600}" if args.link == "uart" else "{kind: usb}"
            suite = root / f"{model.stem}.yaml"
            suite.write_text(f"board: {{emulate_link: {str(not args.no_emulate_link).lower()}, link: {link}}}\n"
                             f"models:\n  - name: {model.stem}\n    tflite: {model}\n    eval_samples: {args.samples}\n")
            _case_seconds(suite, root, f"{model.stem}-warm", "off")  # the reference and caches, once
            plain, _ = _case_seconds(suite, root, f"{model.stem}-off", "off")
            diagnosed, row = _case_seconds(suite, root, f"{model.stem}-all", "all")
            layers = (row.divergence or {}).get("layers", ())
            read = sum(layer["elements"] * (1 if layer["dtype"] in ("int8", "uint8") else 2 if layer["dtype"] == "int16"
                                            else 4) for layer in layers)
            normal = plan_firmware(model.stem, model, model_io(model)[2])
            debug = plan_debug_firmware(normal)
            print(f"{model.stem:<30} {normal.arena_size:>9,} {debug.arena_size:>12,} {len(layers):>8} {read:>11,} "
                  f"{plain:>7.2f} {diagnosed - plain:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
