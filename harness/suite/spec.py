"""The typed suite: what a validated suite file becomes (see harness.suite)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..board.virtual import VirtualBoardOptions
from ..firmware import LinkSettings
from ..sources import DEFAULT_ESP_NN_VERSION

PROFILES = ("full", "quick")
QUANTIZATIONS = ("int8", "float32")
# Variant fields that may hold a list and then expand into a matrix of variants.
MATRIX_FIELDS = ("calibration_samples", "esp_nn_version")

# --- typed suite ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    max_latency_ms: float | None = None
    max_model_bytes: int | None = None
    max_arena_bytes: int | None = None
    min_float_accuracy: float | None = None
    min_int8_accuracy: float | None = None
    min_output_agreement: float | None = None  # fraction of samples whose board output matches the reference
    agreement_tolerance_lsb: int = 1           # how far (in output LSB) still counts as matching
    # Against a baseline run (`--baseline`, `tinyhil compare`): how much worse is still no regression.
    # Latency is relative; bytes are exact counts; accuracy and agreement are absolute fractions
    # (0.01 = one percentage point). Sizes default to 0: a model that grew by a byte is news.
    max_latency_increase: float | None = 0.05
    max_model_bytes_increase: int | None = 0
    max_arena_bytes_increase: int | None = 0
    max_accuracy_drop: float | None = 0.01
    max_agreement_drop: float | None = 0.01

    def regression_limits(self) -> dict[str, float | None]:
        return {"latency_ms": self.max_latency_increase, "model_bytes": self.max_model_bytes_increase,
                "arena_bytes": self.max_arena_bytes_increase, "accuracy": self.max_accuracy_drop,
                "output_agreement": self.max_agreement_drop}


@dataclass(frozen=True)
class Training:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 0.001
    seed: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    options: Mapping[str, Any]
    base_dir: Path

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(sorted(self.options.items()))}


@dataclass(frozen=True)
class Variant:
    name: str
    quantization: str                 # "int8" (full-integer PTQ) or "float32"
    calibration_samples: int | None = None
    line: int = 0
    thresholds: Mapping[str, Any] = field(default_factory=dict)  # overrides of the model's thresholds
    esp_nn_version: str | None = None  # overrides board.esp_nn_version, to put versions side by side


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str | None
    params: Mapping[str, Any]
    tflite: Path | None
    dataset: DatasetSpec | None
    training: Training
    variants: tuple[Variant, ...]
    eval_samples: int
    thresholds: Thresholds
    line: int


@dataclass(frozen=True)
class BoardSettings:
    cpu_mhz: int = 240
    esp_nn: bool = True
    arena: str = "auto"                       # "auto", "sram" or "psram"
    esp_nn_version: str = DEFAULT_ESP_NN_VERSION  # the esp-nn the firmware pins exactly
    link: LinkSettings = LinkSettings()
    virtual: VirtualBoardOptions = VirtualBoardOptions()  # link emulation, real-time pacing, faults


@dataclass(frozen=True)
class LatencyWindows:
    """MLPerf Tiny's performance practice: several windows of back-to-back inferences on one input,
    reported as the median of the window medians. The windows' samples are what a baseline
    comparison tests for significance."""
    windows: int = 5
    inferences_per_window: int = 20


@dataclass(frozen=True)
class Case:
    suite: Suite
    model: ModelSpec
    variant: Variant

    @property
    def id(self) -> str:
        return f"{self.model.name}[{self.variant.name}]"

    @property
    def where(self) -> str:
        return f"{self.suite.path}:{self.variant.line or self.model.line}"

    @property
    def thresholds(self) -> Thresholds:
        return replace(self.model.thresholds, **self.variant.thresholds)

    @property
    def esp_nn_version(self) -> str:
        return self.variant.esp_nn_version or self.suite.board.esp_nn_version


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    profile: str
    board: BoardSettings
    models: tuple[ModelSpec, ...] = field(default=())
    latency: LatencyWindows = LatencyWindows()

    def cases(self) -> list[Case]:
        return [Case(self, model, variant) for model in self.models for variant in model.variants]

