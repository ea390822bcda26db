"""The virtual ESP32-S3's cost model: how long TFLite Micro takes to invoke a model on the chip,
per code path of esp-nn and TFLM (docs/board-model.md).

`estimate_latency` is what the virtual board and the reports use; `fit` holds the constants
fitted to published timings, `validation` their check against whole models nobody fitted,
`calibration` a board's own constants fitted from its measured layers.
"""

from __future__ import annotations

from dataclasses import replace

from ...tflite_model import ModelInfo
from .calibration import Calibration, calibrate_runs, load_calibration
from .fit import default_constants
from .graphs import person_detect_graph
from .model import (CACHE_BYTES, ESP_NN_OPS, PIE_PEAK_MACS_PER_CYCLE, ChipConfig, Constants, LatencyEstimate,
                    OpCost, estimate_with)

__all__ = [
    "ChipConfig", "OpCost", "LatencyEstimate", "Constants", "ESP_NN_OPS", "PIE_PEAK_MACS_PER_CYCLE",
    "CACHE_BYTES", "STATED_ERROR", "STATED_ERROR_REFERENCE", "stated_error", "estimate_latency",
    "published_cost_model", "person_detect_graph",
    "Calibration", "load_calibration", "calibrate_runs", "default_constants",
]

# The largest error of the held-out whole-model points (validation.py), rounded up to 5%: the
# uncertainty an uncalibrated estimate carries. Models that spend most of their estimated time
# in esp-nn's kernels are checked by six held-out points (largest error 23.6%); models that
# spend it in TFLM's reference kernels by one, MobileNetV3-Small without esp-nn (-28.6%).
# tests/test_costmodel.py keeps both honest.
STATED_ERROR = 0.25
STATED_ERROR_REFERENCE = 0.30


def published_cost_model(chip: ChipConfig) -> str:
    kernels = f"esp-nn {chip.esp_nn_version}" if chip.esp_nn else "reference kernels"
    return f"fitted to published timings ({kernels})"


def stated_error(estimate: LatencyEstimate) -> float:
    """The published fit's stated error for this estimate: the reference kernels' when they take
    most of its cycles, esp-nn's otherwise."""
    reference = sum(op.cycles for op in estimate.ops if op.kernel == "reference")
    return STATED_ERROR_REFERENCE if 2 * reference > sum(op.cycles for op in estimate.ops) else STATED_ERROR


def estimate_latency(info: ModelInfo, chip: ChipConfig, calibration: Calibration | None = None) -> LatencyEstimate:
    """Estimated `invoke()` time of `info` on a board configured as `chip`: with the constants
    fitted to published timings, or with a board's calibration."""
    if calibration is None:
        estimate = estimate_with(info, chip, default_constants(), relative_error=STATED_ERROR,
                                 cost_model=published_cost_model(chip))
        return replace(estimate, relative_error=stated_error(estimate))
    return estimate_with(info, chip, calibration.constants(), relative_error=calibration.relative_error,
                         cost_model=calibration.describe())
