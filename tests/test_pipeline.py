"""The pipeline end to end: suites through training, int8 conversion, the reference interpreters
and the virtual board, to results files; the pytest plugin and the CLI on top."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flatbuffers
import pytest

from harness.errors import ConversionError
from harness.firmware import MemoryBudget
from harness.isolated import run_worker
from harness.pipeline import BenchSession
from harness.report import CaseResult, esp_nn_disagreements, read_results
from harness.suite import load_suite

from conftest import run_pytest as _pytest

REPO = Path(__file__).resolve().parents[1]
SEED_COLUMNS = ("model_bytes", "arena_bytes", "latency_median_ms", "latency_p90_ms", "float_accuracy",
                "reference_accuracy", "board_accuracy", "exact_match", "output_agreement", "max_abs_diff",
                "top1_agreement", "cosine_similarity", "rmse")


def test_seed_suite_runs_every_architecture_with_every_column_filled(seed_quick_runs):
    root, first, _ = seed_quick_runs
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    metadata, rows = read_results(root / "results" / "seed" / "first")
    assert metadata["board"] == "virtual" and metadata["profile"] == "quick"
    assert {row.model for row in rows} == {"keyword_cnn", "anomaly_cnn1d", "mobilenet_v2", "lstm", "ds_cnn"}
    assert len(rows) == 16
    for row in rows:
        assert row.status == "passed", (row.case_id, row.error, row.violations)
        missing = [column for column in SEED_COLUMNS if getattr(row, column) is None]
        assert not missing, (row.case_id, missing)
        assert row.latency_kind == "estimated"
        assert row.host_tflm_exact_match == 1.0, row.case_id  # the virtual board runs TFLM's own kernels
        assert row.layers and all(layer.cycles > 0 for layer in row.layers)
        assert 0 < row.macs_per_cycle <= 16 and all(0 <= layer.pie_efficiency <= 1 for layer in row.layers)
        assert row.total_macs == sum(layer.macs for layer in row.layers)
    budget = MemoryBudget().sram_arena_budget
    assert all(row.arena_in_psram == (row.arena_size > budget) for row in rows)
    assert next(r for r in rows if r.case_id == "mobilenet_v2[float32]").arena_in_psram
    assert {"UNIDIRECTIONAL_SEQUENCE_LSTM"} <= {l.op for r in rows if r.model == "lstm" for l in r.layers}
    run_dir = root / "results" / "seed" / "first"
    for name in ("results.json", "results.csv", "results.md", "layers.csv"):
        assert (run_dir / name).stat().st_size > 0
    table = (run_dir / "results.md").read_text()
    assert "latency ms (estimated)" in table and "estimated** by the virtual ESP32-S3" in table
    assert "MAC/cycle" in table and "pie_efficiency" in (run_dir / "layers.csv").read_text()
    assert "tinyhil results" in first.stdout and "keyword_cnn" in first.stdout
    junit = (root / "junit.xml").read_text()
    assert 'tests="16"' in junit and "keyword_cnn[int8-cal50-random]" in junit
    by_id = {row.case_id: row for row in rows}
    # The article's quantization claims, each a row: integer rows beside the float model on the
    # same samples, the calibration and weight settings recorded.
    assert all(row.accuracy_drop_vs_float is not None for row in rows if row.quantization in ("int8", "int16x8"))
    assert all(row.accuracy_drop_vs_float is None for row in rows if row.quantization == "float32")
    assert by_id["keyword_cnn[int8-cal500-random]"].calibration_source == "random"
    assert by_id["keyword_cnn[int8-per-tensor]"].per_channel is False and by_id["keyword_cnn[int8-qat]"].qat
    assert by_id["keyword_cnn[int16x8]"].diff_unit == "LSB"
    assert "int16x8, train x100" in table and "int8 per-tensor, train x100" in table and "int8 QAT" in table
    # A float32 model on the MCU is named slow, with what its int8 rows take (docs/diagnosis.md).
    slow = next(d for d in by_id["keyword_cnn[float32]"].diagnoses if d["kind"] == "slow")
    assert slow["evidence"][0].startswith("the model is float32") and "the int8 row of the same model takes" in \
        slow["evidence"][0], slow
    assert "## Calibration" in table and "- keyword_cnn (train calibration): " in table


def test_unchanged_rerun_trains_and_converts_nothing(seed_quick_runs):
    root, _, second = seed_quick_runs
    assert second.returncode == 0, second.stdout[-3000:]
    _, rows = read_results(root / "results" / "seed" / "second")
    assert {row.case_id for row in rows} == {f"keyword_cnn[{variant}]" for variant in (
        "int8-cal50-train", "int8-cal500-train", "int8-cal50-random", "int8-cal500-random", "int8-per-tensor",
        "int16x8", "int8-qat", "float32")} | {"lstm[float32]", "lstm[int8]"}
    log = (root / "results" / "logs" / "second.log").read_text()
    # The stages' own lines, not the words (a diagnosis may speak of training inputs): nothing trained,
    # converted, generated or run through QuantizationDebugger again.
    work = re.findall(r": (?:training \w|converting |generating data set|per-layer quantization error of ).*", log)
    assert not work, work
    first_log = (root / "results" / "logs" / "first.log").read_text()
    assert "training keyword_cnn" in first_log
    # A model's variants convert in one worker: TensorFlow loads once per model, not per variant.
    assert "converting 8 variants of keyword_cnn in one worker" in first_log


def _suite_file(directory: Path, text: str, name: str = "suite.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def test_mlperf_tiny_models_run_as_tflite_models(tmp_path, shared_dir):
    models = shared_dir / "models" / "mlperf-tiny"
    suite_path = _suite_file(tmp_path, f"""\
