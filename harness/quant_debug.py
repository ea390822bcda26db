"""Why int8 lost accuracy: per-layer quantization error, and the calibration verdict.

Per-layer error comes from TensorFlow's own `tf.lite.experimental.QuantizationDebugger`, given
the converter the quantize stage builds for the variant (`quantize.converter_for`, on the model
`quantize.conversion_model` prepares: same calibration source, sample count and seed, same
per-channel switch). It is run with `fully_quantize`, so its model has the stage's int8 input and
output, and it is fed the data set's first test samples quantized as the board gets them (clipped
to int8 with the stage model's input scale; the debugger's own rounding would wrap around instead
of clipping, which matters exactly when the calibration missed the data's range).

The debugger runs each quantized operator beside a float copy of it that takes the same
(dequantized) input, so each layer's error is its own, not the sum of the layers before it. Per
layer it gives the mean squared error and the mean of each sample's largest absolute error (it
averages every metric over the samples); the RMSE is divided by the output's scale as in the
TensorFlow tutorial, which gives the error in quantization steps: about 0.3 is rounding alone
(a uniform error of one step has an RMSE of 1/sqrt(12)), several steps mean a range that does not
fit the data.

TensorFlow runs in a worker process (`python -m harness.quant_debug JOB RESULT`), as for the
quantize stage; this module's harness side never imports it.

The calibration verdict reads the accuracy at the calibration sizes a suite tried (pure Python).
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError
from .isolated import report_progress, run_worker, worker_main
from .model import TRAIN_THREADS
from .quantize import QuantSettings

DEBUG_TIMEOUT_S = 600
DEBUG_SAMPLES = 64
# The stage's model and the debugger's come from the same calibration, so their quantization
# parameters are equal up to float32 rounding in their serialisation.
_SCALE_REL_TOLERANCE = 1e-5


@dataclass(frozen=True)
class LayerError:
    """One quantized operator's output against its float copy fed the same input."""
    op_index: int          # the op in the quantize stage's .tflite, when it can be matched, else -1
    op_name: str           # e.g. "CONV_2D"
    tensor_name: str       # the op's output tensor (the stage model's name when matched)
    scale: float           # of the quantized output tensor
    zero_point: int
    rmse: float            # float units: sqrt of the mean over samples of each sample's MSE
    rmse_per_scale: float  # RMSE in quantization steps of the output
    max_abs_error: float   # each sample's largest absolute error, averaged over the samples
    elements: int          # elements of the output tensor (one sample)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayerError:
        missing = [field.name for field in fields(cls) if field.name not in data]
        if missing:
            raise ValueError(f"a per-layer quantization error needs {', '.join(missing)}; found keys "
                             f"{', '.join(sorted(data)) or 'none'}")
        return cls(int(data["op_index"]), str(data["op_name"]), str(data["tensor_name"]), float(data["scale"]),
                   int(data["zero_point"]), float(data["rmse"]), float(data["rmse_per_scale"]),
                   float(data["max_abs_error"]), int(data["elements"]))


def errors_to_json(errors: Sequence[LayerError]) -> list[dict[str, Any]]:
    return [error.to_json() for error in errors]


def errors_from_json(data: Sequence[Mapping[str, Any]]) -> tuple[LayerError, ...]:
    return tuple(LayerError.from_json(item) for item in data)


def refusal(settings: QuantSettings) -> str | None:
    """Why the debugger cannot look at this variant, or None."""
    problem = settings.problem()
    if problem:
        return problem
    if settings.quantization != "int8":
        return (f"per-layer quantization error is measured for int8 variants only (TensorFlow's "
                f"QuantizationDebugger quantizes to int8); this variant is {settings.quantization}")
    if settings.qat:
        return ("per-layer quantization error is measured for post-training int8 only: a quantization-aware "
                "trained variant takes its ranges from its fake-quantization nodes, not from a calibration the "
                "QuantizationDebugger can redo")
    return None


