"""Published tables (harness.publish): estimated and measured latency never pass for each other."""

from __future__ import annotations

from pathlib import Path

from harness.publish import write_report
from harness.report import CaseResult, LayerTiming, RunMetadata, write_results


def _run(directory: Path, board: str, rows: list[CaseResult]) -> Path:
    write_results(directory, RunMetadata(suite="seed", suite_path="suites/seed.yaml", profile="full", board=board,
                                         run_id=directory.name, started="2026-11-24T12:00:00",
                                         tinyhil_version="0.1.0", libraries={"tflite-micro": "1"}), rows)
    return directory


def _row(kind: str, latency: float, **values) -> CaseResult:
    base = dict(suite="seed", model="kws", variant="int8", case_id="kws[int8]", quantization="int8", status="passed",
                latency_kind=kind, cpu_mhz=240, esp_nn=True, model_bytes=20_480, latency_median_ms=latency,
                latency_p90_ms=latency, board_accuracy=0.9, calibration_samples=100,
                layers=(LayerTiming(0, "CONV_2D", 1000.0 * latency, 1000, 500),))
    return CaseResult(**{**base, **values})


def test_each_run_says_whether_its_latency_was_estimated_or_measured(tmp_path):
    virtual = _run(tmp_path / "virtual", "virtual", [_row("estimated", 12.5)])
    board = _run(tmp_path / "board", "/dev/ttyACM0", [_row("measured", 14.25)])
    write_report([virtual, board], tmp_path / "out", generated="2026-11-24")
    markdown = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    virtual_part, board_part = markdown.split("## seed on an ESP32-S3 (/dev/ttyACM0)")
    assert "Inference time (estimated)" in virtual_part and "12.5 ms" in virtual_part
    assert "(measured)" not in virtual_part and "**measured**" not in virtual_part
    assert "Inference time (measured)" in board_part and "14.2 ms" in board_part and "estimated" not in board_part
    page = (tmp_path / "out" / "benchmarks.html").read_text()
    assert "class='estimated'>Latency is <strong>estimated</strong>" in page
    assert "class='measured'>Latency is <strong>measured</strong>" in page
    assert "latency, ms (estimated)" in page and "latency, ms (measured)" in page


def test_a_run_mixing_both_marks_every_value(tmp_path):
    mixed = _run(tmp_path / "mixed", "virtual", [
        _row("estimated", 12.5), _row("measured", 3.0, model="ad", case_id="ad[int8]")])
    write_report([mixed], tmp_path / "out", generated="2026-11-24")
    markdown = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    assert "| Inference time " in markdown and "12.5 ms (est.)" in markdown and "3.00 ms (meas.)" in markdown
    assert "latency, ms (estimated and measured mixed)" in (tmp_path / "out" / "benchmarks.html").read_text()


def test_the_published_table_has_every_seed_row_and_says_estimated():
    from harness.suite import load_suite

    repo = Path(__file__).resolve().parents[1]
    published = (repo / "results" / "BENCHMARKS.md").read_text()
    assert "## seed on the virtual ESP32-S3" in published and "Inference time (estimated)" in published
    assert "profile full" in published and "**measured**" not in published and "(meas.)" not in published
    rows = [line.split("|")[1:3] for line in published.splitlines() if line.startswith("| ") and "passed" in line]
    published_cases = {f"{model.strip()}[{variant.strip()}]" for model, variant in rows}
    assert published_cases == {case.id for case in load_suite(repo / "suites" / "seed.yaml").cases()}


def _report(tmp_path: Path, profile: str, rows: list[CaseResult], host: dict | None = None) -> tuple[str, str]:
    directory = tmp_path / profile
    write_results(directory, RunMetadata(suite="seed", suite_path="suites/seed.yaml", profile=profile, board="virtual",
                                         run_id=profile, started="2026-11-24T12:00:00", tinyhil_version="0.1.0",
                                         libraries={"tflite-micro": "1"}, host=host or {}), rows)
    write_report([directory], tmp_path / f"out-{profile}", generated="2026-11-24")
    return ((tmp_path / f"out-{profile}" / "BENCHMARKS.md").read_text(),
            (tmp_path / f"out-{profile}" / "benchmarks.html").read_text())


