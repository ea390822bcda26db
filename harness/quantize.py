"""The quantize stage: a trained float Keras model -> .tflite, as a variant's settings ask.

- int8: full-integer post-training quantization, calibrated on N samples: N seeded training
  samples (`calibration_source: train`), or N standard-normal inputs (`random`, what the seed
  article's own representative_dataset does with np.random.randn); weights per channel, or per
  tensor (`per_channel: false`).
- int16x8: 16-bit activations, 8-bit weights, int16 input and output, calibrated alike. Before
  anything is built for a board, TFLite Micro must have an int16 kernel for every op (checked
  against esp-tflite-micro 1.3.8's kernels, then by running the model once on host TFLM).
- int8 with `qat: true`: quantization-aware training (tensorflow-model-optimization, on tf-keras)
  fine-tunes the float model with fake quantization, then converts to int8 with int8 I/O. The
  ranges come from the fake-quantization nodes; TF 2.21's converter still demands a representative
  data set for int8 I/O, so N training samples are given, as for post-training int8.
- float32: converted as is.

Each conversion runs in its own worker process (`python -m harness.quantize JOB RESULT`): the
converter has segfaulted on recurrent models, and that must fail one variant, not the session.
Every model is rebuilt with a fixed batch of 1 before converting, which is what makes tf-keras emit
a fused UNIDIRECTIONAL_SEQUENCE_LSTM that TFLite Micro runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError, UnsupportedOpError
from .isolated import report_progress, run_worker, worker_main
from .model import TRAIN_THREADS, TrainedModel, deterministic_tensorflow
from .tflm import check_runs_int16

CONVERT_TIMEOUT_S = 900
QUANTIZATIONS = ("int8", "int16x8", "float32")
CALIBRATION_SOURCES = ("train", "random")
# Quantization-aware fine-tuning starts from a converged float model: it only has to adapt the
# weights to the int8 grid, which takes a fraction of the training. A third of the suite's epochs
# (at least one) at a tenth of its learning rate keeps the float optimum's neighbourhood (at the
# full rate, the first epochs of fake quantization throw the model off it and the accuracy dips
# before it recovers) and keeps QAT rows cheap next to the training they follow.
QAT_EPOCH_FRACTION = 1 / 3
QAT_LEARNING_RATE_FACTOR = 0.1


@dataclass(frozen=True)
class QuantSettings:
    quantization: str                     # "int8" | "int16x8" | "float32"
    calibration_samples: int | None = None
    calibration_source: str = "train"     # "train": N seeded training samples; "random": N standard-normal inputs
    per_channel: bool = True              # False: per-tensor weight scales
    qat: bool = False                     # quantization-aware training (tfmot) before converting

    def problem(self) -> str | None:
        if self.quantization not in QUANTIZATIONS:
            return f"unknown quantization {self.quantization!r}; expected one of {', '.join(QUANTIZATIONS)}"
        if self.calibration_source not in CALIBRATION_SOURCES:
            return f"calibration_source {self.calibration_source!r}; expected one of {', '.join(CALIBRATION_SOURCES)}"
        if (self.qat or not self.per_channel) and self.quantization != "int8":
            return f"qat and per_channel apply to int8, not to {self.quantization}"
        samples = self.calibration_samples
        if self.quantization != "float32" and (not isinstance(samples, int) or samples < 1):
            return f"{self.quantization} needs calibration_samples >= 1, found {self.calibration_samples!r}"
        return None


def qat_schedule(training: Mapping[str, Any]) -> tuple[int, float]:
    """(epochs, learning rate) of quantization-aware fine-tuning after `training`."""
    return max(1, round(int(training["epochs"]) * QAT_EPOCH_FRACTION)), \
        float(training["learning_rate"]) * QAT_LEARNING_RATE_FACTOR


def quantize(trained: TrainedModel, settings: QuantSettings, dataset_npz: Path, out_path: Path, *,
             training: Mapping[str, Any], seed: int, where: str,
             progress: Callable[[str], None] | None = None) -> Path:
    """Convert in a worker; `progress` receives "converting", then "calibrating on N samples"
    (after "epoch i/n" lines for QAT)."""
    problem = settings.problem()
    if problem:
        raise ConversionError(problem, where=where)
    job = {"model": str(trained.model_path), "input_shape": list(trained.input_shape),
           "num_outputs": trained.num_outputs, "output_activation": trained.output_activation,
           "settings": asdict(settings), "training": dict(training), "dataset": str(dataset_npz), "seed": seed,
           "out": str(out_path), "threads": TRAIN_THREADS}
    run_worker("harness.quantize", job, out_path.parent, timeout_s=CONVERT_TIMEOUT_S, error=ConversionError,
               where=where, progress=progress)
    return out_path


def quantize_many(trained: TrainedModel, conversions: Sequence[tuple[QuantSettings, Path]], dataset_npz: Path,
                  workdir: Path, *, training: Mapping[str, Any], seed: int, where: str,
                  progress: Callable[[str], None] | None = None) -> dict[Path, str]:
    """Several variants of one model converted in one worker, so TensorFlow loads once (about 5 s
    of each conversion of a small model). Returns why each variant that has no .tflite failed.
    A conversion that fails, or a worker that dies, leaves outputs missing and nothing else: the
    caller converts those again one per worker, where a failure is that variant's own."""
    for settings, _ in conversions:
        problem = settings.problem()
        if problem:
            raise ConversionError(problem, where=where)
    job = {"model": str(trained.model_path), "input_shape": list(trained.input_shape),
           "num_outputs": trained.num_outputs, "output_activation": trained.output_activation,
           "items": [{"settings": asdict(settings), "out": str(out)} for settings, out in conversions],
           "training": dict(training), "dataset": str(dataset_npz), "seed": seed, "threads": TRAIN_THREADS}
    try:
        result = run_worker("harness.quantize", job, workdir, timeout_s=CONVERT_TIMEOUT_S * len(conversions),
                            error=ConversionError, where=where, progress=progress)
    except ConversionError as error:
        return {out: error.one_line() for _, out in conversions if not out.is_file()}
    failed = {Path(out): reason for out, reason in result["failed"].items()}
    return {out: failed.get(out, "no .tflite written") for _, out in conversions if not out.is_file()}