def layer_errors(keras_model: Path, settings: QuantSettings, dataset_npz: Path, *,
                 debug_samples: int = DEBUG_SAMPLES, seed: int = 0, timeout_s: float = DEBUG_TIMEOUT_S,
                 where: str = "", workdir: Path | None = None) -> tuple[LayerError, ...]:
    """Per-layer error of the int8 variant `settings` of the float Keras model against that model,
    on the first `debug_samples` test samples of `dataset_npz` (the preprocessed data set the
    quantize stage calibrates from); `seed` is the quantize stage's (it picks the calibration
    samples). The worker's job, result and log go to `workdir` (kept), else to a temporary
    directory. Raises ConversionError for variants the debugger does not cover (int16x8, QAT,
    float32) before starting anything."""
    problem = refusal(settings)
    if problem:
        raise ConversionError(problem, where=where)
    if debug_samples < 1:
        raise ConversionError(f"debug_samples must be at least 1, found {debug_samples}", where=where)
    job = {"model": str(keras_model), "settings": asdict(settings), "dataset": str(dataset_npz), "seed": seed,
           "debug_samples": int(debug_samples), "threads": TRAIN_THREADS}
    if workdir is not None:
        result = run_worker("harness.quant_debug", job, workdir, timeout_s=timeout_s, error=ConversionError,
                            where=where)
    else:
        with tempfile.TemporaryDirectory(prefix="tinyhil-quant-debug-") as scratch:
            result = run_worker("harness.quant_debug", job, Path(scratch), timeout_s=timeout_s,
                                error=ConversionError, where=where)
    errors = errors_from_json(result["layers"])
    if not errors:
        raise ConversionError("the QuantizationDebugger compared no layer of this model (no NumericVerify op "
                              "in its debug model)", where=where)
    return errors


def worst_layers(errors: Sequence[LayerError], count: int = 3) -> tuple[LayerError, ...]:
    """The `count` layers with the largest error in quantization steps, largest first (a layer
    whose error is not a number comes last)."""
    def key(error: LayerError) -> float:
        return -error.rmse_per_scale if not math.isnan(error.rmse_per_scale) else math.inf
    return tuple(sorted(errors, key=key)[:max(0, count)])


# --- the calibration verdict ---------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationVerdict:
    source: str                            # "train" or "random"
    tried: tuple[tuple[int, float], ...]   # (N, accuracy) sorted by N
    enough: int | None                     # see calibration_verdict; None when no N tried is enough
    text: str


def _samples(count: int, source: str) -> str:
    return f"{count} {'random inputs' if source == 'random' else 'training samples'}"