def test_a_quick_run_is_marked_plainly_in_every_report(tmp_path):
    markdown, page = _report(tmp_path, "quick", [_row("estimated", 12.5)])
    assert markdown.startswith("# tinyhil benchmarks (quick profile: not benchmark figures)")
    assert "## seed on the virtual ESP32-S3 (quick profile: not benchmark figures)" in markdown
    assert "> **Quick profile: not benchmark figures.**" in markdown
    assert "<title>tinyhil benchmarks (quick profile: not benchmark figures)</title>" in page
    assert "<p class='quick'><strong>Quick profile: not benchmark figures.</strong>" in page
    results_md = (tmp_path / "quick" / "results.md").read_text()
    assert results_md.startswith("# seed: run quick (quick profile: not benchmark figures)")
    assert "> **Quick profile: not benchmark figures.**" in results_md
    full_markdown, full_page = _report(tmp_path, "full", [_row("estimated", 12.5)])
    assert "quick profile" not in full_markdown.lower() and "class='quick'" not in full_page
    assert "quick profile" not in (tmp_path / "full" / "results.md").read_text().lower()


def test_published_table_names_data_set_host_units_and_the_disagreeing_reference(tmp_path):
    speech = "generated: formant-synthesized yes, no + noise-only silence, 16 kHz, seed 1"
    rows = [_row("estimated", 12.5, dataset="keywords", dataset_source=speech, arena_bytes=6_304, arena_in_psram=False,
                 reference_source="litert-builtin-ref", output_agreement=0.56, host_tflm_exact_match=1.0,
                 status="failed", violations=("output_agreement 0.56 < min 0.99 (against LiteRT; the board matches "
                                              "host TFLM bit for bit on every sample: the two reference interpreters "
                                              "disagree, not the board)",)),
            _row("estimated", 90.0, model="mnv2", case_id="mnv2[int8]", dataset="digits",
                 dataset_source="real: scikit-learn load_digits, 8x8 upscaled", arena_bytes=610_000,
                 arena_in_psram=True, reference_source="litert-builtin-ref", output_agreement=1.0,
                 host_tflm_exact_match=1.0)]
    host = {"cpu": "AMD EPYC 7B13", "cores": "2", "machine": "x86_64", "os": "Linux 6.1", "python": "CPython 3.11.7"}
    markdown, page = _report(tmp_path, "full", rows, host)
    header = next(line for line in markdown.splitlines() if line.startswith("| Model"))
    assert "| Data " in header and "| Output agreement vs LiteRT " in header and "| Bit-exact with host TFLM " in header
    assert "| keywords (generated) " in markdown and "| digits (real) " in markdown
    assert f"Data sets: keywords: {speech}; digits: real: scikit-learn" in markdown
    assert "- Host (training, conversion, reference): cpu AMD EPYC 7B13; cores 2; machine x86_64" in markdown
    assert "arena in SRAM (kws[int8]); PSRAM (mnv2[int8])" in markdown
    assert "20.0 KiB" in markdown and "595.7 KiB" in markdown and " KB" not in markdown
    assert "KiB (1024 bytes)" in markdown and "model size, KiB" in page
    # p90 of an estimate would repeat the median: no column, and the reason.
    assert "| p90" not in markdown and "p90 is given for measured latency only" in markdown
    assert "the two reference interpreters disagree, not the board" in markdown
    assert "cpu AMD EPYC 7B13" in page and "Data sets: keywords: generated" in page


def test_measured_runs_keep_p90(tmp_path):
    markdown, _ = _report(tmp_path, "full", [_row("measured", 14.25, latency_p90_ms=15.5)])
    assert "| p90 " in markdown and "15.5 ms" in markdown and "p90 is given for measured latency only" not in markdown


PUBLISHED = "published kernel tables (esp-nn 1.1.2)"
CALIBRATED = "calibrated on ESP32-S3-DevKitC-1 /dev/ttyACM0, 2026-11-30, chip build esp-nn 1.1.2 -O2"
HELD_OUT = "±15% is the stated error of the cost model from its held-out validation, docs/board-model.md"