def calibration_indices(train_count: int, samples: int, seed: int) -> np.ndarray:
    """Which training samples calibrate: a seeded random subset, so N=50 is not just class 0."""
    rng = np.random.default_rng(seed)
    return rng.permutation(train_count)[:min(samples, train_count)]


def calibration_inputs(settings: QuantSettings, x_train: np.ndarray, seed: int) -> np.ndarray:
    count = int(settings.calibration_samples or 0)
    if settings.calibration_source == "random":
        return np.random.default_rng(seed).standard_normal((count, *x_train.shape[1:])).astype(np.float32)
    return x_train[calibration_indices(len(x_train), count, seed)].astype(np.float32)


# --- the worker's side ----------------------------------------------------------------------------

def _fix_input_batch(config: Any) -> None:
    """Batch 1 on every input layer of a model config, nested models' included."""
    if isinstance(config, dict):
        shape = config.get("batch_input_shape")
        if isinstance(shape, list) and shape:
            shape[0] = 1
        for value in config.values():
            _fix_input_batch(value)
    elif isinstance(config, list):
        for item in config:
            _fix_input_batch(item)


def with_fixed_batch(keras, model, input_shape: list[int]):
    """`model` rebuilt from its config with a fixed batch of 1, with its weights; its own inputs
    also get the data set's sample shape, so no dimension is left dynamic."""
    config = model.get_config()
    _fix_input_batch(config)
    layers = config.get("layers", [])
    top_inputs = {entry[0] for entry in config.get("input_layers", [])} if "input_layers" in config else None
    for layer in layers:
        if layer.get("class_name") != "InputLayer":
            continue
        if top_inputs is None or layer["config"].get("name") in top_inputs:
            layer["config"]["batch_input_shape"] = [1, *input_shape]
        if top_inputs is None:
            break  # a Sequential model's first layer
    rebuilt = type(model).from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


_TFMOT_LAYER = re.compile(r"Layer ([^\s:]+):<class '[\w.]*?(\w+)'> is not supported")


def _qat_refusal(model, error: Exception) -> ConversionError:
    """tfmot's refusal, with the layer it cannot wrap named as the suite would see it."""
    text = " ".join(str(error).split())
    nested = [layer for layer in model.layers if hasattr(layer, "layers")]
    match = _TFMOT_LAYER.search(text)
    if match:
        what = f"layer '{match[1]}' ({match[2]}): tfmot's int8 scheme has no quantized version of it"
    elif nested:
        what = (f"layer '{nested[0].name}' ({type(nested[0]).__name__}): it is a model nested in the model, which "
                f"tfmot does not quantize")
    else:
        what = f"this model: {text[:300]}"
    return ConversionError(f"quantization-aware training (tfmot) cannot wrap {what}; use post-training int8 "
                           f"(qat: false) for this model", details=text)


def _quantization_aware(keras, model, job: dict, data) -> Any:
    """The float model fine-tuned with fake quantization; returned rebuilt with a batch of 1."""
    import tensorflow_model_optimization as tfmot

    from .model import compile_model, fit

    try:
        qat = tfmot.quantization.keras.quantize_model(model)
    except Exception as error:  # tfmot raises ValueError/RuntimeError naming the layer
        raise _qat_refusal(model, error) from error
    epochs, rate = qat_schedule(job["training"])
    compile_model(keras, qat, job["num_outputs"], job["output_activation"], rate)
    fit(keras, qat, data, epochs, int(job["training"]["batch_size"]))
    single = tfmot.quantization.keras.quantize_model(with_fixed_batch(keras, model, job["input_shape"]))
    single.set_weights(qat.get_weights())
    return single


