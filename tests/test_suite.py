"""Suite files: the seed suite, matrix expansion, profiles, and one-line errors with file:line."""

from __future__ import annotations

import os
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


def test_seed_suite_has_the_five_architectures_and_the_articles_quantization_claims():
    suite = load_suite(REPO / "suites" / "seed.yaml")
    assert [m.name for m in suite.models] == ["keyword_cnn", "anomaly_cnn1d", "mobilenet_v2", "lstm", "ds_cnn"]
    # The article's code as layers, where Keras allows; MobileNetV2 stays a zoo entry.
    assert [m.source().kind for m in suite.models] == ["layers", "layers", "zoo", "layers", "layers"]
    assert [layer.class_name for layer in suite.models[0].layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dropout", "Dense"]
    ids = [case.id for case in suite.cases() if case.model.name == "keyword_cnn"]
    assert ids == ["keyword_cnn[int8-cal50-train]", "keyword_cnn[int8-cal500-train]", "keyword_cnn[int8-cal50-random]",
                   "keyword_cnn[int8-cal500-random]", "keyword_cnn[int8-per-tensor]", "keyword_cnn[int16x8]",
                   "keyword_cnn[int8-qat]", "keyword_cnn[float32]"]
    settings = {case.variant.name: case.variant.settings() for case in suite.cases() if case.model.name == "keyword_cnn"}
    assert settings["int8-cal50-random"].calibration_source == "random"
    assert settings["int8-cal500-random"].calibration_samples == 500
    assert not settings["int8-per-tensor"].per_channel and settings["int8-qat"].qat
    assert settings["int16x8"].quantization == "int16x8" and settings["int16x8"].calibration_samples == 100


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
    (MINIMAL + "    variants:\n      - quantization: int4\n", 7, "quantization must be one of int8, int16x8, float32"),
    (MINIMAL + "    variants:\n      - quantization: float32\n        calibration_samples: 10\n", 8,
     "calibration_samples applies to integer quantization (int8, int16x8), not to float32"),
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


# --- a suite is untrusted input: names and paths ------------------------------------------------

SINE_SUITE = "models:\n  - name: sine\n    tflite: {tflite}\n"


def _project(tmp_path: Path, sine_model: Path) -> Path:
    """A checkout: suites/ next to models/ (the project root is tmp_path/project)."""
    project = tmp_path / "project"
    (project / "suites").mkdir(parents=True)
    (project / "models").mkdir()
    (project / "models" / "sine.tflite").write_bytes(sine_model.read_bytes())
    return project


@pytest.mark.parametrize("text, line, what, shown", [
    ("suite: ../../../../tmp/x\n" + MINIMAL[len("suite: tiny\n"):], 1, "suite name", "'../../../../tmp/x'"),
    ("suite: a/b\n" + MINIMAL[len("suite: tiny\n"):], 1, "suite name", "'a/b'"),
    ("suite: ..\n" + MINIMAL[len("suite: tiny\n"):], 1, "suite name", "'..'"),
    ('suite: ""\n' + MINIMAL[len("suite: tiny\n"):], 1, "suite name", "''"),
    ('models:\n  - name: "kws\\n#error injected"\n    architecture: keyword_cnn\n    dataset: {name: keywords}\n',
     2, "model name", r"'kws\n#error injected'"),
    ('models:\n  - name: "kws */ x"\n    architecture: keyword_cnn\n    dataset: {name: keywords}\n',
     2, "model name", "'kws */ x'"),
    ("models:\n  - name: .hidden\n    architecture: keyword_cnn\n    dataset: {name: keywords}\n",
     2, "model name", "'.hidden'"),
    (MINIMAL + "    variants:\n      - name: ../../x\n        quantization: int8\n", 7,
     "variants[0].name", "'../../x'"),
    (MINIMAL + '    variants:\n      - name: "int8\\"]; bad"\n        quantization: int8\n', 7,
     "variants[0].name", "'int8\"]; bad'"),
])
def test_names_outside_the_safe_set_are_refused_with_their_line(tmp_path, text, line, what, shown):
    message = _error(text, tmp_path)
    assert message.startswith(f"{tmp_path / 'suite.yaml'}:{line}: "), message
    assert f"{what} {shown} is not allowed" in message, message
    assert "letters, digits, '_', '-' and '.'" in message


def test_the_file_name_is_checked_when_it_names_the_suite(tmp_path):
    path = tmp_path / "my suite.yaml"
    path.write_text(MINIMAL[len("suite: tiny\n"):])
    with pytest.raises(SuiteError, match=r"suite name \(the file's name; set `suite:` to choose another\) "
                                         r"'my suite' is not allowed"):
        load_suite(path)
    path.write_text(MINIMAL.replace("suite: tiny", "suite: my-suite_v1.2"))
    assert load_suite(path).name == "my-suite_v1.2"


def test_is_safe_name_is_the_rule_validation_applies():
    from harness.suite import is_safe_name

    assert all(is_safe_name(n) for n in ("seed", "kws_ref-v1.2", "A", "x" * 64, "20261201-165251-7e79"))
    assert not any(is_safe_name(n) for n in ("", ".", "..", "a/b", "a\\b", "kws\n", "a b", "x" * 65, "-x", "é"))


def test_names_in_the_safe_set_pass(tmp_path):
    suite = _parse(MINIMAL.replace("name: kws", "name: KWS_ref-v1.2") + "    variants:\n"
                   "      - {name: int8_fast-1, quantization: int8}\n", tmp_path)
    assert [case.id for case in suite.cases()] == ["KWS_ref-v1.2[int8_fast-1]"]


def test_project_root_is_the_parent_of_the_suites_folder(tmp_path):
    from harness.suite import project_root

    nested = tmp_path / "repo" / "suites" / "audio" / "kws.yaml"
    assert project_root(nested) == (tmp_path / "repo").resolve()
    assert project_root(tmp_path / "elsewhere" / "kws.yaml") == (tmp_path / "elsewhere").resolve()


def _tflite_error(suite_dir: Path, tflite: str) -> str:
    return _error(SINE_SUITE.format(tflite=tflite), suite_dir)


NOT_TFLITE = "is not a TFLite model: expected file identifier b'TFL3' at offset 4"


@pytest.mark.parametrize("content, found", [(b"", "found b'' (0 bytes)"),
                                            (b"this is certainly not a flatbuffer\n", "found b' is '")])
def test_a_tflite_file_that_is_no_model_is_refused_with_inspects_message(tmp_path, sine_model, content, found):
    project = _project(tmp_path, sine_model)
    (project / "models" / "bad.tflite").write_bytes(content)
    message = _tflite_error(project / "suites", "../models/bad.tflite")
    assert message.startswith(f"{project / 'suites' / 'suite.yaml'}:3: model 'sine': tflite file ../models/bad.tflite")
    assert NOT_TFLITE in message and found in message, message


def test_a_truncated_tflite_model_is_refused_at_validation(tmp_path, sine_model):
    project = _project(tmp_path, sine_model)
    (project / "models" / "cut.tflite").write_bytes(sine_model.read_bytes()[:300])
    message = _tflite_error(project / "suites", "../models/cut.tflite")
    assert ":3: model 'sine': tflite file ../models/cut.tflite" in message
    assert "is not a valid TFLite model (300 bytes)" in message and "unpack" not in message, message


def test_an_absolute_tflite_path_is_the_users_choice_but_must_be_a_model(tmp_path, sine_model):
    project = _project(tmp_path, sine_model)
    suite = _parse(SINE_SUITE.format(tflite=sine_model), project / "suites")
    assert suite.models[0].tflite == sine_model.resolve()
    message = _tflite_error(project / "suites", "/etc/passwd")
    assert ":3: model 'sine': tflite file /etc/passwd " + NOT_TFLITE in message, message


def test_a_relative_tflite_path_may_not_leave_the_project(tmp_path, sine_model):
    project = _project(tmp_path, sine_model)
    outside = tmp_path / "outside.tflite"
    outside.write_bytes(sine_model.read_bytes())  # a valid model: only where it is matters
    for raw in ("../../../../etc/passwd", "../../outside.tflite"):
        message = _tflite_error(project / "suites", raw)
        assert f":3: model 'sine': tflite {raw} leads out of the suite's project {project.resolve()}" in message
    # A link inside the project that points out leaves it as well.
    (project / "models" / "link.tflite").symlink_to(outside)
    assert "leads out of the suite's project" in _tflite_error(project / "suites", "../models/link.tflite")
    (project / "models" / "loop.tflite").symlink_to("loop.tflite")
    assert "tflite ../models/loop.tflite cannot be resolved" in _tflite_error(project / "suites", "../models/loop.tflite")
    # Without a suites folder, the suite's own folder is the project.
    (tmp_path / "loose").mkdir()
    assert "leads out of the suite's project" in _tflite_error(tmp_path / "loose", "../outside.tflite")


@pytest.mark.parametrize("make, kind", [(lambda p: p.mkdir(), "is a directory"),
                                        (lambda p: os.mkfifo(p), "is not a regular file")])
def test_a_tflite_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, sine_model, make, kind):
    project = _project(tmp_path, sine_model)
    make(project / "models" / "odd.tflite")
    message = _tflite_error(project / "suites", "../models/odd.tflite")  # a FIFO must not block the read
    assert f":3: model 'sine': tflite file ../models/odd.tflite {kind}" in message and "not found" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_tflite_file_is_refused(tmp_path, sine_model):
    project = _project(tmp_path, sine_model)
    (project / "models" / "sine.tflite").chmod(0)
    assert "cannot read tflite file ../models/sine.tflite" in _tflite_error(project / "suites", "../models/sine.tflite")


