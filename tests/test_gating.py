"""Regression gating against a baseline run: the rules (harness.gate), baseline files, and the CLI's
`tinyhil compare` with its exit codes, markdown and JUnit XML. The planted-regression run through
`pytest --baseline` is in test_pipeline.py, beside the seed runs it builds on."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from harness import gate
from harness.errors import ResultsError, SuiteError
from harness.report import CaseResult, RunMetadata, read_runs, write_results
from harness.suite import Thresholds, parse_suite

REPO = Path(__file__).resolve().parents[1]


def _row(**values) -> CaseResult:
    base = dict(suite="seed", model="kws", variant="int8", case_id="kws[int8]", quantization="int8", status="passed",
                board="virtual", latency_kind="estimated", cpu_mhz=240, model_bytes=20_000, arena_bytes=9_000,
                latency_median_ms=10.0, board_accuracy=0.90, output_agreement=1.0,
                latency_windows_ms=((10.0,) * 5,) * 3, regression_limits=Thresholds().regression_limits())
    return CaseResult(**{**base, **values})


def _measured(rng: np.random.Generator, centre: float, spread: float) -> dict:
    windows = tuple(tuple(float(v) for v in rng.normal(centre, spread, 20)) for _ in range(5))
    return dict(latency_kind="measured", board="/dev/ttyACM0", latency_windows_ms=windows,
                latency_median_ms=float(np.median([np.median(w) for w in windows])))


def _change(comparison: gate.CaseComparison, metric: str) -> gate.MetricChange:
    return next(change for change in comparison.changes if change.metric == metric)


def test_unchanged_row_has_no_change_at_all():
    comparison = gate.compare_case(_row(), _row())
    assert {change.verdict for change in comparison.changes} == {gate.UNCHANGED}
    assert {change.metric for change in comparison.changes} == {
        "latency_ms", "model_bytes", "arena_bytes", "accuracy", "output_agreement"}
    assert not comparison.failed


def test_estimated_latency_is_decided_by_the_threshold_alone():
    slower = gate.compare_case(_row(), _row(latency_median_ms=10.6, cpu_mhz=160))
    change = _change(slower, "latency_ms")
    assert change.verdict == gate.REGRESSED and change.p_value is None
    assert str(change) == ("kws[int8]: latency_ms regressed: 10.000 ms (estimated) -> 10.600 ms (estimated) "
                           "(+6.0%; threshold +5.0%, clock 240 -> 160 MHz)")
    assert _change(gate.compare_case(_row(), _row(latency_median_ms=10.4)), "latency_ms").verdict == gate.WITHIN
    assert _change(gate.compare_case(_row(), _row(latency_median_ms=9.0)), "latency_ms").verdict == gate.IMPROVED


def test_measured_latency_beyond_the_threshold_needs_significance_too():
    rng = np.random.default_rng(7)
    base = _row(**_measured(rng, 10.0, 0.02))
    clearly_slower = gate.compare_case(base, _row(**_measured(rng, 11.0, 0.02)))
    change = _change(clearly_slower, "latency_ms")
    assert change.verdict == gate.REGRESSED and change.p_value < gate.SIGNIFICANCE_P
    # Same shift of the median, but one window's luck: the samples overlap and the change is borderline.
    noisy_base = _row(**_measured(rng, 10.0, 3.0))
    noisy = replace(noisy_base, latency_median_ms=noisy_base.latency_median_ms * 1.2,
                    latency_windows_ms=tuple(tuple(v * 1.02 for v in w) for w in noisy_base.latency_windows_ms))
    change = _change(gate.compare_case(noisy_base, noisy), "latency_ms")
    assert change.verdict == gate.BORDERLINE and change.p_value >= gate.SIGNIFICANCE_P
    assert not gate.compare_case(noisy_base, noisy).failed


def test_an_estimate_and_a_measurement_do_not_compare():
    rng = np.random.default_rng(1)
    change = _change(gate.compare_case(_row(), _row(**_measured(rng, 10.0, 0.1))), "latency_ms")
    assert change.verdict == gate.INCOMPARABLE and change.failed
    assert "estimate and a measurement do not compare" in str(change)


def test_bytes_are_exact_and_accuracy_is_in_points():
    bigger = gate.compare_case(_row(), _row(model_bytes=20_001, arena_bytes=8_000))
    assert _change(bigger, "model_bytes").verdict == gate.REGRESSED
    assert _change(bigger, "arena_bytes").verdict == gate.IMPROVED
    assert "model_bytes regressed: 20,000 B -> 20,001 B (+1 B; threshold +0 B)" in str(_change(bigger, "model_bytes"))
    worse = gate.compare_case(_row(), _row(board_accuracy=0.885, output_agreement=0.995))
    assert _change(worse, "accuracy").verdict == gate.REGRESSED
    assert "90.0% -> 88.5% (-1.5 pts; threshold -1.0 pts)" in str(_change(worse, "accuracy"))
    assert _change(worse, "output_agreement").verdict == gate.WITHIN
    # The limits come from the current row (its suite); null switches a metric off.
    lenient = replace(Thresholds(), max_model_bytes_increase=4096, max_accuracy_drop=None).regression_limits()
    relaxed = gate.compare_case(_row(), _row(model_bytes=21_000, board_accuracy=0.5, regression_limits=lenient))
    assert _change(relaxed, "model_bytes").verdict == gate.WITHIN
    assert _change(relaxed, "accuracy").verdict == gate.UNGATED
    assert not relaxed.failed


def test_a_case_that_failed_to_run_fails_the_comparison():
    comparison = gate.compare_case(_row(), _row(status="error", error="arena too small"))
    assert comparison.failed and "did not run: arena too small" in comparison.failure_text()


def test_suite_thresholds_carry_the_regression_limits_and_latency_windows(tmp_path):
    suite = parse_suite(
        "latency: {windows: 3, inferences_per_window: 7}\n"
        "defaults:\n  thresholds: {max_latency_increase: 0.1, max_accuracy_drop: null}\n"
        "quick:\n  latency: {inferences_per_window: 2}\n"
        "models:\n  - name: m\n    architecture: keyword_cnn\n    dataset: {name: keywords}\n"
        "    thresholds: {max_model_bytes_increase: 512}\n", tmp_path / "s.yaml")
    limits = suite.cases()[0].thresholds.regression_limits()
    assert limits == {"latency_ms": 0.1, "model_bytes": 512, "arena_bytes": 0, "accuracy": None,
                      "output_agreement": 0.01}
    assert (suite.latency.windows, suite.latency.inferences_per_window) == (3, 7)
    quick = parse_suite("latency: {windows: 3}\nquick:\n  latency: {inferences_per_window: 2}\n"
                        "models:\n  - name: m\n    architecture: keyword_cnn\n    dataset: {name: keywords}\n",
                        tmp_path / "q.yaml", profile="quick")
    assert (quick.latency.windows, quick.latency.inferences_per_window) == (3, 2)
    with pytest.raises(SuiteError, match=r"s.yaml:1: latency.windows must be at least 1, found 0"):
        parse_suite("latency: {windows: 0}\nmodels: [{name: m, architecture: keyword_cnn}]\n", tmp_path / "s.yaml")


def _write_run(directory: Path, rows: list[CaseResult], suite: str = "seed") -> Path:
    metadata = RunMetadata(suite=suite, suite_path=f"suites/{suite}.yaml", profile="full", board="virtual",
                           run_id=directory.name, started="2026-11-24T12:00:00", tinyhil_version="0.1.0",
                           libraries={"tflite-micro": "0"})
    write_results(directory, metadata, rows)
    return directory


def test_baseline_is_a_file_a_run_directory_or_a_tree_and_a_duplicate_is_refused(tmp_path):
    run = _write_run(tmp_path / "tree" / "seed" / "base", [_row()])
    _write_run(tmp_path / "tree" / "other" / "base", [_row(suite="other")], suite="other")
    assert set(read_runs(run / "results.json")) == {("seed", "kws[int8]")}
    assert set(read_runs(run)) == {("seed", "kws[int8]")}
    assert set(read_runs(tmp_path / "tree")) == {("seed", "kws[int8]"), ("other", "kws[int8]")}
    _write_run(tmp_path / "tree" / "seed" / "again", [_row()])
    with pytest.raises(ResultsError, match="is in two baseline files"):
        read_runs(tmp_path / "tree")
    with pytest.raises(ResultsError, match="baseline not found"):
        read_runs(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ResultsError, match="not a tinyhil results file"):
        read_runs(tmp_path / "bad.json")


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "compare", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_cli_compare_exit_codes_markdown_and_junit(tmp_path):
    other = replace(_row(), model="ds", case_id="ds[int8]")
    base = _write_run(tmp_path / "base", [_row(), other])
    same = _write_run(tmp_path / "same", [_row(), other])
    result = _compare(str(base), str(same))
    assert result.returncode == 0, result.stderr
    assert "2 cases against baseline" in result.stdout and "0 regressed" in result.stdout

    planted = _write_run(tmp_path / "planted", [_row(latency_median_ms=13.0), replace(other, model_bytes=30_000)])
    markdown, junit = tmp_path / "summary.md", tmp_path / "junit.xml"
    result = _compare(str(base), str(planted), "--markdown", str(markdown), "--junit", str(junit))
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("regressed: kws[int8]: latency_ms regressed: 10.000 ms (estimated) -> 13.000 ms (estimated) "
            "(+30.0%; threshold +5.0%)") in result.stderr
    assert "ds[int8]: model_bytes regressed: 20,000 B -> 30,000 B (+10,000 B; threshold +0 B)" in result.stderr
    text = markdown.read_text()
    assert text.startswith("### tinyhil: regression") and "| kws[int8] | latency_ms  | 10.000 ms (estimated) | 13.000 ms (estimated) | +30.0%" in text
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "2"
    failure = suite.find("testcase[@name='ds[int8]']/failure")
    assert "model_bytes regressed" in failure.get("message")

    rng = np.random.default_rng(3)
    measured = _write_run(tmp_path / "measured", [_row(**_measured(rng, 10.0, 0.1)), other])
    result = _compare(str(base), str(measured))
    assert result.returncode == 2 and "not comparable" in result.stderr
    result = _compare(str(base), str(tmp_path / "missing"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "current run not found" in result.stderr


def test_an_agreement_violation_says_which_reference_disagrees():
    """ad01's case: 56% agreement with LiteRT, the board bit-exact with host TFLM on every sample."""
    def agreement_violation(**extra) -> str:
        violations = gate.check(Thresholds(min_output_agreement=0.99), latency_ms=1.0, model_bytes=1, arena_bytes=1,
                                float_accuracy=None, int8_accuracy=None, agreement=0.56, **extra)
        (violation,) = violations
        return str(violation)

    text = agreement_violation(host_tflm_exact_match=1.0)
    assert text.startswith("output_agreement 0.56 < min 0.99 (against LiteRT;")
    assert "the board matches host TFLM bit for bit on every sample" in text and "not the board" in text
    board_fault = agreement_violation(host_tflm_exact_match=0.4)
    assert "matches host TFLM bit for bit on 40.0% of samples" in board_fault and "not the board" not in board_fault
    assert agreement_violation() == "output_agreement 0.56 < min 0.99"


