"""csv: windows of sensor rows from the user's CSV files (docs/datasets.md, "csv").

A recording is one CSV file. A *run* is a stretch of consecutive rows of one label: the whole file
when labels come from class folders, or each stretch of equal values in the label column. Windows
are cut from runs (so none crosses a label change) and, once the split is chosen, from the pieces
of runs on either side of it (so none crosses the split either).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DatasetError
from .base import TEST_FRACTION, Dataset, cap_option, int_option, rng_for
from .files import capped_presplit, check_minimum, choice_option, class_files, count_text, ignored, path_option

WHERE = "dataset 'csv'"
LABEL_MODES = ("per_window", "per_file")


@dataclass(frozen=True)
class _Run:
    file: int  # index into the recordings
    label: str
    values: np.ndarray  # (rows, columns) float64


@dataclass(frozen=True)
class _Recording:
    path: Path
    label: str | None  # the class folder's name, when the layout has class folders


def load_csv(options: Mapping[str, object], seed: int, base_dir: Path) -> Dataset:
    path, text = path_option(options, base_dir, WHERE, "file or directory")
    mode = choice_option(options, "labels", LABEL_MODES, WHERE)
    label_column = str(options["label_column"]).strip()
    window = int_option(options, "window", WHERE, 1)
    stride = int_option(options, "stride", WHERE, 0) or window
    cap = cap_option(options, WHERE, allow_all=True)
    wanted = _column_names(str(options["columns"]), label_column, mode)
    recordings = _recordings(path, mode)

    runs: list[_Run] = []
    columns: list[str] | None = wanted
    first_with_columns: Path | None = None
    total_rows = 0
    for index, recording in enumerate(recordings):
        frame = _read_table(recording.path)
        found = [c for c in frame.columns if c != label_column]
        if columns is None:
            columns, first_with_columns = found, recording.path
        elif wanted is None and found != columns:
            raise DatasetError(
                f"expected the columns of {first_with_columns.name if first_with_columns else 'the first file'} "
                f"({', '.join(columns)}), found {', '.join(found)}",
                where=str(recording.path),
            )
        values = _numeric(frame, columns, recording.path)
        total_rows += len(frame)
        if mode == "per_file":
            runs.append(_Run(index, str(recording.label), values))
        else:
            runs.extend(_label_runs(frame, label_column, values, index, recording.path))
    assert columns is not None

    labels = tuple(sorted({run.label for run in runs}))
    if len(labels) < 2:
        raise DatasetError(f"expected at least 2 classes, found {len(labels)}: {', '.join(labels)}", where=WHERE)
    fits = [run for run in runs if len(run.values) >= window]
    for label in labels:
        if not any(run.label == label for run in fits):
            longest = max(len(run.values) for run in runs if run.label == label)
            raise DatasetError(
                f"class {label!r}: expected a run of at least {window} rows of one label for one window, "
                f"found at most {longest}",
                where=WHERE,
            )
    by_file = _split_by_file(fits, labels)
    train, test = (_split_by_file_windows if by_file else _split_in_blocks)(fits, labels, window, stride, seed)
    index_of = {label: i for i, label in enumerate(labels)}
    x_train, y_train = _stack(train, index_of, window, len(columns))
    x_test, y_test = _stack(test, index_of, window, len(columns))
    counts_train = np.bincount(y_train, minlength=len(labels))
    counts_test = np.bincount(y_test, minlength=len(labels))
    check_minimum({label: int(counts_train[i] + counts_test[i]) for i, label in enumerate(labels)}, "windows", WHERE)
    for i, label in enumerate(labels):
        if not counts_train[i] or not counts_test[i]:
            lengths = sorted((len(run.values) for run in fits if run.label == label), reverse=True)
            raise DatasetError(
                f"class {label!r}: expected enough contiguous rows for a window of {window} in both the train "
                f"and the test split, found runs of {', '.join(map(str, lengths[:5]))} rows",
                where=WHERE,
            )

    windows = len(y_train) + len(y_test)
    if window == 1 and stride == 1:
        shape = f"{count_text(windows, 'sample')}, one per row"
    else:
        shape = f"{count_text(windows, 'window')} of {window} rows, stride {stride}"
    split = "split by file" if by_file else "split into contiguous blocks of each run"
    kept = f", at most {cap} per class kept" if cap else ""
    source = (
        f"recorded: {count_text(len(recordings), 'CSV file')} under {text}, {count_text(total_rows, 'row')}, "
        f"{shape}, columns {','.join(columns)}, {split}{kept}"
    )
    return capped_presplit(
        "csv", (x_train, y_train), (x_test, y_test), labels, "multiclass", source, cap, seed
    )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _column_names(text: str, label_column: str, mode: str) -> list[str] | None:
    if mode == "per_window" and not label_column:
        raise DatasetError("option 'label_column' is empty: labels per_window read each row's label there",
                           where=WHERE)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        return None
    if len(set(names)) != len(names):
        raise DatasetError(f"option 'columns' repeats a column: {text!r}", where=WHERE)
    if label_column in names:
        raise DatasetError(f"option 'columns' names the label column {label_column!r} as a feature", where=WHERE)
    return names


def _recordings(path: Path, mode: str) -> list[_Recording]:
    """The CSV files under `path`: one file, a folder of files, or a folder of class folders."""
    if path.is_file():
        if mode == "per_file":
            raise DatasetError(
                "labels per_file takes each class from a sub-folder's name, but option 'path' is one file "
                f"({path}); expected a folder with one sub-folder per class, or labels per_window",
                where=WHERE,
            )
        return [_Recording(path, None)]
    entries = sorted(p for p in path.iterdir() if not ignored(p))
    files = [p for p in entries if p.is_file()]
    folders = [p for p in entries if p.is_dir()]
    for file in files:
        if file.suffix.lower() != ".csv":
            raise DatasetError(f"expected CSV files (.csv) in {path}, found {file.name!r}", where=str(file))
    if files and folders:
        raise DatasetError(
            f"expected either CSV files or one sub-folder per class in {path}, found both "
            f"({files[0].name!r} and the folder {folders[0].name!r})",
            where=WHERE,
        )
    if files:
        if mode == "per_file":
            raise DatasetError(
                f"labels per_file takes each class from a sub-folder's name, but {path} holds the CSV files "
                "directly; expected one sub-folder per class, or labels per_window",
                where=WHERE,
            )
        return [_Recording(p, None) for p in files]
    if len(folders) < 2 and mode == "per_file":
        raise DatasetError(
            f"expected one sub-folder per class (at least 2 classes) in {path}, found {len(folders)}", where=WHERE
        )
    if not folders:
        raise DatasetError(f"expected CSV files in {path}, found none", where=WHERE)
    return [
        _Recording(file, folder.name) for folder in folders for file in class_files(folder, (".csv",), "CSV", WHERE)
    ]


def _read_table(path: Path) -> pd.DataFrame:
    # Every cell is read as text so that the checks below can name the cell that is not a number,
    # rather than pandas silently turning a column with one typo into strings or NaN.
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DatasetError(
            "the file is empty: expected a header row naming the columns, then one row per sample", where=str(path)
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise DatasetError(f"cannot read CSV: {' '.join(str(error).split())}", where=str(path)) from error
    frame.columns = [str(c).strip() for c in frame.columns]
    # Editors leave blank lines at the end; blank lines elsewhere are reported by the cell checks.
    blank = frame.apply(lambda column: column.fillna("").str.strip() == "").all(axis=1).to_numpy()
    trailing = len(blank) - (np.flatnonzero(~blank)[-1] + 1 if (~blank).any() else 0)
    frame = frame.iloc[: len(frame) - trailing]
    if frame.empty:
        raise DatasetError("expected data rows after the header, found none", where=str(path))
    return frame


def _numeric(frame: pd.DataFrame, columns: Sequence[str], path: Path) -> np.ndarray:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"column {missing[0]!r} not found: expected columns {', '.join(columns)}, "
            f"found {', '.join(map(str, frame.columns))}",
            where=str(path),
        )
    values = np.empty((len(frame), len(columns)))
    for j, column in enumerate(columns):
        cells = frame[column].fillna("").str.strip()
        numbers = pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(numbers))
        if len(bad):
            row = int(bad[0])
            cell = cells.iloc[row]
            what = "an empty cell" if cell == "" else f"{cell!r}"
            raise DatasetError(
                f"column {column!r}: expected a finite number, found {what}", where=f"{path}:{row + 2}"
            )
        values[:, j] = numbers
    return values


def _label_runs(frame: pd.DataFrame, label_column: str, values: np.ndarray, file: int, path: Path) -> list[_Run]:
    if label_column not in frame.columns:
        raise DatasetError(
            f"labels per_window: expected a label column {label_column!r}, found columns "
            f"{', '.join(map(str, frame.columns))} (set label_column, or use labels per_file with class folders)",
            where=str(path),
        )
    labels = frame[label_column].fillna("").str.strip().to_numpy(dtype=object)
    empty = np.flatnonzero(labels == "")
    if len(empty):
        raise DatasetError(
            f"column {label_column!r}: expected a label, found an empty cell", where=f"{path}:{int(empty[0]) + 2}"
        )
    starts = [0, *(np.flatnonzero(labels[1:] != labels[:-1]) + 1).tolist(), len(labels)]
    return [
        _Run(file, str(labels[a]), values[a:b]) for a, b in itertools.pairwise(starts)
    ]


# --------------------------------------------------------------------------------------------
# Split and windows
# --------------------------------------------------------------------------------------------


def _split_by_file(runs: Sequence[_Run], labels: Sequence[str]) -> bool:
    """Whole recordings can be the unit of the split when each holds one label and every class has
    two or more of them."""
    labels_of: dict[int, set[str]] = {}
    for run in runs:
        labels_of.setdefault(run.file, set()).add(run.label)
    if any(len(found) > 1 for found in labels_of.values()):
        return False
    files_of = {label: {f for f, found in labels_of.items() if label in found} for label in labels}
    return all(len(files) >= 2 for files in files_of.values())


def _windows(values: np.ndarray, window: int, stride: int) -> np.ndarray:
    """(windows, window, columns) starting at row 0, every `stride` rows."""
    if len(values) < window:
        return np.empty((0, window, values.shape[1]))
    view = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)[::stride]
    return view.transpose(0, 2, 1)


_Pieces = list[tuple[str, np.ndarray]]  # (label, windows)


def _split_by_file_windows(
    runs: Sequence[_Run], labels: Sequence[str], window: int, stride: int, seed: int
) -> tuple[_Pieces, _Pieces]:
    """A fifth of each class's recordings (at least one, never all) go to test, drawn at random."""
    rng = rng_for(seed, "csv/files")
    test_files: set[int] = set()
    for label in labels:
        files = sorted({run.file for run in runs if run.label == label})
        count = min(max(1, round(len(files) * TEST_FRACTION)), len(files) - 1)
        test_files.update(int(f) for f in rng.choice(files, count, replace=False))
    train: _Pieces = []
    test: _Pieces = []
    for run in runs:
        (test if run.file in test_files else train).append((run.label, _windows(run.values, window, stride)))
    return train, test


