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
