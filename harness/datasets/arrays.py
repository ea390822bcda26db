"""npz: the user's arrays, already split (docs/datasets.md, "npz")."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .base import Dataset, cap_option
from .files import capped_presplit, check_minimum, count_text, path_option

WHERE = "dataset 'npz'"
REQUIRED = ("x_train", "y_train", "x_test", "y_test")
TASKS = ("multiclass", "binary")


def load_npz(options: Mapping[str, object], seed: int, base_dir: Path) -> Dataset:
    path, text = path_option(options, base_dir, WHERE, "file")
    cap = cap_option(options, WHERE, allow_all=True)
    arrays = _read(path)
    missing = [name for name in REQUIRED if name not in arrays]
    if missing:
        raise DatasetError(
            f"expected arrays {', '.join(REQUIRED)}; {', '.join(missing)} missing, found "
            f"{', '.join(sorted(arrays)) or 'no arrays'}",
            where=str(path),
        )
    x_train = _inputs(arrays, "x_train", path)
    x_test = _inputs(arrays, "x_test", path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"expected x_train and x_test to have the same sample shape, found {x_train.shape[1:]} and "
            f"{x_test.shape[1:]}",
            where=str(path),
        )
    names = _label_names(arrays, path)
    y_train, y_test, labels = _targets(arrays, names, len(x_train), len(x_test), path)
    task = _task(arrays, labels, path)
    counts = np.bincount(np.concatenate([y_train, y_test]), minlength=len(labels))
    trained = np.bincount(y_train, minlength=len(labels))
    for index, label in enumerate(labels):
        if counts[index] and not trained[index]:
            raise DatasetError(
                f"class {label!r} is in y_test but not in y_train: expected every class a model is tested on "
                "to be in its training split",
                where=str(path),
            )
    check_minimum(dict(zip(labels, (int(c) for c in counts), strict=True)), "samples", str(path))
    kept = f", at most {cap} per class kept" if cap else ""
    source = (
        f"recorded: arrays from {text}, {count_text(len(y_train), 'train sample')} and "
        f"{count_text(len(y_test), 'test sample')} (the file's split){kept}"
    )
    return capped_presplit("npz", (x_train, y_train), (x_test, y_test), labels, task, source, cap, seed)


def _read(path: Path) -> dict[str, np.ndarray]:
    # np.load reads any non-zip file as a pickle (or .npy); checking first gives the right message.
    if not zipfile.is_zipfile(path):
        raise DatasetError(
            "cannot read .npz: expected a zip archive written by np.savez or np.savez_compressed, found other data",
            where=str(path),
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as error:
        # numpy refuses object arrays without pickle, which would run code from the file.
        raise DatasetError(
            f"expected plain numeric or string arrays, found an object array ({error}); store class names "
            "with np.array(names, dtype=str)",
            where=str(path),
        ) from error
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(
            f"cannot read .npz: expected a file written by np.savez, {error}", where=str(path)
        ) from error


def _inputs(arrays: Mapping[str, np.ndarray], name: str, path: Path) -> np.ndarray:
    array = arrays[name]
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DatasetError(f"{name}: expected integer or float values, found dtype {array.dtype}", where=str(path))
    if array.ndim < 2 or len(array) == 0:
        raise DatasetError(
            f"{name}: expected (samples, features...) with at least one sample, found shape {array.shape}",
            where=str(path),
        )
    values = array.astype(np.float32)
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0])
        raise DatasetError(f"{name}: expected finite values, found NaN or infinity in sample {row}", where=str(path))
    return values


def _label_names(arrays: Mapping[str, np.ndarray], path: Path) -> tuple[str, ...] | None:
    if "labels" not in arrays:
        return None
    names = arrays["labels"]
    if names.ndim != 1 or names.dtype.kind not in "US" or len(names) < 2:
        raise DatasetError(
            f"labels: expected a 1-D string array of at least 2 class names, found dtype {names.dtype} "
            f"shape {names.shape}",
            where=str(path),
        )
    text = tuple(str(n.decode() if isinstance(n, bytes) else n) for n in names)
    if len(set(text)) != len(text):
        raise DatasetError(f"labels: expected distinct class names, found {', '.join(text)}", where=str(path))
    return text


def _targets(
    arrays: Mapping[str, np.ndarray], names: tuple[str, ...] | None, n_train: int, n_test: int, path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    raw = {"y_train": arrays["y_train"], "y_test": arrays["y_test"]}
    for name, expected in (("y_train", n_train), ("y_test", n_test)):
        y = raw[name]
        if y.ndim == 2 and y.shape[1] > 1:
            raise DatasetError(
                f"{name}: expected class indices of shape ({expected},), found shape {y.shape}; if these are "
                f"one-hot rows, store {name}.argmax(axis=1)",
                where=str(path),
            )
        if y.ndim != 1 or len(y) != expected:
            x_name = name.replace("y_", "x_")
            raise DatasetError(
                f"{name}: expected shape ({expected},), one label per sample of {x_name}, found shape {y.shape}",
                where=str(path),
            )
    kinds = {raw[name].dtype.kind for name in raw}
    if kinds <= set("US"):
        # Class names as labels: the class order is the `labels` array's, else sorted names.
        values = [np.char.strip(raw[name].astype(str)) for name in raw]
        found = sorted(set(values[0]) | set(values[1]))
        labels = names or tuple(found)
        unknown = [v for v in found if v not in labels]
        if unknown:
            raise DatasetError(
                f"expected labels among {', '.join(labels)}, found {unknown[0]!r} in y_train/y_test", where=str(path)
            )
        index = {label: i for i, label in enumerate(labels)}
        y_train, y_test = (np.array([index[v] for v in column], dtype=np.int64) for column in values)
        return y_train, y_test, labels
    converted = []
    for name, y in raw.items():
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)  # Keras users often store labels as float
        if y.dtype.kind not in "iu":
            raise DatasetError(f"{name}: expected integer class indices, found dtype {y.dtype}", where=str(path))
        converted.append(y.astype(np.int64))
    y_train, y_test = converted
    top = int(max(y_train.max(), y_test.max()))
    low = int(min(y_train.min(), y_test.min()))
    labels = names or tuple(str(i) for i in range(top + 1))
    if low < 0 or top >= len(labels):
        raise DatasetError(
            f"expected class indices in 0..{len(labels) - 1} ({len(labels)} labels), found values {low}..{top}",
            where=str(path),
        )
    if len(labels) < 2:
        raise DatasetError("expected at least 2 classes, found 1", where=str(path))
    return y_train, y_test, labels


def _task(arrays: Mapping[str, np.ndarray], labels: tuple[str, ...], path: Path) -> str:
    if "task" not in arrays:
        return "multiclass"
    task = arrays["task"]
    value = str(task.item()) if task.ndim == 0 and task.dtype.kind in "US" else None
    if value not in TASKS:
        raise DatasetError(
            f"task: expected a string 'multiclass' or 'binary', found {task.dtype} {task!r}"[:300], where=str(path)
        )
    if value == "binary" and len(labels) != 2:
        raise DatasetError(f"task 'binary': expected 2 classes, found {len(labels)}", where=str(path))
    return value
