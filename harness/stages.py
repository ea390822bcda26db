"""The cached stages of a case: data set -> trained model -> .tflite -> evaluation inputs ->
reference outputs. Each artifact lives in the content-addressed cache (cache.py) under the hash of
everything it depends on, so an unchanged rerun computes nothing; the board stage (pipeline.py) is
never cached, because it is the measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cache
from .datasets import load_dataset
from .errors import DatasetError, TinyhilError
from .model import TrainedModel, train
from .progress import Progress
from .quantize import quantize
from .reference import ReferenceRun, TensorQuant, run_reference
from .suite import Case, ModelSpec

log = logging.getLogger("tinyhil")

_HARNESS = Path(__file__).resolve().parent
_EPOCH = re.compile(r"epoch (\d+)/(\d+)")


def code_hash(*names: str) -> str:
    return cache.source_hash(*(str(_HARNESS / name) for name in names))


@dataclass(frozen=True)
class EvalSet:
    inputs: np.ndarray            # float features, or raw inputs already in the model's type
    labels: np.ndarray | None     # None when the suite gives no data set (random inputs)
    task: str
    quantized: bool               # True when `inputs` are raw model-typed values
    description: str
    source: str = ""              # where the data set's samples come from (generated, recorded, ...)


@dataclass(frozen=True)
class PreparedModel:
    spec: ModelSpec
    dataset_npz: Path | None
    trained: TrainedModel | None
    train_key: str


class Stages:
    """The cached stages for one session: the artifact cache, and where progress goes."""

    def __init__(self, artifacts: cache.ArtifactCache, progress: Progress) -> None:
        self.cache = artifacts
        self.progress = progress
        self._prepared: dict[tuple[str, str], PreparedModel] = {}

    def _worker_progress(self, case_id: str, stage: str):
        """The callback a training or conversion worker reports through: epochs as counts, the
        rest as the stage's detail."""
        def report(text: str) -> None:
            epoch = _EPOCH.fullmatch(text)
            if epoch:
                self.progress.count(case_id, stage, int(epoch[1]), int(epoch[2]), "epochs")
            elif text != stage:
                self.progress.stage(case_id, stage, text)
        return report

    def dataset_npz(self, model: ModelSpec, where: str, case_id: str) -> Path:
        assert model.dataset is not None
        key = cache.content_key("dataset", model.dataset.key(), model.training.seed, code_hash("datasets.py"),
                                directory_fingerprint(model.dataset.options.get("path"), model.dataset.base_dir))

        def generate(staging: Path) -> None:
            log.info("%s: generating data set %s", where, model.dataset.name)
            self.progress.stage(case_id, "data set", model.dataset.name)
            try:
                data = load_dataset(model.dataset.name, model.dataset.options, seed=model.training.seed,
                                    base_dir=model.dataset.base_dir)
            except TinyhilError as error:
                raise type(error)(error.message, where=error.where or where, details=error.details) from error
            np.savez(staging / "data.npz", x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
                     y_test=data.y_test, labels=np.array(data.labels), task=np.array(data.task),
                     source=np.array(data.source))

        return self.cache.ensure("datasets", key, generate) / "data.npz"

    def prepare(self, case: Case) -> PreparedModel:
        """The case's data set and trained model, once per model of a suite."""
        model = case.model
        memo = (str(case.suite.path), model.name)
        if memo in self._prepared:
            return self._prepared[memo]
        where = f"{case.suite.path}:{model.line}"
        npz = self.dataset_npz(model, where, case.id) if model.dataset is not None else None
        trained, train_key = None, ""
        if model.architecture is not None:
            assert npz is not None
            train_key = cache.content_key("train", cache.file_hash(npz), model.architecture, dict(model.params),
                                          model.training.__dict__, code_hash("zoo.py", "model.py"),
                                          cache.library_versions())

            def fit(staging: Path) -> None:
                log.info("%s: training %s (%s)", where, model.name, model.architecture)
                self.progress.stage(case.id, "training", f"{model.name} ({model.architecture})")
                train(model.architecture, model.params, model.training.__dict__, npz, staging, where=where,
                      progress=self._worker_progress(case.id, "training"))

            entry = self.cache.ensure("models", train_key, fit)
            result = json.loads((entry / "model-result.json").read_text())
            trained = TrainedModel(model.architecture, dict(model.params), entry / "weights.h5",
                                   tuple(result["input_shape"]), result["num_outputs"], result["output_activation"],
                                   result["float_accuracy"], result["parameter_count"], result["train_seconds"],
                                   result.get("host", {}))
        prepared = PreparedModel(model, npz, trained, train_key)
        self._prepared[memo] = prepared
        return prepared

    def tflite(self, case: Case, prepared: PreparedModel) -> Path:
        if case.model.tflite is not None:
            return case.model.tflite
        assert prepared.trained is not None and prepared.dataset_npz is not None
        variant = case.variant
        key = cache.content_key("quantize", prepared.train_key, variant.quantization, variant.calibration_samples,
                                case.model.training.seed, code_hash("quantize.py", "zoo.py"), cache.library_versions())

        def convert(staging: Path) -> None:
            log.info("%s: converting %s", case.where, case.id)
            self.progress.stage(case.id, "converting", variant.name)
            quantize(prepared.trained, variant.quantization, variant.calibration_samples, prepared.dataset_npz,
                     staging / "model.tflite", seed=case.model.training.seed, where=case.where,
                     progress=self._worker_progress(case.id, "converting"))

        return self.cache.ensure("tflite", key, convert) / "model.tflite"

    def eval_set(self, case: Case, prepared: PreparedModel, input_quant: TensorQuant,
                 output_quant: TensorQuant) -> EvalSet:
        count = case.model.eval_samples
        if prepared.dataset_npz is None:
            # No data set: seeded random inputs over the input type's range. Agreement with the
            # reference is still measured; accuracy is not defined.
            rng = np.random.default_rng(case.model.training.seed)
            shape = (count,) + input_quant.shape[1:]
            if input_quant.dtype == "float32":
                inputs = rng.normal(size=shape).astype(np.float32)
            else:
                info = np.iinfo(input_quant.dtype)
                inputs = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(input_quant.dtype)
            return EvalSet(inputs, None, "", True, f"{count} random inputs (seed {case.model.training.seed})")
        with np.load(prepared.dataset_npz) as data:
            x, y = data["x_test"][:count], data["y_test"][:count]
            labels, task, source = [str(label) for label in data["labels"]], str(data["task"]), str(data["source"])
        expected = tuple(input_quant.shape[1:])
        where = f"{case.suite.path}:{case.model.line}"
        if tuple(x.shape[1:]) != expected:
            raise DatasetError(f"data set '{case.model.dataset.name}' gives inputs of shape {list(x.shape[1:])}, "
                               f"the model takes {list(expected)}", where=where)
        check_classes(case, output_quant, labels, task, where)
        return EvalSet(x, y, task, False, f"{len(x)} test samples of {case.model.dataset.name}", source)

    def reference(self, case_id: str, tflite: Path, inputs: np.ndarray) -> ReferenceRun:
        key = cache.content_key("reference", cache.file_hash(tflite), hash_array(inputs), str(inputs.dtype),
                                list(inputs.shape), code_hash("reference.py", "tflm.py"), cache.library_versions())

        def compute(staging: Path) -> None:
            self.progress.stage(case_id, "reference", f"{len(inputs)} samples")
            run = run_reference(tflite, inputs)
            np.savez(staging / "reference.npz", outputs=run.outputs, tflm_outputs=run.tflm_outputs)
            (staging / "meta.json").write_text(json.dumps({
                "source": run.source, "litert_note": run.litert_note, "host_arena_bytes": run.host_arena_bytes,
                "input_quant": run.input_quant.__dict__, "output_quant": run.output_quant.__dict__}))

        entry = self.cache.ensure("reference", key, compute)
        meta = json.loads((entry / "meta.json").read_text())
        with np.load(entry / "reference.npz") as arrays:
            outputs, tflm_outputs = arrays["outputs"], arrays["tflm_outputs"]
        quant = {name: TensorQuant(**{**meta[name], "shape": tuple(meta[name]["shape"])})
                 for name in ("input_quant", "output_quant")}
        return ReferenceRun(outputs, meta["source"], tflm_outputs, meta["litert_note"],
                            meta["host_arena_bytes"], quant["input_quant"], quant["output_quant"])


def check_classes(case: Case, output_quant: TensorQuant, labels: list[str], task: str, where: str) -> None:
    """A model's outputs must be the data set's classes (one sigmoid output for two): accuracy
    against labels of another data set would be a meaningless number."""
    outputs = int(np.prod(output_quant.shape[1:]))
    if outputs == len(labels) or (outputs == 1 and len(labels) == 2):
        return
    raise DatasetError(f"model '{case.model.name}' gives {outputs} output(s) per sample, data set "
                       f"'{case.model.dataset.name}' has {len(labels)} classes ({', '.join(labels[:12])}"
                       f"{', ...' if len(labels) > 12 else ''}; task {task}): pair the model with the data set "
                       f"it was trained on", where=where)


def hash_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def directory_fingerprint(path_option: object, base_dir: Path) -> str:
    """Names, sizes and times of a user's data directory, so adding a recording reruns training."""
    if not isinstance(path_option, str):
        return ""
    root = (base_dir / path_option).resolve()
    if not root.is_dir():
        return ""
    entries = sorted((str(path.relative_to(root)), path.stat().st_size, int(path.stat().st_mtime))
                     for path in root.rglob("*.wav"))
    return cache.content_key(entries)
