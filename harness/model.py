"""The model stage: a float Keras model for the variants to quantize, with its float accuracy.

Where it comes from (`ModelSource`): a zoo architecture or a suite's `layers:`, trained here; or
the user's own Keras file (`keras:`), used as given or fine-tuned (`train: true`). Whichever, the
worker checks it against the data set (input shape, one output per class, both named when they
differ), saves the whole model as model.keras and its float outputs on the test split, row order
kept, so later stages score the same samples the board runs.

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

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .compare import accuracy
from .errors import TinyhilError, TrainingError
from .isolated import report_progress, report_started, run_worker, worker_main
from .layers import LayerSpec

TRAIN_TIMEOUT_S = 1800
# TensorFlow's intra- and inter-op threads while training: one, for a fixed summation order.
TRAIN_THREADS = 1
# The CPU features (from /proc/cpuinfo) by which oneDNN and XNNPACK choose kernels, so results may
# differ between hosts that differ in them.
_KERNEL_ISA = frozenset({"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                         "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                         "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16"})


MODEL_FILE = "model.keras"
PREDICTIONS_FILE = "float-predictions.npy"
RESULT_FILE = "model-result.json"
SOURCE_KINDS = ("zoo", "layers", "keras")


@dataclass(frozen=True)
class ModelSource:
    kind: str                                   # "zoo" | "layers" | "keras"
    name: str = "model"                         # the suite's model name (Keras model name)
    architecture: str = ""                      # zoo
    params: Mapping[str, Any] = field(default_factory=dict)   # zoo
    layers: tuple[LayerSpec, ...] = ()          # layers
    keras_path: Path | None = None              # keras: a .keras / .h5 file or a SavedModel dir
    fine_tune: bool = False                     # keras: `train: true`

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"model source kind {self.kind!r}; expected one of {SOURCE_KINDS}")

    @property
    def trains(self) -> bool:
        return self.kind != "keras" or self.fine_tune

    def describe(self) -> str:
        if self.kind == "zoo":
            return f"zoo:{self.architecture}"
        if self.kind == "layers":
            return f"layers:{len(self.layers)}"
        return f"keras:{self.keras_path}" + (" (fine-tuned)" if self.fine_tune else "")

    def to_job(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "architecture": self.architecture,
                "params": dict(self.params), "layers": [spec.to_job() for spec in self.layers],
                "keras_path": str(self.keras_path) if self.keras_path is not None else None,
                "fine_tune": self.fine_tune}

    def key(self) -> dict[str, Any]:
        """What decides the trained model, for cache keys and fingerprints: the job without the
        suite lines of the layers, so that a comment added above a model retrains nothing."""
        job = self.to_job()
        job["layers"] = [{k: v for k, v in layer.items() if k != "line"} for layer in job["layers"]]
        return job

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> ModelSource:
        return cls(job["kind"], job.get("name", "model"), job.get("architecture", ""), dict(job.get("params", {})),
                   tuple(LayerSpec.from_job(spec) for spec in job.get("layers", ())),
                   Path(job["keras_path"]) if job.get("keras_path") else None, bool(job.get("fine_tune", False)))


@dataclass(frozen=True)
class TrainedModel:
    source: ModelSource
    model_path: Path                 # the whole float Keras model, saved (model.keras) in workdir
    input_shape: tuple[int, ...]
    num_outputs: int
    output_activation: str
    float_accuracy: float            # on the data set's whole test split
    parameter_count: int
    train_seconds: float             # 0 for a keras: model used as given
    host: Mapping[str, Any]
    float_predictions_path: Path     # float outputs on x_test, row order kept (.npy)
    trained: bool = True             # False: a keras: model used as given


def head_for(task: str, num_classes: int) -> tuple[int, str]:
    """Binary tasks get one sigmoid unit (the seed article's anomaly model), others a softmax."""
    return (1, "sigmoid") if task == "binary" else (num_classes, "softmax")


def train(source: ModelSource, training: Mapping[str, Any], dataset_npz: Path, workdir: Path, *, where: str,
          progress: Callable[[str], None] | None = None, dataset_name: str = "") -> TrainedModel:
    """Build (or load) and train in a worker; `progress` receives "epoch 3/20" after each epoch.
    `dataset_name` names the data set in shape and class mismatch errors."""
    job = {"source": source.to_job(), "training": dict(training), "dataset": str(dataset_npz),
           "dataset_name": dataset_name, "workdir": str(workdir), "threads": TRAIN_THREADS}
    run_worker("harness.model", job, workdir, timeout_s=TRAIN_TIMEOUT_S, error=TrainingError, where=where,
               progress=progress)
    return load_trained(workdir, source)


def load_trained(workdir: Path, source: ModelSource) -> TrainedModel:
    """The model a finished worker left in `workdir` (a cache entry), without TensorFlow. Paths
    are the workdir's: a staging directory is renamed into the cache after the worker ends."""
    path = workdir / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot read the model stage's result {path}: {error}") from error
    return TrainedModel(source, workdir / MODEL_FILE, tuple(result["input_shape"]), int(result["num_outputs"]),
                        result["output_activation"], float(result["float_accuracy"]), int(result["parameter_count"]),
                        float(result["train_seconds"]), result.get("host", {}), workdir / PREDICTIONS_FILE,
                        bool(result.get("trained", True)))


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




# --- the worker's side ----------------------------------------------------------------------------

def output_activation_of(model) -> str:
    """"softmax", "sigmoid", "linear" or another name: what the model's last layer applies."""
    last = model.layers[-1]
    while hasattr(last, "layers") and last.layers:  # a nested model ends the outer one
        last = last.layers[-1]
    config = last.get_config()
    if type(last).__name__ == "Softmax":
        return "softmax"
    activation = config.get("activation")
    if isinstance(activation, dict):  # a serialized activation object
        activation = activation.get("config", {}).get("name") or activation.get("class_name")
    return str(activation) if activation else "linear"


def check_fits_data(model, sample_shape: tuple[int, ...], labels: list[str], dataset: str,
                    kind: str) -> tuple[int, str]:
    """(outputs, output activation) of `model`, or a TrainingError naming both sides when the model
    does not take the data set's samples or does not give one output per class."""
    named = f"data set '{dataset}'" if dataset else "the data set"
    if isinstance(model.input_shape, list) or isinstance(model.output_shape, list):
        raise TrainingError(f"the model has {len(model.inputs)} input(s) and {len(model.outputs)} output(s); "
                            f"tinyhil runs models with one input and one output")
    takes = tuple(model.input_shape[1:])
    if len(takes) != len(sample_shape) or any(t is not None and t != s for t, s in zip(takes, sample_shape)):
        raise TrainingError(f"the model takes inputs of shape {list(takes)}; {named} gives samples of shape "
                            f"{list(sample_shape)}")
    gives = tuple(model.output_shape[1:])
    activation = output_activation_of(model)
    classes = f"{len(labels)} classes ({', '.join(labels[:12])}{', ...' if len(labels) > 12 else ''})"
    if len(gives) != 1 or gives[0] is None:
        raise TrainingError(f"the model gives outputs of shape {list(gives)} per sample; {named} has {classes}: "
                            f"end the model with a Dense layer of one unit per class")
    outputs = int(gives[0])
    fix = (f"set units: {len(labels)}" + (" (or units: 1 with activation: sigmoid)" if len(labels) == 2 else "")
           if kind != "keras" else "pair the model with the data set it was trained on")
    if outputs != len(labels) and not (outputs == 1 and len(labels) == 2):
        raise TrainingError(f"the last layer gives {outputs} output{'s' if outputs != 1 else ''}; {named} has "
                            f"{classes}: {fix}")
    if outputs == 1 and activation != "sigmoid":
        raise TrainingError(f"the last layer gives one output with activation '{activation}'; one output is read as "
                            f"the probability of class '{labels[1]}', so it needs activation: sigmoid")
    return outputs, activation


def compile_model(keras, model, outputs: int, activation: str, learning_rate: float) -> None:
    """One sigmoid output: binary cross-entropy; several: sparse categorical cross-entropy, on
    logits unless the last layer is a softmax."""
    if outputs == 1:
        loss = keras.losses.BinaryCrossentropy()
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=activation != "softmax")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])


