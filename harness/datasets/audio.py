"""audio_folder: the user's WAV clips, one sub-folder per class (docs/datasets.md, "audio_folder")."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.io.wavfile

from ..errors import DatasetError
from .base import Dataset, cap_option, rng_for, stratified_split
from .files import check_minimum, choice_option, class_files, class_folders, count_text, path_option, pick_per_class
from .keywords import CLIP_SAMPLES, SAMPLE_RATE, fit_to_clip, mfcc_features, to_sample_rate

WHERE = "dataset 'audio_folder'"
FEATURES = ("mfcc", "raw")


def load_audio_folder(options: Mapping[str, object], seed: int, base_dir: Path) -> Dataset:
    root, text = path_option(options, base_dir, WHERE, "directory")
    features = choice_option(options, "features", FEATURES, WHERE)
    cap = cap_option(options, WHERE, allow_all=True)
    classes = class_folders(root, WHERE, "WAV file")
    files = [class_files(folder, (".wav",), "WAV", WHERE) for _, folder in classes]
    labels = tuple(name for name, _ in classes)
    check_minimum({label: len(found) for label, found in zip(labels, files, strict=True)}, "clips", WHERE)
    keep = pick_per_class([len(found) for found in files], cap, rng_for(seed, "audio_folder/cap"))
    chosen = [(index, found[i]) for index, (found, rows) in enumerate(zip(files, keep, strict=True)) for i in rows]
    clips = np.stack([read_clip(path) for _, path in chosen])
    y = np.array([index for index, _ in chosen], dtype=np.int64)
    if features == "mfcc":
        x = mfcc_features(clips)[..., None]
        shape = "MFCC 49x10 (the keywords front end)"
    else:
        # Resampling can ring a little past full scale; the contract for raw input is [-1, 1].
        x = np.clip(clips, -1.0, 1.0)[..., None]
        shape = f"raw {CLIP_SAMPLES} samples at {SAMPLE_RATE} Hz"
    kept = f", at most {cap} per class kept" if cap else ""
    source = (
        f"recorded: {count_text(sum(map(len, files)), 'WAV file')} in {len(labels)} class folders under {text}, "
        f"1 s clips, {shape}{kept}"
    )
    return stratified_split("audio_folder", x, y, labels, "multiclass", source, seed)


def read_clip(path: Path) -> np.ndarray:
    """One WAV file as 1 s of mono float audio at 16 kHz (channels averaged, resampled, padded or
    trimmed at the end)."""
    try:
        with warnings.catch_warnings():
            # Metadata chunks (LIST, bext, ...) are legal and carry no audio.
            warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)
            rate, data = scipy.io.wavfile.read(path)
    except (ValueError, OSError, EOFError) as error:
        raise DatasetError(
            f"cannot read WAV file: expected RIFF WAVE audio (PCM 8/16/24/32-bit or float), "
            f"{' '.join(str(error).split())}",
            where=str(path),
        ) from error
    if data.size == 0:
        raise DatasetError("expected audio samples, found an empty WAV file", where=str(path))
    if data.dtype == np.uint8:
        samples = (data.astype(np.float64) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        # scipy returns 24-bit PCM left-aligned in int32, so one divisor per container width suffices.
        samples = data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))
    else:
        samples = data.astype(np.float64)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if not np.isfinite(samples).all():
        raise DatasetError("expected finite samples, found NaN or infinity in a float WAV file", where=str(path))
    return fit_to_clip(to_sample_rate(samples[None, :], int(rate)))[0]
