"""The model stage: train a zoo architecture in float32 and record its float accuracy.

Training runs in a worker process (`python -m harness.model JOB RESULT`) so TensorFlow never
loads into the harness process and a crash stays one model's failure.

Training is deterministic as far as TensorFlow allows: every seed is set, TensorFlow's op
determinism is on and TensorFlow runs one thread, so the order of every floating-point sum is
fixed and the same job gives bit-identical weights (and .tflite files) in any process on the same
machine. Across machines it need not: TensorFlow's matrix products go through oneDNN even with
TF_ENABLE_ONEDNN_OPTS=0, and oneDNN picks its kernels by the CPU's instruction set (capping it with
ONEDNN_MAX_CPU_ISA=AVX2 changes the trained weights here). Turning oneDNN's ops off would not fix
that and makes MobileNetV2 train 2.4 times slower, so it stays on. The host that trained, with the
instruction sets that decide those kernels, is recorded with the model (`host` in
model-result.json), so a published accuracy says where it came from.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .compare import accuracy
from .errors import TrainingError
from .isolated import report_progress, report_started, run_worker, worker_main

TRAIN_TIMEOUT_S = 1800
# TensorFlow's intra- and inter-op threads while training: one, for a fixed summation order.
TRAIN_THREADS = 1
# The CPU features (from /proc/cpuinfo) by which oneDNN and XNNPACK choose kernels, so results may
# differ between hosts that differ in them.
_KERNEL_ISA = frozenset({"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                         "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                         "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16"})


@dataclass(frozen=True)
class TrainedModel:
    architecture: str
    params: Mapping[str, Any]
    weights_path: Path
    input_shape: tuple[int, ...]
    num_outputs: int
    output_activation: str
    float_accuracy: float
    parameter_count: int
    train_seconds: float
    host: Mapping[str, Any] = field(default_factory=dict)  # where it was trained: host_description()


def head_for(task: str, num_classes: int) -> tuple[int, str]:
    """Binary tasks get one sigmoid unit (the seed article's anomaly model), others a softmax."""
    return (1, "sigmoid") if task == "binary" else (num_classes, "softmax")


def train(architecture: str, params: Mapping[str, Any], training: Mapping[str, Any], dataset_npz: Path,
          workdir: Path, *, where: str, progress: Callable[[str], None] | None = None) -> TrainedModel:
    """Train in a worker; `progress` receives "epoch 3/20" after each epoch."""
    job = {"architecture": architecture, "params": dict(params), "training": dict(training),
           "dataset": str(dataset_npz), "weights": str(workdir / "weights.h5"), "threads": TRAIN_THREADS}
    result = run_worker("harness.model", job, workdir, timeout_s=TRAIN_TIMEOUT_S, error=TrainingError, where=where,
                        progress=progress)
    return TrainedModel(architecture, dict(params), Path(result["weights"]), tuple(result["input_shape"]),
                        result["num_outputs"], result["output_activation"], result["float_accuracy"],
                        result["parameter_count"], result["train_seconds"], result["host"])


def deterministic_tensorflow(seed: int, threads: int):
    """TensorFlow set up for reproducible results; call in a worker before TensorFlow runs anything."""
    import tensorflow as tf
    import tf_keras as keras

    # Thread counts are fixed when TensorFlow's runtime starts: before the first op.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)  # Python's, NumPy's and TensorFlow's generators
    tf.config.list_logical_devices()  # starts the runtime, which logs its device probing now
    report_started()
    return tf, keras


def host_description(threads: int) -> dict[str, Any]:
    """Where a model was trained: what decides its float results. No host name."""
    import tensorflow as tf
    import tf_keras as keras

    cpuinfo: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's entries
            key, _, value = line.partition(":")
            cpuinfo.setdefault(key.strip(), value.strip())
    except OSError:
        pass  # not Linux: platform's answers only
    cpu = cpuinfo.get("model name") or platform.processor() or platform.machine()
    flags = set((cpuinfo.get("flags") or cpuinfo.get("Features") or "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "machine": platform.machine(), "isa": sorted(flags & _KERNEL_ISA), "cores": os.cpu_count(),
            "usable_cores": usable, "os": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "tf_keras": keras.__version__, "numpy": np.__version__,
            "threads": threads, "op_determinism": True,
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0",
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


def _run(job: dict[str, Any]) -> dict[str, Any]:
    from . import zoo

    settings = job["training"]
    threads = int(job["threads"])
    _, keras = deterministic_tensorflow(settings["seed"], threads)
    data = np.load(job["dataset"])
    task = str(data["task"])
    num_outputs, activation = head_for(task, len(data["labels"]))
    model = zoo.build(job["architecture"], job["params"], input_shape=data["x_train"].shape[1:],
                      num_outputs=num_outputs, output_activation=activation)
    loss = "binary_crossentropy" if task == "binary" else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(settings["learning_rate"]), loss=loss, metrics=["accuracy"])
    epochs = settings["epochs"]

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            report_progress(f"epoch {epoch + 1}/{epochs}")

    started = time.monotonic()
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=settings["batch_size"],
              shuffle=True, verbose=2, callbacks=[EpochProgress()])
    seconds = time.monotonic() - started
    predictions = model.predict(data["x_test"], batch_size=256, verbose=0)
    model.save_weights(job["weights"])
    return {"weights": job["weights"], "input_shape": list(data["x_train"].shape[1:]), "num_outputs": num_outputs,
            "output_activation": activation, "float_accuracy": accuracy(predictions, data["y_test"]),
            "parameter_count": int(model.count_params()), "train_seconds": seconds,
            "host": host_description(threads)}


if __name__ == "__main__":
    worker_main(_run)
