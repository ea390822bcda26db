"""Types and helpers every data set loader shares: the `Dataset` it returns, its declared options,
option checks, sample caps and the seeded stratified split."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import DatasetError

TEST_FRACTION = 0.2
# Below this a stratified 80/20 split cannot put every class into both halves.
MIN_SAMPLES_PER_CLASS = 5


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetOption:
    name: str
    type: type | tuple[type, ...]
    default: object
    help: str


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]
    task: str
    source: str

    def __post_init__(self) -> None:
        # A malformed Dataset would surface much later as a shape error inside Keras or a wrong
        # accuracy on the board; checking here names the data set instead.
        where = f"dataset {self.name!r}"
        if self.task not in ("multiclass", "binary"):
            raise DatasetError(f"task must be 'multiclass' or 'binary', not {self.task!r}", where=where)
        if self.task == "binary" and len(self.labels) != 2:
            raise DatasetError(f"a binary data set needs 2 labels, got {len(self.labels)}", where=where)
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != np.float32 or y.dtype != np.int64:
                raise DatasetError(
                    f"{split} arrays must be float32/int64, got {x.dtype}/{y.dtype}", where=where
                )
            if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
                raise DatasetError(f"{split} split has {len(x)} inputs and {y.shape} labels", where=where)
            if y.min() < 0 or y.max() >= len(self.labels):
                raise DatasetError(f"{split} labels outside 0..{len(self.labels) - 1}", where=where)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(
                f"train inputs {self.x_train.shape[1:]} and test inputs {self.x_test.shape[1:]} differ",
                where=where,
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DatasetLoader:
    name: str
    description: str
    options: tuple[DatasetOption, ...]
    load: Callable[[Mapping[str, object], int, Path], Dataset]



def check_option_type(option: DatasetOption, value: object, where: str) -> object:
    allowed = option.type if isinstance(option.type, tuple) else (option.type,)
    # bool is an int subclass, but `samples_per_class: true` in a suite is a mistake, not 1.
    if isinstance(value, bool) and bool not in allowed:
        raise _wrong_type(option, value, allowed, where)
    if isinstance(value, allowed):
        return value
    # Suites are YAML, where `fault_severity: 2` is an int; refusing it would only annoy.
    if float in allowed and isinstance(value, int):
        return float(value)
    raise _wrong_type(option, value, allowed, where)


def _wrong_type(option: DatasetOption, value: object, allowed: tuple[type, ...], where: str) -> DatasetError:
    expected = " or ".join(t.__name__ for t in allowed)
    return DatasetError(
        f"option {option.name!r} must be {expected}, got {type(value).__name__} {value!r}", where=where
    )


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def rng_for(seed: int, stream: str) -> np.random.Generator:
    # One independent stream per data set and purpose, so adding a draw to one loader never
    # changes another loader's data for the same seed.
    return np.random.default_rng([seed, *stream.encode()])


def int_option(
    options: Mapping[str, object], name: str, where: str, low: int, high: int | None = None
) -> int:
    value = int(options[name])  # type: ignore[call-overload]
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise DatasetError(f"option {name!r} must be {bound}, got {value}", where=where)
    return value


def cap_option(options: Mapping[str, object], where: str, allow_all: bool) -> int:
    """samples_per_class; 0 means 'no cap' for real data sets, which have a natural size."""
    value = int(options["samples_per_class"])  # type: ignore[call-overload]
    if allow_all and value == 0:
        return 0
    if value < MIN_SAMPLES_PER_CLASS:
        hint = " (or 0 for all)" if allow_all else ""
        raise DatasetError(
            f"option 'samples_per_class' must be >= {MIN_SAMPLES_PER_CLASS}{hint}, got {value}", where=where
        )
    return value


def frozen(array: np.ndarray, dtype: type) -> np.ndarray:
    out = np.ascontiguousarray(array, dtype=dtype)
    out.setflags(write=False)
    return out


def stratified_split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str],
    task: str,
    source: str,
    seed: int,
) -> Dataset:
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed, shuffle=True
    )
    return Dataset(
        name=name,
        x_train=frozen(x_train, np.float32),
        y_train=frozen(y_train, np.int64),
        x_test=frozen(x_test, np.float32),
        y_test=frozen(y_test, np.int64),
        labels=tuple(labels),
        task=task,
        source=source,
    )


def resolve_path(path_text: str, base_dir: Path) -> Path:
    path = Path(path_text).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve()


def cap_indices(classes: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices keeping at most `cap` random rows of each class (cap 0 = keep all)."""
    if cap == 0:
        return np.arange(len(classes))
    keep = []
    for label in np.unique(classes):
        rows = np.flatnonzero(classes == label)
        keep.append(rows if len(rows) <= cap else rng.choice(rows, cap, replace=False))
    return np.sort(np.concatenate(keep))
