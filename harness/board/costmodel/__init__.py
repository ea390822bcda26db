"""The virtual ESP32-S3's cost model: how long TFLite Micro takes to invoke a model on the chip,
per code path of esp-nn and TFLM (docs/board-model.md).

`estimate_latency` is what the virtual board and the reports use; `fit` holds the constants
fitted to published timings, `validation` their check against whole models nobody fitted,
`calibration` a board's own constants fitted from its measured layers.
"""

from __future__ import annotations

from ...tflite_model import ModelInfo
from .calibration import Calibration, calibrate_runs, load_calibration
from .fit import default_constants
from .graphs import person_detect_graph
from .model import (CACHE_BYTES, ESP_NN_OPS, PIE_PEAK_MACS_PER_CYCLE, ChipConfig, Constants, LatencyEstimate,
                    OpCost, estimate_with)

__all__ = [
    "ChipConfig", "OpCost", "LatencyEstimate", "Constants", "ESP_NN_OPS", "PIE_PEAK_MACS_PER_CYCLE",
    "CACHE_BYTES", "STATED_ERROR", "estimate_latency", "published_cost_model", "person_detect_graph",
    "Calibration", "load_calibration", "calibrate_runs", "default_constants",
]

# The largest error of the held-out whole-model points (validation.py), rounded up to 5%:
# the uncertainty every uncalibrated estimate carries. tests/test_costmodel.py keeps it honest.
STATED_ERROR = 0.25


def published_cost_model(chip: ChipConfig) -> str:
    kernels = f"esp-nn {chip.esp_nn_version}" if chip.esp_nn else "reference kernels"
    return f"fitted to published timings ({kernels})"


def estimate_latency(info: ModelInfo, chip: ChipConfig, calibration: Calibration | None = None) -> LatencyEstimate:
    """Estimated `invoke()` time of `info` on a board configured as `chip`: with the constants
    fitted to published timings, or with a board's calibration."""
    if calibration is None:
        return estimate_with(info, chip, default_constants(), relative_error=STATED_ERROR,
                             cost_model=published_cost_model(chip))
    return estimate_with(info, chip, calibration.constants(), relative_error=calibration.relative_error,
                         cost_model=calibration.describe())