suite: mlperf
defaults:
  eval_samples: 20
models:
  - name: kws
    tflite: {models / 'kws_ref_model.tflite'}
  - name: ad01
    tflite: {models / 'ad01_int8.tflite'}
    thresholds: {{min_output_agreement: 1.0, agreement_tolerance_lsb: 3}}
""")
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="r") as session:
        rows = [session.run_case(case) for case in load_suite(suite_path).cases()]
    kws, ad01 = rows
    assert kws.status == "passed" and ad01.status == "passed", (kws.error, ad01.error, ad01.violations)
    assert kws.reference_source == "litert-builtin-ref" and kws.board_accuracy is None
    assert kws.model_bytes == (models / "kws_ref_model.tflite").stat().st_size
    assert {layer.op for layer in kws.layers} >= {"CONV_2D", "DEPTHWISE_CONV_2D"}
    # Published fact (shared/models/NOTICE.md): TFLM and LiteRT's reference kernels differ by up
    # to 3 LSB on this FULLY_CONNECTED-only model; the board is TFLM, so it must be exact to TFLM.
    assert ad01.max_abs_diff <= 3 and ad01.host_tflm_exact_match == 1.0


def test_person_detect_falls_back_to_tflm_where_litert_refuses_it(tmp_path, shared_dir):
    suite_path = _suite_file(tmp_path, f"""\
models:
  - name: person
    tflite: {shared_dir / 'models' / 'tflm-examples' / 'person_detect.tflite'}
    eval_samples: 3
""")
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results") as session:
        (row,) = [session.run_case(case) for case in load_suite(suite_path).cases()]
    assert row.status == "passed", row.error
    assert row.reference_source == "tflm-host" and "LiteRT cannot run this model" in row.reference_note
    assert row.exact_match == 1.0


def test_a_tflite_model_paired_with_a_data_set_of_other_classes_is_refused_with_both_counts(tmp_path, shared_dir):
    suite_path = _suite_file(tmp_path, f"""\
models:
  - name: other
    tflite: {shared_dir / 'models' / 'tflm-examples' / 'hello_world_int8.tflite'}
    eval_samples: 2
  - name: kws
    tflite: {shared_dir / 'models' / 'mlperf-tiny' / 'kws_ref_model.tflite'}
    dataset: {{name: keywords, options: {{words: "yes,no", samples_per_class: 10}}}}
    eval_samples: 10
