"""Tests of the data sets that read a user's own files (csv, image_folder, audio_folder, npz) and of
the declared preprocessing. Every file is written by the test; nothing is downloaded (seconds)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.datasets import (
    DATASETS,
    MIN_SAMPLES_PER_CLASS,
    USER_DATASETS,
    Dataset,
    Preprocessing,
    load_dataset,
    mfcc_features,
    preprocess_dataset,
    write_example_data,
)
from harness.datasets.audio import read_clip
from harness.errors import DatasetError


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own-data")
    write_example_data(root, seed=0)
    return root


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm.tobytes())


def read_pcm(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as handle:
        return np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def check_dataset(dataset: Dataset, shape: tuple[int, ...], labels: tuple[str, ...]) -> None:
    assert dataset.input_shape == shape
    assert dataset.labels == labels and dataset.task == "multiclass"
    assert dataset.source.startswith("recorded: ") and "\n" not in dataset.source
    for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (len(y), *shape)
        assert set(np.unique(y)) == set(range(len(labels))), "every class in both splits"
        assert not x.flags.writeable and np.isfinite(x).all()


# ---------------------------------------------------------------------------------------------
# Registry and the example files
# ---------------------------------------------------------------------------------------------

EXPECTED_OPTIONS = {
    "csv": {"path": "", "columns": "", "label_column": "label", "labels": "per_window", "window": 1, "stride": 0,
            "samples_per_class": 0},
    "image_folder": {"path": "", "image_size": 32, "color_mode": "grayscale", "samples_per_class": 0},
    "audio_folder": {"path": "", "features": "mfcc", "samples_per_class": 0},
    "npz": {"path": "", "samples_per_class": 0},
}


def test_user_kinds_are_registered_with_declared_options() -> None:
    assert USER_DATASETS == set(EXPECTED_OPTIONS) and USER_DATASETS <= set(DATASETS)
    for name, defaults in EXPECTED_OPTIONS.items():
        options = DATASETS[name].options
        assert {o.name: o.default for o in options} == defaults
        assert all(o.help for o in options)


def test_example_data_loads_as_every_kind(example: Path) -> None:
    cases = [
        ("csv", {"path": "sensors", "labels": "per_file", "columns": "ax,ay,az", "window": 25}, (25, 3),
         ("idle", "shake", "walk")),
        ("csv", {"path": "sensors.csv", "columns": "ax,ay,az", "window": 25}, (25, 3), ("idle", "shake", "walk")),
        ("image_folder", {"path": "images", "image_size": 16}, (16, 16, 1), ("one", "two", "zero")),
        ("audio_folder", {"path": "audio"}, (49, 10, 1), ("no", "yes")),
        ("npz", {"path": "arrays.npz"}, (128,), ("normal", "worn", "damaged")),
    ]
    for name, options, shape, labels in cases:
        dataset = load_dataset(name, options, seed=0, base_dir=example)
        check_dataset(dataset, shape, labels)
        counts = np.bincount(np.concatenate([dataset.y_train, dataset.y_test]))
        assert counts.min() >= 20, (name, counts)  # enough for a quick-profile run to learn from
        again = load_dataset(name, options, seed=0, base_dir=example)
        assert np.array_equal(dataset.x_test, again.x_test) and np.array_equal(dataset.y_train, again.y_train)
    csv_source = load_dataset("csv", cases[0][1], seed=0, base_dir=example).source
    assert "9 CSV files under sensors" in csv_source and "split by file" in csv_source


def test_example_data_is_a_function_of_the_seed(tmp_path: Path) -> None:
    first = write_example_data(tmp_path / "a", seed=3)
    again = write_example_data(tmp_path / "b", seed=3)
    assert set(first) == {"sensors", "sensors_csv", "images", "audio", "arrays"}
    for key in first:
        files = sorted(p for p in first[key].rglob("*") if p.is_file()) if first[key].is_dir() else [first[key]]
        assert files, key
        for path in files:
            twin = again[key] / path.relative_to(first[key]) if first[key].is_dir() else again[key]
            assert path.read_bytes() == twin.read_bytes(), path


def test_example_sensor_windows_carry_their_activity(example: Path) -> None:
    # The activity is in the signal's energy, which a linear model on per-axis log std learns at once.
    from sklearn.linear_model import LogisticRegression

    for path, labels in (("sensors", "per_file"), ("sensors.csv", "per_window")):
        dataset = load_dataset("csv", {"path": path, "labels": labels, "columns": "ax,ay,az", "window": 25},
                               base_dir=example)

        def energy(x: np.ndarray) -> np.ndarray:
            return np.log(x.std(axis=1) + 1e-3)

        model = LogisticRegression(max_iter=2000).fit(energy(dataset.x_train), dataset.y_train)
        assert model.score(energy(dataset.x_test), dataset.y_test) >= 0.9


# ---------------------------------------------------------------------------------------------
# csv
# ---------------------------------------------------------------------------------------------


def write_recordings(root: Path, files_per_class: int, rows: int) -> None:
    """Class folders of CSVs whose column `a` is file_number * 1000 + row, so a window tells where
    it came from; `b` is a second channel."""
    number = 0
    for label in ("left", "right"):
        for take in range(files_per_class):
            a = number * 1000 + np.arange(rows)
            lines = ["t,a,b", *(f"{i / 50:.2f},{v},{-v}" for i, v in enumerate(a))]
            write_text(root / label / f"take{take}.csv", "\n".join(lines) + "\n")
            number += 1


def test_csv_per_file_windows_split_by_recording(tmp_path: Path) -> None:
    write_recordings(tmp_path / "rec", files_per_class=5, rows=60)
    options = {"path": "rec", "labels": "per_file", "columns": "a,b", "window": 10, "stride": 5}
    dataset = load_dataset("csv", options, seed=1, base_dir=tmp_path)
    check_dataset(dataset, (10, 2), ("left", "right"))
    assert "split by file" in dataset.source

    def files(x: np.ndarray) -> set[int]:
        # Every window is 10 consecutive rows of one file, starting on the stride grid.
        assert np.all(np.diff(x[:, :, 0], axis=1) == 1) and np.array_equal(x[:, :, 1], -x[:, :, 0])
        assert np.all((x[:, 0, 0] % 1000) % 5 == 0)
        return set((x[:, 0, 0] // 1000).astype(int).tolist())

    train, test = files(dataset.x_train), files(dataset.x_test)
    assert not train & test, "a recording on both sides of the split"
    assert len(test) == 2  # a fifth of each class's 5 files
    assert len(dataset.y_train) + len(dataset.y_test) == 10 * 11  # (60 - 10) / 5 + 1 windows per file
    other = load_dataset("csv", options, seed=2, base_dir=tmp_path)
    assert files(other.x_test) != test  # the seed draws the test recordings


def test_csv_one_file_with_label_runs_splits_in_contiguous_blocks(tmp_path: Path) -> None:
    labels = ["walk"] * 100 + ["idle"] * 80 + ["walk"] * 120
    lines = ["row,label", *(f"{i},{label}" for i, label in enumerate(labels))]
    write_text(tmp_path / "one.csv", "\n".join(lines) + "\n\n\n")  # trailing blank lines are ignored
    dataset = load_dataset("csv", {"path": "one.csv", "window": 8, "stride": 4}, seed=0, base_dir=tmp_path)
    check_dataset(dataset, (8, 1), ("idle", "walk"))
    assert "contiguous blocks" in dataset.source

    def rows(x: np.ndarray, y: np.ndarray) -> set[int]:
        starts = x[:, 0, 0].astype(int)
        assert np.all(np.diff(x[:, :, 0], axis=1) == 1)
        for start, label in zip(starts, y, strict=True):
            # No window crosses a label change, and each has the label of its rows.
            assert len({labels[r] for r in range(start, start + 8)}) == 1
            assert dataset.labels[label] == labels[start]
        return {r for s in starts for r in range(s, s + 8)}

    train = rows(dataset.x_train, dataset.y_train)
    test = rows(dataset.x_test, dataset.y_test)
    assert not train & test, "a row in both splits"
    # Each run's test rows are one block at its start or end, about a fifth of the run.
    for lo, hi in ((0, 100), (100, 180), (180, 300)):
        block = sorted(r for r in test if lo <= r < hi)
        assert block and block == list(range(block[0], block[-1] + 1))
        assert block[0] == lo or block[-1] == hi - 1


def test_csv_one_row_per_sample_and_default_columns(tmp_path: Path) -> None:
    lines = ["x,y,label", *(f"{i},{2 * i},{'ab'[i % 2]}" for i in range(40))]
    write_text(tmp_path / "rows.csv", "\n".join(lines) + "\n")
    dataset = load_dataset("csv", {"path": "rows.csv"}, seed=0, base_dir=tmp_path)
    check_dataset(dataset, (2,), ("a", "b"))
    assert np.array_equal(dataset.x_train[:, 1], 2 * dataset.x_train[:, 0])
    assert "40 samples, one per row" in dataset.source and "columns x,y" in dataset.source


def test_csv_folder_of_files_with_label_columns(tmp_path: Path) -> None:
    for n in range(4):
        lines = ["v,label", *(f"{n * 100 + i},{'up' if i < 20 else 'down'}" for i in range(40))]
        write_text(tmp_path / "flat" / f"r{n}.csv", "\n".join(lines) + "\n")
    dataset = load_dataset("csv", {"path": "flat", "window": 4}, seed=0, base_dir=tmp_path)
    check_dataset(dataset, (4, 1), ("down", "up"))
    # Files hold two labels each, so they cannot be the unit of the split: blocks are.
    assert "contiguous blocks" in dataset.source


def test_csv_cap_keeps_each_class_in_both_splits(tmp_path: Path) -> None:
    write_recordings(tmp_path / "rec", files_per_class=5, rows=60)
    options = {"path": "rec", "labels": "per_file", "columns": "a", "window": 5, "samples_per_class": 12}
    dataset = load_dataset("csv", options, seed=0, base_dir=tmp_path)
    counts = np.bincount(dataset.y_train) + np.bincount(dataset.y_test)
    assert counts.tolist() == [12, 12] and np.bincount(dataset.y_test).min() >= 1
    train_files = set((dataset.x_train[:, 0, 0] // 1000).astype(int).tolist())
    assert not train_files & set((dataset.x_test[:, 0, 0] // 1000).astype(int).tolist())


@pytest.mark.parametrize(
    ("content", "options", "message", "where"),
    [
        ("a,b,label\n1,2,x\n", {"columns": "a,c"}, r"column 'c' not found: expected columns a, c, found a, b, label",
         "bad.csv"),
        ("a,label\n1,x\n2,x\nseven,x\n", {}, r"column 'a': expected a finite number, found 'seven'", "bad.csv:4"),
        ("a,label\n1,x\n\n3,x\n", {}, r"column 'a': expected a finite number, found an empty cell", "bad.csv:3"),
        ("a,label\n1,x\n2,\n3,y\n", {}, r"column 'label': expected a label, found an empty cell", "bad.csv:3"),
        ("a,b\n1,2\n", {}, r"expected a label column 'label', found columns a, b", "bad.csv"),
        ("a,label\n", {}, r"expected data rows after the header, found none", "bad.csv"),
        ("", {}, r"the file is empty", "bad.csv"),
        ("a,label\n1,x\n2,y\n", {"labels": "per_file"}, r"labels per_file .* is one file", ""),
        ("a,label\n" + "1,x\n" * 6 + "2,y\n" * 6, {"window": 8}, r"class 'x': expected a run of at least 8 rows", ""),
        ("a,label\n" + "1,x\n" * 6 + "2,y\n" * 3, {}, r"class 'y' has 3 windows; expected at least 5", ""),
        ("a,label\n" + "1,x\n" * 9 + "2,y\n" * 9, {"window": 5, "stride": 1},
         r"class 'x': expected enough contiguous rows .* both the train and the test split, found runs of 9 rows", ""),
        ("a,label\n1,x\n", {"labels": "by_hand"}, r"option 'labels' must be 'per_window' or 'per_file'", ""),
    ],
)
def test_csv_errors_say_what_was_expected_found_and_where(
    tmp_path: Path, content: str, options: dict[str, object], message: str, where: str
) -> None:
    write_text(tmp_path / "bad.csv", content)
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset("csv", {"path": "bad.csv", **options}, base_dir=tmp_path)
    if where:
        assert caught.value.where == str((tmp_path / where.split(":")[0]).resolve()) + (
            ":" + where.split(":")[1] if ":" in where else ""
        )


def test_csv_folder_layout_errors(tmp_path: Path) -> None:
    write_recordings(tmp_path / "rec", files_per_class=2, rows=30)
    (tmp_path / "rec" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"class folder 'empty' is empty: expected CSV files"):
        load_dataset("csv", {"path": "rec", "labels": "per_file"}, base_dir=tmp_path)
    (tmp_path / "rec" / "empty").rmdir()
    write_text(tmp_path / "rec" / "left" / "notes.txt", "recorded on Tuesday")
    with pytest.raises(DatasetError, match=r"expected CSV files \(\.csv\) in class folder 'left', found 'notes.txt'"):
        load_dataset("csv", {"path": "rec", "labels": "per_file"}, base_dir=tmp_path)
    (tmp_path / "rec" / "left" / "notes.txt").unlink()
    write_text(tmp_path / "rec" / "right" / "take9.csv", "t,a,c\n0,1,2\n")
    with pytest.raises(DatasetError, match=r"expected the columns of take0.csv \(t, a, b\), found t, a, c") as caught:
        load_dataset("csv", {"path": "rec", "labels": "per_file"}, base_dir=tmp_path)
    assert caught.value.where.endswith("take9.csv")
    write_text(tmp_path / "rec" / "stray.csv", "a\n1\n")
    with pytest.raises(DatasetError, match=r"either CSV files or one sub-folder per class .* found both"):
        load_dataset("csv", {"path": "rec", "labels": "per_file"}, base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"option 'path' is required"):
        load_dataset("csv", {}, base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"found nothing at .*missing"):
        load_dataset("csv", {"path": "missing"}, base_dir=tmp_path)


def test_csv_with_too_few_recordings_per_class_falls_back_to_blocks(tmp_path: Path) -> None:
    write_recordings(tmp_path / "rec", files_per_class=1, rows=100)
    dataset = load_dataset("csv", {"path": "rec", "labels": "per_file", "columns": "a", "window": 10},
                           base_dir=tmp_path)
    assert "contiguous blocks" in dataset.source
    train = {int(v) for x in dataset.x_train for v in x[:, 0]}
    assert not train & {int(v) for x in dataset.x_test for v in x[:, 0]}


# ---------------------------------------------------------------------------------------------
# image_folder
# ---------------------------------------------------------------------------------------------


def write_images(root: Path, per_class: int = 6) -> None:
    for index, (label, colour) in enumerate((("red", (255, 0, 0)), ("grey", (200, 200, 200)))):
        for n in range(per_class):
            size = (20, 12) if n % 2 else (40, 40)  # mixed sizes and aspect ratios
            suffix = (".png", ".jpg", ".bmp")[n % 3]
            path = root / label / ("deeper" if n == 5 else "") / f"img{n}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.new("RGB" if index == 0 or n % 2 else "L", size, colour if index == 0 or n % 2 else 200)
            image.save(path, **({"quality": 100} if suffix == ".jpg" else {}))


def test_image_folder_resizes_mixed_images_and_keeps_raw_pixels(tmp_path: Path) -> None:
    write_images(tmp_path / "img")
    grey = load_dataset("image_folder", {"path": "img", "image_size": 8}, base_dir=tmp_path)
    check_dataset(grey, (8, 8, 1), ("grey", "red"))
    x = np.concatenate([grey.x_train, grey.x_test])
    y = np.concatenate([grey.y_train, grey.y_test])
    # Raw 0..255 values (scaling is the suite's declared preprocessing); red in ITU-R 601 luma is 76.
    assert np.allclose(x[y == 0], 200, atol=1) and np.allclose(x[y == 1], 76, atol=2)
    rgb = load_dataset("image_folder", {"path": "img", "image_size": 5, "color_mode": "rgb"}, base_dir=tmp_path)
    check_dataset(rgb, (5, 5, 3), ("grey", "red"))
    reds = np.concatenate([rgb.x_train[rgb.y_train == 1], rgb.x_test[rgb.y_test == 1]])
    assert np.allclose(reds.reshape(-1, 3).mean(axis=0), (255, 0, 0), atol=2)
    assert "12 images in 2 class folders under img, resized to 5x5 rgb" in rgb.source


def test_image_folder_squashes_to_the_square_upright(tmp_path: Path) -> None:
    # Stored pixels: black top half, white bottom half, grey left quarter. The EXIF tag says "rotate
    # 90 degrees clockwise to view", as phone cameras write.
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[10:] = 255
    stored[:, :10] = 128
    exif = Image.Exif()
    exif[0x0112] = 6
    for label in ("a", "b"):
        for n in range(5):
            path = tmp_path / "img" / label / f"{n}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(stored).save(path, quality=100, exif=exif)
    x = load_dataset("image_folder", {"path": "img", "image_size": 8}, base_dir=tmp_path).x_train[..., 0]
    # Upright, the whole 20x40 picture squeezed into 8x8 (not cropped to a square).
    upright = np.rot90(stored, k=-1)
    expected = np.asarray(Image.fromarray(upright).resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(x - expected).max() < 12


def test_image_folder_cap_and_minimum(tmp_path: Path) -> None:
    write_images(tmp_path / "img", per_class=8)
    capped = load_dataset("image_folder", {"path": "img", "samples_per_class": 5}, base_dir=tmp_path)
    assert (np.bincount(capped.y_train) + np.bincount(capped.y_test)).tolist() == [5, 5]
    write_images(tmp_path / "few", per_class=MIN_SAMPLES_PER_CLASS - 1)
    with pytest.raises(DatasetError, match=r"class 'grey' has 4 images; expected at least 5 per class"):
        load_dataset("image_folder", {"path": "few"}, base_dir=tmp_path)


def test_image_folder_errors_name_the_file(tmp_path: Path) -> None:
    write_images(tmp_path / "img")
    fake = write_text(tmp_path / "img" / "red" / "broken.png", "not an image")
    with pytest.raises(DatasetError, match=r"cannot read image: expected a PNG, JPEG or BMP file") as caught:
        load_dataset("image_folder", {"path": "img"}, base_dir=tmp_path)
    assert caught.value.where == str(fake)
    fake.unlink()
    Image.new("L", (8, 8)).save(tmp_path / "img" / "red" / "actually.png", format="GIF")
    with pytest.raises(DatasetError, match=r"expected a PNG, JPEG or BMP image, found GIF data"):
        load_dataset("image_folder", {"path": "img"}, base_dir=tmp_path)
    (tmp_path / "img" / "red" / "actually.png").unlink()
    write_text(tmp_path / "img" / "red" / "labels.txt", "red")
    with pytest.raises(DatasetError, match=r"expected image files \(.png, .jpg, .jpeg, .bmp\) in class folder "
                                           r"'red', found 'labels.txt'"):
        load_dataset("image_folder", {"path": "img"}, base_dir=tmp_path)
    (tmp_path / "img" / "red" / "labels.txt").unlink()
    write_text(tmp_path / "img" / ".DS_Store", "finder")  # system files are never data
    (tmp_path / "img" / "blue").mkdir()
    with pytest.raises(DatasetError, match=r"class folder 'blue' is empty"):
        load_dataset("image_folder", {"path": "img"}, base_dir=tmp_path)
    (tmp_path / "img" / "blue").rmdir()
    Image.new("L", (8, 8)).save(tmp_path / "img" / "loose.png")
    with pytest.raises(DatasetError, match=r"found the file 'loose.png' directly in it"):
        load_dataset("image_folder", {"path": "img"}, base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"option 'color_mode' must be 'grayscale' or 'rgb', got 'cmyk'"):
        load_dataset("image_folder", {"path": "img", "color_mode": "cmyk"}, base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"expected a directory, found a file"):
        load_dataset("image_folder", {"path": "img/loose.png"}, base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# audio_folder
# ---------------------------------------------------------------------------------------------


def tone(freq: float, seconds: float = 0.8, rate: int = 16000) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


def write_tones(root: Path) -> None:
    for label, base in (("high", 2000.0), ("low", 300.0)):
        for n in range(6):
            name = f"{label}/{'nested/deeper/' if n == 0 else ''}{n} any name.WAV"
            write_wav(root / name, tone(base + 37 * n))


def test_audio_folder_uses_the_keywords_front_end(tmp_path: Path) -> None:
    write_tones(tmp_path / "aud")
    dataset = load_dataset("audio_folder", {"path": "aud"}, seed=0, base_dir=tmp_path)
    check_dataset(dataset, (49, 10, 1), ("high", "low"))
    # Each row is exactly mfcc_features of one file (padded to 1 s), the same front end as keywords.
    expected = {mfcc_features(read_pcm(path)).round(4).tobytes() for path in (tmp_path / "aud" / "low").rglob("*")
                if path.is_file()}
    assert len(expected) == 6
    rows = np.concatenate([dataset.x_train[dataset.y_train == 1], dataset.x_test[dataset.y_test == 1]])
    assert {row[..., 0].round(4).tobytes() for row in rows} == expected
    raw = load_dataset("audio_folder", {"path": "aud", "features": "raw"}, seed=0, base_dir=tmp_path)
    check_dataset(raw, (16000, 1), ("high", "low"))
    assert raw.x_train.min() >= -1 and raw.x_train.max() <= 1
    assert np.all(raw.x_train[:, 12800:] == 0)  # 0.8 s clips zero-padded at the end


def test_audio_clips_are_resampled_and_mixed_to_mono(tmp_path: Path) -> None:
    clip = tone(440.0, 1.0, 22050)
    write_wav(tmp_path / "a.wav", clip, 22050)
    write_wav(tmp_path / "stereo.wav", np.stack([clip, 0 * clip], axis=1).reshape(-1), 22050, channels=2)
    mono = read_clip(tmp_path / "a.wav")
    reference = tone(440.0, 1.0, 16000)
    assert mono.shape == (16000,) and np.abs(mono[200:-200] - reference[200:-200]).max() < 0.01
    assert np.allclose(read_clip(tmp_path / "stereo.wav"), mono / 2, atol=1e-4)


def test_audio_folder_errors(tmp_path: Path) -> None:
    write_tones(tmp_path / "aud")
    fake = write_text(tmp_path / "aud" / "low" / "fake.wav", "ID3 not a wave file")
    with pytest.raises(DatasetError, match=r"cannot read WAV file: expected RIFF WAVE audio") as caught:
        load_dataset("audio_folder", {"path": "aud"}, base_dir=tmp_path)
    assert caught.value.where == str(fake)
    fake.unlink()
    write_text(tmp_path / "aud" / "low" / "song.mp3", "ID3")
    with pytest.raises(DatasetError, match=r"expected WAV files \(.wav\) in class folder 'low', found 'song.mp3'"):
        load_dataset("audio_folder", {"path": "aud"}, base_dir=tmp_path)
    (tmp_path / "aud" / "low" / "song.mp3").unlink()
    write_wav(tmp_path / "aud" / "low" / "silent.wav", np.zeros(0))
    with pytest.raises(DatasetError, match=r"expected audio samples, found an empty WAV file"):
        load_dataset("audio_folder", {"path": "aud"}, base_dir=tmp_path)
    (tmp_path / "aud" / "low" / "silent.wav").unlink()
    (tmp_path / "aud" / "mid").mkdir()
    with pytest.raises(DatasetError, match=r"class folder 'mid' is empty: expected WAV files"):
        load_dataset("audio_folder", {"path": "aud"}, base_dir=tmp_path)
    write_wav(tmp_path / "aud" / "mid" / "one.wav", tone(900.0))
    with pytest.raises(DatasetError, match=r"class 'mid' has 1 clips; expected at least 5"):
        load_dataset("audio_folder", {"path": "aud"}, base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"option 'features' must be 'mfcc' or 'raw'"):
        load_dataset("audio_folder", {"path": "aud", "features": "spectrogram"}, base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------


def arrays(n_train: int = 20, n_test: int = 10, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 255, size=(n_train, 4, 4), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 255, size=(n_test, 4, 4), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


def test_npz_keeps_the_files_split_and_names(tmp_path: Path) -> None:
    data = arrays()
    np.savez(tmp_path / "d.npz", **data, labels=np.array(["cat", "dog", "emu"]))
    dataset = load_dataset("npz", {"path": "d.npz"}, base_dir=tmp_path)
    check_dataset(dataset, (4, 4), ("cat", "dog", "emu"))
    # The file's split is kept (reordered within each split), values as stored.
    assert sorted(map(bytes, dataset.x_test.astype(np.uint8))) == sorted(map(bytes, data["x_test"]))
    assert "20 train samples and 10 test samples (the file's split)" in dataset.source
    capped = load_dataset("npz", {"path": "d.npz", "samples_per_class": 6}, base_dir=tmp_path)
    assert (np.bincount(capped.y_train) + np.bincount(capped.y_test)).tolist() == [6, 6, 6]
    assert set(map(bytes, capped.x_test.astype(np.uint8))) <= set(map(bytes, data["x_test"]))


def test_npz_cap_keeps_a_small_test_split(tmp_path: Path) -> None:
    # A cap shares each class between the splits in the file's ratio, but never empties one.
    data = arrays(n_train=120, n_test=6)
    np.savez(tmp_path / "d.npz", **data)
    capped = load_dataset("npz", {"path": "d.npz", "samples_per_class": 5}, base_dir=tmp_path)
    assert np.bincount(capped.y_train).tolist() == [4, 4, 4] and np.bincount(capped.y_test).tolist() == [1, 1, 1]


def test_npz_string_labels_float_indices_and_binary_task(tmp_path: Path) -> None:
    data = arrays(classes=2)
    names = np.array(["off", "on"])
    np.savez(tmp_path / "s.npz", **{**data, "y_train": names[data["y_train"]], "y_test": names[data["y_test"]]})
    dataset = load_dataset("npz", {"path": "s.npz"}, base_dir=tmp_path)
    assert dataset.labels == ("off", "on") and np.array_equal(dataset.y_train[:0], [])
    np.savez(tmp_path / "b.npz", **{**data, "y_train": data["y_train"].astype(np.float32)}, task=np.array("binary"))
    binary = load_dataset("npz", {"path": "b.npz"}, base_dir=tmp_path)
    assert binary.task == "binary" and binary.labels == ("0", "1")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_train": np.zeros(19, dtype=int)}, (r"y_train: expected shape \(20,\), one label per sample of x_train, "
                                               r"found shape \(19,\)")),
        ({"x_test": np.zeros((10, 4, 5))}, (r"expected x_train and x_test to have the same sample shape, found "
                                           r"\(4, 4\) and \(4, 5\)")),
        ({"x_train": np.zeros(20)}, r"x_train: expected \(samples, features...\) .* found shape \(20,\)"),
        ({"y_test": np.eye(3)[np.arange(10) % 3]}, (r"y_test: expected class indices of shape \(10,\), found shape "
                                                   r"\(10, 3\); if these are one-hot rows")),
        ({"y_test": np.full(10, 7), "labels": np.array(["a", "b", "c"])},
         r"expected class indices in 0..2 \(3 labels\), found values 0..7"),
        ({"y_test": np.full(10, -1)}, r"expected class indices in 0..2 \(3 labels\), found values -1..2"),
        ({"x_train": np.full((20, 4, 4), np.nan)}, r"x_train: expected finite values, found NaN"),
        ({"x_train": np.array([["a"] * 4] * 20)}, r"x_train: expected integer or float values, found dtype <U1"),
        ({"labels": np.array(["a", "b", "c"]), "task": np.array("binary")}, (r"task 'binary': expected 2 classes, "
                                                                             r"found 3")),
        ({"labels": np.array([1, 2, 3])}, r"labels: expected a 1-D string array"),
        ({"y_train": np.where(np.arange(20) % 3 == 2, 0, np.arange(20) % 3)},
         r"class '2' is in y_test but not in y_train"),
        ({"y_train": np.r_[np.zeros(12, dtype=int), 1, 1, [2] * 6], "y_test": np.r_[np.zeros(8, dtype=int), 1, 2]},
         r"class '1' has 3 samples; expected at least 5"),
    ],
)
def test_npz_errors_name_the_array(tmp_path: Path, change: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "bad.npz", **{**arrays(), **change})
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset("npz", {"path": "bad.npz"}, base_dir=tmp_path)
    assert caught.value.where == str((tmp_path / "bad.npz").resolve())


def test_npz_file_errors(tmp_path: Path) -> None:
    data = arrays()
    np.savez(tmp_path / "partial.npz", x_train=data["x_train"], y_train=data["y_train"], X_test=data["x_test"])
    with pytest.raises(DatasetError, match=r"x_test, y_test missing, found X_test, x_train, y_train"):
        load_dataset("npz", {"path": "partial.npz"}, base_dir=tmp_path)
    np.savez(tmp_path / "objects.npz", **data, labels=np.array(["a", None, "c"], dtype=object))
    with pytest.raises(DatasetError, match=r"found an object array"):
        load_dataset("npz", {"path": "objects.npz"}, base_dir=tmp_path)
    write_text(tmp_path / "text.npz", "x_train,y_train")
    with pytest.raises(DatasetError, match=r"cannot read .npz"):
        load_dataset("npz", {"path": "text.npz"}, base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"expected a file, found a directory"):
        load_dataset("npz", {"path": "."}, base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def test_standardize_from_train_uses_the_training_split_only() -> None:
    rng = np.random.default_rng(0)
    x_train = rng.normal((10.0, -5.0, 0.0), (2.0, 0.5, 3.0), size=(200, 7, 3))
    x_test = rng.normal(100.0, 50.0, size=(50, 7, 3))  # wildly different: it must not matter
    fitted = Preprocessing("standardize", from_train=True).fitted(x_train)
    assert not fitted.from_train and len(fitted.mean) == 3 and len(fitted.std) == 3
    out = fitted.apply(x_train)
    assert out.dtype == np.float32
    assert np.allclose(out.reshape(-1, 3).mean(axis=0), 0, atol=1e-5)
    assert np.allclose(out.reshape(-1, 3).std(axis=0), 1, atol=1e-5)
    assert fitted.mean == tuple(x_train.reshape(-1, 3).mean(axis=0).tolist())

    train = Dataset("t", x_train.astype(np.float32), np.arange(200) % 2, x_test.astype(np.float32),
                    np.arange(50) % 2, ("a", "b"), "multiclass", "generated: test")
    done, used = preprocess_dataset(train, Preprocessing("standardize", from_train=True))
    assert np.allclose(used.mean, x_train.astype(np.float32).reshape(-1, 3).mean(axis=0), atol=1e-5)
    assert np.allclose(done.x_test, (x_test.astype(np.float32) - used.mean) / used.std, atol=1e-4)
    assert not done.x_train.flags.writeable and done.y_test is train.y_test
    assert abs(float(done.x_test.mean())) > 10  # test statistics never entered the constants


def test_scale_and_explicit_standardize() -> None:
    pixels = np.array([[0.0, 127.5, 255.0]])
    scale = Preprocessing("scale", scale=1 / 255)
    assert np.allclose(scale.apply(pixels), [[0, 0.5, 1]]) and scale.describe() == "x * 0.00392157 + 0"
    signed = Preprocessing("scale", scale=1 / 127.5, offset=-1)
    assert np.allclose(signed.apply(pixels), [[-1, 0, 1]])
    one = Preprocessing("standardize", mean=0.5, std=[0.25])  # one value for every channel
    assert np.allclose(one.apply(np.array([[0.5, 1.0]])), [[0, 2]]) and one.describe() == "(x - 0.5) / 0.25"
    per_channel = Preprocessing("standardize", mean=(1, 2), std=(1, 4))
    assert np.allclose(per_channel.apply(np.array([[1.0, 6.0], [2.0, 2.0]])), [[0, 1], [1, 0]])
    assert per_channel.describe() == "(x - [1, 2]) / [1, 4]"
    assert np.array_equal(Preprocessing().apply(pixels), pixels.astype(np.float32))
    assert Preprocessing("scale", scale=2).fitted(pixels) == Preprocessing("scale", scale=2)


@pytest.mark.parametrize(
    "prep",
    [
        Preprocessing(),
        Preprocessing("scale", scale=1 / 255, offset=-0.5),
        Preprocessing("standardize", mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0)),
        Preprocessing("standardize", from_train=True),
        Preprocessing("standardize", from_train=True).fitted(np.arange(24.0).reshape(4, 6)),
    ],
)
def test_preprocessing_round_trips_through_a_dict(prep: Preprocessing) -> None:
    import json

    data = json.loads(json.dumps(prep.to_dict()))  # what results.json and cache keys hold
    assert Preprocessing.from_dict(data) == prep
    assert "\n" not in prep.describe()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "normalize"}, r"method: expected one of none, scale, standardize, found 'normalize'"),
        ({"method": "scale", "scale": 0}, r"scale: expected a non-zero factor, found 0"),
        ({"method": "scale", "scale": True}, r"scale: expected a number, found bool True"),
        ({"method": "standardize", "mean": [0.5], "std": [0.0]}, r"std: expected a value > 0, found 0"),
        ({"method": "standardize", "mean": [0, 0], "std": [1, -2]}, r"std\[1\]: expected a value > 0, found -2"),
        ({"method": "standardize", "mean": [0, 0], "std": [1]}, (r"as many std values as mean values, found 2 mean "
                                                                r"and 1 std")),
        ({"method": "standardize", "mean": [0]}, r"expected mean and std \(or from_train: true\), std is missing"),
        ({"method": "standardize", "from_train": True, "mean": [0], "std": [1]}, r"from_train computes mean and std"),
        ({"method": "scale", "from_train": True}, r"method 'scale' takes offset, scale; found from_train"),
        ({"method": "none", "scale": 2}, r"method 'none' takes nothing else; found scale"),
        ({"method": "standardize", "mean": [float("nan")], "std": [1]}, r"mean\[0\]: expected a finite number"),
        ({"method": "scale", "factor": 2}, r"preprocessing has no field 'factor'"),
        ({"scale": 2}, r"expected a 'method'"),
    ],
)
def test_preprocessing_errors_are_precise(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessing.from_dict(fields)


def test_preprocessing_apply_refuses_unfitted_and_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"from_train has no statistics yet: fit it on the training split first"):
        Preprocessing("standardize", from_train=True).apply(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"has 3 mean/std values \(one per channel\), but the samples' last axis "
                                         r"has 6 channels"):
        Preprocessing("standardize", mean=(0, 0, 0), std=(1, 1, 1)).apply(np.zeros((2, 50, 6)))
    with pytest.raises(ValueError, match=r"channel 1 of the training split is constant \(4\), so its std is 0"):
        Preprocessing("standardize", from_train=True).fitted(np.array([[1.0, 4.0], [2.0, 4.0]]))
