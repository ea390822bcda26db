"""basic_motions: the UEA BasicMotions smartwatch recordings bundled in sktime."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .base import Dataset, cap_indices, cap_option, frozen, int_option, rng_for


def _basic_motions_dir() -> Path:
    # find_spec locates the installed package without importing it (sktime's import is slow).
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("sktime is not installed; basic_motions ships inside it")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "BasicMotions"


def _read_ts(path: Path) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Parse an equal-length multivariate .ts file: (recordings, length, channels), labels, class names."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DatasetError(f"cannot read BasicMotions file: {error}", where=str(path)) from error
    class_names: tuple[str, ...] = ()
    recordings: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            lowered = line.lower()
            if lowered.startswith("@classlabel"):
                class_names = tuple(line.split()[2:])
            elif lowered.startswith("@data"):
                in_data = True
            continue
        *dims, label = line.split(":")
        try:
            recordings.append(np.array([[float(v) for v in dim.split(",")] for dim in dims]).T)
        except ValueError as error:
            raise DatasetError(f"malformed .ts data line: {error}", where=f"{path}:{number}") from error
        labels.append(label.strip())
    if not recordings or len({r.shape for r in recordings}) != 1:
        raise DatasetError("expected equal-length recordings", where=str(path))
    return np.stack(recordings), labels, class_names


def _windows(recordings: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    """(recordings, windows per recording, seq_len, channels)."""
    view = np.lib.stride_tricks.sliding_window_view(recordings, seq_len, axis=1)[:, ::stride]
    return view.transpose(0, 1, 3, 2)


def load_basic_motions(options: Mapping[str, object], seed: int, base_dir: Path) -> Dataset:
    where = "dataset 'basic_motions'"
    folder = _basic_motions_dir()
    train_raw, train_names, class_names = _read_ts(folder / "BasicMotions_TRAIN.ts")
    test_raw, test_names, _ = _read_ts(folder / "BasicMotions_TEST.ts")
    length = train_raw.shape[1]
    seq_len = int_option(options, "seq_len", where, 2, length)
    stride = int_option(options, "stride", where, 1)
    cap = cap_option(options, where, allow_all=True)
    class_names = class_names or tuple(sorted(set(train_names)))
    index = {name: i for i, name in enumerate(class_names)}
    rng = rng_for(seed, "basic_motions")

    def windowed(raw: np.ndarray, names: list[str], class_cap: int) -> tuple[np.ndarray, np.ndarray]:
        windows = _windows(raw, seq_len, stride)
        per_recording = windows.shape[1]
        x = windows.reshape(-1, seq_len, raw.shape[2])
        y = np.repeat([index[n] for n in names], per_recording).astype(np.int64)
        keep = rng.permutation(cap_indices(y, class_cap, rng))
        return x[keep], y[keep]

    # The data set's own TRAIN/TEST files hold different recordings, so overlapping windows of one
    # recording can never straddle the split. A cap is shared between the files by their sizes.
    train_share = len(train_raw) / (len(train_raw) + len(test_raw))
    train_cap = 0 if cap == 0 else max(1, round(cap * train_share))
    test_cap = 0 if cap == 0 else max(1, cap - train_cap)
    x_train, y_train = windowed(train_raw, train_names, train_cap)
    x_test, y_test = windowed(test_raw, test_names, test_cap)

    # Per-channel standardization with train-split statistics only, applied to both splits.
    mean = x_train.mean(axis=(0, 1))
    std = x_train.std(axis=(0, 1))
    std = np.where(std > 0, std, 1.0)
    return Dataset(
        name="basic_motions",
        x_train=frozen((x_train - mean) / std, np.float32),
        y_train=frozen(y_train, np.int64),
        x_test=frozen((x_test - mean) / std, np.float32),
        y_test=frozen(y_test, np.int64),
        labels=tuple(name.lower() for name in class_names),
        task="multiclass",
        source="real: BasicMotions (UEA archive; smartwatch accelerometer+gyroscope at 10 Hz), from sktime",
    )
