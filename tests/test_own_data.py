"""The example suite for users' own data (suites/examples/own-data.yaml), run as a user runs it, on
files the test writes: a CSV folder and file, an image folder, a WAV folder and an .npz, each
with its declared preprocessing, through training, quantization, the reference and the virtual
board."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.datasets.examples import write_example_data
from harness.report import read_results

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "suites" / "examples" / "own-data.yaml"


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-data")
    folder = root / "suites" / "examples"
    folder.mkdir(parents=True)
    suite = Path(shutil.copy(EXAMPLE, folder))
    write_example_data(folder / "data")
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), "--profile=quick",
                           f"--results-dir={root / 'results'}", f"--cache-dir={root / 'cache'}", "--run-id=first"],
                          cwd=REPO, capture_output=True, text=True, timeout=1500, check=False)
    return root, done


def test_the_example_suite_runs_every_data_set_kind_on_written_files(own_data_run):
    root, done = own_data_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, rows = read_results(root / "results" / "own-data" / "first")
    assert {row.dataset for row in rows} == {"csv", "image_folder", "audio_folder", "npz"}
    for row in rows:
        assert row.status == "passed", (row.case_id, row.error, row.violations)
        assert row.board_accuracy is not None and row.reference_accuracy is not None, row.case_id
        assert row.dataset_source, row.case_id  # every row says where its samples came from
    by_id = {row.case_id: row for row in rows}
    assert by_id["words[int8]"].source == "zoo:keyword_cnn"
    assert by_id["gestures[int8]"].source.startswith("layers")
    # Integer rows against the float model on the same samples.
    assert all(row.accuracy_drop_vs_float is not None for row in rows if row.quantization == "int8")
    assert by_id["gestures[float32]"].accuracy_drop_vs_float is None
    assert by_id["shapes[int8]"].preprocessing.startswith("x * 0.00392")
    table = (root / "results" / "own-data" / "first" / "results.md").read_text()
    # The data set notes name each declared preprocessing with its fitted constants.
    assert "preprocessing x * 0.00392157 + 0" in table
    assert "the training split's statistics" in table and "preprocessing (x - [0, 0, 1]) / [1, 1, 1]" in table


def test_the_declared_preprocessing_reaches_every_split_once(own_data_run):
    """The data set stage stores the preprocessed splits; standardization from the training split
    leaves it at mean 0 and unit deviation per channel, and the test split is scaled with those
    same constants (not its own)."""
    root, done = own_data_run
    assert done.returncode == 0, done.stderr[-3000:]
    found = 0
    for npz in (root / "cache").rglob("data.npz"):
        with np.load(npz) as data:
            declared = json.loads(str(data["preprocessing"]))
            if "training split" not in str(data["preprocessing_text"]):
                continue
            found += 1
            x_train, x_test = data["x_train"], data["x_test"]
        channels = x_train.reshape(-1, x_train.shape[-1])
        np.testing.assert_allclose(channels.mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(channels.std(axis=0), 1.0, atol=1e-3)
        assert len(declared["mean"]) == x_train.shape[-1] == 3
        # The test split went through the training split's constants: its own statistics differ.
        assert not np.allclose(x_test.reshape(-1, 3).mean(axis=0), 0.0, atol=1e-6)
    assert found == 1


OWN_MODEL = """\
suite: own-model
defaults:
  training: {epochs: 3, batch_size: 16, learning_rate: 0.003, seed: 0}
  eval_samples: 30
models:
  - name: as_given
    keras: data/model.keras
    dataset: {name: npz, options: {path: data/arrays.npz}}
    variants: [{quantization: int8, calibration_samples: 40}]
  - name: from_h5
    keras: data/model.h5
    dataset: {name: npz, options: {path: data/arrays.npz}}
    variants: [{quantization: int8, calibration_samples: 40}]
  - name: wrong_classes
    keras: data/model.keras
    dataset:
      name: image_folder
      options: {path: data/images, image_size: 16}
"""


def test_a_users_keras_model_is_evaluated_quantized_and_run_as_given(tmp_path):
    """The user's own trained model (a .keras and an .h5 file the test trains and saves), through
    the whole pipeline: float accuracy recorded without training, int8 built from it, and a data
    set of another shape refused with both shapes named."""
    import tf_keras as keras

    folder = tmp_path / "suites"
    write_example_data(folder / "data")
    with np.load(folder / "data" / "arrays.npz") as arrays:
        x, y, x_test, y_test = arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=20, verbose=0)
    expected_accuracy = float((model.predict(x_test, verbose=0).argmax(axis=1) == y_test).mean())
    model.save(folder / "data" / "model.keras")
    model.save(folder / "data" / "model.h5")
    suite = folder / "own-model.yaml"
    suite.write_text(OWN_MODEL)
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), f"--results-dir={tmp_path / 'r'}",
                           f"--cache-dir={tmp_path / 'c'}", "--run-id=k"], cwd=REPO, capture_output=True, text=True,
                          timeout=1200, check=False)
    _, rows = read_results(tmp_path / "r" / "own-model" / "k")
    by_id = {row.case_id: row for row in rows}
    given = by_id["as_given[int8]"]
    assert given.status == "passed", (given.error, done.stderr[-2000:])
    assert given.source == f"keras:{(folder / 'data' / 'model.keras').resolve()}"
    # Recorded on the data set's test split without training it: the model as the user saved it.
    assert given.float_accuracy == pytest.approx(expected_accuracy)
    assert given.accuracy_drop_vs_float is not None
    # The same model from its .h5 file: the same float accuracy. (Fine-tuning, `train: true`, is
    # tested at the model stage: tests/test_quantize.py.)
    assert by_id["from_h5[int8]"].status == "passed" and by_id["from_h5[int8]"].float_accuracy == given.float_accuracy
    wrong = by_id["wrong_classes[int8]"]
    assert wrong.status == "error"
    assert "[16, 16, 1]" in wrong.error and "[128]" in wrong.error, wrong.error
    log = (tmp_path / "r" / "logs" / "k.log").read_text()
    assert "evaluating as_given" in log and "evaluating from_h5" in log and "training as_given" not in log
