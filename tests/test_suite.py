"""Suite files: the seed suite, matrix expansion, profiles, and one-line errors with file:line."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from harness.errors import SuiteError
from harness.suite import load_suite, parse_suite

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
suite: tiny
models:
  - name: kws
    architecture: keyword_cnn
    dataset: {name: keywords}
"""


def _parse(text: str, tmp_path: Path, profile: str = "full"):
    path = tmp_path / "suite.yaml"
    path.write_text(dedent(text))
    return load_suite(path, profile)


def _error(text: str, tmp_path: Path) -> str:
    with pytest.raises(SuiteError) as caught:
        _parse(text, tmp_path)
    line = caught.value.one_line()
    assert "\n" not in line
    return line


def test_seed_suite_has_the_five_architectures_and_expands_the_calibration_matrix():
    suite = load_suite(REPO / "suites" / "seed.yaml")
    assert [m.architecture for m in suite.models] == ["keyword_cnn", "anomaly_cnn1d", "mobilenet_v2", "lstm", "ds_cnn"]
    ids = [case.id for case in suite.cases()]
    assert ids[:3] == ["keyword_cnn[int8-cal50]", "keyword_cnn[int8-cal500]", "keyword_cnn[float32]"]
    assert {c.variant.calibration_samples for c in suite.cases() if c.model.name == "keyword_cnn"} == {50, 500, None}
    assert all(case.variant.quantization in ("int8", "float32") for case in suite.cases())


def test_quick_profile_shrinks_training_data_and_evaluation_and_drops_accuracy_limits():
    full = load_suite(REPO / "suites" / "seed.yaml", "full")
    quick = load_suite(REPO / "suites" / "seed.yaml", "quick")
    for f, q in zip(full.models, quick.models):
        assert q.training.epochs == 1 < f.training.epochs
        assert q.eval_samples < f.eval_samples
        assert q.dataset.options["samples_per_class"] == 20
    case = quick.cases()[0]
    assert case.thresholds.min_int8_accuracy is None and full.cases()[0].thresholds.min_int8_accuracy == 0.85
    assert case.thresholds.min_output_agreement == full.cases()[0].thresholds.min_output_agreement


def test_variant_thresholds_override_the_model_and_null_switches_one_off(tmp_path):
    suite = _parse(MINIMAL + """\
    thresholds: {max_latency_ms: 10, min_int8_accuracy: 0.9}
    variants:
      - quantization: int8
      - quantization: float32
        thresholds: {max_latency_ms: null}
""", tmp_path)
    int8, float32 = suite.cases()
    assert int8.thresholds.max_latency_ms == 10 and float32.thresholds.max_latency_ms is None
    assert float32.thresholds.min_int8_accuracy == 0.9
    assert int8.variant.calibration_samples == 100


def test_missing_suite_names_the_path(tmp_path):
    with pytest.raises(SuiteError, match="suite file not found"):
        load_suite(tmp_path / "nope.yaml")


def test_yaml_syntax_error_has_the_line(tmp_path):
    assert _error("suite: x\nmodels: [\n  - a: 1\n  b\n", tmp_path).startswith(f"{tmp_path / 'suite.yaml'}:")


