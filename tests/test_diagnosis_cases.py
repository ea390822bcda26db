"""The seed article's failure modes, each planted in a suite and run through the whole pipeline on
the virtual board: the row, results.md, `tinyhil explain` and pytest's failure message name the
failure with its evidence (docs/diagnosis.md quotes these outputs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.pipeline import BenchSession
from harness.report import CaseResult
from harness.suite import load_suite

from conftest import run_pytest

REPO = Path(__file__).resolve().parents[1]

# Small Keras models on scikit-learn's digits (8x8 grey), so that training takes seconds: the
# planted mistakes are the seed article's, not the models'.
TRAINED = """\
suite: planted
board: {emulate_link: false}
defaults:
  training: {epochs: 12, batch_size: 32, learning_rate: 0.003, seed: 0}
  eval_samples: 120
  thresholds: {min_output_agreement: 0.98, agreement_tolerance_lsb: 1}
models:
  # The seed article's device: `x / 255` on the sensor values, while training standardized them.
  - name: article_device
    layers:
      - Flatten: {}
      - Dense: {units: 32, activation: relu}
      - Dense: {units: 10, activation: softmax}
    dataset:
      name: digits
      options: {image_size: 8, channels: 1}
      preprocessing: {method: standardize, from_train: true}
      device_preprocessing: {method: scale, scale: 0.00392156862745098}
    thresholds: {min_int8_accuracy: 0.8}
    variants: [{quantization: int8}]
  # Pixel values 0..255 calibrated on standard-normal noise (the seed article's np.random.randn)
  # against calibration on training images, 20 and 200 of each.
  - name: random_calibration
    layers:
      - Flatten: {}
      - Dense: {units: 32, activation: relu}
      - Dense: {units: 10, activation: softmax}
    dataset:
      name: digits
      options: {image_size: 8, channels: 1}
      preprocessing: {method: scale, scale: 255}
    variants:
      - {quantization: int8, calibration_source: random, calibration_samples: [20, 200],
         thresholds: {min_int8_accuracy: 0.5}}
      - {quantization: int8, calibration_source: train, calibration_samples: [20, 200]}
  # A layer Keras trains but TFLite has no builtin for.
  - name: bicubic
    layers:
      - UpSampling2D: {size: 2, interpolation: bicubic}
      - Conv2D: {filters: 4, kernel_size: 3, activation: relu}
      - Flatten: {}
      - Dense: {units: 10, activation: softmax}
    dataset: {name: digits, options: {image_size: 8, channels: 1}}
    training: {epochs: 1}
    variants: [{quantization: int8}]
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    suite = root / "planted.yaml"
    suite.write_text(TRAINED)
    with BenchSession(cache_dir=root / "cache", results_dir=root / "results", run_id="r", progress=False) as session:
        cases = load_suite(suite).cases()
        session.plan(cases)
        rows = {row.case_id: row for row in (session.run_case(case) for case in cases)}
    return root, rows


def _kinds(row: CaseResult) -> list[str]:
    return [diagnosis["kind"] for diagnosis in row.diagnoses]


def _text(row: CaseResult) -> str:
    return "\n".join(f"{d['title']}: {' | '.join(d['evidence'])} -> {d['suggestion']}" for d in row.diagnoses)


def test_inputs_scaled_as_the_articles_device_are_diagnosed_as_a_preprocessing_mismatch(planted):
    _, rows = planted
    row = rows["article_device[int8]"]
    assert row.device_preprocessing.startswith("x * 0.00392"), row.device_preprocessing
    assert row.board_accuracy is not None and row.board_accuracy < 0.5, row.board_accuracy
    assert "preprocessing" in _kinds(row), _text(row)
    diagnosis = next(d for d in row.diagnoses if d["kind"] == "preprocessing")
    evidence = " ".join(diagnosis["evidence"])
    # The numbers a user acts on: the eval inputs' range against what the input quantization
    # represents and against the training inputs.
    assert "the input quantization represents" in evidence and "of its 256 steps" in evidence, evidence
    assert "training inputs: range [" in evidence and "x narrower" in evidence, evidence
    # The drop is the preprocessing's: calibration is not blamed for it.
    assert "calibration" not in _kinds(row), _text(row)
    assert "preprocessing" in diagnosis["suggestion"], diagnosis