def _speech_suite(path: str) -> str:
    return ("models:\n  - name: kws\n    architecture: keyword_cnn\n    dataset:\n      name: keywords\n"
            f"      options: {{source: speech_commands, path: {path}}}\n")


def test_a_data_set_path_may_not_leave_the_project_and_its_error_lists_nothing(tmp_path, sine_model):
    project = _project(tmp_path, sine_model)
    (project / "data" / "sc").mkdir(parents=True)
    (tmp_path / "elsewhere" / "sc").mkdir(parents=True)
    (tmp_path / "elsewhere" / "private_notes").mkdir()
    suite = _parse(_speech_suite("../data/sc"), project / "suites")
    assert suite.models[0].dataset.options["path"] == "../data/sc"
    message = _error(_speech_suite("../../elsewhere"), project / "suites")
    assert message.startswith(f"{project / 'suites' / 'suite.yaml'}:6: model 'kws'.dataset.options: path "
                              f"../../elsewhere leads out of the suite's project"), message
    assert "private_notes" not in message
    # An absolute directory is the user's explicit choice.
    assert _parse(_speech_suite(tmp_path / "elsewhere" / "sc"), project / "suites").models[0].dataset
    missing = _error(_speech_suite("../data/nope"), project / "suites")
    assert ":6: model 'kws'.dataset.options: path ../data/nope not found" in missing


def test_tinyhil_validate_gives_the_clear_message_for_a_bad_model(tmp_path, sine_model):
    import subprocess
    import sys

    project = _project(tmp_path, sine_model)
    (project / "models" / "empty.tflite").write_bytes(b"")
    (project / "suites" / "bad.yaml").write_text(SINE_SUITE.format(tflite="../models/empty.tflite"))
    (project / "suites" / "good.yaml").write_text(SINE_SUITE.format(tflite="../models/sine.tflite"))
    done = subprocess.run([sys.executable, "-m", "harness.cli", "validate", "suites/bad.yaml", "suites/good.yaml"],
                          cwd=project, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert done.stderr.strip() == (f"error: suites/bad.yaml:3: model 'sine': tflite file ../models/empty.tflite "
                                   f"(resolved to {(project / 'models' / 'empty.tflite').resolve()}) "
                                   f"{NOT_TFLITE}, found b'' (0 bytes)"), done.stderr
    assert "suites/good.yaml: suite 'good', 1 cases: sine[as-is]" in done.stdout