""")
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results") as session:
        _, row = [session.run_case(case) for case in load_suite(suite_path).cases()]
    assert row.status == "error"
    assert row.error == (f"{suite_path}:5: model 'kws' gives 12 output(s) per sample, data set 'keywords' has 3 "
                         f"classes (yes, no, silence; task multiclass): pair the model with the data set it was "
                         f"trained on")


def test_a_tflite_model_with_a_data_set_is_held_to_the_accuracy_limit_of_its_kind(tmp_path, seed_quick_runs):
    root, first, _ = seed_quick_runs
    assert first.returncode == 0, first.stdout[-2000:]
    _, rows = read_results(root / "results" / "seed" / "first")
    models = {row.variant: row.model_path for row in rows if row.model == "keyword_cnn"}
    # The seed's keyword CNN, given as .tflite files, on its own data set with the two words'
    # labels swapped: whatever it learned, it cannot be right on every sample, so a limit of 100%
    # must fail, for the int8 model (int8 input and output) and for the float one alike.
    suite_path = _suite_file(tmp_path, f"""\
defaults:
  eval_samples: 12
  thresholds: {{min_int8_accuracy: 1.0, min_float_accuracy: 1.0}}
x-swapped: &swapped {{name: keywords, options: {{words: "no,yes", samples_per_class: 20}}}}
models:
  - name: kws_int8
    tflite: {models["int8-cal50-train"]}
    dataset: *swapped
  - name: kws_float
    tflite: {models["float32"]}
    dataset: *swapped
  - name: kws_int16
    tflite: {models["int16x8"]}
    dataset: *swapped
""")
    with BenchSession(cache_dir=root / "cache", results_dir=tmp_path / "results") as session:
        int8, float32, int16 = [session.run_case(case) for case in load_suite(suite_path).cases()]
    assert int8.status == "failed" and float32.status == "failed", (int8.error, float32.error)
    assert [v.split(" ")[0] for v in int8.violations] == ["int8_accuracy"], int8.violations
    # int16 input and output is an integer model too: held to the quantized limit.
    assert [v.split(" ")[0] for v in int16.violations] == ["int8_accuracy"], (int16.error, int16.violations)
    assert [v.split(" ")[0] for v in float32.violations] == ["float_accuracy"], float32.violations
    assert int8.board_accuracy < 1.0 and float32.board_accuracy < 1.0


def _padded_model(model: Path, out: Path, extra_bytes: int) -> Path:
    """The same model carrying an unused constant buffer, to make its flatbuffer too big for flash."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model.read_bytes(), 0))
    padding = schema.BufferT()
    padding.data = bytes(extra_bytes)
    tree.buffers.append(padding)
    builder = flatbuffers.Builder(extra_bytes + 4096)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    out.write_bytes(bytes(builder.Output()))
    return out


def test_model_too_big_for_the_flash_partition_is_refused_by_the_board(tmp_path, sine_model):
    _padded_model(sine_model, tmp_path / "big.tflite", 8 * 1024 * 1024)
    suite_path = _suite_file(tmp_path, "models:\n  - name: big\n    tflite: big.tflite\n    eval_samples: 2\n")
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results") as session:
        (row,) = [session.run_case(case) for case in load_suite(suite_path).cases()]
    assert row.status == "error"
    # The factory partition of firmware/partitions.csv (8,323,072 bytes), as the firmware reads it.
    assert "board refused big[as-is]" in row.error and "exceeds the 8323072-byte app partition" in row.error


