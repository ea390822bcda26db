"""MobileNetV3-Small 224x224x3 int8, the architecture of esp-nn's second published whole-model
figure (1,434 ms with ESP-NN, 26,000 ms without, ESP32-S3 at 240 MHz, arena in PSRAM), built with
tf-keras and quantized, so the cost model can be checked against a model nobody fitted it to.

Timing depends on shapes and operators only, so the weights are Keras's random initialisation and
the quantization is calibrated on a few random inputs. The model has no preprocessing layer: the
board receives int8 inputs, as esp-nn's benchmark does. Building takes about 10 s in a worker
process (TensorFlow stays out of the caller); the result is cached by the TensorFlow version and
this file's contents.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ...cache import ArtifactCache
from ...errors import ConversionError
from ...isolated import report_progress, run_worker, worker_main

INPUT_SHAPE = (224, 224, 3)
CLASSES = 1000
CALIBRATION_SAMPLES = 4
SEED = 0
FILE_NAME = "mobilenet_v3_small_224_int8.tflite"


def mobilenet_v3_small_tflite(cache_dir: Path, *, timeout_s: float = 600.0) -> Path:
    """The int8 .tflite, built on first use into `cache_dir` (an artifact cache)."""
    import importlib.metadata

    versions = "|".join(importlib.metadata.version(name) for name in ("tensorflow", "tf-keras"))
    key = hashlib.sha256(Path(__file__).read_bytes() + versions.encode()).hexdigest()[:16]

    def build(directory: Path) -> None:
        run_worker(__name__, {"out": str(directory / FILE_NAME)}, directory, timeout_s=timeout_s,
                   error=ConversionError, where="MobileNetV3-Small (held-out cost-model point)")

    return ArtifactCache(cache_dir).ensure("heldout-models", key, build) / FILE_NAME


def _run(job: dict) -> dict:
    from ...model import deterministic_tensorflow

    tf, keras = deterministic_tensorflow(SEED, 1)
    report_progress("building MobileNetV3-Small 224x224x3")
    model = keras.applications.MobileNetV3Small(
        input_shape=INPUT_SHAPE, weights=None, classes=CLASSES, include_preprocessing=False)
    rng = np.random.default_rng(SEED)

    def representative_dataset():
        for _ in range(CALIBRATION_SAMPLES):
            yield [rng.uniform(-1.0, 1.0, (1, *INPUT_SHAPE)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    report_progress("quantizing")
    flatbuffer = converter.convert()
    out = Path(job["out"])
    out.write_bytes(flatbuffer)
    return {"out": str(out), "bytes": len(flatbuffer)}


if __name__ == "__main__":
    worker_main(_run)