def test_random_calibration_is_diagnosed_with_per_layer_error_and_the_verdict(planted):
    root, rows = planted
    random_rows = [rows[f"random_calibration[int8-cal{n}-random]"] for n in (20, 200)]
    trained = [rows[f"random_calibration[int8-cal{n}-train]"] for n in (20, 200)]
    for row in random_rows:
        assert row.accuracy_drop_vs_float > 0.02, (row.case_id, row.accuracy_drop_vs_float)
        assert "calibration" in _kinds(row), _text(row)
        # QuantizationDebugger's per-layer statistics, one per operator with weights or activations.
        assert {e["op_name"] for e in row.quantization_errors} >= {"FULLY_CONNECTED"}, row.quantization_errors
        diagnosis = next(d for d in row.diagnoses if d["kind"] == "calibration")
        assert any(line.startswith("loses most: op ") for line in diagnosis["evidence"]), diagnosis
        # The loss the debugger cannot see: noise-calibrated input quantization clips pixel values.
        assert any("the training inputs span [0, 255]" in line and "clip at -128 or 127" in line
                   for line in diagnosis["evidence"]), diagnosis
        assert "calibration_source: train" in diagnosis["suggestion"]
    # The second N of the matrix has the first beside it: the verdict is in its diagnosis.
    second = next(d for d in random_rows[1].diagnoses if d["kind"] == "calibration")
    assert any(line.startswith("calibration verdict: ") for line in second["evidence"]), second
    for row in trained:
        assert "calibration" not in _kinds(row), _text(row)
    markdown = (root / "results" / "planted" / "r" / "results.md").read_text()
    assert "## Calibration" in markdown and "random_calibration (train calibration)" in markdown


def test_a_layer_without_a_tflite_builtin_is_named_with_its_suite_line(planted):
    root, rows = planted
    row = rows["bicubic[int8]"]
    assert row.status == "error"
    assert _kinds(row) == ["unsupported-op"], _text(row)
    diagnosis = row.diagnoses[0]
    evidence = " ".join(diagnosis["evidence"])
    assert "ResizeBicubic" in evidence and "up_sampling2d" in evidence, evidence
    assert f"{root / 'planted.yaml'}:" in evidence and "UpSampling2D" in evidence, evidence