def calibration_verdict(points: Sequence[tuple[int, float]], source: str, *,
                        within: float = 0.01) -> CalibrationVerdict:
    """How many calibration samples are enough, from the accuracy at each N tried.

    The largest N tried is the yardstick. `enough` is the smallest N whose accuracy, and that of
    every larger N tried, is at least the largest N's accuracy minus `within` (0.01: one point
    of accuracy); a smaller N that beats the largest counts as within. An N followed by a larger
    one that falls more than `within` short does not count: that is noise or luck, not enough.

    No N tried is enough (`enough` None) when
    - only one N was tried: nothing shows that it is past the point where more samples help; or
    - the accuracy still rises by more than `within` from the second largest N to the largest: the
      curve has not flattened, so the largest N may not be enough either (and it is the only N
      within reach of itself).
    Accuracies are fractions (0..1).
    """
    if source not in ("train", "random"):
        raise ValueError(f"calibration source {source!r}; expected 'train' or 'random'")
    if not points:
        raise ValueError("a calibration verdict needs at least one (samples, accuracy) point")
    if not 0.0 <= within < 1.0:
        raise ValueError(f"within is a fraction of accuracy in 0..1, found {within}")
    tried = tuple(sorted((int(n), float(accuracy)) for n, accuracy in points))
    counts = [n for n, _ in tried]
    if len(set(counts)) != len(counts) or counts[0] < 1:
        raise ValueError(f"calibration sizes must be distinct and positive, found {counts}")
    if not all(0.0 <= accuracy <= 1.0 for _, accuracy in tried):
        raise ValueError(f"accuracies must be fractions in 0..1, found {[accuracy for _, accuracy in tried]}")
    largest, best = tried[-1]

    def percent(value: float) -> str:
        return f"{100 * value:.1f}%"

    if len(tried) == 1:
        text = (f"no N tried is enough: only {_samples(largest, source)} were tried ({percent(best)}); "
                f"try a smaller and a larger N to see where the accuracy stops rising")
        return CalibrationVerdict(source, tried, None, text)
    previous, previous_accuracy = tried[-2]
    # 1e-9: accuracies are ratios of sample counts, so 0.945 - 0.01 must still admit 0.935.
    floor = best - within - 1e-9
    if previous_accuracy < floor:
        text = (f"no N tried is enough: the accuracy still rises by {100 * (best - previous_accuracy):.1f} points "
                f"from {previous} to {largest} ({percent(previous_accuracy)} to {percent(best)}), so "
                f"{_samples(largest, source)} may not be enough either; try more")
        return CalibrationVerdict(source, tried, None, text)
    enough = largest
    for n, accuracy in reversed(tried[:-1]):
        if accuracy < floor:
            break
        enough = n
    accuracy = dict(tried)[enough]
    text = (f"{_samples(enough, source)} are enough ({percent(accuracy)} against {percent(best)} with {largest}, "
            f"within {100 * within:g} point{'s' if 100 * within != 1 else ''})")
    return CalibrationVerdict(source, tried, enough, text)


# --- the worker's side ----------------------------------------------------------------------------

def match_ops(rows: Sequence[Mapping[str, Any]], stage_info) -> list[int]:
    """For each debugger row (in the debug model's op order), the index of the same op in the
    stage's model (a harness.tflite_model.ModelInfo), or -1. Both models come from one converter
    setup and calibration, so their quantized ops come in the same order with the same output
    quantization; a row is matched to the next op from there with the same name, output scale,
    zero point and element count."""
    matched, cursor = [], 0
    for row in rows:
        found = -1
        for op in stage_info.ops[cursor:]:
            if op.name != row["op_name"] or not op.outputs:
                continue
            out = stage_info.tensors[op.outputs[0]]
            if (out.scales and out.zero_points and out.elements == int(row["elements"])
                    and out.zero_points[0] == int(row["zero_point"])
                    and math.isclose(out.scales[0], float(row["scale"]), rel_tol=_SCALE_REL_TOLERANCE)):
                found = op.index
                break
        if found >= 0:
            cursor = found + 1
        matched.append(found)
    return matched


def weight_mismatch(debug_info, stage_info, pairs: Sequence[tuple[int, int]]) -> str | None:
    """Whether the debugger quantized weights otherwise than the stage (per channel or per tensor):
    `pairs` are (output tensor in the debug model, op index in the stage's model) of matched
    layers. Activation ranges alone would not show a per-channel switch that did not reach it."""
    defining = {tensor: op for op in debug_info.ops for tensor in op.outputs}
    for tensor, index in pairs:
        debug_op, stage_op = defining.get(tensor), stage_info.ops[index]
        if debug_op is None or len(debug_op.inputs) < 2 or len(stage_op.inputs) < 2:
            continue
        debug_weights, stage_weights = debug_info.tensors[debug_op.inputs[1]], stage_info.tensors[stage_op.inputs[1]]
        if not (debug_weights.is_constant and stage_weights.is_constant):
            continue
        if len(debug_weights.scales) != len(stage_weights.scales):
            return (f"the QuantizationDebugger's model quantizes the weights of op {index} ({stage_op.name}) with "
                    f"{len(debug_weights.scales)} scales, the quantize stage's with {len(stage_weights.scales)}: "
                    f"it did not convert the variant as the stage does")
    return None


