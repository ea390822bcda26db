"""Tests of harness.datasets on the real bundled data and small generated sets (fast: seconds)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from harness.datasets import (
    DATASETS,
    KEYWORD_WORDS,
    Dataset,
    DatasetLoader,
    DatasetOption,
    load_dataset,
    mfcc_features,
    vibration_features,
)
from harness.datasets.examples import write_wav
from harness.errors import DatasetError

SHARED_EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tflm-examples"

SMALL = {
    "keywords": {"samples_per_class": 10},
    "vibration": {"samples_per_class": 20},
    "digits": {"samples_per_class": 10, "image_size": 32},
    "basic_motions": {"samples_per_class": 12},
}
EXPECTED = {
    # name: (input shape, labels, task)
    "keywords": ((49, 10, 1), ("yes", "no", "silence"), "multiclass"),
    "vibration": ((128,), ("normal", "fault"), "binary"),
    "digits": ((32, 32, 3), tuple("0123456789"), "multiclass"),
    "basic_motions": ((50, 6), ("standing", "running", "walking", "badminton"), "multiclass"),
}


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as handle:
        return np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")


# ---------------------------------------------------------------------------------------------
# Registry and the shape of every data set
# ---------------------------------------------------------------------------------------------


def test_registry_is_read_only_and_complete() -> None:
    assert set(DATASETS) == {
        "keywords", "vibration", "digits", "basic_motions", "csv", "image_folder", "audio_folder", "npz"
    }
    with pytest.raises(TypeError):
        DATASETS["other"] = DATASETS["digits"]  # type: ignore[index]
    for name, loader in DATASETS.items():
        assert isinstance(loader, DatasetLoader) and loader.name == name
        assert all(isinstance(option, DatasetOption) for option in loader.options)
        assert "samples_per_class" in {option.name for option in loader.options}
        for option in loader.options:
            allowed = option.type if isinstance(option.type, tuple) else (option.type,)
            assert isinstance(option.default, allowed), option


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_dataset_shapes_dtypes_and_labels(name: str) -> None:
    shape, labels, task = EXPECTED[name]
    dataset = load_dataset(name, SMALL[name], seed=0)
    assert isinstance(dataset, Dataset) and dataset.name == name
    assert dataset.input_shape == shape
    assert dataset.labels == labels and dataset.num_classes == len(labels)
    assert dataset.task == task
    assert dataset.source.split(":")[0] in ("real", "generated") and "\n" not in dataset.source
    for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), *shape)
        assert np.isfinite(x).all()
        assert set(np.unique(y)) == set(range(len(labels))), "every class in every split"
        assert not x.flags.writeable and not y.flags.writeable
    counts = np.bincount(np.concatenate([dataset.y_train, dataset.y_test]))
    assert counts.max() <= SMALL[name]["samples_per_class"]


def test_keywords_default_sizes_are_declared() -> None:
    defaults = {o.name: o.default for o in DATASETS["keywords"].options}
    assert defaults == {"source": "synthetic", "words": "yes,no", "path": "", "samples_per_class": 400}
    assert {o.name: o.default for o in DATASETS["vibration"].options}["samples_per_class"] == 600


def test_keywords_other_words_from_phoneme_tables() -> None:
    dataset = load_dataset("keywords", {"words": "up, down,stop", "samples_per_class": 5}, seed=2)
    assert dataset.labels == ("up", "down", "stop", "silence")
    assert set(KEYWORD_WORDS) >= {"yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"}


def test_digits_full_size_is_all_1797_images_in_unit_range() -> None:
    dataset = load_dataset("digits", {"image_size": 8, "channels": 1}, seed=0)
    assert len(dataset.y_train) + len(dataset.y_test) == 1797
    assert dataset.input_shape == (8, 8, 1)
    assert dataset.x_train.min() >= 0.0 and dataset.x_train.max() <= 1.0
    # At the native size bilinear resizing must be the identity: pixels are the 0..16 counts / 16.
    assert np.allclose(np.unique(dataset.x_train * 16), np.arange(17))


def test_digits_resize_keeps_the_image() -> None:
    big = load_dataset("digits", {"image_size": 40, "channels": 3, "samples_per_class": 5}, seed=0)
    assert big.input_shape == (40, 40, 3)
    assert np.array_equal(big.x_train[..., 0], big.x_train[..., 2])
    small = load_dataset("digits", {"image_size": 8, "channels": 1, "samples_per_class": 5}, seed=0)
    # Same seed, same rows. With half-pixel centres, source pixel i lands exactly on output pixel
    # 5 * i + 2; in between, bilinear values lie between their neighbours.
    assert np.allclose(big.x_train[:, 2::5, 2::5, 0], small.x_train[..., 0], atol=1e-6)
    assert not np.allclose(big.x_train[:, 3::5, 3::5, 0], small.x_train[..., 0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["keywords", "vibration"])
def test_generated_data_is_deterministic_per_seed(name: str) -> None:
    first = load_dataset(name, SMALL[name], seed=7)
    again = load_dataset(name, SMALL[name], seed=7)
    other = load_dataset(name, SMALL[name], seed=8)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(first, field), getattr(again, field)), field
    assert not np.array_equal(first.x_train, other.x_train)
    assert first.source != other.source  # the seed is part of the provenance line


@pytest.mark.parametrize("name", ["digits", "basic_motions"])
def test_real_data_is_deterministic_per_seed(name: str) -> None:
    first = load_dataset(name, SMALL[name], seed=3)
    again = load_dataset(name, SMALL[name], seed=3)
    assert np.array_equal(first.x_train, again.x_train) and np.array_equal(first.y_test, again.y_test)


# ---------------------------------------------------------------------------------------------
# basic_motions: split by recording
# ---------------------------------------------------------------------------------------------


def test_basic_motions_windows_never_straddle_the_split() -> None:
    dataset = load_dataset("basic_motions", {"seq_len": 20, "stride": 5}, seed=0)

    # Overlapping windows of one recording share runs of samples; a leak would show up as a run
    # of 4 consecutive time steps present in both splits.
    def runs(x: np.ndarray) -> set[bytes]:
        view = np.lib.stride_tricks.sliding_window_view(x, 4, axis=1)
        return {np.round(r, 5).tobytes() for r in view.reshape(-1, *view.shape[2:])}

    assert not runs(dataset.x_train) & runs(dataset.x_test)
    # 40 recordings per file, 100 samples each: (100 - 20) / 5 + 1 = 17 windows per recording.
    assert len(dataset.y_train) == len(dataset.y_test) == 40 * 17


def test_basic_motions_standardized_with_train_statistics() -> None:
    dataset = load_dataset("basic_motions", {}, seed=0)
    assert np.allclose(dataset.x_train.mean(axis=(0, 1)), 0, atol=1e-4)
    assert np.allclose(dataset.x_train.std(axis=(0, 1)), 1, atol=1e-3)
    # Test uses the train constants, so its statistics are merely close, not exact.
    assert not np.allclose(dataset.x_test.mean(axis=(0, 1)), 0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(DatasetError) as caught:
        load_dataset("mnist", {})
    assert "mnist" in str(caught.value) and "keywords" in str(caught.value) and "digits" in str(caught.value)


def test_unknown_option_is_named() -> None:
    with pytest.raises(DatasetError, match="'image_sise'"):
        load_dataset("digits", {"image_sise": 32})


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("digits", {"image_size": "96"}, "image_size"),
        ("digits", {"channels": 3.0}, "channels"),
        ("vibration", {"samples_per_class": True}, "samples_per_class"),
        ("vibration", {"fault_severity": "high"}, "fault_severity"),
        ("keywords", {"words": ["yes", "no"]}, "words"),
    ],
)
def test_wrong_option_type_is_named(name: str, options: dict[str, object], option: str) -> None:
    with pytest.raises(DatasetError, match=f"'{option}'"):
        load_dataset(name, options)


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("digits", {"channels": 2}, "channels"),
        ("digits", {"image_size": 4}, "image_size"),
        ("keywords", {"words": "yes,banana"}, "words"),
        ("keywords", {"words": "yes,silence"}, "words"),
        ("keywords", {"source": "youtube"}, "source"),
        ("keywords", {"samples_per_class": 0}, "samples_per_class"),
        ("vibration", {"fault_severity": -1.0}, "fault_severity"),
        ("basic_motions", {"seq_len": 101}, "seq_len"),
    ],
)
def test_bad_option_value_is_named(name: str, options: dict[str, object], option: str) -> None:
    with pytest.raises(DatasetError, match=f"'{option}'"):
        load_dataset(name, options)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(DatasetError, match="seed"):
        load_dataset("digits", {}, seed=seed)  # type: ignore[arg-type]


def test_int_is_accepted_for_a_float_option() -> None:
    dataset = load_dataset("vibration", {"fault_severity": 2, "samples_per_class": 5})
    assert "fault_severity 2.0" in dataset.source


def test_dataset_rejects_wrong_dtypes() -> None:
    x = np.zeros((4, 3), dtype=np.float64)
    y = np.zeros(4, dtype=np.int64)
    with pytest.raises(DatasetError, match="float32"):
        Dataset("bad", x, y, x, y, ("a", "b"), "multiclass", "generated: test")


# ---------------------------------------------------------------------------------------------
# Front ends on real clips
# ---------------------------------------------------------------------------------------------


def test_mfcc_of_real_clips() -> None:
    if not SHARED_EXAMPLES.is_dir():
        pytest.skip(f"{SHARED_EXAMPLES} not present")
    features = {
        name: mfcc_features(read_wav(SHARED_EXAMPLES / f"{name}_1000ms.wav"))
        for name in ("yes", "no", "silence")
    }
    for name, mfcc in features.items():
        assert mfcc.shape == (49, 10) and mfcc.dtype == np.float32, name
    # Coefficient 0 is the frame's log energy.
    assert features["silence"][:, 0].mean() < features["yes"][:, 0].mean() - 1
    assert features["silence"][:, 0].mean() < features["no"][:, 0].mean() - 1
    assert not np.allclose(features["yes"], features["no"], atol=0.1)


def test_mfcc_input_conventions() -> None:
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000) * 3000).astype(np.int16)
    as_float = mfcc_features(audio.astype(np.float64) / 32768.0)
    assert np.allclose(mfcc_features(audio), as_float, atol=1e-5)
    assert np.allclose(mfcc_features(np.stack([audio, audio]))[1], as_float, atol=1e-5)
    # Short clips are zero-padded at the end; other rates are resampled to 16 kHz.
    short = mfcc_features(audio[:8000])
    assert short.shape == (49, 10) and np.allclose(short[:20], as_float[:20], atol=1e-5)
    assert mfcc_features(np.zeros(8000), sample_rate=8000).shape == (49, 10)


def test_vibration_features_shape() -> None:
    assert vibration_features(np.zeros(256)).shape == (128,)
    assert vibration_features(np.zeros((3, 256))).shape == (3, 128)
    with pytest.raises(DatasetError):
        vibration_features(np.zeros(200))


# ---------------------------------------------------------------------------------------------
# Separability: the generated data must carry the label, and not only in the training split
# ---------------------------------------------------------------------------------------------


def linear_test_accuracy(dataset: Dataset) -> float:
    flat_train = dataset.x_train.reshape(len(dataset.x_train), -1)
    flat_test = dataset.x_test.reshape(len(dataset.x_test), -1)
    model = LogisticRegression(max_iter=2000).fit(flat_train, dataset.y_train)
    return float(model.score(flat_test, dataset.y_test))


def test_keywords_are_linearly_separable_well_above_chance() -> None:
    dataset = load_dataset("keywords", {"samples_per_class": 80}, seed=0)
    assert linear_test_accuracy(dataset) >= 0.7  # chance is 1/3; seeds 0-4 give 0.81-0.88


def test_vibration_faults_are_detectable_and_severity_matters() -> None:
    strong = linear_test_accuracy(
        load_dataset("vibration", {"samples_per_class": 200, "fault_severity": 2.0})
    )
    absent = linear_test_accuracy(
        load_dataset("vibration", {"samples_per_class": 200, "fault_severity": 0.0})
    )
    assert strong >= 0.8  # chance is 1/2; seeds 0-3 give 0.88-0.96
    assert absent <= 0.65  # with no impacts the classes are the same machine


# ---------------------------------------------------------------------------------------------
# keywords from a Speech Commands directory
# ---------------------------------------------------------------------------------------------


def make_speech_commands(root: Path) -> None:
    """Tiny Speech Commands tree: per word, 6 speakers; each speaker is one tone frequency."""
    t = np.arange(16000) / 16000
    for word_index, word in enumerate(("yes", "no")):
        for speaker in range(6):
            freq = 300.0 + 500.0 * word_index + 40.0 * speaker
            for take in range(2):
                clip = 0.3 * np.sin(2 * np.pi * freq * t[: 12000 + 1000 * take])  # shorter than 1 s
                write_wav(root / word / f"s{speaker}_nohash_{take}.wav", clip)
    rng = np.random.default_rng(0)
    write_wav(root / "_background_noise_" / "white.wav", 0.3 * rng.standard_normal(3 * 16000))
    write_wav(root / "_background_noise_" / "too_short.wav", 0.3 * rng.standard_normal(100))


def test_speech_commands_directory(tmp_path: Path) -> None:
    make_speech_commands(tmp_path / "sc")
    options = {"source": "speech_commands", "path": "sc", "samples_per_class": 0}
    dataset = load_dataset("keywords", options, seed=0, base_dir=tmp_path)
    assert dataset.labels == ("yes", "no", "silence") and dataset.source.startswith("real:")
    assert dataset.input_shape == (49, 10, 1)
    counts = np.bincount(np.concatenate([dataset.y_train, dataset.y_test]))
    assert counts.tolist() == [12, 12, 12]

    # Every word row is the front end applied to one file; map rows back to speakers and check
    # that no speaker is on both sides of the split.
    speaker_of: dict[bytes, str] = {}
    for path in sorted((tmp_path / "sc").glob("*/s*_nohash_*.wav")):
        key = mfcc_features(read_wav(path)).round(4).tobytes()
        speaker_of[key] = path.stem.split("_nohash_")[0]

    def speakers(x: np.ndarray, y: np.ndarray) -> set[str]:
        return {
            speaker_of[row[..., 0].round(4).tobytes()] for row, label in zip(x, y, strict=True) if label < 2
        }

    train_speakers = speakers(dataset.x_train, dataset.y_train)
    test_speakers = speakers(dataset.x_test, dataset.y_test)
    assert train_speakers and test_speakers and not train_speakers & test_speakers

    capped = load_dataset("keywords", {**options, "samples_per_class": 6}, seed=0, base_dir=tmp_path)
    assert np.bincount(np.concatenate([capped.y_train, capped.y_test])).tolist() == [6, 6, 6]


def test_a_missing_word_folder_does_not_list_the_directory(tmp_path: Path) -> None:
    # Errors reach the log and results.json; what else a directory holds is none of their business.
    make_speech_commands(tmp_path / "sc")
    (tmp_path / "sc" / "private_notes_2024").mkdir()
    with pytest.raises(DatasetError) as caught:
        load_dataset("keywords", {"source": "speech_commands", "path": "sc", "words": "yes,left"}, base_dir=tmp_path)
    message = caught.value.one_line()
    assert str((tmp_path / "sc" / "left").resolve()) in message
    assert "private_notes_2024" not in message and "_background_noise_" not in message
    assert "private_notes_2024" not in caught.value.details


def test_speech_commands_errors_name_the_resolved_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="'path'"):
        load_dataset("keywords", {"source": "speech_commands"}, base_dir=tmp_path)
    with pytest.raises(DatasetError) as caught:
        load_dataset("keywords", {"source": "speech_commands", "path": "missing"}, base_dir=tmp_path)
    assert str((tmp_path / "missing").resolve()) in str(caught.value)

    make_speech_commands(tmp_path / "sc")
    with pytest.raises(DatasetError, match="'left'"):
        load_dataset(
            "keywords", {"source": "speech_commands", "path": "sc", "words": "yes,left"}, base_dir=tmp_path
        )
    write_wav(tmp_path / "sc" / "yes" / "stereo_nohash_0.wav", np.zeros(100))
    with wave.open(str(tmp_path / "sc" / "yes" / "stereo_nohash_0.wav"), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(np.zeros(200, dtype="<i2").tobytes())
    with pytest.raises(DatasetError, match=r"stereo_nohash_0\.wav"):
        load_dataset("keywords", {"source": "speech_commands", "path": "sc"}, base_dir=tmp_path)
