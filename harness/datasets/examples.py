"""Small but real example files for every kind of user data set (suites/examples/own-data.yaml).

`write_example_data(root)` writes, under `root`:

- `sensors/<idle|walk|shake>/*.csv`: 3-axis accelerometer recordings (columns t, ax, ay, az in s and
  g at 50 Hz), three per class; for `csv` with `labels: per_file`.
- `sensors.csv`: one long recording with a `label` column that changes activity every few seconds;
  for `csv` with `labels: per_window`.
- `images/<zero|one|two>/...`: scikit-learn's handwritten digits 0-2, upscaled, as PNG, JPEG and BMP
  files of two sizes, some RGB; for `image_folder`.
- `audio/<yes|no>/**/*.wav`: the keywords synthesizer's clips as 16-bit WAV, some at 22.05 kHz and
  some one folder deeper; for `audio_folder`.
- `arrays.npz`: vibration front-end features of bearings in three conditions (normal, worn,
  damaged), split 80/20; for `npz`.

Every file is a pure function of the seed. The sizes (20-40 samples per class) let a quick-profile
run train in seconds.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.signal
from PIL import Image
from sklearn.datasets import load_digits

from .base import rng_for
from .keywords import synthesize_clips
from .vibration import simulate_vibration, vibration_features

SENSOR_RATE = 50.0  # Hz
SENSOR_CLASSES = ("idle", "walk", "shake")
IMAGE_CLASSES = ("zero", "one", "two")
AUDIO_WORDS = ("yes", "no")


def write_example_data(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the example files under `root`; returns their paths by name: sensors, sensors_csv,
    images, audio, arrays."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return {
        "sensors": _write_sensor_folders(root / "sensors", seed),
        "sensors_csv": _write_sensor_table(root / "sensors.csv", seed),
        "images": _write_images(root / "images", seed),
        "audio": _write_audio(root / "audio", seed),
        "arrays": _write_arrays(root / "arrays.npz", seed),
    }


def accelerometer(activity: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, 3) acceleration in g of a wrist-worn sensor at 50 Hz doing `activity`."""
    t = np.arange(rows) / SENSOR_RATE
    # Gravity along the sensor's tilted z axis: how the device sits differs per recording.
    tilt = rng.normal(0.0, 0.2, size=2)
    gravity = np.array([np.sin(tilt[0]), np.sin(tilt[1]) * np.cos(tilt[0]), np.cos(tilt[0]) * np.cos(tilt[1])])
    signal = np.tile(gravity, (rows, 1)) + rng.normal(0.0, 0.02, size=(rows, 3))
    if activity == "idle":
        # Breathing and small hand movements: slow and faint.
        signal += 0.02 * np.sin(2 * np.pi * rng.uniform(0.2, 0.4) * t + rng.uniform(0, 2 * np.pi))[:, None]
    elif activity == "walk":
        step = rng.uniform(1.6, 2.2)  # steps per second
        phase = rng.uniform(0, 2 * np.pi)
        signal[:, 2] += rng.uniform(0.2, 0.4) * np.sin(2 * np.pi * step * t + phase)
        signal[:, 2] += 0.1 * np.sin(4 * np.pi * step * t + 2 * phase)
        signal[:, 0] += rng.uniform(0.1, 0.2) * np.sin(2 * np.pi * step * t + phase + np.pi / 2)
        signal[:, 1] += 0.08 * np.sin(np.pi * step * t + phase)  # sway once per stride (two steps)
    elif activity == "shake":
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        frequency = rng.uniform(4.0, 7.0)
        amplitude = rng.uniform(0.8, 1.5) * (1 + 0.2 * np.sin(2 * np.pi * 0.5 * t))
        signal += (amplitude * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi)))[:, None] * axis
        signal += rng.normal(0.0, 0.1, size=(rows, 3))
    else:
        raise ValueError(f"unknown activity {activity!r}; expected one of {', '.join(SENSOR_CLASSES)}")
    return signal


def _table(values: np.ndarray, start_row: int = 0) -> pd.DataFrame:
    t = (start_row + np.arange(len(values))) / SENSOR_RATE
    return pd.DataFrame({"t": t.round(3), "ax": values[:, 0], "ay": values[:, 1], "az": values[:, 2]})