def test_a_crashing_worker_fails_one_stage_with_its_signal(tmp_path, monkeypatch):
    """Stands in for the converter segfault seen with TF 2.21 on Keras 3 LSTMs: the real crash
    depends on library versions, so the worker here kills itself the same way."""
    (tmp_path / "segfaulting_worker.py").write_text(
        "import os, signal\nprint('calibrating...', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(ConversionError, match=r"was killed by signal SIGSEGV: calibrating\.\.\."):
        run_worker("segfaulting_worker", {}, tmp_path / "work", timeout_s=60, error=ConversionError, where="m")


SINE_SUITE = """\
models:
  - name: sine
    tflite: {model}
    eval_samples: 4
"""


def test_plugin_keeps_going_past_a_broken_suite_and_reports_one_line(tmp_path, sine_model):
    suites = tmp_path / "suites"
    _suite_file(suites, SINE_SUITE.format(model=sine_model), "good.yaml")
    _suite_file(suites, "models:\n  - name: x\n    architecture: nope\n    dataset: {name: keywords}\n", "bad.yaml")
    result = _pytest(str(suites), f"--results-dir={tmp_path / 'r'}", f"--cache-dir={tmp_path / 'c'}",
                     f"--rootdir={REPO}", "-q", timeout=300)
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed" in result.stdout
    assert f"{suites / 'bad.yaml'}:3: unknown architecture 'nope'" in result.stdout
    assert "Traceback" not in result.stdout


def test_missing_board_port_fails_every_item_fast_with_the_port_named(tmp_path, sine_model):
    suite = _suite_file(tmp_path / "suites", SINE_SUITE.format(model=sine_model)
                        + "  - name: sine2\n    tflite: " + str(sine_model) + "\n")
    result = _pytest(str(suite), "--board=/dev/ttyACM_tinyhil_missing", f"--results-dir={tmp_path / 'r'}",
                     f"--cache-dir={tmp_path / 'c'}", f"--rootdir={REPO}", "-q", timeout=120)
    assert result.returncode == 1
    assert result.stdout.count("serial port /dev/ttyACM_tinyhil_missing does not exist") >= 2
    assert "2 failed" in result.stdout
    # Nothing ran, so no row claims a firmware build.
    _, rows = read_results(tmp_path / "r" / "suite" / "latest")
    assert [row.firmware_build for row in rows] == ["", ""] and all(row.status == "error" for row in rows)


def test_cli_run_validate_and_inspect(tmp_path, sine_model):
    suite = _suite_file(tmp_path, SINE_SUITE.format(model=sine_model))
    env = {**os.environ}
    run = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir",
                          str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--run-id", "cli"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "latency ms (estimated)" in run.stdout
    document = json.loads((tmp_path / "r" / "suite" / "cli" / "results.json").read_text())
    assert document["results"][0]["case_id"] == "sine[as-is]"
    bad = _suite_file(tmp_path, "models: 3\n", "bad.yaml")
    validate = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(bad)], capture_output=True,
                              text=True, timeout=60, cwd=REPO)
    assert validate.returncode == 2
    assert validate.stderr.strip() == f"error: {bad}:1: models must be a non-empty list"
    inspect = subprocess.run([sys.executable, "-m", "harness.cli", "inspect", str(sine_model)], capture_output=True,
                             text=True, timeout=60, cwd=REPO)
    assert inspect.returncode == 0 and "FULLY_CONNECTED" in inspect.stdout


def test_unchanged_rerun_passes_its_baseline(seed_quick_runs):
    root, _, second = seed_quick_runs
    assert second.returncode == 0, second.stdout[-3000:]
    assert "tinyhil baseline comparison" in second.stdout and "10 cases against baseline" in second.stdout
    assert "0 regressed, 0 borderline, 0 improved (50 metrics compared)" in second.stdout
    assert (root / "second-summary.md").read_text().startswith("### tinyhil: no regression")


