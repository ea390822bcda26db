"""Accuracy failures the seed article names: predictions that collapse to one class because the
board is fed other inputs than training saw, and int8 accuracy lost to calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..reference import TensorQuant
from .base import Diagnosis, num, pct

# Predictions "collapse" when one class takes this share of them: 80% leaves room for a few
# samples of other classes, as a collapsed model still gives on inputs far from the rest.
COLLAPSE_SHARE = 0.8
# ... and that class is at most half as common among the labels ("much rarer"): a data set where
# one class really is 80% of the samples is not a collapse.
COLLAPSE_LABEL_RATIO = 0.5
# Below this many samples one class can take 80% by chance (the quick profile runs a handful).
MIN_COLLAPSE_SAMPLES = 10
# Share of the quantized inputs at the type's minimum or maximum beyond what the training data
# itself puts there: 5% of a sample clipped is already a visible distortion of its features.
SATURATION_SHARE = 0.05
# The eval inputs span less than this share of the range the input quantization represents: at
# 5% an int8 input keeps about 13 of its 256 steps.
RANGE_USE_MIN = 0.05
# Eval inputs against the training split: a spread this many times narrower or wider, or a mean
# this many training standard deviations away, is not the same preprocessing. Real drift between
# recordings moves statistics by tens of percent, not by a factor of 4.
SPREAD_RATIO = 4.0
SHIFT_STDS = 2.0
# int8 accuracy this many points under the float model's on the same samples (the seed article's
# "<2% accuracy drop on most tasks"). A parameter of calibration_problem.
CALIBRATION_DROP_POINTS = 2.0
# Layers named in the evidence, by RMSE over scale.
WORST_LAYERS = 3

SUGGEST_PREPROCESSING = ("feed the board what training saw: declare the preprocessing once under the data set's "
                         "`preprocessing:` (training, calibration and the board then use the same constants), and "
                         "make the device's front end apply exactly those constants")


@dataclass(frozen=True, eq=False)
class PreprocessingEvidence:
    predicted: np.ndarray              # the board's predicted class of every evaluation sample
    labels: np.ndarray                 # the true class of the same samples
    eval_inputs: np.ndarray            # the float inputs the board was given, before quantization
    input_quant: TensorQuant           # the model's input tensor: dtype, scale, zero point
    train_inputs: np.ndarray | None = None   # the data set's x_train (what training saw)
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Stats:
    low: float
    high: float
    mean: float
    std: float

    @classmethod
    def of(cls, values: np.ndarray) -> _Stats:
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        return cls(float(flat.min()), float(flat.max()), float(flat.mean()), float(flat.std()))

    def text(self) -> str:
        # A standardized mean comes out as 1e-9 rather than 0: print it as the 0 it is.
        mean = 0.0 if abs(self.mean) < 1e-6 * max(1.0, self.std) else self.mean
        return f"range [{num(self.low)}, {num(self.high)}], mean {num(mean)}, std {num(self.std)}"


def _representable(quant: TensorQuant) -> tuple[float, float] | None:
    if quant.dtype.startswith("float") or quant.scale == 0.0:
        return None
    info = np.iinfo(quant.dtype)
    return (info.min - quant.zero_point) * quant.scale, (info.max - quant.zero_point) * quant.scale


def _at_limits(values: np.ndarray, quant: TensorQuant) -> float:
    quantized = quant.quantize(np.asarray(values, dtype=np.float32))
    info = np.iinfo(quant.dtype)
    return float(((quantized == info.min) | (quantized == info.max)).mean())


def _collapse(evidence: PreprocessingEvidence) -> str | None:
    predicted = np.asarray(evidence.predicted).reshape(-1).astype(np.int64)
    labels = np.asarray(evidence.labels).reshape(-1).astype(np.int64)
    if len(predicted) < MIN_COLLAPSE_SAMPLES or len(predicted) != len(labels):
        return None
    counts = np.bincount(predicted)
    top = int(counts.argmax())
    share = counts[top] / len(predicted)
    label_share = float((labels == top).mean())
    if share < COLLAPSE_SHARE or label_share > COLLAPSE_LABEL_RATIO * share:
        return None
    name = f"'{evidence.class_names[top]}'" if top < len(evidence.class_names) else str(top)
    return (f"the board predicts class {name} for {pct(share)} of the {len(predicted)} samples; "
            f"{pct(label_share)} of them are that class")


def preprocessing_mismatch(evidence: PreprocessingEvidence) -> Diagnosis | None:
    """The board's inputs are not what training saw: its predictions collapse to one class, its
    quantized inputs saturate, or the eval inputs' range is far from the training split's or from
    what the input quantization represents. None when none of these shows."""
    facts: list[str] = []
    eval_stats = _Stats.of(evidence.eval_inputs)
    train_stats = _Stats.of(evidence.train_inputs) if evidence.train_inputs is not None else None
    quant = evidence.input_quant
    span = _representable(quant)
    if train_stats is not None:
        ratio = eval_stats.std / train_stats.std if train_stats.std > 0 else float("inf")
        shift = abs(eval_stats.mean - train_stats.mean) / train_stats.std if train_stats.std > 0 else 0.0
        if ratio < 1 / SPREAD_RATIO or ratio > SPREAD_RATIO or shift > SHIFT_STDS:
            how = (f"{1 / ratio:.0f}x narrower" if ratio < 1 else f"{ratio:.0f}x wider") if ratio < 1 / SPREAD_RATIO \
                or ratio > SPREAD_RATIO else f"mean {shift:.1f} training standard deviations away"
            facts.append(f"eval inputs: {eval_stats.text()}; training inputs: {train_stats.text()} ({how})")
    if span is not None:
        low, high = span
        width = high - low
        used = (eval_stats.high - eval_stats.low) / width if width > 0 else 1.0
        train_used = ((train_stats.high - train_stats.low) / width) if train_stats is not None and width > 0 else None
        steps = 2 ** (8 * np.dtype(quant.dtype).itemsize)
        if used < RANGE_USE_MIN and (train_used is None or train_used >= RANGE_USE_MIN):
            trained = f" (the training inputs span {pct(train_used)} of it)" if train_used is not None else ""
            facts.append(f"eval inputs span [{num(eval_stats.low)}, {num(eval_stats.high)}], {pct(used)} of the "
                         f"[{num(low)}, {num(high)}] the input quantization represents (scale {num(quant.scale)}, "
                         f"zero point {quant.zero_point}){trained}: {round(used * (steps - 1))} of its {steps} steps")
        saturated = _at_limits(evidence.eval_inputs, quant)
        baseline = _at_limits(evidence.train_inputs, quant) if evidence.train_inputs is not None else 0.0
        if saturated > SATURATION_SHARE and saturated > baseline + SATURATION_SHARE:
            info = np.iinfo(quant.dtype)
            outside = float(((np.asarray(evidence.eval_inputs) < low) | (np.asarray(evidence.eval_inputs) > high)).mean())
            against = f" (training inputs: {pct(baseline)})" if evidence.train_inputs is not None else ""
            facts.append(f"{pct(saturated)} of the quantized inputs are at {info.min} or {info.max}{against}; "
                         f"{pct(outside)} of the eval values lie outside the [{num(low)}, {num(high)}] the input "
                         f"quantization represents")
    collapse = _collapse(evidence)
    if collapse is None and not facts:
        return None
    if not facts:
        ranges = f"; training inputs {train_stats.text()}" if train_stats is not None else ""
        return Diagnosis(
            "preprocessing", "The board's predictions collapse to one class",
            (collapse, f"the eval inputs ({eval_stats.text()}) look like the training inputs{ranges}"),
            "check the device's preprocessing against training's first (a silent mismatch is the usual cause); "
            "if it matches, the model itself predicts one class: check its float accuracy and its calibration")
    return Diagnosis("preprocessing", "Preprocessing differs between training and the board",
                     tuple(([collapse] if collapse else []) + facts), SUGGEST_PREPROCESSING)


@dataclass(frozen=True)
class CalibrationEvidence:
    quantization: str                   # the row's quantization ("int8", "int16x8")
    float_accuracy: float               # the float model on this row's evaluation samples
    quantized_accuracy: float           # the integer model on the same samples (the board's)
    samples: int
    calibration_samples: int | None
    calibration_source: str             # "train" or "random"
    qat: bool = False
    # harness.quant_debug.LayerError: op_index, op_name, tensor_name, scale, zero_point, rmse,
    # rmse_per_scale, max_abs_error, elements (TensorFlow's QuantizationDebugger per layer)
    layer_errors: Sequence[Any] = ()
    # harness.quant_debug.CalibrationVerdict: source, tried, enough, text
    verdict: Any = None


def _worst_layers(errors: Sequence[Any]) -> list[str]:
    ranked = sorted(errors, key=lambda error: -float(error.rmse_per_scale))[:WORST_LAYERS]
    # The converter names a fused tensor by every op it fused (";"-separated): the first is enough.
    return [f"op {error.op_index} ({error.op_name}, tensor '{str(error.tensor_name).split(';')[0]}'): RMSE {num(float(error.rmse))} "
            f"against the float model, {num(float(error.rmse_per_scale))} quantization steps (scale "
            f"{num(float(error.scale))})" for error in ranked]


def calibration_problem(evidence: CalibrationEvidence, *, threshold_points: float = CALIBRATION_DROP_POINTS
                        ) -> Diagnosis | None:
    """Integer accuracy more than `threshold_points` under the float model on the same samples,
    with the layers that lose most and the calibration verdict. None for float rows and within
    the threshold."""
    if evidence.quantization in ("float32", "as-is", "") or evidence.samples <= 0:
        return None
    drop = 100 * (evidence.float_accuracy - evidence.quantized_accuracy)
    if drop <= threshold_points:
        return None
    source = ("random standard-normal inputs" if evidence.calibration_source == "random" else "training samples")
    calibrated = (f"calibrated on {evidence.calibration_samples} {source}" if evidence.calibration_samples
                  else "quantization-aware trained" if evidence.qat else "calibration not recorded")
    facts = [f"{evidence.quantization} accuracy {pct(evidence.quantized_accuracy)} against the float model's "
             f"{pct(evidence.float_accuracy)} on the same {evidence.samples} samples: {drop:.1f} points lower "
             f"(threshold {threshold_points:g})", calibrated]
    facts += [f"loses most: {line}" for line in _worst_layers(evidence.layer_errors)]
    if evidence.verdict is not None and getattr(evidence.verdict, "text", ""):
        facts.append(f"calibration verdict: {evidence.verdict.text}")
    if evidence.calibration_source == "random":
        suggestion = ("calibrate on real data: `calibration_source: train` with `calibration_samples` of a few hundred; "
                      "random inputs give the activations ranges the data never has")
    elif evidence.verdict is not None and not getattr(evidence.verdict, "enough", True):
        suggestion = ("raise `calibration_samples` past the largest N tried, and check that the calibration samples "
                      "cover every class and condition; else try quantization-aware training (`qat: true`)")
    else:
        suggestion = ("raise `calibration_samples` (the seed article's model recovered from N=50 to N=500), keep "
                      "`calibration_source: train`; if the worst layers stay far off, per-channel weights or "
                      "quantization-aware training (`qat: true`) for them")
    return Diagnosis("calibration", f"{evidence.quantization} lost accuracy in quantization", tuple(facts), suggestion)