_NO_16X8 = re.compile(r"Quantization to 16x8-bit not yet supported for op: '(\w+)'")


def converter_for(tf, model, settings: QuantSettings, calibration: np.ndarray | None):
    """The TFLiteConverter of a (batch-1) Keras model set up as the quantize stage converts it
    under `settings`; `calibration` feeds the representative data set of post-training integer
    quantization. Shared with harness.quant_debug, whose QuantizationDebugger must convert the
    variant exactly as this stage does."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if settings.quantization in ("int8", "int16x8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if calibration is not None:
            announced = []

            def representative_dataset():
                if not announced:  # the converter reads the data set twice for int16x8
                    report_progress(f"calibrating on {len(calibration)} samples")
                    announced.append(True)
                for sample in calibration:
                    yield [sample[np.newaxis].astype(np.float32)]

            converter.representative_dataset = representative_dataset
        if settings.quantization == "int16x8":
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
            converter.inference_input_type = converter.inference_output_type = tf.int16
            # The converter gives 16x8 dense layers one weight scale per output channel, and
            # esp-tflite-micro 1.3.8's esp-nn FULLY_CONNECTED wrapper runs int16 inputs through the
            # per-tensor reference kernel whatever the scales (kernels/esp_nn/fully_connected.cc,
            # case kTfLiteInt16): on the chip every output but the first channel's would be scaled
            # wrongly. Per-tensor dense weights are what that kernel computes correctly.
            converter._experimental_disable_per_channel_quantization_for_dense_layers = True
        else:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = converter.inference_output_type = tf.int8
        if not settings.per_channel:
            # The converter's only switch for per-tensor weight scales (TF 2.21).
            converter._experimental_disable_per_channel = True
    return converter


def convert(tf, model, settings: QuantSettings, calibration: np.ndarray | None, *, where: str = "") -> bytes:
    """The .tflite of a (batch-1) Keras model under `settings` (see `converter_for`)."""
    converter = converter_for(tf, model, settings, calibration)
    try:
        flatbuffer = converter.convert()
    except Exception as error:  # the converter raises many types (ConverterError, ValueError, ...)
        text = " ".join(str(error).split())
        missing = sorted(set(_NO_16X8.findall(text)))
        if missing:
            raise UnsupportedOpError(f"the TFLite converter has no 16x8 quantization for op {', '.join(missing)}: "
                                     f"quantize this model as int8", where=where, details=text) from error
        raise ConversionError(f"TFLite converter failed: {text[:400]}", where=where, details=text) from error
    if settings.quantization == "int16x8":
        check_runs_int16(flatbuffer, where=where)
    return flatbuffer


def conversion_model(keras, job: dict, settings: QuantSettings) -> tuple[Any, np.ndarray | None]:
    """The Keras model the stage converts (batch 1, fine-tuned first for QAT) and its calibration
    inputs, from a job's "model", "dataset", "seed" and "input_shape" (plus "training",
    "num_outputs" and "output_activation" for QAT). Shared with harness.quant_debug."""
    # Every conversion starts from the same seeds and a fresh Keras state, so one converted beside
    # others (quantize_many) is the one converted alone.
    keras.backend.clear_session()
    keras.utils.set_random_seed(job["seed"])
    model = keras.models.load_model(job["model"], compile=False, safe_mode=True)
    calibration = None
    if settings.quantization != "float32":
        data = np.load(job["dataset"])
        calibration = calibration_inputs(settings, data["x_train"], job["seed"])
        if settings.qat:
            model = _quantization_aware(keras, model, job, data)
    if not settings.qat:
        model = with_fixed_batch(keras, model, job["input_shape"])
    return model, calibration


def _convert_one(tf, keras, job: dict, settings: QuantSettings, out: Path) -> dict:
    started = time.monotonic()
    model, calibration = conversion_model(keras, job, settings)
    flatbuffer = convert(tf, model, settings, calibration)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(flatbuffer)
    tmp.replace(out)
    return {"out": str(out), "bytes": len(flatbuffer), "seconds": time.monotonic() - started}


def _run(job: dict) -> dict:
    tf, keras = deterministic_tensorflow(job["seed"], int(job["threads"]))
    if "items" not in job:
        report_progress("converting")
        return _convert_one(tf, keras, job, QuantSettings(**job["settings"]), Path(job["out"]))
    converted, failed = [], {}
    for number, item in enumerate(job["items"], 1):
        settings = QuantSettings(**item["settings"])
        report_progress(f"converting {number}/{len(job['items'])}")
        try:
            converted.append(_convert_one(tf, keras, job, settings, Path(item["out"])))
        except Exception as error:  # that variant's failure; it is converted again alone, and reported there
            failed[item["out"]] = " ".join(str(error).split())[:400] or type(error).__name__
            print(f"conversion {number} ({settings}) failed: {failed[item['out']]}", flush=True)
    return {"converted": converted, "failed": failed}


if __name__ == "__main__":
    worker_main(_run)
