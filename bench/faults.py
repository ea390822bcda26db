"""Fault benchmark: long runs of realistic models on the virtual board under byte faults and resets.

    .venv/bin/python bench/faults.py [--model kws|person|rgb96] [--inferences N] [--drop 1e-3] [--flip 1e-3]
                                     [--resets 10] [--engine native|python]

Runs MLPerf Tiny's keyword-spotting model (kws_ref_model, 490-byte int8 inputs) or TFLM's person
detection model (person_detect, 96x96x1 int8) from ../shared/models, or a 96x96x3 int8 MobileNetV1
(alpha 0.25, random weights; built here and cached, since ../shared/models has none) on the virtual board, through the host path the pipeline uses (board interface,
protocol, pyserial, pty; `infer_many`, so the link is pipelined) with the default timeouts. The
same random inputs run twice: without faults, then with the byte drop and flip rates and resets
spread evenly over the run. Every output of both runs is compared with host TFLM's. It prints the
wall time of both runs, the retries, the faults injected and the wrong outputs (the goal: none,
and the faulty run completes).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.board import VirtualBoard  # noqa: E402
from harness.board.faults import FaultPlan  # noqa: E402
from harness.board.virtual import VirtualBoardOptions  # noqa: E402
from harness.errors import BoardError  # noqa: E402
from harness.firmware import plan_firmware  # noqa: E402
from harness.reference import model_io  # noqa: E402
from harness.tflm import open_interpreter  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
MODELS = {"kws": SHARED / "mlperf-tiny" / "kws_ref_model.tflite",
          "person": SHARED / "tflm-examples" / "person_detect.tflite"}
CACHE = Path(__file__).resolve().parents[1] / ".tinyhil-cache" / "bench"

# A 96x96x3 int8 model, as the issue asks for and ../shared/models lacks: MobileNetV1 at alpha 0.25
# with random weights (a fault benchmark needs the input size and a real graph, not accuracy),
# quantized by the TFLite converter on random calibration inputs. Deterministic for a TensorFlow
# version; cached by the hash of this text.
RGB96_SOURCE = """
import sys
import numpy as np
import tf_keras
import tensorflow as tf
tf.keras.utils.set_random_seed(7)
# A fixed batch of 1, and the backbone with pooling and a dense head as harness/zoo.py builds it
# (MobileNet's own top, a 1x1 convolution between reshapes, makes host TFLM abort).
inputs = tf_keras.Input(shape=(96, 96, 3), batch_size=1)
backbone = tf_keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None,
                                           pooling="avg")
outputs = tf_keras.layers.Dense(10, activation="softmax")(backbone(inputs))
model = tf_keras.Model(inputs, outputs)
rng = np.random.default_rng(7)
def representative():
    for _ in range(16):
        yield [rng.uniform(-1, 1, size=(1, 96, 96, 3)).astype(np.float32)]
converter = tf.lite.TFLiteConverter.from_keras_model(model)
converter.optimizations = [tf.lite.Optimize.DEFAULT]
converter.representative_dataset = representative
converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
converter.inference_input_type = tf.int8
converter.inference_output_type = tf.int8
open(sys.argv[1], "wb").write(converter.convert())
"""


def rgb96_model() -> Path:
    """The 96x96x3 model, built once (about a minute) in a child process and then cached."""
    digest = hashlib.sha256(RGB96_SOURCE.encode()).hexdigest()[:16]
    path = CACHE / f"rgb96-mobilenet-v2-0.35-{digest}.tflite"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", RGB96_SOURCE, str(partial)], check=True, timeout=900, env=env,
                   stdout=subprocess.DEVNULL)
    partial.replace(path)
    return path


def run(model: Path, inputs: list[np.ndarray], expected: list[np.ndarray], plan: FaultPlan, engine: str) -> dict:
    _, _, arena = model_io(model)
    firmware = plan_firmware(model.stem, model, arena)
    wrong = delivered = 0
    error = ""
    with tempfile.TemporaryDirectory() as work, \
            VirtualBoard(Path(work), options=VirtualBoardOptions(faults=plan, engine=engine)) as board:
        board.load(firmware)
        started = time.monotonic()
        try:
            for result, reference in zip(board.infer_many([[x] for x in inputs], profile=False), expected):
                delivered += 1
                wrong += int(not np.array_equal(result.outputs[0], reference))
        except BoardError as failure:
            error = failure.message
        elapsed = time.monotonic() - started
        log = board.log_tail(1_000_000)
        return {"seconds": elapsed, "delivered": delivered, "wrong": wrong, "retries": board.retries,
                "engine": board.build.kind if board.build else "?", "error": error,
                "resets": log.count("reset during invoke"), "lost": log.count("frame lost")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS) + ["rgb96"], default="kws")
    parser.add_argument("--inferences", type=int, default=None, help="default: 10000 for kws, 500 otherwise")
    parser.add_argument("--drop", type=float, default=1e-3)
    parser.add_argument("--flip", type=float, default=1e-3)
    parser.add_argument("--resets", type=int, default=10)
    parser.add_argument("--engine", choices=("native", "python"), default="native")
    args = parser.parse_args()
    model = rgb96_model() if args.model == "rgb96" else MODELS[args.model]
    if not model.is_file():
        print(f"{model} is absent: this benchmark needs ../shared/models", file=sys.stderr)
        return 2
    count = args.inferences or (10_000 if args.model == "kws" else 500)
    host = open_interpreter(model.read_bytes(), 1 << 22)
    detail = host.input_details[0]
    rng = np.random.default_rng(7)
    inputs = [rng.integers(-128, 128, size=detail["shape"], dtype=np.int8) for _ in range(count)]
    expected = [host.run([x])[0] for x in inputs]
    resets = tuple(int(count * (i + 0.5) / args.resets) + 1 for i in range(args.resets))
    faulty = FaultPlan(seed=1, drop_rate=args.drop, flip_rate=args.flip, reset_at=resets)
    print(f"{model.name}: {count} inferences, input {[int(d) for d in detail['shape']]} int8, engine {args.engine}")
    rows = [("fault-free", run(model, inputs, expected, FaultPlan(), args.engine))]
    rows.append((f"drop {args.drop:g}, flip {args.flip:g}, {args.resets} resets",
                 run(model, inputs, expected, faulty, args.engine)))
    clean = rows[0][1]["seconds"]
    print(f"{'run':<36} {'wall s':>8} {'x clean':>8} {'delivered':>10} {'wrong':>6} {'retries':>8} {'resets':>7}")
    for name, row in rows:
        print(f"{name:<36} {row['seconds']:>8.1f} {row['seconds'] / clean:>8.1f} {row['delivered']:>10} "
              f"{row['wrong']:>6} {row['retries']:>8} {row['resets']:>7}")
    for name, row in rows:
        print(f"{name}: firmware {row['engine']}"
              + (f"; DID NOT COMPLETE: {row['error']}" if row["error"] else ""))
    complete = all(row["delivered"] == count and row["wrong"] == 0 for _, row in rows)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