def _layer_rows(debugger) -> list[dict[str, Any]]:
    """The debugger's layer statistics, as its own CSV dump gives them (pandas reads it as the
    TensorFlow tutorial does), with the tutorial's RMSE in quantization steps."""
    import pandas

    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    table = pandas.read_csv(io.StringIO(dump.getvalue()))
    rows = []
    for record in table.to_dict("records"):
        rmse = math.sqrt(float(record["mean_squared_error"]))
        scale = float(record["scale"])
        rows.append({"debug_tensor": int(record["tensor_idx"]), "op_name": str(record["op_name"]),
                     "tensor_name": str(record["tensor_name"]), "scale": scale,
                     "zero_point": int(record["zero_point"]), "rmse": rmse, "rmse_per_scale": rmse / scale,
                     "max_abs_error": float(record["max_abs_error"]),
                     "elements": round(float(record["num_elements"]))})
    return rows


def _run(job: dict) -> dict:
    from .model import deterministic_tensorflow
    from .quantize import conversion_model, convert, converter_for
    from .reference import TensorQuant
    from .tflite_model import inspect_model

    tf, keras = deterministic_tensorflow(job["seed"], int(job["threads"]))
    settings = QuantSettings(**job["settings"])
    with np.load(job["dataset"]) as data:
        x_test = data["x_test"]
        debug_inputs = x_test[:int(job["debug_samples"])].astype(np.float32)
    job = {**job, "input_shape": [int(d) for d in x_test.shape[1:]]}
    report_progress("converting")
    model, calibration = conversion_model(keras, job, settings)
    # The stage's own conversion, for the op indices the rest of the harness uses.
    stage_info = inspect_model(convert(tf, model, settings, calibration))
    stage_input = stage_info.tensors[stage_info.inputs[0]]
    if stage_input.dtype != "int8" or not stage_input.scales:
        raise ConversionError(f"the int8 model's input is {stage_input.dtype} without a scale; the debugger "
                              f"needs the stage's int8 input")
    input_quant = TensorQuant("int8", stage_input.shape, stage_input.scales[0], stage_input.zero_points[0])

    def debug_dataset():
        for sample in debug_inputs:
            yield [input_quant.quantize(sample[np.newaxis])]

    options = tf.lite.experimental.QuantizationDebugOptions(fully_quantize=True)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter_for(tf, model, settings, calibration), debug_dataset=debug_dataset,
        debug_options=options)
    debug_info = inspect_model(debugger.quant_model)
    debug_input = debug_info.tensors[debug_info.inputs[0]]
    same_input = (debug_input.dtype == "int8" and debug_input.scales[:1] and debug_input.zero_points[:1] ==
                  stage_input.zero_points[:1] and math.isclose(debug_input.scales[0], stage_input.scales[0],
                                                               rel_tol=_SCALE_REL_TOLERANCE))
    if not same_input:
        raise ConversionError(f"the debugger's model takes {debug_input.dtype} input with scale "
                              f"{debug_input.scales[:1]} and zero point {debug_input.zero_points[:1]}, the stage's "
                              f"int8 with {stage_input.scales[:1]} and {stage_input.zero_points[:1]}: they were "
                              f"not converted alike")
    report_progress(f"comparing layers on {len(debug_inputs)} samples")
    debugger.run()
    rows = _layer_rows(debugger)
    for row, index in zip(rows, match_ops(rows, stage_info)):
        row["op_index"] = index
        if index >= 0:
            # The debugger's name loses a trailing digit (it strips the suffix of its quantized copy).
            row["tensor_name"] = stage_info.tensors[stage_info.ops[index].outputs[0]].name
    debug_tensors = [row.pop("debug_tensor") for row in rows]
    mismatch = weight_mismatch(debug_info, stage_info, [(tensor, row["op_index"]) for tensor, row
                                                         in zip(debug_tensors, rows) if row["op_index"] >= 0])
    if mismatch:
        raise ConversionError(mismatch)
    return {"layers": rows, "samples": len(debug_inputs)}


if __name__ == "__main__":
    worker_main(_run)
