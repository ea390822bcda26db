"""What the loaders of a user's own files share: the `path` option, class sub-folders, the minimum
per class, and caps that keep a split the files already fixed.

Errors name the file (and the row, for tables) and say what was expected and what was found. They
name files inside the user's data folder, which the user pointed at, but never list a directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .base import MIN_SAMPLES_PER_CLASS, Dataset, frozen, resolve_path, rng_for

# Files that operating systems and editors drop into folders; they are never data.
_SYSTEM_FILES = frozenset({"Thumbs.db", "desktop.ini", "Icon\r"})


def ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name in _SYSTEM_FILES


def path_option(options: Mapping[str, object], base_dir: Path, where: str, want: str) -> tuple[Path, str]:
    """The resolved `path` and its text as given; `want` is "file", "directory" or "file or directory"."""
    text = str(options["path"]).strip()
    if not text:
        raise DatasetError(f"option 'path' is required: expected a {want}", where=where)
    path = resolve_path(text, base_dir)
    if not path.exists():
        raise DatasetError(f"option 'path': expected a {want}, found nothing at {path}", where=where)
    found = "directory" if path.is_dir() else "file"
    if found not in want.split(" or "):
        raise DatasetError(f"option 'path': expected a {want}, found a {found} at {path}", where=where)
    return path, text


def choice_option(options: Mapping[str, object], name: str, choices: Sequence[str], where: str) -> str:
    value = str(options[name])
    if value not in choices:
        raise DatasetError(
            f"option {name!r} must be {' or '.join(repr(c) for c in choices)}, got {value!r}", where=where
        )
    return value


def class_folders(root: Path, where: str, kind: str) -> list[tuple[str, Path]]:
    """(class name, folder) for every sub-folder of `root`, sorted by name."""
    entries = sorted(p for p in root.iterdir() if not ignored(p))
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise DatasetError(
            f"expected only one sub-folder per class in {root}, found the file {stray[0].name!r} "
            f"directly in it (put each {kind} in its class's folder)",
            where=where,
        )
    if len(entries) < 2:
        raise DatasetError(
            f"expected one sub-folder per class (at least 2 classes) in {root}, found {len(entries)}",
            where=where,
        )
    return [(p.name, p) for p in entries]


def class_files(folder: Path, suffixes: Sequence[str], kind: str, where: str) -> list[Path]:
    """Every file under a class folder, at any depth, sorted; all must have one of `suffixes`."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(ignored(Path(part)) for part in p.relative_to(folder).parts)
    )
    expected = ", ".join(suffixes)
    for path in files:
        if path.suffix.lower() not in suffixes:
            raise DatasetError(
                f"expected {kind} files ({expected}) in class folder {folder.name!r}, "
                f"found {str(path.relative_to(folder))!r}",
                where=str(path),
            )
    if not files:
        raise DatasetError(
            f"class folder {folder.name!r} is empty: expected {kind} files ({expected})", where=str(folder)
        )
    return files


def check_minimum(counts: Mapping[str, int], noun: str, where: str) -> None:
    """Every class present needs enough samples for a stratified split to reach both halves."""
    for label, count in counts.items():
        if 0 < count < MIN_SAMPLES_PER_CLASS:
            raise DatasetError(
                f"class {label!r} has {count} {noun}; expected at least {MIN_SAMPLES_PER_CLASS} per class, "
                "so that it is in both the train and the test split",
                where=where,
            )


def pick_per_class(counts: Sequence[int], cap: int, rng: np.random.Generator) -> list[np.ndarray]:
    """For each class with `counts[i]` items: the sorted indices of the ones kept under `cap`."""
    return [
        np.arange(n) if cap == 0 or n <= cap else np.sort(rng.choice(n, cap, replace=False)) for n in counts
    ]


def capped_presplit(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    labels: Sequence[str],
    task: str,
    source: str,
    cap: int,
    seed: int,
) -> Dataset:
    """A Dataset from splits the files fixed, capped per class in the class's own train:test ratio
    (a cap never moves a sample across the split), each split shuffled."""
    (x_train, y_train), (x_test, y_test) = train, test
    rng = rng_for(seed, f"{name}/cap")
    keep_train: list[np.ndarray] = []
    keep_test: list[np.ndarray] = []
    for index in range(len(labels)):
        rows_train = np.flatnonzero(y_train == index)
        rows_test = np.flatnonzero(y_test == index)
        total = len(rows_train) + len(rows_test)
        if cap == 0 or total <= cap:
            keep_train.append(rows_train)
            keep_test.append(rows_test)
            continue
        train_cap = round(cap * len(rows_train) / total)
        if len(rows_train) and len(rows_test):
            train_cap = min(max(train_cap, 1), cap - 1)
        for rows, limit, out in ((rows_train, train_cap, keep_train), (rows_test, cap - train_cap, keep_test)):
            out.append(rows if len(rows) <= limit else np.sort(rng.choice(rows, limit, replace=False)))
    order = rng_for(seed, f"{name}/order")
    train_rows = order.permutation(np.concatenate(keep_train))
    test_rows = order.permutation(np.concatenate(keep_test))
    return Dataset(
        name=name,
        x_train=frozen(x_train[train_rows], np.float32),
        y_train=frozen(y_train[train_rows], np.int64),
        x_test=frozen(x_test[test_rows], np.float32),
        y_test=frozen(y_test[test_rows], np.int64),
        labels=tuple(labels),
        task=task,
        source=source,
    )


def count_text(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"