def test_explain_prints_a_runs_diagnoses_and_refuses_an_unknown_case(planted):
    root, _ = planted
    run_dir = root / "results" / "planted" / "r"
    shown = subprocess.run([sys.executable, "-m", "harness.cli", "explain", str(run_dir), "article_device[int8]"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("article_device[int8] (planted): failed")
    assert "Preprocessing differs between training and the board" in shown.stdout
    unknown = subprocess.run([sys.executable, "-m", "harness.cli", "explain", str(run_dir), "nope[int8]"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "no case 'nope[int8]'" in unknown.stdout


# --- on the board: a corrupted operator, an arena too small, slow settings -----------------------

def _run(tmp_path: Path, text: str, **session) -> list[CaseResult]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="r", progress=False,
                      **session) as bench:
        return [bench.run_case(case) for case in load_suite(suite).cases()]


@pytest.mark.parametrize("op", [3, 9])
def test_a_corrupted_operator_is_found_as_the_first_to_diverge(tmp_path, shared_dir, op):
    model = shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
    (row,) = _run(tmp_path, f"""\
board: {{emulate_link: false, faults: {{corrupt_op: {op}}}}}
models:
  - name: kws
    tflite: {model}
    eval_samples: 8
    thresholds: {{min_output_agreement: 0.98}}
""")
    assert row.status == "failed" and row.output_agreement < 0.98, (row.status, row.error, row.output_agreement)
    assert row.divergence is not None
    first = row.divergence["first_vs_tflm"]
    assert first["op_index"] == op, row.divergence["text"]
    # Every operator before it is bit-exact with host TFLM on the board.
    assert all(layer["vs_tflm_max_lsb"] == 0 for layer in row.divergence["layers"] if layer["op_index"] < op)
    assert _kinds(row)[0] == "divergence" and f"op {op} " in row.diagnoses[0]["title"]


def test_a_clean_board_is_read_on_demand_and_every_operator_agrees(tmp_path, shared_dir):
    model = shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
    (row,) = _run(tmp_path, f"""\
board: {{emulate_link: false}}
models:
  - name: kws
    tflite: {model}
    eval_samples: 4
""", diagnose="all")
    assert row.status == "passed" and row.divergence is not None
    assert row.divergence["first_vs_tflm"] is None and "divergence" not in _kinds(row)
    assert len(row.divergence["layers"]) >= 13 and all(l["vs_tflm_max_lsb"] == 0 for l in row.divergence["layers"])


def test_pytest_ends_a_failed_items_message_with_its_diagnosis(tmp_path, shared_dir):
    model = shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "corrupt.yaml").write_text(f"""\
board: {{emulate_link: false, faults: {{corrupt_op: 3}}}}
models:
  - name: kws
    tflite: {model}
    eval_samples: 4
    thresholds: {{min_output_agreement: 0.98}}
""")
    result = run_pytest(str(suites), f"--results-dir={tmp_path / 'results'}", f"--cache-dir={tmp_path / 'cache'}",
                        cwd=REPO)
    assert result.returncode == 1, result.stdout[-2000:]
    failure = next(line for line in result.stdout.splitlines() if "kws[as-is]" in line and "diagnosis:" in line)
    assert failure.rstrip().split(" -- diagnosis: ")[1].startswith("The board's outputs first diverge at op 3"), failure


def test_an_arena_sized_as_a_sketch_too_small_is_diagnosed_with_the_bytes_needed(tmp_path, shared_dir):
    model = shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
    # The seed article's `constexpr int kTensorArenaSize = 10 * 1024;` for a model that needs 24 KB.
    (row,) = _run(tmp_path, f"""\
board: {{emulate_link: false}}
models:
  - name: kws
    tflite: {model}
    arena_kb: 10
    eval_samples: 4
""")
    assert row.status == "error" and "ARENA_ALLOCATION_FAILED" in row.error, row.error
    assert _kinds(row) == ["arena"], _text(row)
    evidence = " ".join(row.diagnoses[0]["evidence"])
    assert "needs 24,272 bytes" in evidence and "the firmware gave 10,240 bytes" in evidence, evidence
    assert "it fits internal SRAM" in evidence
    assert row.diagnoses[0]["suggestion"].startswith("raise the suite's `arena_kb: 10` to at least 29"), row.diagnoses


def _with_op(model: Path, out: Path, old: str, new: str) -> Path:
    """`model` with every operator of one kind turned into another: an op the firmware lacks."""
    import flatbuffers
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model.read_bytes(), 0))
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    codes = [code for code in tree.operatorCodes if names[max(code.builtinCode, code.deprecatedBuiltinCode)] == old]
    assert codes, f"{model.name} has no {old}"
    for code in codes:
        code.builtinCode = getattr(schema.BuiltinOperator, new)
        code.deprecatedBuiltinCode = schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES
    builder = flatbuffers.Builder(len(model.read_bytes()) + 4096)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    out.write_bytes(bytes(builder.Output()))
    return out


