"""Preprocessing declared once per data set (docs/datasets.md, "Preprocessing").

Loaders return raw values. A suite's `preprocessing:` becomes one `Preprocessing`, fitted on the
training split when it asks for that, and the same fitted object then feeds training, calibration,
the reference interpreter and the board. A model trained on standardized data and fed `x / 255` on
the device is the classic way a TinyML model loses its accuracy on hardware; with one object there
is no second place to get the constants wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Dataset, frozen

METHODS = ("none", "scale", "standardize")
PREPROCESSING_METHODS = METHODS  # the name the suite parser imports
_FIELDS = ("method", "scale", "offset", "mean", "std", "from_train")


# Every refusal is a ValueError, even of a wrong type: the suite parser turns exactly that into a
# SuiteError with the line, and a YAML value of the wrong type is a wrong value to the user.
def _number(value: object, what: str) -> float:
    # bool is an int subclass, but `scale: true` in a suite is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what}: expected a number, found {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what}: expected a finite number, found {number}")
    return number


def _numbers(value: object, what: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        return (_number(value, what),)
    return tuple(_number(v, f"{what}[{i}]") for i, v in enumerate(value))


def _format(values: Sequence[float]) -> str:
    text = ", ".join(f"{v:.6g}" for v in values)
    return text if len(values) == 1 else f"[{text}]"


@dataclass(frozen=True)
class Preprocessing:
    """x -> float32 model input. `scale`: x * scale + offset. `standardize`: (x - mean) / std, with
    one value for every channel or one per channel (the last axis of a sample), given or computed
    from the training split (`from_train`)."""

    method: str = "none"
    scale: float = 1.0
    offset: float = 0.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    from_train: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"preprocessing method: expected one of {', '.join(METHODS)}, found {self.method!r}")
        if not isinstance(self.from_train, bool):
            raise ValueError(f"preprocessing from_train: expected true or false, found {self.from_train!r}")
        # Lists from YAML and single numbers become tuples, so the object stays hashable and exact.
        object.__setattr__(self, "scale", _number(self.scale, "preprocessing scale"))
        object.__setattr__(self, "offset", _number(self.offset, "preprocessing offset"))
        object.__setattr__(self, "mean", _numbers(self.mean, "preprocessing mean"))
        object.__setattr__(self, "std", _numbers(self.std, "preprocessing std"))
        given = self._given()
        allowed = {"none": set(), "scale": {"scale", "offset"}, "standardize": {"mean", "std", "from_train"}}
        stray = sorted(given - allowed[self.method])
        if stray:
            takes = ", ".join(sorted(allowed[self.method])) or "nothing else"
            raise ValueError(
                f"preprocessing method {self.method!r} takes {takes}; found {', '.join(stray)}"
            )
        if self.method == "scale" and self.scale == 0:
            raise ValueError("preprocessing scale: expected a non-zero factor, found 0 (every input would be equal)")
        if self.method != "standardize":
            return
        if self.from_train:
            if self.mean or self.std:
                raise ValueError(
                    "preprocessing from_train computes mean and std from the training split; "
                    "found explicit mean/std as well: give one or the other"
                )
            return
        if not self.mean or not self.std:
            missing = "mean" if not self.mean else "std"
            raise ValueError(
                f"preprocessing standardize: expected mean and std (or from_train: true), {missing} is missing"
            )
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"preprocessing standardize: expected as many std values as mean values, found "
                f"{len(self.mean)} mean and {len(self.std)} std"
            )
        for index, value in enumerate(self.std):
            if value <= 0:
                where = "std" if len(self.std) == 1 else f"std[{index}]"
                raise ValueError(f"preprocessing {where}: expected a value > 0, found {value:g}")

    def _given(self) -> set[str]:
        defaults = Preprocessing.__dataclass_fields__
        return {
            name for name in ("scale", "offset", "mean", "std", "from_train")
            if getattr(self, name) != defaults[name].default
        }

    def fitted(self, x_train: np.ndarray) -> Preprocessing:
        """With `from_train`: the constants of `x_train`'s channels filled in (nothing else is read,
        so the test split can never leak into them). Otherwise self."""
        if not self.from_train:
            return self
        x = np.asarray(x_train, dtype=np.float64)
        if x.ndim < 2 or len(x) == 0:
            raise ValueError(f"preprocessing from_train: expected a batch of training samples, found shape {x.shape}")
        channels = x.reshape(-1, x.shape[-1])
        mean = channels.mean(axis=0)
        std = channels.std(axis=0)
        constant = np.flatnonzero(std == 0)
        if len(constant):
            raise ValueError(
                f"preprocessing from_train: channel {int(constant[0])} of the training split is constant "
                f"({mean[constant[0]]:g}), so its std is 0; give mean and std explicitly or drop that channel"
            )
        return Preprocessing("standardize", mean=tuple(mean.tolist()), std=tuple(std.tolist()))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """float32 model input for `x` (one sample or a batch; channels on the last axis)."""
        values = np.asarray(x, dtype=np.float64)
        if self.method == "none":
            return values.astype(np.float32)
        if self.method == "scale":
            return (values * self.scale + self.offset).astype(np.float32)
        if self.from_train:
            raise ValueError(
                "preprocessing from_train has no statistics yet: fit it on the training split first "
                "(Preprocessing.fitted(x_train))"
            )
        channels = values.shape[-1] if values.ndim else 0
        if len(self.mean) not in (1, channels):
            raise ValueError(
                f"preprocessing standardize has {len(self.mean)} mean/std values (one per channel), but the "
                f"samples' last axis has {channels} channels (shape {values.shape})"
            )
        return ((values - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def invert(self, x: np.ndarray) -> np.ndarray:
        """The raw values `apply` turned into `x` (float64; exact up to float32 rounding). The data
        set stage stores preprocessed splits only; a device's own preprocessing starts from these."""
        values = np.asarray(x, dtype=np.float64)
        if self.method == "none":
            return values
        if self.method == "scale":
            return (values - self.offset) / self.scale
        if self.from_train:
            raise ValueError("preprocessing from_train has no statistics to invert: use the fitted one")
        return values * np.asarray(self.std) + np.asarray(self.mean)

    def describe(self) -> str:
        if self.method == "none":
            return "none (inputs as loaded)"
        if self.method == "scale":
            return f"x * {self.scale:.6g} + {self.offset:.6g}"
        if self.from_train:
            return "(x - mean) / std per channel, statistics of the training split"
        return f"(x - {_format(self.mean)}) / {_format(self.std)}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.method == "scale":
            out.update(scale=self.scale, offset=self.offset)
        elif self.method == "standardize":
            if self.from_train:
                out["from_train"] = True
            else:
                out.update(mean=list(self.mean), std=list(self.std))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocessing: expected a mapping with 'method', found {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in _FIELDS)
        if unknown:
            raise ValueError(f"preprocessing has no field {unknown[0]!r}; it takes: {', '.join(_FIELDS)}")
        if "method" not in data:
            raise ValueError(f"preprocessing: expected a 'method' ({', '.join(METHODS)}), found none")
        if not isinstance(data["method"], str):
            raise ValueError(f"preprocessing method: expected one of {', '.join(METHODS)}, found {data['method']!r}")
        return cls(**{key: data[key] for key in _FIELDS if key in data})


def preprocess_dataset(dataset: Dataset, preprocessing: Preprocessing) -> tuple[Dataset, Preprocessing]:
    """`dataset` with `preprocessing` fitted on its training split and applied to both splits, and
    the fitted Preprocessing (the one to hand to calibration, the reference and the board)."""
    fitted = preprocessing.fitted(dataset.x_train)
    return (
        dataclasses.replace(
            dataset,
            x_train=frozen(fitted.apply(dataset.x_train), np.float32),
            x_test=frozen(fitted.apply(dataset.x_test), np.float32),
        ),
        fitted,
    )