def _split_in_blocks(
    runs: Sequence[_Run], labels: Sequence[str], window: int, stride: int, seed: int
) -> tuple[_Pieces, _Pieces]:
    """The first or the last fifth of each run (a seeded coin per run) goes to test. Runs too short
    to give both sides a window go whole to one side: a fifth of each class's short runs, drawn at
    random (at least one when there are two or more), to test."""
    rng = rng_for(seed, "csv/blocks")
    train: _Pieces = []
    test: _Pieces = []
    short: dict[str, list[_Run]] = {}
    for run in runs:
        rows = len(run.values)
        test_rows = max(round(rows * TEST_FRACTION), window)
        at_end = bool(rng.random() < 0.5)
        if rows - test_rows < window:
            short.setdefault(run.label, []).append(run)
            continue
        cut = rows - test_rows if at_end else test_rows
        first, second = run.values[:cut], run.values[cut:]
        train_part, test_part = (first, second) if at_end else (second, first)
        train.append((run.label, _windows(train_part, window, stride)))
        test.append((run.label, _windows(test_part, window, stride)))
    for label in sorted(short):
        pool = short[label]
        count = min(max(1, round(len(pool) * TEST_FRACTION)), len(pool) - 1)
        chosen = set(rng.choice(len(pool), count, replace=False).tolist()) if count > 0 else set()
        for index, run in enumerate(pool):
            (test if index in chosen else train).append((run.label, _windows(run.values, window, stride)))
    return train, test


def _stack(pieces: _Pieces, index_of: Mapping[str, int], window: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([w for _, w in pieces]) if pieces else np.empty((0, window, columns))
    y = np.concatenate([np.full(len(w), index_of[label], dtype=np.int64) for label, w in pieces]) if pieces else (
        np.empty(0, dtype=np.int64)
    )
    # One row per sample is a vector, as a Dense model expects; longer windows keep (time, columns).
    return (x[:, 0, :] if window == 1 else x), y