def test_a_quick_run_and_a_full_run_do_not_compare():
    full = _row(profile="full", eval_samples=200, board_accuracy=0.80)
    quick = _row(profile="quick", eval_samples=30, board_accuracy=0.95)
    comparison = gate.compare_case(full, quick)  # what `pytest --baseline` does per item
    assert comparison.failed and not comparison.changes
    assert "baseline ran with profile full, current with profile quick" in comparison.incomparable
    assert "evaluation samples 200 -> 30" in comparison.incomparable
    assert "not comparable" in comparison.failure_text()
    # Same profile, a suite that changed its sample count: refused too.
    fewer = gate.compare_case(_row(profile="full", eval_samples=200), _row(profile="full", eval_samples=100))
    assert fewer.failed and fewer.incomparable.startswith("evaluation samples 200 -> 100")
    rng = np.random.default_rng(5)
    measured = _measured(rng, 10.0, 0.1)
    shorter = dict(measured, latency_windows_ms=measured["latency_windows_ms"][:3])
    windows = gate.compare_case(_row(profile="full", **measured), _row(profile="full", **shorter))
    assert "latency windows x inferences 5 x 20 -> 3 x 20" in windows.incomparable
    assert not gate.compare_case(_row(profile="full", **measured), _row(profile="full", **measured)).failed