def test_planted_regression_fails_pytest_baseline_naming_model_metric_old_new_threshold(tmp_path, seed_quick_runs):
    """Two plants on the seed suite: a slower clock (every latency up by half) and a bigger anomaly
    model (wider convolutions: more flatbuffer bytes). Both must fail against the first run."""
    root, first, _ = seed_quick_runs
    assert first.returncode == 0
    seed = (REPO / "suites" / "seed.yaml").read_text()
    planted = seed.replace("  cpu_mhz: 240\n", "  cpu_mhz: 160\n").replace(
        "      - Conv1D: {filters: 16, kernel_size: 5", "      - Conv1D: {filters: 24, kernel_size: 5")
    assert planted.count("cpu_mhz: 160") == 1 and planted.count("Conv1D: {filters: 24") == 1
    suite = _suite_file(tmp_path / "planted", planted, "seed.yaml")
    result = _pytest(str(suite), "--profile=quick", "-k", "keyword_cnn and int8-cal50-train or anomaly_cnn1d",
                     f"--baseline={root / 'results' / 'seed' / 'first'}", f"--results-dir={tmp_path / 'r'}",
                     f"--cache-dir={root / 'cache'}", f"--rootdir={REPO}", "-q",
                     f"--junitxml={tmp_path / 'junit.xml'}", timeout=900)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "3 failed" in result.stdout, result.stdout[-3000:]
    _, baseline_rows = read_results(root / "results" / "seed" / "first")
    _, planted_rows = read_results(tmp_path / "r" / "seed" / "latest")
    old = {row.case_id: row for row in baseline_rows}
    for row in planted_rows:
        before = old[row.case_id]
        assert row.latency_median_ms > 1.3 * before.latency_median_ms, row.case_id
        message = (f"{row.case_id}: latency_ms regressed: {before.latency_median_ms:.3f} ms (estimated) -> "
                   f"{row.latency_median_ms:.3f} ms (estimated) (+")
        assert message in result.stdout, (message, result.stdout[-3000:])
        assert "threshold +5.0%, clock 240 -> 160 MHz)" in result.stdout
    bigger = next(row for row in planted_rows if row.case_id == "anomaly_cnn1d[int8]")
    message = (f"model_bytes regressed: {old['anomaly_cnn1d[int8]'].model_bytes:,} B -> "
               f"{bigger.model_bytes:,} B (+{bigger.model_bytes - old['anomaly_cnn1d[int8]'].model_bytes:,} B; "
               "threshold +0 B)")
    # One line per item: the suite's file:line, the case, then every regression of that case.
    line = next(line for line in result.stdout.splitlines() if ": anomaly_cnn1d[int8]: latency_ms regressed" in line)
    assert line.startswith(f"{suite}:") and message in line, line
    assert "keyword_cnn[int8-cal50-train]: model_bytes" not in result.stdout  # the unplanted model kept its size
    assert "tinyhil baseline comparison" in result.stdout and "3 cases against baseline" in result.stdout
    assert 'failures="3"' in (tmp_path / "junit.xml").read_text()


def test_report_renders_benchmarks_markdown_and_a_self_contained_html_with_plots(tmp_path, seed_quick_runs):
    root, first, _ = seed_quick_runs
    assert first.returncode == 0
    run = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(root / "results" / "seed" / "first"),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    _, rows = read_results(root / "results" / "seed" / "first")
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| Model " in markdown and "| Size " in markdown and "Inference time (estimated)" in markdown
    assert "| Accuracy " in markdown and "**estimated** by the virtual ESP32-S3's cost model" in markdown
    assert "clock 240 MHz; kernels ESP-NN" in markdown and "tflite-micro" in markdown and "tensorflow" in markdown
    assert "Statistic: the median over the evaluation samples" in markdown and "window medians" not in markdown
    for row in rows:
        assert f"| {row.model} " in markdown and f"| {row.variant} " in markdown
    assert len([line for line in markdown.splitlines() if line.startswith("| ") and "passed" in line]) == len(rows)
    page = (tmp_path / "benchmarks.html").read_text()
    for title in ("Size against latency", "float32 (red) against int8 (green)", "Accuracy against calibration set size"):
        assert title in page
    assert page.count("<svg") == 3 + len(rows)  # three summary plots and one per-layer plot per row
    assert all(f"{row.case_id}: {len(row.layers)} layers" in page for row in rows)
    # Self-contained: nothing to fetch, nothing to run.
    assert "<script" not in page and " src=" not in page and "<link" not in page


def test_seed_suite_runs_on_the_native_firmware_bit_exact_with_host_tflm(seed_quick_runs):
    root, first, _ = seed_quick_runs
    assert first.returncode == 0, first.stdout[-3000:]
    _, rows = read_results(root / "results" / "seed" / "first")
    for row in rows:
        assert row.firmware_build == "native", (row.case_id, row.firmware_build)
        assert (row.esp_tflite_micro, row.esp_nn_version) == ("1.3.8", "1.1.2")
        assert row.host_tflm_exact_match == 1.0, row.case_id
        assert row.optimisation and row.output_digest
    results_md = (root / "results" / "seed" / "first" / "results.md").read_text()
    assert "Firmware: the firmware's own core built for the host (virtual board) (esp-tflite-micro 1.3.8; " \
           "esp-nn 1.1.2" in results_md