def _write_sensor_folders(folder: Path, seed: int) -> Path:
    rng = rng_for(seed, "examples/sensors")
    for activity in SENSOR_CLASSES:
        (folder / activity).mkdir(parents=True, exist_ok=True)
        for take in range(3):
            rows = int(rng.integers(240, 321))
            _table(accelerometer(activity, rows, rng)).to_csv(
                folder / activity / f"{activity}_{take + 1:02d}.csv", index=False, float_format="%.4f"
            )
    return folder


def _write_sensor_table(path: Path, seed: int) -> Path:
    rng = rng_for(seed, "examples/sensors.csv")
    pieces = []
    rows_so_far = 0
    for activity in [a for _ in range(3) for a in rng.permutation(SENSOR_CLASSES)]:
        rows = int(rng.integers(250, 301))
        piece = _table(accelerometer(str(activity), rows, rng), rows_so_far)
        piece["label"] = activity
        pieces.append(piece)
        rows_so_far += rows
    pd.concat(pieces, ignore_index=True).to_csv(path, index=False, float_format="%.4f")
    return path


def _write_images(folder: Path, seed: int) -> Path:
    rng = rng_for(seed, "examples/images")
    digits = load_digits()
    for digit, name in enumerate(IMAGE_CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(digits.target == digit)
        for count, row in enumerate(sorted(rng.choice(rows, 30, replace=False))):
            pixels = np.round(digits.images[row] * (255.0 / 16.0)).astype(np.uint8)
            size = 24 if count % 3 else 32
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR)
            if count % 7 == 0:
                image = image.convert("RGB")
            suffix = (".png", ".png", ".png", ".jpg", ".bmp")[count % 5]
            options = {"quality": 95} if suffix == ".jpg" else {}
            image.save(folder / name / f"{name}_{count:03d}{suffix}", **options)
    return folder


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    """16-bit mono PCM, as recorders and Speech Commands write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm.tobytes())


def _write_audio(folder: Path, seed: int) -> Path:
    rng = rng_for(seed, "examples/audio")
    per_word = 24
    classes = np.repeat(np.arange(len(AUDIO_WORDS)), per_word)
    clips = synthesize_clips(AUDIO_WORDS, classes, rng)
    counts = dict.fromkeys(AUDIO_WORDS, 0)
    for label, clip in zip(classes, clips, strict=True):
        word = AUDIO_WORDS[label]
        n = counts[word]
        counts[word] += 1
        # Names and layout as a user's recorder might leave them: a second session in a sub-folder,
        # and a phone that records at 22.05 kHz.
        relative = f"session 2/clip-{n}.wav" if n % 3 == 2 else f"take_{n:03d}.wav"
        if n % 4 == 1:
            write_wav(folder / word / relative, scipy.signal.resample_poly(clip, 441, 320), 22050)
        else:
            write_wav(folder / word / relative, clip, 16000)
    return folder


# Bearing condition for arrays.npz: the vibration simulator's fault impacts at two severities.
ARRAY_CLASSES = (("normal", 0.0), ("worn", 0.7), ("damaged", 2.5))


def _write_arrays(path: Path, seed: int) -> Path:
    rng = rng_for(seed, "examples/arrays")
    per_class = 40
    classes = rng.permutation(np.repeat(np.arange(len(ARRAY_CLASSES)), per_class))
    features = np.empty((len(classes), 128), dtype=np.float32)
    for label, (_, severity) in enumerate(ARRAY_CLASSES):
        rows = np.flatnonzero(classes == label)
        features[rows] = vibration_features(simulate_vibration(np.full(len(rows), severity > 0), severity, rng))
    test = np.zeros(len(classes), dtype=bool)
    for label in range(len(ARRAY_CLASSES)):
        rows = np.flatnonzero(classes == label)
        test[rows[: per_class // 5]] = True
    np.savez(
        path,
        x_train=features[~test],
        y_train=classes[~test],
        x_test=features[test],
        y_test=classes[test],
        labels=np.array([name for name, _ in ARRAY_CLASSES]),
    )
    return path