def fit(keras, model, data, epochs: int, batch_size: int) -> float:
    """Train, reporting "epoch i/n"; the seconds it took."""
    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            report_progress(f"epoch {epoch + 1}/{epochs}")

    started = time.monotonic()
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=batch_size, shuffle=True, verbose=2,
              callbacks=[EpochProgress()])
    return time.monotonic() - started


def _find_lambda(config: Any) -> bool:
    if isinstance(config, dict):
        if config.get("class_name") == "Lambda":
            return True
        return any(_find_lambda(value) for value in config.values())
    if isinstance(config, list):
        return any(_find_lambda(item) for item in config)
    return False


_LAMBDA = ("has a Lambda layer, which would run Python code stored in the file; rebuild the model without it "
           "(Keras layers only) and save it again")


def keras_file_config(path: Path) -> dict[str, Any]:
    """The model config a Keras file or SavedModel directory holds, read without deserializing any
    of it, or a TrainingError saying what `path` is instead."""
    if path.is_dir():
        metadata = path / "keras_metadata.pb"
        if not (path / "saved_model.pb").is_file():
            raise TrainingError(f"{path} is a directory without saved_model.pb: not a SavedModel; expected a .keras "
                                f"or .h5 file, or a directory written by model.save(..., save_format='tf')")
        if not metadata.is_file():
            raise TrainingError(f"{path} is a SavedModel without Keras metadata (keras_metadata.pb), as "
                                f"tf.saved_model.save writes: save the Keras model with model.save('model.keras')")
        from tf_keras.protobuf import saved_metadata_pb2

        saved = saved_metadata_pb2.SavedMetadata()
        saved.ParseFromString(metadata.read_bytes())
        return {"class_name": "SavedModel", "config": [json.loads(node.metadata) for node in saved.nodes]}
    head = path.read_bytes()[:8]
    if head.startswith(b"PK"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                if "config.json" not in archive.namelist():
                    raise TrainingError(f"{path} is a zip archive without config.json ({', '.join(archive.namelist()[:5])}):"
                                        f" not a Keras model file; save with model.save('model.keras')")
                return json.loads(archive.read("config.json"))
        except zipfile.BadZipFile as error:
            raise TrainingError(f"{path} is a damaged zip archive: {error}") from error
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        import h5py

        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get("model_config")
            if raw is None:
                found = ", ".join(sorted(h5.keys())[:5]) or "nothing"
                raise TrainingError(f"{path} is an HDF5 file without a model config (found {found}): weights only, "
                                    f"as save_weights writes; save the whole model with model.save('model.h5')")
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if len(head) >= 8 and head[4:8] == b"TFL3":
        raise TrainingError(f"{path} is a TFLite flatbuffer, not a Keras model: give it as `tflite:`")
    raise TrainingError(f"{path} is not a Keras model: it starts with bytes {head.hex(' ')}, neither a .keras zip "
                        f"archive nor an HDF5 file")


def load_keras_file(keras, path: Path):
    """The user's Keras model, loaded without compiling; Lambda layers and custom classes refused."""
    config = keras_file_config(path)
    if _find_lambda(config):
        raise TrainingError(f"{path} {_LAMBDA}")
    try:
        if path.suffix == ".keras":
            model = keras.models.load_model(path, compile=False, safe_mode=True)
        else:
            model = keras.models.load_model(path, compile=False)
    except Exception as error:  # unknown classes, versions, damaged files
        raise TrainingError(f"Keras cannot load {path}: {' '.join(str(error).split())[:300]}") from error
    if not isinstance(model, keras.Model):
        raise TrainingError(f"{path} loaded as {type(model).__name__}, not a Keras model")
    if any(type(layer).__name__ == "Lambda" for layer in model.submodules):
        raise TrainingError(f"{path} {_LAMBDA}")
    return model


def _build(keras, source: ModelSource, data):
    from . import zoo
    from .layers import build_sequential

    sample_shape = tuple(int(d) for d in data["x_train"].shape[1:])
    if source.kind == "zoo":
        outputs, activation = head_for(str(data["task"]), len(data["labels"]))
        return zoo.build(source.architecture, source.params, input_shape=sample_shape, num_outputs=outputs,
                         output_activation=activation)
    if source.kind == "layers":
        return build_sequential(keras, source.layers, input_shape=sample_shape, name=source.name)
    assert source.keras_path is not None
    return load_keras_file(keras, source.keras_path)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    source = ModelSource.from_job(job["source"])
    settings = job["training"]
    threads = int(job["threads"])
    _, keras = deterministic_tensorflow(int(settings.get("seed", 0)), threads)
    data = np.load(job["dataset"])
    labels = [str(label) for label in data["labels"]]
    sample_shape = tuple(int(d) for d in data["x_train"].shape[1:])
    try:
        model = _build(keras, source, data)
    except TinyhilError as error:
        raise TrainingError(error.message) from error
    outputs, activation = check_fits_data(model, sample_shape, labels, job.get("dataset_name", ""), source.kind)
    seconds = 0.0
    if source.trains:
        compile_model(keras, model, outputs, activation, settings["learning_rate"])
        seconds = fit(keras, model, data, int(settings["epochs"]), int(settings["batch_size"]))
    predictions = model.predict(data["x_test"], batch_size=256, verbose=0)
    workdir = Path(job["workdir"])
    np.save(workdir / PREDICTIONS_FILE, predictions.astype(np.float32))
    model.save(workdir / MODEL_FILE)
    result = {"input_shape": list(sample_shape), "num_outputs": outputs, "output_activation": activation,
              "float_accuracy": accuracy(predictions, data["y_test"]), "parameter_count": int(model.count_params()),
              "train_seconds": seconds, "trained": source.trains, "host": host_description(threads)}
    return result  # run_worker writes it to workdir/model-result.json (RESULT_FILE), which load_trained reads


if __name__ == "__main__":
    worker_main(_run)