def test_cli_compare_refuses_a_quick_run_against_a_full_one(tmp_path):
    rows = [_row(eval_samples=200), replace(_row(eval_samples=200), model="ds", case_id="ds[int8]")]
    full = _write_run(tmp_path / "full", rows)
    quick_rows = [replace(row, eval_samples=30, board_accuracy=0.95, latency_median_ms=8.0) for row in rows]
    metadata = RunMetadata(suite="seed", suite_path="suites/seed.yaml", profile="quick", board="virtual",
                           run_id="quick", started="2026-11-24T12:00:00", tinyhil_version="0.1.0", libraries={})
    write_results(tmp_path / "quick", metadata, quick_rows)
    result = _compare(str(full), str(tmp_path / "quick"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "improved" not in result.stderr and "0 improved" in result.stdout
    assert "2 not comparable" in result.stdout
    (line,) = [line for line in result.stderr.splitlines() if "not comparable" in line]
    assert line.startswith("error: ") and "(2 of 2 cases: kws[int8], ds[int8])" in line
    assert "baseline ran with profile full, current with profile quick" in line
    markdown = tmp_path / "summary.md"
    _compare(str(full), str(tmp_path / "quick"), "--markdown", str(markdown))
    assert markdown.read_text().startswith("### tinyhil: not comparable")


# --- issue 12: an estimate's stated error and its cost model ---------------------------------------------

PUBLISHED = "published kernel tables (esp-nn 1.1.2)"
CALIBRATED = "calibrated on ESP32-S3-DevKitC-1 /dev/ttyACM0, 2026-11-30, chip build esp-nn 1.1.2 -O2"


def test_estimates_from_different_cost_models_do_not_compare():
    published = _row(cost_model=PUBLISHED, latency_error=0.15)
    calibrated = _row(cost_model=CALIBRATED, latency_error=0.08, latency_median_ms=12.4)
    comparison = gate.compare_case(published, calibrated)
    change = _change(comparison, "latency_ms")
    assert change.verdict == gate.INCOMPARABLE and comparison.failed
    assert change.note == (f"the two estimates come from different cost models (baseline: {PUBLISHED}; current: "
                           f"{CALIBRATED})")
    # The other metrics do not depend on the cost model: they are still gated.
    assert _change(comparison, "model_bytes").verdict == gate.UNCHANGED
    recalibrated = replace(calibrated, cost_model=CALIBRATED.replace("2026-11-30", "2026-12-14"))
    assert _change(gate.compare_case(calibrated, recalibrated), "latency_ms").verdict == gate.INCOMPARABLE
    # A baseline from before rows named their cost model: its estimates came from another one.
    old = _row()
    assert "baseline: not recorded" in _change(gate.compare_case(old, published), "latency_ms").note
    # The same calibration on both sides compares as before.
    assert _change(gate.compare_case(calibrated, replace(calibrated, latency_median_ms=12.5)),
                   "latency_ms").verdict == gate.WITHIN
    text = gate.comparison_markdown(gate.compare_runs({("seed", "kws[int8]"): published}, [calibrated], "base"))
    assert text.startswith("### tinyhil: not comparable") and "different cost models" in text


def test_the_gate_states_the_band_of_estimates_and_leaves_the_verdict_to_the_threshold():
    base = _row(cost_model=PUBLISHED, latency_error=0.15)
    slower = replace(base, latency_median_ms=10.6)
    change = _change(gate.compare_case(base, slower), "latency_ms")
    # +6% is inside the estimate's band, and still beyond the suite's +5%: deterministic, so regressed.
    assert change.verdict == gate.REGRESSED and change.latency_error == 0.15
    assert str(change) == ("kws[int8]: latency_ms regressed: 10.000 ms (estimated) -> 10.600 ms (estimated) "
                           "(+6.0%; threshold +5.0%, inside the estimate's ±15% band: the threshold alone decides)")
    far = _change(gate.compare_case(base, replace(base, latency_median_ms=13.0)), "latency_ms")
    assert far.verdict == gate.REGRESSED and "band" not in far.note
    comparison = gate.compare_runs({("seed", "kws[int8]"): base}, [slower], "base")
    band = ("estimates carry ±15% (the cost model's stated error): a change inside the band is judged by the "
            "threshold alone")
    assert band in gate.comparison_table(comparison)
    assert band in gate.comparison_markdown(comparison)
    rng = np.random.default_rng(11)
    measured = _row(**_measured(rng, 10.0, 0.02))
    plain = gate.compare_runs({("seed", "kws[int8]"): measured}, [replace(measured, model_bytes=20_100)], "base")
    assert "±" not in gate.comparison_table(plain) and "±" not in gate.comparison_markdown(plain)
