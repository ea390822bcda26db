"""The quantize stage: a trained model -> .tflite, full-integer int8 (post-training, calibrated on N
training samples) or float32.

Each conversion runs in its own worker process (`python -m harness.quantize JOB RESULT`): the
converter has segfaulted on recurrent models, and that must fail one variant, not the session.
The model is rebuilt with a fixed batch of 1 before converting, which is what makes tf-keras emit
a fused UNIDIRECTIONAL_SEQUENCE_LSTM that TFLite Micro runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import ConversionError
from .isolated import report_progress, run_worker, worker_main
from .model import TRAIN_THREADS, TrainedModel, deterministic_tensorflow

CONVERT_TIMEOUT_S = 900


def quantize(trained: TrainedModel, quantization: str, calibration_samples: int | None, dataset_npz: Path,
             out_path: Path, *, seed: int, where: str, progress: Callable[[str], None] | None = None) -> Path:
    """Convert in a worker; `progress` receives "converting", then "calibrating on N samples" for int8."""
    job = {"architecture": trained.architecture, "params": dict(trained.params), "weights": str(trained.weights_path),
           "input_shape": list(trained.input_shape), "num_outputs": trained.num_outputs,
           "output_activation": trained.output_activation, "quantization": quantization,
           "calibration_samples": calibration_samples, "dataset": str(dataset_npz), "seed": seed,
           "out": str(out_path), "threads": TRAIN_THREADS}
    run_worker("harness.quantize", job, out_path.parent, timeout_s=CONVERT_TIMEOUT_S, error=ConversionError,
               where=where, progress=progress)
    return out_path


def calibration_indices(train_count: int, samples: int, seed: int) -> np.ndarray:
    """Which training samples calibrate: a seeded random subset, so N=50 is not just class 0."""
    rng = np.random.default_rng(seed)
    return rng.permutation(train_count)[:min(samples, train_count)]


def _run(job: dict) -> dict:
    from . import zoo

    tf, _ = deterministic_tensorflow(job["seed"], int(job["threads"]))
    report_progress("converting")

    model = zoo.build(job["architecture"], job["params"], input_shape=tuple(job["input_shape"]),
                      num_outputs=job["num_outputs"], output_activation=job["output_activation"], batch_size=1)
    model.load_weights(job["weights"])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if job["quantization"] == "int8":
        data = np.load(job["dataset"])
        x_train = data["x_train"].astype(np.float32)
        chosen = x_train[calibration_indices(len(x_train), job["calibration_samples"], job["seed"])]

        def representative_dataset():
            report_progress(f"calibrating on {len(chosen)} samples")
            for sample in chosen:
                yield [sample[np.newaxis]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif job["quantization"] != "float32":
        raise ConversionError(f"unknown quantization {job['quantization']!r}; expected int8 or float32")
    try:
        flatbuffer = converter.convert()
    except Exception as error:  # the converter raises many types (ConverterError, ValueError, ...)
        raise ConversionError(f"TFLite converter failed: {' '.join(str(error).split())[:400]}") from error
    out = Path(job["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(flatbuffer)
    tmp.replace(out)
    return {"out": str(out), "bytes": len(flatbuffer)}


if __name__ == "__main__":
    worker_main(_run)
