"""The model stage: train a zoo architecture in float32 and record its float accuracy.

Training runs in a worker process (`python -m harness.model JOB RESULT`) so TensorFlow never
loads into the harness process and a crash stays one model's failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .compare import accuracy
from .errors import TrainingError
from .isolated import run_worker, worker_main

TRAIN_TIMEOUT_S = 1800


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


def head_for(task: str, num_classes: int) -> tuple[int, str]:
    """Binary tasks get one sigmoid unit (the seed article's anomaly model), others a softmax."""
    return (1, "sigmoid") if task == "binary" else (num_classes, "softmax")


def train(architecture: str, params: Mapping[str, Any], training: Mapping[str, Any], dataset_npz: Path,
          workdir: Path, *, where: str) -> TrainedModel:
    job = {"architecture": architecture, "params": dict(params), "training": dict(training),
           "dataset": str(dataset_npz), "weights": str(workdir / "weights.h5")}
    result = run_worker("harness.model", job, workdir, timeout_s=TRAIN_TIMEOUT_S, error=TrainingError, where=where)
    return TrainedModel(architecture, dict(params), Path(result["weights"]), tuple(result["input_shape"]),
                        result["num_outputs"], result["output_activation"], result["float_accuracy"],
                        result["parameter_count"], result["train_seconds"])


def _run(job: dict[str, Any]) -> dict[str, Any]:
    import tf_keras as keras

    from . import zoo

    data = np.load(job["dataset"])
    task = str(data["task"])
    num_outputs, activation = head_for(task, len(data["labels"]))
    settings = job["training"]
    keras.utils.set_random_seed(settings["seed"])
    model = zoo.build(job["architecture"], job["params"], input_shape=data["x_train"].shape[1:],
                      num_outputs=num_outputs, output_activation=activation)
    loss = "binary_crossentropy" if task == "binary" else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(settings["learning_rate"]), loss=loss, metrics=["accuracy"])
    started = time.monotonic()
    model.fit(data["x_train"], data["y_train"], epochs=settings["epochs"], batch_size=settings["batch_size"],
              shuffle=True, verbose=2)
    seconds = time.monotonic() - started
    predictions = model.predict(data["x_test"], batch_size=256, verbose=0)
    model.save_weights(job["weights"])
    return {"weights": job["weights"], "input_shape": list(data["x_train"].shape[1:]), "num_outputs": num_outputs,
            "output_activation": activation, "float_accuracy": accuracy(predictions, data["y_test"]),
            "parameter_count": int(model.count_params()), "train_seconds": seconds}


if __name__ == "__main__":
    worker_main(_run)
