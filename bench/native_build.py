"""Native firmware build benchmark: cold and warm time of the virtual board's firmware.

    .venv/bin/python bench/native_build.py [--vendor DIR] [--jobs N]

Builds the firmware's portable core against esp-tflite-micro 1.3.8 and each pinned esp-nn (ESP-NN
kernels on, as the seed suite runs) into an empty cache (cold: TFLM's core is compiled once and
shared, then each esp-nn's wrappers and kernels), then asks again (warm: every entry found by its
content hash). Prints seconds per step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.board.native_firmware import build_native_firmware  # noqa: E402
from harness.sources import ESP_NN_VERSIONS, default_vendor_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vendor", type=Path, default=default_vendor_dir(), help="pinned sources (../shared/vendor)")
    args = parser.parse_args()
    timings: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="tinyhil-native-bench-") as cache:
        for round_name in ("cold", "warm"):
            for version in ESP_NN_VERSIONS:
                started = time.perf_counter()
                build_native_firmware(version, True, cache_root=Path(cache), vendor_dir=args.vendor)
                timings.append((f"{round_name} esp-nn {version}", time.perf_counter() - started))
    for label, seconds in timings:
        print(f"{label:>20}: {seconds:8.2f} s")
    cold = sum(seconds for label, seconds in timings if label.startswith("cold"))
    warm = sum(seconds for label, seconds in timings if label.startswith("warm"))
    print(f"{'cold total':>20}: {cold:8.2f} s\n{'warm total':>20}: {warm:8.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
