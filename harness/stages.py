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
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cache
from .datasets import load_dataset
from .datasets.preprocessing import Preprocessing
from .errors import DatasetError, TinyhilError
from .model import TrainedModel, load_trained, train
from .progress import Progress
from .quantize import quantize, quantize_many
from .reference import ReferenceRun, TensorQuant, run_reference
from .suite import Case, ModelSpec

log = logging.getLogger("tinyhil")

_HARNESS = Path(__file__).resolve().parent
_EPOCH = re.compile(r"epoch (\d+)/(\d+)")


def code_hash(*names: str) -> str:
    """The source of harness modules (a package by its folder name: every .py in it)."""
    files = []
    for name in names:
        path = _HARNESS / name
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return cache.source_hash(*(str(file) for file in files if "__pycache__" not in file.parts))


@dataclass(frozen=True)
class EvalSet:
    inputs: np.ndarray            # float features, or raw inputs already in the model's type
    labels: np.ndarray | None     # None when the suite gives no data set (random inputs)
    task: str
    quantized: bool               # True when `inputs` are raw model-typed values
    description: str
    source: str = ""              # where the data set's samples come from (generated, recorded, ...)
    preprocessing: str = ""       # the declared preprocessing every split went through, in one line
    float_outputs: np.ndarray | None = None  # the float Keras model's outputs on the same samples
    # The suite's device_preprocessing, when the inputs went through it instead of training's ("" if not).
    device_preprocessing: str = ""


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
        # The cases the session will run (BenchSession.plan): variants of one model are then
        # converted together, in one worker. Models whose variants had their turn are remembered.
        self._planned: list[Case] = []
        self._batched: set[tuple[str, str]] = set()

    def plan(self, cases: list[Case]) -> None:
        self._planned = list(cases)

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
        """The data set with its declared preprocessing applied to every split, once: what
        training, calibration, the reference and the board all read."""
        assert model.dataset is not None
        spec = model.dataset
        key = cache.content_key("dataset", spec.key(), model.training.seed, code_hash("datasets"),
                                directory_fingerprint(spec.options.get("path"), spec.base_dir))

        def generate(staging: Path) -> None:
            log.info("%s: generating data set %s", where, spec.name)
            self.progress.stage(case_id, "data set", spec.name)
            try:
                data = load_dataset(spec.name, spec.options, seed=model.training.seed, base_dir=spec.base_dir)
                # Statistics, where the declaration asks for them, come from the training split only.
                preprocessing = spec.preprocessing.fitted(data.x_train)
                splits = {name: preprocessing.apply(getattr(data, name)) for name in ("x_train", "x_test")}
            except TinyhilError as error:
                raise type(error)(error.message, where=error.where or where, details=error.details) from error
            except ValueError as error:  # the preprocessing does not fit the data (channels)
                raise DatasetError(f"data set '{spec.name}': preprocessing {spec.preprocessing.describe()}: {error}",
                                   where=where) from error
            np.savez(staging / "data.npz", **splits, y_train=data.y_train, y_test=data.y_test,
                     labels=np.array(data.labels), task=np.array(data.task), source=np.array(data.source),
                     preprocessing=np.array(json.dumps(preprocessing.to_dict())),
                     preprocessing_text=np.array(preprocessing.describe() + (
                         ", the training split's statistics" if spec.preprocessing.from_train else "")))

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
        if model.trains:
            assert npz is not None
            source = model.source()
            user_model = files_fingerprint(model.keras, content=True) if model.keras is not None else ""
            train_key = cache.content_key("train", cache.file_hash(npz), source.key(), user_model,
                                          model.training.__dict__, code_hash("zoo.py", "layers.py", "model.py"),
                                          cache.library_versions())

            def fit(staging: Path) -> None:
                log.info("%s: %s %s (%s)", where, "training" if source.kind != "keras" or source.fine_tune
                         else "evaluating", model.name, source.describe())
                self.progress.stage(case.id, "training", f"{model.name} ({source.describe()})")
                train(source, model.training.__dict__, npz, staging, where=where,
                      progress=self._worker_progress(case.id, "training"), dataset_name=model.dataset.name)

            entry = self.cache.ensure("models", train_key, fit)
            trained = load_trained(entry, source)
        prepared = PreparedModel(model, npz, trained, train_key)
        self._prepared[memo] = prepared
        return prepared

    def _tflite_key(self, case: Case, prepared: PreparedModel) -> str:
        settings = case.variant.settings()
        # QAT fine-tunes with the suite's training settings: they are part of what it builds.
        return cache.content_key("quantize", prepared.train_key, settings.__dict__, case.model.training.seed,
                                 case.model.training.__dict__ if settings.qat else None,
                                 code_hash("quantize.py", "model.py", "zoo.py", "layers.py", "tflm.py"),
                                 cache.library_versions())

    def tflite(self, case: Case, prepared: PreparedModel) -> Path:
        if case.model.tflite is not None:
            return case.model.tflite
        assert prepared.trained is not None and prepared.dataset_npz is not None
        variant = case.variant
        settings = variant.settings()
        key = self._tflite_key(case, prepared)
        if not self.cache.entry("tflite", key).exists():
            self._convert_together(case, prepared)

        def convert(staging: Path) -> None:
            log.info("%s: converting %s", case.where, case.id)
            self.progress.stage(case.id, "converting", variant.name)
            quantize(prepared.trained, settings, prepared.dataset_npz, staging / "model.tflite",
                     training=case.model.training.__dict__, seed=case.model.training.seed, where=case.where,
                     progress=self._worker_progress(case.id, "converting"))

        return self.cache.ensure("tflite", key, convert) / "model.tflite"

    def _convert_together(self, case: Case, prepared: PreparedModel) -> None:
        """The planned variants of `case`'s model that are not cached yet, converted in one worker
        (TensorFlow loads once, not once per variant), each then put in the cache as if converted
        alone. Whatever fails here is converted again alone by `tflite`, which reports it."""
        memo = (str(case.suite.path), case.model.name)
        if memo in self._batched:
            return
        self._batched.add(memo)
        siblings = [other for other in self._planned if other.suite.path == case.suite.path
                    and other.model.name == case.model.name and other.model.tflite is None]
        if len(siblings) < 2:
            return
        # One batch per model at a time, across processes: a run that waited here finds the
        # entries the other built, as it would behind each entry's own lock.
        with cache.file_lock(self.cache.root / "locks" / f"tflite-together-{prepared.train_key}.lock"):
            pending = {self._tflite_key(other, prepared): other for other in siblings}
            pending = {key: other for key, other in pending.items() if not self.cache.entry("tflite", key).exists()}
            if len(pending) < 2:
                return
            self._convert_pending(case, prepared, pending)

    def _convert_pending(self, case: Case, prepared: PreparedModel, pending: dict[str, Case]) -> None:
        assert prepared.trained is not None and prepared.dataset_npz is not None
        log.info("%s: converting %d variants of %s in one worker: %s", case.where, len(pending), case.model.name,
                 ", ".join(other.variant.name for other in pending.values()))
        self.progress.stage(case.id, "converting", f"{len(pending)} variants")
        with cache.staging_dir(self.cache.root / "tflite", "together") as staging:
            outputs = {key: staging / f"{index}.tflite" for index, key in enumerate(pending)}
            failed = quantize_many(prepared.trained, [(pending[key].variant.settings(), out)
                                                      for key, out in outputs.items()],
                                   prepared.dataset_npz, staging, training=case.model.training.__dict__,
                                   seed=case.model.training.seed, where=case.where,
                                   progress=self._worker_progress(case.id, "converting"))
            for key, out in outputs.items():
                if out in failed:
                    log.info("%s: %s did not convert beside the others (%s); converting it alone",
                             case.where, pending[key].id, failed[out])
                    continue

                def keep(entry: Path, out: Path = out) -> None:
                    shutil.copyfile(out, entry / "model.tflite")
                    shutil.copyfile(staging / "quantize.log", entry / "quantize.log")

                self.cache.ensure("tflite", key, keep)

    def quantization_errors(self, case: Case, prepared: PreparedModel) -> tuple:
        """Per-layer quantization error of an int8 variant against its float model (TensorFlow's
        QuantizationDebugger, harness.quant_debug), cached beside the variant's .tflite."""
        from .quant_debug import errors_from_json, errors_to_json, layer_errors

        assert prepared.trained is not None and prepared.dataset_npz is not None
        settings = case.variant.settings()
        key = cache.content_key("quant-debug", self._tflite_key(case, prepared),
                                code_hash("quant_debug.py", "quantize.py", "tflite_model.py", "reference.py"),
                                cache.library_versions())

        def compute(staging: Path) -> None:
            log.info("%s: per-layer quantization error of %s (QuantizationDebugger)", case.where, case.id)
            errors = layer_errors(prepared.trained.model_path, settings, prepared.dataset_npz,
                                  seed=case.model.training.seed, where=case.where, workdir=staging)
            (staging / "layers.json").write_text(json.dumps(errors_to_json(errors)))

        entry = self.cache.ensure("quant-debug", key, compute)
        return errors_from_json(json.loads((entry / "layers.json").read_text()))

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
            preprocessing = str(data["preprocessing_text"])
            device = case.model.dataset.device_preprocessing
            if device is not None:
                try:
                    x = device_inputs(device, Preprocessing.from_dict(json.loads(str(data["preprocessing"]))),
                                      data["x_train"], x)
                except ValueError as error:  # constants that do not fit the data (channels, a constant channel)
                    raise DatasetError(f"data set '{case.model.dataset.name}': device_preprocessing "
                                       f"{device.describe()}: {error}",
                                       where=f"{case.suite.path}:{case.model.line}") from error
        expected = tuple(input_quant.shape[1:])
        where = f"{case.suite.path}:{case.model.line}"
        if tuple(x.shape[1:]) != expected:
            raise DatasetError(f"data set '{case.model.dataset.name}' gives inputs of shape {list(x.shape[1:])}, "
                               f"the model takes {list(expected)}", where=where)
        check_classes(case, output_quant, labels, task, where)
        float_outputs = (np.load(prepared.trained.float_predictions_path)[:count]
                         if prepared.trained is not None else None)
        return EvalSet(x, y, task, False, f"{len(x)} test samples of {case.model.dataset.name}", source,
                       preprocessing, float_outputs, device.describe() if device is not None else "")

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


def device_inputs(device: Preprocessing, training: Preprocessing, x_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`x` (preprocessed as for training) as the user's device would feed it: back to the raw values,
    then through the device's own preprocessing (fitted on the raw training split if it asks)."""
    raw = training.invert(x)
    fitted = device.fitted(training.invert(x_train)) if device.from_train else device
    return fitted.apply(raw)


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
    """Names, sizes and times of a user's data (a directory's files, or one file), so that adding
    a recording or editing a CSV reruns what was built from it."""
    if not isinstance(path_option, str) or not path_option:
        return ""
    return files_fingerprint((base_dir / path_option).resolve())


def files_fingerprint(root: Path, *, content: bool = False) -> str:
    """Names, sizes and times (or contents) of a file, or of every file under a directory."""
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = sorted(path for path in root.rglob("*") if path.is_file())
    else:
        return ""
    entries = [(str(path.relative_to(root)) if path != root else path.name, path.stat().st_size,
                cache.file_hash(path) if content else int(path.stat().st_mtime_ns)) for path in paths]
    return cache.content_key(entries)
