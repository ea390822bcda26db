"""Link benchmark: how close the harness keeps the serial link to its physical limit.

    .venv/bin/python bench/link.py [--seconds 6]

On the virtual board (which paces the link like the hardware: UART at 10 bits per byte, native
USB at 560 KiB/s), for a 490-byte input (KWS, 49x10 int8) and a 27,648-byte input (96x96x3
int8), at 115200 baud, 921600 baud and native USB, it prints:

- upload: input payload bytes per second as a fraction of the raw link rate, with inference
  taking no time (the link alone sets the pace);
- end-to-end: samples per second with the estimated inference time taken for real, as a
  fraction of the bound min(link rate / bytes per sample, 1 / inference time).

Goal (issue 5): at least 90% for both. For comparison, the MLPerf Tiny runner moves about a third
of the raw rate (hex text in 31-byte chunks, each acknowledged).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.board import VirtualBoard  # noqa: E402
from harness.board.virtual import VirtualBoardOptions  # noqa: E402
from harness.firmware import LinkSettings, plan_firmware  # noqa: E402
from harness.reference import model_io  # noqa: E402

LINKS = (("UART 115200", LinkSettings("uart", 115200)), ("UART 921600", LinkSettings("uart", 921600)),
         ("native USB", LinkSettings("usb")))


def build_models(directory: Path) -> dict[str, Path]:
    """Two small int8 models with the benchmark's input sizes (conversion takes a few seconds)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras as keras

    shapes = {"490 B (49x10x1)": (49, 10, 1), "27,648 B (96x96x3)": (96, 96, 3)}
    paths = {}
    for label, shape in shapes.items():
        inputs = keras.Input(shape=shape, batch_size=1)
        x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        rng = np.random.default_rng(0)
        converter.representative_dataset = lambda: ([rng.normal(size=(1, *shape)).astype(np.float32)]
                                                    for _ in range(20))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        path = directory / f"input_{np.prod(shape)}.tflite"
        path.write_bytes(converter.convert())
        paths[label] = path
    return paths


def measure(model: Path, link: LinkSettings, seconds: float, realtime: bool, work: Path) -> tuple[float, float, int]:
    """(samples per second, median inference seconds, input bytes)."""
    input_quant, _, arena = model_io(model)
    firmware = plan_firmware(model.stem, model, arena, link=link)
    nbytes = int(np.prod(input_quant.shape))
    per_sample_s = link.transfer_s(nbytes)
    count = max(8, min(400, math.ceil(seconds / per_sample_s)))
    rng = np.random.default_rng(1)
    samples = [[rng.integers(-128, 127, size=input_quant.shape, dtype=np.int8)] for _ in range(count)]
    with VirtualBoard(work, options=VirtualBoardOptions(realtime=realtime)) as board:
        board.load(firmware)
        list(board.infer_many(samples[:2], profile=False))  # warm up both processes
        started = time.monotonic()
        results = list(board.infer_many(samples, profile=False))
        elapsed = time.monotonic() - started
    return count / elapsed, float(np.median([r.total_us for r in results])) / 1e6, nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="about how long each measurement runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        models = build_models(Path(work))
        print(f"{'link':12} {'input':19} {'upload':>8} {'e2e/s':>9} {'bound/s':>9} {'e2e':>7} {'inference':>10}")
        worst = 1.0
        for link_label, link in LINKS:
            for model_label, model in models.items():
                rate, _, nbytes = measure(model, link, args.seconds, False, Path(work) / "a")
                upload = rate * nbytes / link.bytes_per_s
                e2e_rate, inference_s, _ = measure(model, link, args.seconds, True, Path(work) / "b")
                bound = min(link.bytes_per_s / nbytes, 1 / inference_s if inference_s else math.inf)
                worst = min(worst, upload, e2e_rate / bound)
                print(f"{link_label:12} {model_label:19} {upload:8.1%} {e2e_rate:9.1f} {bound:9.1f} "
                      f"{e2e_rate / bound:7.1%} {inference_s * 1e3:8.2f} ms")
    print(f"lowest fraction: {worst:.1%} (goal 90%)")
    return 0 if worst >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