@pytest.mark.parametrize("text, line, fragment", [
    (MINIMAL + "    epochs: 3\n", 6, "unknown field 'epochs' in model 'kws'"),
    (MINIMAL + "    training: {epochs: ten}\n", 6, "model 'kws'.training.epochs must be int, found str"),
    (MINIMAL + "    training: {epochs: true}\n", 6, "epochs must be int, found bool"),
    ("models:\n  - name: kws\n    architecture: keyword_cnn\n", 2, "missing field 'dataset'"),
    ("models:\n  - name: kws\n    architecture: resnet9000\n    dataset: {name: keywords}\n", 3,
     "unknown architecture 'resnet9000'; the zoo has: anomaly_cnn1d"),
    ("models:\n  - name: kws\n    architecture: keyword_cnn\n    params: {filterz: 3}\n    dataset: {name: keywords}\n",
     4, "architecture 'keyword_cnn' has no parameter 'filterz'"),
    ("models:\n  - name: kws\n    architecture: keyword_cnn\n    dataset: {name: imagenet}\n", 4,
     "unknown data set 'imagenet'"),
    ("models:\n  - name: kws\n    architecture: keyword_cnn\n    dataset:\n      name: keywords\n      options: {wordz: x}\n",
     6, "data set 'keywords' has no option 'wordz'"),
    ("models:\n  - name: m\n    tflite: missing.tflite\n", 3, "tflite file missing.tflite not found"),
    (MINIMAL + "  - name: kws\n    architecture: lstm\n    dataset: {name: basic_motions}\n", 6,
     "two models are named 'kws'"),
    (MINIMAL + "    variants:\n      - quantization: int4\n", 7, "quantization must be one of int8, float32"),
    (MINIMAL + "    variants:\n      - quantization: float32\n        calibration_samples: 10\n", 8,
     "calibration_samples applies to int8 quantization only"),
    (MINIMAL + "    variants:\n      - quantization: int8\n        calibration_samples: [10, 0]\n", 8,
     "calibration_samples must be a positive int"),
    ("board: {cpu_mhz: 300}\n" + MINIMAL, 1, "board.cpu_mhz must be 80, 160 or 240"),
    ("suite: a\nsuite: b\nmodels: []\n", 2, "duplicate key 'suite'"),
    ("models: []\n", 1, "models must be a non-empty list"),
])
def test_invalid_suites_fail_with_file_line_and_field(tmp_path, text, line, fragment):
    message = _error(text, tmp_path)
    assert message.startswith(f"{tmp_path / 'suite.yaml'}:{line}: "), message
    assert fragment in message, message


def test_tflite_paths_resolve_relative_to_the_suite(tmp_path, sine_model):
    models = tmp_path / "models"
    models.mkdir()
    (models / "sine.tflite").write_bytes(sine_model.read_bytes())
    suites = tmp_path / "suites"
    suites.mkdir()
    suite = _parse("models:\n  - name: sine\n    tflite: ../models/sine.tflite\n", suites)
    assert suite.models[0].tflite == (models / "sine.tflite").resolve()
    assert [case.id for case in suite.cases()] == ["sine[as-is]"]


def test_yaml_is_safe_loaded():
    with pytest.raises(SuiteError, match="could not determine a constructor|YAML"):
        parse_suite("models: !!python/object/apply:os.system ['true']\n", Path("evil.yaml"))


def test_quick_profile_caps_data_sets_that_default_to_all_their_samples(tmp_path):
    suite = _parse("""\
quick: {samples_per_class: 7}
models:
  - name: motions
    architecture: lstm
    dataset: {name: basic_motions, options: {samples_per_class: 0}}
""", tmp_path, profile="quick")
    assert suite.models[0].dataset.options["samples_per_class"] == 7


def test_esp_nn_version_is_a_board_setting_and_a_variant_matrix(tmp_path):
    suite = _parse(dedent("""\
        suite: s
        board: {esp_nn_version: "1.2.3"}
        models:
          - name: m
            architecture: keyword_cnn
            dataset: {name: keywords}
            variants:
              - quantization: int8
                esp_nn_version: ["1.1.2", "1.2.3"]
              - quantization: float32
        """), tmp_path)
    cases = {case.id: case.esp_nn_version for case in suite.cases()}
    assert cases == {"m[int8-esp-nn1.1.2-cal100]": "1.1.2", "m[int8-esp-nn1.2.3-cal100]": "1.2.3", "m[float32]": "1.2.3"}


@pytest.mark.parametrize("setting", ["board: {esp_nn_version: 1.2}", 'board: {esp_nn_version: "1.2.6"}'])
def test_an_esp_nn_version_without_pinned_sources_is_refused_with_its_line(tmp_path, setting):
    message = _error(f"suite: s\n{setting}\nmodels:\n  - name: m\n    architecture: keyword_cnn\n", tmp_path)
    assert ":2:" in message and "esp_nn_version must be one of 1.1.2, 1.2.3" in message


def test_the_virtual_board_engine_is_a_board_setting(tmp_path):
    suite = _parse(MINIMAL.replace("suite: tiny\n", "suite: tiny\nboard: {engine: python}\n"), tmp_path)
    assert suite.board.virtual.engine == "python"
    message = _error(MINIMAL.replace("suite: tiny\n", "suite: tiny\nboard: {engine: qemu}\n"), tmp_path)
    assert ":2:" in message and "board.engine must be one of auto, native, python" in message
