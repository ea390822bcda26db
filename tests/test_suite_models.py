"""Suite validation of where models come from (`layers:`, `keras:`), declared preprocessing and the
quantization settings of variants: each mistake is one line with file:line."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from harness.errors import SuiteError
from harness.suite import load_suite


def _suite(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(dedent(text))
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _suite(tmp_path, text)
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    line = caught.value.one_line()
    assert "\n" not in line
    return line


LAYERS = """\
models:
  - name: my_cnn
    layers:
      - Conv2D: {filters: 8, kernel_size: 3, activation: relu}
      - MaxPooling2D: {pool_size: 2}
      - Flatten: {}
      - Dense: {units: 32, activation: relu}
      - Dense: {units: 3, activation: softmax}
    dataset: {name: keywords}
"""


def test_layers_become_layer_specs_with_their_lines(tmp_path):
    suite = load_suite(_suite(tmp_path, LAYERS))
    model = suite.models[0]
    assert [(spec.class_name, spec.line) for spec in model.layers] == [
        ("Conv2D", 4), ("MaxPooling2D", 5), ("Flatten", 6), ("Dense", 7), ("Dense", 8)]
    assert model.layers[0].config == {"filters": 8, "kernel_size": 3, "activation": "relu"}
    assert model.source().kind == "layers" and model.architecture is None
    assert [case.id for case in suite.cases()] == ["my_cnn[int8]", "my_cnn[float32]"]


def test_a_layer_tflm_cannot_run_names_its_line_and_what_to_use_instead(tmp_path):
    line = _error(tmp_path, LAYERS.replace("      - Flatten: {}", "      - LayerNormalization: {}"))
    assert line.startswith(f"{tmp_path / 'suite.yaml'}:6:"), line
    assert "LayerNormalization" in line and "BatchNormalization" in line


@pytest.mark.parametrize("item, expected", [
    ("- Lambda: {function: 'lambda x: x'}", "Lambda"),
    ("- Conv2D: {filters: 8, kernel_size: 3, activation: gelu}", "gelu"),
    ("- Dense: 3", "must be a mapping"),
    ("- {Dense: {units: 3}, Flatten: {}}", "one Keras layer class"),
    ("- NoSuchLayer: {}", "NoSuchLayer"),
])
def test_layer_mistakes_are_refused_at_load(tmp_path, item, expected):
    line = _error(tmp_path, LAYERS.replace("- MaxPooling2D: {pool_size: 2}", item))
    assert "suite.yaml:5:" in line and expected in line, line


def test_exactly_one_model_source(tmp_path):
    line = _error(tmp_path, LAYERS.replace("    dataset:", "    architecture: keyword_cnn\n    dataset:"))
    assert "exactly one of 'architecture'" in line and "found architecture and layers" in line
    line = _error(tmp_path, "models:\n  - name: m\n    dataset: {name: keywords}\n")
    assert "found none" in line


def test_a_keras_model_is_checked_at_load(tmp_path):
    base = "models:\n  - name: mine\n    keras: {path}\n    dataset: {{name: keywords}}\n"
    assert "not found" in _error(tmp_path, base.format(path="missing.keras"))
    (tmp_path / "model.txt").write_text("x")
    assert "suffix '.txt'" in _error(tmp_path, base.format(path="model.txt"))
    (tmp_path / "saved").mkdir()
    assert "without saved_model.pb" in _error(tmp_path, base.format(path="saved"))
    assert "leads out of" in _error(tmp_path, base.format(path="../elsewhere.keras"))
    (tmp_path / "model.keras").write_bytes(b"PK")
    suite = load_suite(_suite(tmp_path, base.format(path="model.keras")))
    assert suite.models[0].source().kind == "keras" and not suite.models[0].fine_tune
    assert suite.models[0].keras == (tmp_path / "model.keras").resolve()
    tuned = base.format(path="model.keras") + "    train: true\n    training: {epochs: 2}\n"
    assert load_suite(_suite(tmp_path, tuned)).models[0].fine_tune
    silent = base.format(path="model.keras") + "    training: {epochs: 2}\n"
    assert "only with `train: true`" in _error(tmp_path, silent)
    assert "'train' applies to 'keras' models" in _error(tmp_path, LAYERS + "    train: true\n")
    assert "missing field 'dataset'" in _error(tmp_path, "models:\n  - name: mine\n    keras: model.keras\n")


def _variants(tmp_path: Path, variants: str) -> Path:
    items = "".join(f"      {line}\n" for line in dedent(variants).splitlines())
    return _suite(tmp_path, LAYERS + "    variants:\n" + items)


def test_quantization_settings_and_their_default_names(tmp_path):
    path = _variants(tmp_path, """\
        - quantization: int8
          calibration_samples: [50, 500]
          calibration_source: [train, random]
        - {quantization: int8, calibration_source: random}
        - {quantization: int8, per_channel: false}
        - {quantization: int16x8, calibration_samples: 200}
        - {quantization: int8, qat: true}
        - {quantization: float32}
        """)
    variants = {case.variant.name: case.variant for case in load_suite(path).cases()}
    assert list(variants) == ["int8-cal50-train", "int8-cal50-random", "int8-cal500-train", "int8-cal500-random",
                              "int8-random", "int8-per-tensor", "int16x8", "int8-qat", "float32"]
    assert variants["int8-random"].settings().calibration_source == "random"
    assert variants["int8-random"].calibration_samples == 100
    assert variants["int16x8"].settings().calibration_samples == 200
    assert variants["int8-per-tensor"].per_channel is False
    assert variants["int8-qat"].qat and variants["int8-qat"].calibration_source is None
    assert variants["float32"].calibration_source is None


@pytest.mark.parametrize("variant, expected", [
    ("{quantization: int4}", "int8, int16x8, float32"),
    ("{quantization: float32, calibration_source: random}", "applies to integer quantization"),
    ("{quantization: int8, calibration_source: test}", "train or random"),
    ("{quantization: int16x8, per_channel: false}", "per_channel applies to int8"),
    ("{quantization: float32, qat: true}", "qat applies to int8"),
    ("{quantization: int8, qat: true, calibration_source: random}", "calibration_source does not apply"),
    ("{quantization: int8, per_channel: 0}", "per_channel must be bool"),
    ("{quantization: int8, calibration_source: []}", "must not be an empty list"),
])
def test_quantization_setting_mistakes_name_the_field_and_line(tmp_path, variant, expected):
    line = _error(tmp_path, LAYERS + f"    variants:\n      - {variant}\n")
    assert "suite.yaml:11:" in line and expected in line, line


def test_max_accuracy_drop_vs_float_is_a_threshold(tmp_path):
    suite = load_suite(_suite(tmp_path, LAYERS + "    thresholds: {max_accuracy_drop_vs_float: 0.02}\n"))
    assert suite.cases()[0].thresholds.max_accuracy_drop_vs_float == 0.02


def test_preprocessing_is_declared_once_in_the_data_set(tmp_path):
    text = LAYERS.replace("    dataset: {name: keywords}\n", "    dataset:\n      name: keywords\n"
                          "      preprocessing: {method: standardize, mean: [0.5], std: 2}\n")
    spec = load_suite(_suite(tmp_path, text)).models[0].dataset
    assert spec.preprocessing.method == "standardize" and spec.preprocessing.std == (2.0,)
    assert spec.key()["preprocessing"] == spec.preprocessing.to_dict()
    assert "method must be one of" in _error(tmp_path, text.replace("standardize", "whiten"))
    assert "std" in _error(tmp_path, text.replace("std: 2", "std: 0"))
    assert "list of numbers" in _error(tmp_path, text.replace("mean: [0.5]", "mean: [a]"))


def test_a_data_set_path_may_be_a_file_but_must_exist_inside_the_project(tmp_path):
    text = LAYERS.replace("{name: keywords}", "{name: npz, options: {path: data.npz}}")
    assert "not found" in _error(tmp_path, text)
    assert "leads out of" in _error(tmp_path, text.replace("data.npz", "../data.npz"))


def test_moving_a_layers_model_down_the_file_changes_neither_its_cache_key_nor_its_fingerprint(tmp_path):
    """Suite lines are for error messages: a comment added above a model must not retrain it, nor
    make a resumed run redo its rows (seen: the published run retrained three models after a
    comment was added to another model's variants)."""
    from harness.pipeline import BenchSession

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = load_suite(_suite(tmp_path / "a", LAYERS))
    second = load_suite(_suite(tmp_path / "b", "# a comment\n# another\n" + LAYERS))
    one, other = first.models[0], second.models[0]
    assert [spec.line for spec in one.layers] != [spec.line for spec in other.layers]
    assert one.source().key() == other.source().key()
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results") as session:
        prints = [session.case_fingerprint(suite.cases()[0])["parts"]["suite"] for suite in (first, second)]
    assert prints[0] == prints[1]


DEVICE = """\
models:
  - name: digits_mlp
    layers:
      - Flatten: {}
      - Dense: {units: 10, activation: softmax}
    dataset:
      name: digits
      preprocessing: {method: standardize, from_train: true}
      device_preprocessing: {method: scale, scale: 0.00392156862745098}
"""


def test_device_preprocessing_is_read_but_leaves_the_training_key_alone(tmp_path):
    import numpy as np

    model = load_suite(_suite(tmp_path, DEVICE)).models[0]
    (tmp_path / "plain").mkdir()
    plain = load_suite(_suite(tmp_path / "plain", DEVICE.replace(
        "      device_preprocessing: {method: scale, scale: 0.00392156862745098}\n", ""))).models[0]
    assert model.dataset.device_preprocessing.method == "scale"
    assert plain.dataset.device_preprocessing is None
    # Training and calibration never see the device's preprocessing: same data set, same model.
    assert model.dataset.key() == plain.dataset.key() and model.source().key() == plain.source().key()
    assert np.isclose(model.dataset.device_preprocessing.scale, 1 / 255)


def test_a_wrong_device_preprocessing_names_its_line(tmp_path):
    line = _error(tmp_path, DEVICE.replace("{method: scale, scale: 0.00392156862745098}", "{method: divide}"))
    assert line.startswith(f"{tmp_path / 'suite.yaml'}:9:"), line
    assert "device_preprocessing.method" in line and "divide" in line


def test_device_inputs_are_the_raw_values_through_the_devices_own_preprocessing():
    import numpy as np

    from harness.datasets.preprocessing import Preprocessing
    from harness.stages import device_inputs

    rng = np.random.default_rng(0)
    raw_train, raw_test = rng.uniform(0, 16, (50, 8, 8, 1)), rng.uniform(0, 16, (5, 8, 8, 1))
    training = Preprocessing("standardize", from_train=True).fitted(raw_train)
    x_train, x_test = training.apply(raw_train), training.apply(raw_test)
    article = device_inputs(Preprocessing("scale", scale=1 / 255), training, x_train, x_test)
    assert np.allclose(article, raw_test / 255, atol=1e-6)
    # A device that standardizes with the training statistics gives back training's own inputs.
    same = device_inputs(Preprocessing("standardize", from_train=True), training, x_train, x_test)
    assert np.allclose(same, x_test, atol=1e-4)
