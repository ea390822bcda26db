"""Data sets the model zoo trains on and the boards are benchmarked with (docs/datasets.md).

Each data set is a `DatasetLoader` in the read-only `DATASETS` registry; `load_dataset` is the one
entry point: it checks option names and types against the loader's declared options, fills the
defaults, and returns a frozen `Dataset` whose arrays are read-only.

Built in: two generated sets (`keywords` by default, `vibration`) so that the harness runs with no
download, and two real ones that ship inside installed packages (`digits` with scikit-learn,
`basic_motions` with sktime); `keywords` can also read a real Speech Commands directory. The user's
own files: `csv`, `image_folder`, `audio_folder` and `npz`. These return raw values; the suite's
declared `Preprocessing` (preprocessing.py) turns them into model inputs, once, for every stage.

Everything is a pure function of (options, seed, the files read): every random draw comes from a
generator seeded here, and nothing is cached between calls. Feature extraction (`mfcc_features`,
`vibration_features`) is one public function per data set, including the fixed scaling, because a
front end that differs between training and the device is the classic way a TinyML model loses its
accuracy on hardware.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path

from ..errors import DatasetError
from .arrays import load_npz
from .audio import load_audio_folder
from .base import (
    MIN_SAMPLES_PER_CLASS,
    TEST_FRACTION,
    Dataset,
    DatasetLoader,
    DatasetOption,
    check_option_type,
)
from .basic_motions import load_basic_motions
from .digits import load_digits_dataset
from .examples import write_example_data
from .images import load_image_folder
from .keywords import KEYWORD_WORDS, load_keywords, mfcc_features
from .preprocessing import Preprocessing, preprocess_dataset
from .tables import load_csv
from .vibration import load_vibration, vibration_features

__all__ = [
    "DATASETS",
    "KEYWORD_WORDS",
    "MIN_SAMPLES_PER_CLASS",
    "TEST_FRACTION",
    "USER_DATASETS",
    "Dataset",
    "DatasetLoader",
    "DatasetOption",
    "Preprocessing",
    "load_dataset",
    "mfcc_features",
    "preprocess_dataset",
    "vibration_features",
    "write_example_data",
]


def load_dataset(
    name: str, options: Mapping[str, object], *, seed: int = 0, base_dir: Path = Path(".")
) -> Dataset:
    """Build data set `name` with `options` (missing ones take their defaults)."""
    loader = DATASETS.get(name)
    if loader is None:
        raise DatasetError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}")
    where = f"dataset {name!r}"
    # scikit-learn's splitters take 32-bit seeds; refusing others here names the problem.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DatasetError(f"seed must be an int in 0..2**32-1, got {seed!r}", where=where)
    declared = {option.name: option for option in loader.options}
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise DatasetError(
            f"unknown option {unknown[0]!r} for data set {name!r}; options: {', '.join(declared)}",
            where=where,
        )
    filled: dict[str, object] = {}
    for option in loader.options:
        value = options.get(option.name, option.default)
        filled[option.name] = check_option_type(option, value, where)
    return loader.load(types.MappingProxyType(filled), seed, Path(base_dir))



DATASETS: Mapping[str, DatasetLoader] = types.MappingProxyType(
    {
        "keywords": DatasetLoader(
            name="keywords",
            description="keyword spotting, 49x10 MFCC; synthesized speech or a Speech Commands directory",
            options=(
                DatasetOption(
                    "source", str, "synthetic", "'synthetic' (formant synthesizer) or 'speech_commands'"
                ),
                DatasetOption("words", str, "yes,no", "comma-separated keywords; 'silence' is always added"),
                DatasetOption(
                    "path",
                    str,
                    "",
                    "Speech Commands directory for source speech_commands; relative to base_dir",
                ),
                DatasetOption(
                    "samples_per_class", int, 400, "clips per class; for speech_commands a cap, 0 = all"
                ),
            ),
            load=load_keywords,
        ),
        "vibration": DatasetLoader(
            name="vibration",
            description="bearing fault detection, 128 log-FFT bins of a simulated 1 kHz accelerometer",
            options=(
                DatasetOption("samples_per_class", int, 600, "windows per class"),
                DatasetOption("fault_severity", float, 1.0, "scales defect impact amplitude (difficulty)"),
            ),
            load=load_vibration,
        ),
        "digits": DatasetLoader(
            name="digits",
            description="scikit-learn handwritten digits (8x8, 10 classes) upscaled bilinearly",
            options=(
                DatasetOption("image_size", int, 96, "output height and width in pixels"),
                DatasetOption("channels", int, 3, "1 (grey) or 3 (grey repeated as RGB)"),
                DatasetOption("samples_per_class", int, 183, "cap per class; 183 or 0 = all 1797 images"),
            ),
            load=load_digits_dataset,
        ),
        "basic_motions": DatasetLoader(
            name="basic_motions",
            description="BasicMotions smartwatch accelerometer+gyroscope windows, 4 activities",
            options=(
                DatasetOption("seq_len", int, 50, "window length in samples (10 Hz)"),
                DatasetOption("stride", int, 10, "step between windows in samples"),
                DatasetOption(
                    "samples_per_class", int, 0, "cap on windows per class over both splits; 0 = all"
                ),
            ),
            load=load_basic_motions,
        ),
        "csv": DatasetLoader(
            name="csv",
            description="the user's sensor rows from CSV files, one row or a window of rows per sample",
            options=(
                DatasetOption("path", str, "", "a CSV file, a folder of CSV files, or one sub-folder per class"),
                DatasetOption("columns", str, "", "comma-separated feature columns; '' = every column but the label"),
                DatasetOption("label_column", str, "label", "the column holding each row's label (labels per_window)"),
                DatasetOption(
                    "labels", str, "per_window", "'per_window' (the label column) or 'per_file' (class sub-folders)"
                ),
                DatasetOption("window", int, 1, "rows per sample; 1 = one row per sample, input (columns,)"),
                DatasetOption("stride", int, 0, "rows between window starts; 0 = window (no overlap)"),
                DatasetOption("samples_per_class", int, 0, "cap on windows per class over both splits; 0 = all"),
            ),
            load=load_csv,
        ),
        "image_folder": DatasetLoader(
            name="image_folder",
            description="the user's PNG/JPEG/BMP images, one sub-folder per class",
            options=(
                DatasetOption("path", str, "", "folder with one sub-folder of images per class"),
                DatasetOption("image_size", int, 32, "height and width after resizing, in pixels"),
                DatasetOption("color_mode", str, "grayscale", "'grayscale' (1 channel) or 'rgb' (3 channels)"),
                DatasetOption("samples_per_class", int, 0, "cap on images per class; 0 = all"),
            ),
            load=load_image_folder,
        ),
        "audio_folder": DatasetLoader(
            name="audio_folder",
            description="the user's WAV clips, one sub-folder per class, through the keywords MFCC front end",
            options=(
                DatasetOption("path", str, "", "folder with one sub-folder of WAV files per class, any nesting"),
                DatasetOption("features", str, "mfcc", "'mfcc' (49x10x1, as keywords) or 'raw' (16000x1 samples)"),
                DatasetOption("samples_per_class", int, 0, "cap on clips per class; 0 = all"),
            ),
            load=load_audio_folder,
        ),
        "npz": DatasetLoader(
            name="npz",
            description="the user's arrays x_train, y_train, x_test, y_test (and labels, task) in one .npz",
            options=(
                DatasetOption("path", str, "", "the .npz file"),
                DatasetOption("samples_per_class", int, 0, "cap per class over both splits; 0 = all"),
            ),
            load=load_npz,
        ),
    }
)

# The kinds that read the user's files; their `path` may name a file (csv, npz) or a directory.
USER_DATASETS: frozenset[str] = frozenset({"csv", "image_folder", "audio_folder", "npz"})
