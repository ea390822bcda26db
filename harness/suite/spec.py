"""The typed suite: what a validated suite file becomes (see harness.suite)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..board.virtual import VirtualBoardOptions
from ..datasets.preprocessing import Preprocessing
from ..firmware import LinkSettings
from ..layers import LayerSpec
from ..model import ModelSource
from ..quantize import QuantSettings
from ..sources import DEFAULT_ESP_NN_VERSION

PROFILES = ("full", "quick")
# int8: full-integer post-training quantization; int16x8: 16-bit activations, 8-bit weights
# (QUANTIZATIONS and CALIBRATION_SOURCES are the quantize stage's own).
INTEGER_QUANTIZATIONS = ("int8", "int16x8")
# Variant fields that may hold a list and then expand into a matrix of variants.
MATRIX_FIELDS = ("calibration_samples", "calibration_source", "esp_nn_version")

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
    # An integer variant's board accuracy below the float model's, on the same evaluation samples
    # (absolute: 0.02 = two percentage points).
    max_accuracy_drop_vs_float: float | None = None

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
    # Declared once, applied to every split by the data set stage: training, calibration, the
    # reference and the board all see the same numbers.
    preprocessing: Preprocessing = Preprocessing()
    # What the user's device code does to a raw input, when it is to be checked against training's
    # preprocessing: the evaluation inputs (board and reference) get this one instead. Not part of
    # key(): training and calibration never see it.
    device_preprocessing: Preprocessing | None = None

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(sorted(self.options.items())),
                "preprocessing": self.preprocessing.to_dict()}


@dataclass(frozen=True)
class Variant:
    name: str
    quantization: str                 # "int8", "int16x8", "float32" ("as-is" for a tflite model)
    calibration_samples: int | None = None
    line: int = 0
    thresholds: Mapping[str, Any] = field(default_factory=dict)  # overrides of the model's thresholds
    esp_nn_version: str | None = None  # overrides board.esp_nn_version, to put versions side by side
    calibration_source: str | None = None  # "train" or "random" (integer variants)
    per_channel: bool = True               # int8 weights: one scale per output channel, or per tensor
    qat: bool = False                      # quantization-aware training before converting

    def settings(self) -> QuantSettings:
        return QuantSettings(self.quantization, self.calibration_samples, self.calibration_source or "train",
                             self.per_channel, self.qat)


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
    layers: tuple[LayerSpec, ...] = ()   # a Keras Sequential model, layer by layer
    keras: Path | None = None             # the user's own Keras model
    fine_tune: bool = False               # `train: true`: fine-tune the keras model first
    # `arena_kb`: a fixed tensor arena, as a sketch's kTensorArenaSize; None sizes it from host TFLM.
    arena_bytes: int | None = None

    @property
    def trains(self) -> bool:
        """Whether a Keras model stands behind the variants (to train, fine-tune or evaluate)."""
        return self.tflite is None

    def source(self) -> ModelSource:
        if self.keras is not None:
            return ModelSource("keras", self.name, keras_path=self.keras, fine_tune=self.fine_tune)
        if self.layers:
            return ModelSource("layers", self.name, layers=self.layers)
        assert self.architecture is not None, "a tflite model has no Keras source"
        return ModelSource("zoo", self.name, architecture=self.architecture, params=dict(self.params))

    def describe_source(self) -> str:
        return f"tflite:{self.tflite}" if self.tflite is not None else self.source().describe()


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