def test_seed_suite_on_esp_nn_1_2_3_agrees_with_1_1_2_or_says_where_not(tmp_path, seed_quick_runs):
    """The same trained models (one cache) on the other pinned esp-nn: every row bit-exact with
    host TFLM again, and any output that differs from the 1.1.2 run is named in results.md."""
    root, first, _ = seed_quick_runs
    assert first.returncode == 0
    seed = (REPO / "suites" / "seed.yaml").read_text()
    other = seed.replace("  esp_nn: true\n", '  esp_nn: true\n  esp_nn_version: "1.2.3"\n')
    assert other.count('esp_nn_version: "1.2.3"') == 1
    suite = _suite_file(tmp_path / "esp-nn-1.2.3", other, "seed.yaml")
    # The int8 rows whose kernels esp-nn runs (float32, int16 and the LSTM run TFLM's reference
    # kernels, the same under either version): conv, depthwise, pooling and dense, per-channel
    # and per-tensor.
    result = _pytest(str(suite), "--profile=quick", "-k", "int8-cal50-train or int8-per-tensor or mobilenet_v2 and "
                     "int8 or ds_cnn and int8 or anomaly_cnn1d and int8",
                     f"--results-dir={tmp_path / 'r'}", f"--cache-dir={root / 'cache'}",
                     f"--rootdir={REPO}", "-q", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    _, rows = read_results(tmp_path / "r" / "seed" / "latest")
    _, first_rows = read_results(root / "results" / "seed" / "first")
    before = {row.case_id: row for row in first_rows}
    differing = []
    for row in rows:
        assert (row.firmware_build, row.esp_nn_version, row.host_tflm_exact_match) == ("native", "1.2.3", 1.0)
        if row.output_digest != before[row.case_id].output_digest:
            differing.append(row.case_id)
    notes = esp_nn_disagreements([*first_rows, *rows])
    assert len(notes) == len(differing), (notes, differing)


def test_rows_that_differ_only_in_esp_nn_version_and_disagree_are_named():
    def row(case_id, version, digest):
        return CaseResult(suite="s", model="kws", variant=case_id, case_id=case_id, quantization="int8", status="passed",
                          calibration_samples=100, eval_samples=50, esp_nn_version=version, output_digest=digest)
    same = [row("kws[int8-esp-nn1.1.2]", "1.1.2", "aa"), row("kws[int8-esp-nn1.2.3]", "1.2.3", "aa")]
    assert esp_nn_disagreements(same) == []
    differ = [row("kws[int8-esp-nn1.1.2]", "1.1.2", "aa"), row("kws[int8-esp-nn1.2.3]", "1.2.3", "bb")]
    assert esp_nn_disagreements(differ) == ["kws (int8): board outputs differ between esp-nn 1.1.2 "
                                            "(kws[int8-esp-nn1.1.2]), 1.2.3 (kws[int8-esp-nn1.2.3])"]


def test_inspect_into_a_pipe_closed_early_prints_no_traceback(shared_dir):
    """`tinyhil inspect model.tflite | head -1`: the reader leaves before the output is written."""
    model = shared_dir / "models" / "tflm-examples" / "person_detect.tflite"
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", "inspect", str(model)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the child has imported anything, let alone printed
    _, stderr = process.communicate(timeout=120)
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()[-2000:]


def test_report_goes_to_the_run_directory_unless_out_is_named(tmp_path, seed_quick_runs):
    root, first, _ = seed_quick_runs
    assert first.returncode == 0
    run_dir = tmp_path / "run"
    shutil.copytree(root / "results" / "seed" / "first", run_dir)
    committed = (REPO / "results" / "BENCHMARKS.md").read_bytes()
    report = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(run_dir)], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert report.returncode == 0, report.stderr
    assert (run_dir / "BENCHMARKS.md").is_file() and (run_dir / "benchmarks.html").is_file()
    assert (REPO / "results" / "BENCHMARKS.md").read_bytes() == committed
    several = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(run_dir), str(run_dir)],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
    assert several.returncode == 2 and "--out" in several.stderr