def test_an_op_the_firmware_has_no_kernel_for_is_named_with_the_alternative(tmp_path, shared_dir):
    model = _with_op(shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite", tmp_path / "gelu.tflite",
                     "SOFTMAX", "GELU")
    (row,) = _run(tmp_path, f"""\
board: {{emulate_link: false}}
models:
  - name: kws_gelu
    tflite: {model}
    eval_samples: 4
""")
    assert row.status == "error" and "GELU" in row.error, row.error
    assert _kinds(row) == ["unsupported-op"], _text(row)
    diagnosis = row.diagnoses[0]
    assert "operator 12 of the main graph is GELU" in " ".join(diagnosis["evidence"]), diagnosis
    assert "relu" in diagnosis["suggestion"], diagnosis


def test_slow_settings_are_each_named_with_the_estimate_they_cost(tmp_path, shared_dir):
    model = shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
    suite = f"""\
board: {{emulate_link: false, BOARD}}
models:
  - name: kws
    tflite: {model}
    eval_samples: 4
"""
    (reference,) = _run(tmp_path / "reference", suite.replace("BOARD", "esp_nn: false"))
    assert reference.status == "passed" and _kinds(reference) == ["slow"], _text(reference)
    evidence = reference.diagnoses[0]["evidence"]
    assert evidence[0].startswith("the firmware is built without esp-nn") and "with esp-nn the cost model estimates" in \
        evidence[0], evidence
    assert "`board.esp_nn: true`" in reference.diagnoses[0]["suggestion"]
    # kws's 29 KiB arena stays in the data cache wherever it is; person_detect's 96 KiB does not.
    person = shared_dir / "models" / "tflm-examples" / "person_detect.tflite"
    (psram,) = _run(tmp_path / "psram", suite.replace("BOARD", "arena: psram").replace(str(model), str(person)))
    assert _kinds(psram) == ["slow"], _text(psram)
    line = next(line for line in psram.diagnoses[0]["evidence"] if "PSRAM" in line)
    assert line.startswith(f"the {psram.arena_size / 1024:.1f} KiB arena is in PSRAM though internal SRAM"), line
    assert "in SRAM the cost model estimates" in line and "`board.arena: auto` or `sram`" in psram.diagnoses[0]["suggestion"]


def test_the_next_case_runs_its_own_firmware_after_a_diagnosis_read_the_debug_build(tmp_path, shared_dir):
    model = shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
    first, second = _run(tmp_path, f"""\
board: {{emulate_link: false}}
models:
  - name: kws
    tflite: {model}
    eval_samples: 4
  - name: kws_again
    tflite: {model}
    eval_samples: 4
""", diagnose="all")
    assert first.divergence is not None and second.divergence is not None
    # The debug build's arena is 100,352 bytes; each row reports the arena its own (normal) run had.
    assert first.arena_size == second.arena_size == 29_696, (first.arena_size, second.arena_size)
    assert second.status == "passed" and second.host_tflm_exact_match == 1.0 and second.retries == 0


def test_a_diagnosis_that_cannot_be_made_leaves_the_row_as_it_was(tmp_path, shared_dir, monkeypatch):
    """Stands in for a board or a disk that fails while the debug firmware is prepared: that is
    the diagnosis's failure, reported as such, never the case's."""
    import harness.diagnose

    def unavailable(image):
        raise OSError("No space left on device")

    monkeypatch.setattr(harness.diagnose, "plan_debug_image", unavailable)
    model = shared_dir / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
    (row,) = _run(tmp_path, f"""\
board: {{emulate_link: false}}
models:
  - name: kws
    tflite: {model}
    eval_samples: 4
""", diagnose="all")
    assert row.status == "passed" and row.divergence is None and not row.error
    incomplete = [d for d in row.diagnoses if d["kind"] == "incomplete"]
    assert incomplete and incomplete[0]["title"].endswith("the board's intermediate tensors could not be read")
    assert incomplete[0]["evidence"] == ["OSError: No space left on device"]