def test_published_estimates_carry_their_band_and_its_source(tmp_path):
    rows = [_row("estimated", 12.5, latency_error=0.15, cost_model=PUBLISHED),
            _row("estimated", 1434.0, model="mnv3s", case_id="mnv3s[int8]", model_bytes=2_555_904,
                 arena_in_psram=True, latency_error=0.15, cost_model=PUBLISHED)]
    markdown, page = _report(tmp_path, "full", rows)
    header = next(line for line in markdown.splitlines() if line.startswith("| Model"))
    assert "| Inference time (estimated) " in header
    assert "| 12.5 ms ±15% " in markdown and "| 1434.0 ms ±15% " in markdown
    assert f"Latency: estimated by the cost model ({PUBLISHED}); {HELD_OUT}." in markdown
    assert "<td>12.5 ms ±15%</td>" in page and HELD_OUT in page
    # The plot draws the band as well: one error bar per estimate, and the caption says what the bars are.
    assert "Bars span the stated error of each estimate." in page
    size_plot = page[:page.index("Model size against latency")]
    assert size_plot.count('id="LineCollection_') == 1  # matplotlib's error bars, in the size/latency plot
    assert "12.5 ms ±15% per inference" in page  # the layer plot's title


def test_a_published_mix_marks_each_value_and_a_calibrated_estimate_says_where(tmp_path):
    rows = [_row("estimated", 12.5, latency_error=0.15, cost_model=PUBLISHED),
            _row("estimated", 13.1, model="ds", case_id="ds[int8]", latency_error=0.08, cost_model=CALIBRATED),
            _row("measured", 3.0, model="ad", case_id="ad[int8]")]
    markdown, page = _report(tmp_path, "full", rows)
    assert "12.5 ms ±15% (est.)" in markdown and "13.1 ms ±8% (cal. est.)" in markdown
    assert "3.00 ms (meas.)" in markdown and "3.00 ms ±" not in markdown
    assert f"Latency of ds[int8]: estimated, {CALIBRATED}; ±8% is the stated error of that calibration." in markdown
    assert "Latency of kws[int8]: estimated by the cost model" in markdown and HELD_OUT in markdown
    assert f"estimated, {CALIBRATED}" in page
    calibrated, _ = _report(tmp_path, "calibrated",
                            [_row("estimated", 13.1, latency_error=0.08, cost_model=CALIBRATED)])
    assert "| Inference time (estimated, calibrated) " in calibrated and "| 13.1 ms ±8% " in calibrated


def test_a_diagnosed_row_gets_its_divergence_and_quantization_strips_and_the_verdicts(tmp_path):
    layers = tuple(LayerTiming(index, op, 100.0, 24_000, 5_000) for index, op in enumerate(
        ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")))
    divergence = {"sample_index": 4, "tolerance_lsb": 1, "text": "op 1 (DEPTHWISE_CONV_2D, esp-nn) is the first",
                  "first_vs_tflm": {"op_index": 1}, "first_vs_litert": None,
                  "layers": [{"op_index": i, "vs_tflm_max_lsb": lsb} for i, lsb in enumerate((0, 32, 120))]}
    errors = tuple({"op_index": i, "op_name": op.op, "tensor_name": f"t{i}", "scale": 0.1, "zero_point": 0,
                    "rmse": 0.01 * (i + 1), "rmse_per_scale": 0.1 * (i + 1), "max_abs_error": 0.05, "elements": 10}
                   for i, op in enumerate(layers))
    diagnosis = {"kind": "divergence", "title": "The board's outputs first diverge at op 1 (DEPTHWISE_CONV_2D, esp-nn "
                 "kernel)", "evidence": ["op 1 is the first"], "suggestion": "check that op's kernel"}
    rows = [_row("estimated", 1.0, case_id=f"kws[int8-cal{n}-train]", variant=f"int8-cal{n}-train",
                 calibration_samples=n, calibration_source="train", board_accuracy=accuracy, layers=layers,
                 **({"divergence": divergence, "quantization_errors": errors, "diagnoses": (diagnosis,)} if n == 50
                    else {}))
            for n, accuracy in ((50, 0.90), (500, 0.905))]
    write_report([_run(tmp_path / "run", "virtual", rows)], tmp_path / "out", generated="2026-12-02")
    page = (tmp_path / "out" / "benchmarks.html").read_text()
    # The strips sit beside the diagnosed row's latency plot only.
    assert page.count("divergence (sample 4)") == 1 and page.count("board vs host TFLM, max LSB") == 1
    assert page.count("int8 RMSE, quantization steps") == 1
    assert "Verdict: kws (train calibration): 50 training samples are enough" in page
    assert "<h3>Diagnoses</h3>" in page and "first diverge at op 1" in page
    markdown = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    assert "### Diagnoses" in markdown and "layers that lose most to int8: op 2 FULLY_CONNECTED (0.30 steps)" in markdown
    assert "- kws (train calibration): 50 training samples are enough (90.0% against 90.5% with 500" in markdown
