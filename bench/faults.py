"""Fault benchmark: long runs of realistic models on the virtual board under byte faults and resets.

    .venv/bin/python bench/faults.py [--model kws|person|rgb96] [--inferences N] [--drop 1e-3] [--flip 1e-3]
                                     [--resets 10] [--engine native|python]

Runs MLPerf Tiny's keyword-spotting model (kws_ref_model, 490-byte int8 inputs) or TFLM's person
detection model (person_detect, 96x96x1 int8) from ../shared/models, or a 96x96x3 int8 MobileNetV2
(the seed suite's, random weights; built here and cached, since ../shared/models has none) on the
virtual board, through the host path the pipeline uses (board interface, protocol, pyserial, pty;
`infer_many`, so the link is pipelined) with the default timeouts. The
same random inputs run twice: without faults, then with the byte drop and flip rates and resets
spread evenly over the run. Every output of both runs is compared with host TFLM's. It prints the
wall time of both runs, the retries, the faults injected and the wrong outputs (the goal: none,
and the faulty run completes).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import shutil
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

# A 96x96x3 int8 model, as the issue asks for and ../shared/models lacks: the seed suite's MobileNetV2
# (harness/zoo.py, alpha 0.35, 10 classes) with random weights (a fault benchmark needs the input
# size and a real graph, not accuracy), converted by the harness's own quantize stage. Random
# weights alone do not make a usable model: with batch normalisation at its initial statistics
# (mean 0, variance 1) the activations shrink layer by layer, the logits' int8 scale ends near 8e-9,
# and host TFLM aborts (SIGABRT, nothing printed) in the softmax's CalculateSoftmaxParams, whose
# QuantizeMultiplierGreaterThanOne needs input scale x beta x 2^26 > 1. So the batch-norm
# statistics are measured on the inputs first, as training would: every layer then sees activations
# of unit scale, as in a trained network.
RGB96_SHAPE = (96, 96, 3)
RGB96_SEED = 7
RGB96_SAMPLES = 64


def rgb96_model() -> Path:
    """The 96x96x3 model, built once (about a minute, in two worker processes) and then cached.

    Cached by the hash of what decides its bytes: this builder, harness/zoo.py, harness/quantize.py and
    harness/model.py.
    """
    from harness.errors import TinyhilError
    from harness.isolated import run_worker
    from harness.model import TRAIN_THREADS, ModelSource, TrainedModel
    from harness.quantize import QuantSettings, quantize

    harness = Path(__file__).resolve().parents[1] / "harness"
    digest = hashlib.sha256(inspect.getsource(_build_rgb96).encode() + (harness / "zoo.py").read_bytes()
                            + (harness / "quantize.py").read_bytes() + (harness / "model.py").read_bytes()
                            ).hexdigest()[:16]
    path = CACHE / f"rgb96-mobilenet-v2-0.35-{digest}.tflite"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(prefix="tinyhil-rgb96-") as work:
        work = Path(work)
        job = {"model": str(work / "model.keras"), "dataset": str(work / "data.npz"), "seed": RGB96_SEED,
               "threads": TRAIN_THREADS}
        try:
            built = run_worker("bench.faults", job, work, timeout_s=900, error=TinyhilError, where="bench rgb96")
            source = ModelSource("zoo", "rgb96", architecture="mobilenet_v2", params={"alpha": 0.35})
            trained = TrainedModel(source, Path(built["model"]), RGB96_SHAPE, 10, "softmax", float("nan"),
                                   int(built["parameters"]), 0.0, {}, work / "no-predictions.npy", trained=False)
            quantize(trained, QuantSettings("int8", RGB96_SAMPLES), Path(built["dataset"]), work / "model.tflite",
                     training={}, seed=RGB96_SEED, where="bench rgb96")
            _check_loads(work / "model.tflite")
        except TinyhilError as failure:
            raise SystemExit(f"building the 96x96x3 model failed: {failure.one_line()}") from failure
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial-{os.getpid()}")
        shutil.copyfile(work / "model.tflite", partial)
        partial.replace(path)
    return path


def _build_rgb96(job: dict) -> dict:
    """Worker (`python -m bench.faults JOB RESULT`): the model's weights and calibration inputs."""
    from harness import zoo
    from harness.model import deterministic_tensorflow

    _, keras = deterministic_tensorflow(job["seed"], int(job["threads"]))
    model = zoo.build("mobilenet_v2", {"alpha": 0.35}, input_shape=RGB96_SHAPE, num_outputs=10,
                      output_activation="softmax")
    rng = np.random.default_rng(job["seed"])
    inputs = rng.uniform(-1, 1, size=(RGB96_SAMPLES, *RGB96_SHAPE)).astype(np.float32)
    # One forward pass in training mode with momentum 0 sets every moving mean and variance to the
    # statistics of this batch; the zoo's momentum is restored before saving the whole model.
    norms = [layer for layer in model.submodules if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(inputs, training=True)
    for layer in norms:
        layer.momentum = zoo.BATCHNORM_MOMENTUM
    model.save(job["model"])
    np.savez(job["dataset"], x_train=inputs)
    return {"model": job["model"], "dataset": job["dataset"], "parameters": int(model.count_params())}


def _check_loads(model: Path) -> None:
    """Host TFLM aborts the process on some models (see above): try it in a child first."""
    from harness.errors import TinyhilError
    from harness.native_build import child_dies_with_parent

    probe = ("import sys; from pathlib import Path; from harness.tflm import open_interpreter; "
             "open_interpreter(Path(sys.argv[1]).read_bytes(), 1 << 22)")
    done = subprocess.run([sys.executable, "-c", probe, str(model)], check=False, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120,
                          preexec_fn=child_dies_with_parent())
    if done.returncode != 0:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
        said = " ".join((done.stderr + done.stdout).split())[-300:] or "it printed nothing"
        raise TinyhilError(f"host TFLM cannot load {model.name} ({how}): {said}")


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
                "resets": log.count("reset during invoke")}


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
    if __package__ == "bench":  # `python -m bench.faults JOB RESULT`: the rgb96 builder's worker
        from harness.isolated import worker_main

        worker_main(_build_rgb96)
    else:
        sys.exit(main())
