"""What a run's tables tell the reader (harness.report, harness.results): the terminal summary fits
the terminal, results.md gives the board settings, host and data behind every figure, and the rows
load into pandas for notebooks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from harness.report import (CaseResult, LayerTiming, RunMetadata, host_facts, read_results, summary_table,
                            terminal_table, write_results)

# The seed suite's eleven rows as the virtual board gives them (results/BENCHMARKS.md, full profile).
SEED = [("keyword_cnn", "int8-cal50", 11_960, 6_304, 1.64, 0.935, 50), ("keyword_cnn", "int8-cal500", 11_960, 6_304, 1.64, 0.945, 500),
        ("keyword_cnn", "float32", 29_388, 17_184, 27.13, 0.935, None), ("anomaly_cnn1d", "int8", 10_136, 6_960, 1.16, 0.83, 200),
        ("anomaly_cnn1d", "float32", 17_510, 18_640, 51.93, 0.83, None), ("mobilenet_v2", "int8", 636_314, 210_016, 91.48, 0.90, 100),
        ("mobilenet_v2", "float32", 1_646_900, 624_640, 3337.36, 0.91, None), ("lstm", "int8", 9_932, 4_816, 11.21, 0.89, 100),
        ("lstm", "float32", 23_756, 10_650, 9.91, 0.885, None), ("ds_cnn", "int8", 44_748, 23_960, 21.37, 0.96, 200),
        ("ds_cnn", "float32", 94_208, 71_780, 823.6, 0.96, None)]
DATA = {"keyword_cnn": ("keywords", "generated: formant-synthesized yes, no + noise-only silence, 16 kHz, seed 1"),
        "ds_cnn": ("keywords", "generated: formant-synthesized yes, no + noise-only silence, 16 kHz, seed 1"),
        "anomaly_cnn1d": ("vibration", "generated: simulated bearing accelerometer at 1 kHz, fault_severity 1.0, seed 1"),
        "mobilenet_v2": ("digits", "real: scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits), "
                                   "8x8 upscaled"),
        "lstm": ("basic_motions", "real: BasicMotions (UEA archive; smartwatch accelerometer+gyroscope at 10 Hz), "
                                  "from sktime")}


def seed_rows(profile: str = "full") -> list[CaseResult]:
    rows = []
    for model, variant, size, arena, latency, accuracy, calibration in SEED:
        dataset, source = DATA[model]
        rows.append(CaseResult(
            suite="seed", model=model, variant=variant, case_id=f"{model}[{variant}]",
            quantization="float32" if variant == "float32" else "int8", status="passed", profile=profile,
            calibration_samples=calibration, source=f"zoo:{model}", dataset=dataset, dataset_source=source,
            board="virtual", latency_kind="estimated", cpu_mhz=240, esp_nn=True, esp_nn_version="1.1.2",
            arena_in_psram=arena > 320 * 1024, firmware_build="native", esp_tflite_micro="1.3.8", model_bytes=size,
            arena_bytes=arena, arena_size=arena + 4096, latency_median_ms=latency, latency_p90_ms=latency,
            float_accuracy=accuracy - 0.002, reference_accuracy=accuracy, board_accuracy=accuracy,
            reference_source="litert-builtin-ref", exact_match=1.0, host_tflm_exact_match=1.0, output_agreement=1.0,
            max_abs_diff=0.0, diff_unit="LSB", top1_agreement=1.0, cosine_similarity=1.0, rmse=0.0,
            eval_samples=200, total_macs=80_672, macs_per_cycle=0.2049,
            latency_windows_ms=((latency,) * 200,),
            layers=(LayerTiming(0, "CONV_2D", 1124.0, 269_816, 27_072), LayerTiming(1, "MAX_POOL_2D", 41.0, 9_911, 0))))
    return rows


def metadata(profile: str = "full", host: dict[str, str] | None = None) -> RunMetadata:
    return RunMetadata(suite="seed", suite_path="suites/seed.yaml", profile=profile, board="virtual",
                       run_id="r1", started="2026-12-01T15:05:26+00:00", tinyhil_version="0.1.0",
                       libraries={"tensorflow": "2.21.0"}, host=host if host is not None else host_facts())


@pytest.mark.parametrize("width", [80, 120])
def test_terminal_summary_fits_the_terminal_and_keeps_the_main_columns(width):
    rows = seed_rows()
    rows[9] = replace(rows[9], status="failed", output_agreement=0.56,
                      violations=("output_agreement 0.56 < min 0.99 (against LiteRT; the board matches host TFLM bit "
                                  "for bit on every sample: the two reference interpreters disagree, not the board)",))
    assert max(map(len, summary_table(rows).splitlines())) > 200  # results.md keeps every column
    text = terminal_table(rows, width)
    lines = text.splitlines()
    assert max(map(len, lines)) < width, text
    header = lines[0]
    for column in ("model", "variant", "latency ms (estimated)", "board acc", "status"):
        assert column in header, (column, header)
    body = lines[2:13]
    assert [line.split()[0] for line in body] == [model for model, *_ in SEED]
    assert "failed" in body[9] and "passed" in body[0]
    assert "not shown at this terminal width (see results.md)" in text
    if width == 120:
        # Wide enough for the agreement and its reference: a LiteRT disagreement on a board that
        # matches host TFLM bit for bit reads as what it is.
        assert "agreement vs LiteRT" in header and "= host TFLM" in header
        assert "56.0%" in body[9] and body[9].count("100.0%") == 1


def test_terminal_summary_on_a_wide_terminal_has_every_column():
    text = terminal_table(seed_rows(), 400)
    assert "not shown" not in text and "RMSE" in text and "max diff" in text and "data" in text.splitlines()[0]


def test_results_md_gives_clock_kernels_arena_placement_host_data_and_units(tmp_path):
    rows = seed_rows()
    host = {"cpu": "AMD EPYC 7B13", "cores": "2", "machine": "x86_64", "os": "Debian GNU/Linux 12 (Linux 6.1)",
            "python": "CPython 3.11.7"}
    write_results(tmp_path, metadata(host=host), rows)
    text = (tmp_path / "results.md").read_text()
    assert "Board settings: clock 240 MHz; kernels ESP-NN (esp-nn 1.1.2); arena in SRAM (the other rows); " \
           "PSRAM (mobilenet_v2[float32])." in text
    assert "Host (training, conversion, reference): cpu AMD EPYC 7B13; cores 2; machine x86_64; os Debian" in text
    assert "- keywords: generated: formant-synthesized" in text and "- digits: real: scikit-learn" in text
    assert "| keywords (generated) " in text and "| digits (real) " in text
    assert "size KiB" in text and "arena KiB" in text and " KB" not in text and "KiB (1024 bytes)" in text
    # Estimates do not depend on the input: no p90 column repeating the median, and the reason.
    assert "| p90" not in text and "p90 is given for measured latency only" in text
    assert "agreement vs LiteRT" in text and "= host TFLM" in text
    assert "quick profile" not in text.lower()


def test_results_md_keeps_p90_for_measured_rows_only():
    rows = seed_rows()[:2]
    rows[1] = replace(rows[1], latency_kind="measured", latency_p90_ms=1.93, board="/dev/ttyACM0")
    table = summary_table(rows)
    header, _, first, second = table.splitlines()[:4]
    assert "| p90 " in header
    cells = lambda line: [cell.strip() for cell in line.split("|")]  # noqa: E731
    column = cells(header).index("p90")
    assert cells(first)[column] == "" and cells(second)[column] == "1.93 meas."


def test_host_facts_name_the_machine_but_not_the_host_or_user():
    import getpass
    import platform
    import socket

    facts = host_facts()
    assert {"cpu", "cores", "machine", "os", "python"} <= set(facts)
    assert facts["machine"] == platform.machine() and platform.python_version() in facts["python"]
    assert facts["cpu"] and facts["cpu"] != "unknown"
    text = " ".join(facts.values())
    assert socket.gethostname() not in text and getpass.getuser() not in text.split()


def test_metadata_without_host_still_loads(tmp_path):
    """results.json of runs from before the host was recorded."""
    write_results(tmp_path, metadata(host={}), seed_rows()[:1])
    import json

    document = json.loads((tmp_path / "results.json").read_text())
    del document["metadata"]["host"]
    (tmp_path / "results.json").write_text(json.dumps(document))
    from harness.publish import load_run

    assert load_run(tmp_path).metadata.host == {}


def test_rows_load_as_dataframes_for_notebooks(tmp_path):
    from harness import load_layers, load_results

    rows = seed_rows()
    rows[2] = replace(rows[2], status="failed", violations=("latency_ms 27.13 > max 20",))
    write_results(tmp_path / "run", metadata(), rows)
    frame = load_results(tmp_path / "run")
    assert isinstance(frame, pd.DataFrame) and len(frame) == 11
    assert list(frame["case_id"]) == [row.case_id for row in rows]
    assert frame.loc[0, "run_id"] == "r1" and frame.loc[0, "profile"] == "full"
    # Types from the fields, gaps as <NA>: an int column with a gap stays integer, a float column of
    # whole numbers stays float.
    assert str(frame["calibration_samples"].dtype) == "Int64" and pd.isna(frame.loc[2, "calibration_samples"])
    assert str(frame["latency_median_ms"].dtype) == "Float64" and str(frame["esp_nn"].dtype) == "boolean"
    assert frame.loc[2, "violations"] == ("latency_ms 27.13 > max 20",)
    by_quantization = frame.groupby("quantization")["latency_median_ms"].median()
    assert by_quantization["int8"] < by_quantization["float32"]
    assert load_results(tmp_path / "run" / "results.json").equals(frame)
    layers = load_layers(tmp_path / "run")
    assert len(layers) == 22 and str(layers["time_us"].dtype) == "Float64"
    assert layers.groupby("op")["cycles"].sum()["CONV_2D"] == 11 * 269_816
    assert set(layers["case_id"]) == set(frame["case_id"])


def test_csv_files_keep_integers_and_join_violations(tmp_path):
    rows = seed_rows()[:3]
    rows[1] = replace(rows[1], violations=("a < min 1", "b > max 2"))
    write_results(tmp_path, metadata(), rows)
    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame["calibration_samples"].astype("Int64")) == [50, 500, pd.NA]
    assert "50.0" not in (tmp_path / "results.csv").read_text().split("\n")[1]
    assert frame.loc[1, "violations"] == "a < min 1; b > max 2"
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(layers.columns[:3]) == ["case_id", "model", "variant"] and len(layers) == 6


def test_old_results_without_a_profile_per_row_take_the_runs(tmp_path):
    write_results(tmp_path, metadata(profile="quick"), [replace(seed_rows()[0], profile="")])
    _, (row,) = read_results(tmp_path)
    assert row.profile == "quick"


def test_docs_name_load_results():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "load_results(" in readme and "load_layers(" in readme


def test_terminal_summary_leaves_out_columns_no_row_fills():
    """A model run on random inputs has no accuracy: its empty columns must not take the place of
    figures it has."""
    row = replace(seed_rows()[0], dataset="", dataset_source="", source="tflite:sine.tflite", float_accuracy=None,
                  reference_accuracy=None, board_accuracy=None)
    header = terminal_table([row], 100).splitlines()[0]
    assert "acc" not in header and "agreement vs LiteRT" in header and "= host TFLM" in header


# --- issue 12: estimates carry their stated error, layers their code path, measured runs their drift ---

PUBLISHED = "published kernel tables (esp-nn 1.1.2)"
CALIBRATED = "calibrated on ESP32-S3-DevKitC-1 /dev/ttyACM0, 2026-11-30, chip build esp-nn 1.1.2 -O2"


def _estimated(rows: list[CaseResult], error: float = 0.15, model: str = PUBLISHED) -> list[CaseResult]:
    return [replace(row, latency_error=error, cost_model=model) for row in rows]


def _cells(table: str, column: str) -> list[str]:
    lines = table.splitlines()
    titles = [cell.strip() for cell in lines[0].split("|")]
    return [[cell.strip() for cell in line.split("|")][titles.index(column)] for line in lines[2:]]


@pytest.mark.parametrize("width", [80, 120])
def test_an_estimated_latency_carries_its_band_and_the_terminal_table_still_fits(width):
    rows = _estimated(seed_rows())
    assert _cells(summary_table(rows), "latency ms (estimated)")[:3] == ["1.64 ±15%", "1.64 ±15%", "27.13 ±15%"]
    text = terminal_table(rows, width)
    assert max(map(len, text.splitlines())) < width, text
    assert "latency ms (estimated)" in text.splitlines()[0] and "3337.36 ±15%" in text


def test_a_table_mixing_kinds_marks_each_value_with_its_band(tmp_path):
    rows = _estimated(seed_rows()[:3])
    rows[1] = replace(rows[1], latency_kind="measured", board="/dev/ttyACM0", latency_error=None, cost_model="",
                      latency_median_ms=1.87, latency_p90_ms=1.93)
    rows[2] = replace(rows[2], cost_model=CALIBRATED, latency_error=0.08)
    assert _cells(summary_table(rows), "latency ms") == ["1.64 ±15% est.", "1.87 meas.", "27.13 ±8% cal. est."]
    text = terminal_table(rows, 80)
    assert max(map(len, text.splitlines())) < 80, text
    assert "1.64 ±15% est." in text and "27.13 ±8% cal. est." in text
    write_results(tmp_path, metadata(), rows)
    markdown = (tmp_path / "results.md").read_text()
    # Two cost models in one run: each note names its rows.
    assert ("Latency of keyword_cnn[int8-cal50]: estimated by the cost model (published kernel tables (esp-nn "
            "1.1.2)); ±15% is the stated error of the cost model from its held-out validation, "
            "docs/board-model.md.") in markdown
    assert (f"Latency of keyword_cnn[float32]: estimated, {CALIBRATED}; ±8% is the stated error of that "
            "calibration.") in markdown


def test_results_md_says_where_the_band_of_an_estimate_comes_from(tmp_path):
    write_results(tmp_path / "published", metadata(), _estimated(seed_rows()))
    markdown = (tmp_path / "published" / "results.md").read_text()
    assert ("Latency: estimated by the cost model (published kernel tables (esp-nn 1.1.2)); ±15% is the stated "
            "error of the cost model from its held-out validation, docs/board-model.md.") in markdown
    write_results(tmp_path / "calibrated", metadata(), _estimated(seed_rows(), 0.08, CALIBRATED))
    markdown = (tmp_path / "calibrated" / "results.md").read_text()
    assert "| latency ms (estimated, calibrated) " in markdown and "| 91.48 ±8% " in markdown
    assert f"Latency: estimated, {CALIBRATED}; ±8% is the stated error of that calibration." in markdown
    # Rows from before estimates carried an error: no band, and the note says there is none.
    write_results(tmp_path / "old", metadata(), seed_rows())
    markdown = (tmp_path / "old" / "results.md").read_text()
    assert "±" not in markdown and "no stated error recorded" in markdown


def kws_layers() -> tuple[LayerTiming, ...]:
    """keyword_cnn[int8-cal50]'s layers as the pipeline records them on a board at 240 MHz, with their
    code paths and the cost model's cycles."""
    return (LayerTiming(0, "CONV_2D", 380.4, 91_296, 35_280, "esp-nn generic conv (s8, 3x3, 1 -> 8 ch)", 0.45, 87_112),
            LayerTiming(1, "DEPTHWISE_CONV_2D", 102.6, 24_624, 8_640, "esp-nn depthwise 3x3 (s8, mult 1)", 0.62, 22_005),
            LayerTiming(2, "CONV_2D", 160.2, 38_448, 36_864, "esp-nn 1x1 conv (s8, ch%8==0)", 1.24, 33_810),
            LayerTiming(3, "FULLY_CONNECTED", 6.3, 1_512, 1_536, "esp-nn fully connected (s8)", 1.18, 1_330),
            LayerTiming(4, "SOFTMAX", 9.8, 2_352, 0, "esp-nn softmax (s8)", None, 2_460))


def test_layers_give_their_code_path_and_efficiency_against_the_path_ceiling(tmp_path):
    from harness import load_layers

    rows = [replace(row, layers=kws_layers()) for row in _estimated(seed_rows()[:2])]
    write_results(tmp_path, metadata(), rows)
    _, loaded = read_results(tmp_path)
    assert loaded[0].layers == kws_layers() and loaded[0].latency_error == 0.15 and loaded[0].cost_model == PUBLISHED
    layers = load_layers(tmp_path)
    assert {name: str(layers[name].dtype) for name in ("path", "path_ceiling", "ceiling_efficiency",
                                                       "estimated_cycles")} == {
        "path": "string", "path_ceiling": "Float64", "ceiling_efficiency": "Float64", "estimated_cycles": "Int64"}
    conv1x1 = layers[(layers["case_id"] == "keyword_cnn[int8-cal50]") & (layers["op_index"] == 2)].iloc[0]
    assert conv1x1["path"] == "esp-nn 1x1 conv (s8, ch%8==0)" and conv1x1["estimated_cycles"] == 33_810
    # 36,864 MACs in 38,448 cycles: 0.959 MAC/cycle, 6.0% of the PIE peak, 77.3% of the path's 1.24.
    assert conv1x1["pie_efficiency"] == pytest.approx(0.05993, abs=1e-5)
    assert conv1x1["ceiling_efficiency"] == pytest.approx(0.95880 / 1.24, abs=1e-5)
    softmax = layers[layers["op"] == "SOFTMAX"].iloc[0]
    assert pd.isna(softmax["path_ceiling"]) and pd.isna(softmax["ceiling_efficiency"])
    csv = pd.read_csv(tmp_path / "layers.csv")
    assert {"path", "path_ceiling", "ceiling_efficiency", "estimated_cycles"} <= set(csv.columns)
    assert csv.loc[2, "ceiling_efficiency"] == pytest.approx(0.77323, abs=1e-5)
    assert "path_ceiling" in (tmp_path / "results.md").read_text()


def test_results_written_before_paths_and_bands_still_load(tmp_path):
    import json

    from harness import load_layers

    write_results(tmp_path, metadata(), seed_rows()[:1])
    document = json.loads((tmp_path / "results.json").read_text())
    row = document["results"][0]
    for key in ("latency_error", "cost_model", "estimated_latency_ms"):
        del row[key]
    for layer in row["layers"]:
        for key in ("path", "path_ceiling", "estimated_cycles", "ceiling_efficiency"):
            del layer[key]
    (tmp_path / "results.json").write_text(json.dumps(document))
    _, (loaded,) = read_results(tmp_path)
    assert loaded.latency_error is None and loaded.cost_model == "" and loaded.estimated_latency_ms is None
    assert loaded.layers[0].path == "" and loaded.layers[0].ceiling_efficiency is None
    layers = load_layers(tmp_path)
    assert layers["path_ceiling"].isna().all() and str(layers["estimated_cycles"].dtype) == "Int64"


def _measured_kws(**values) -> CaseResult:
    row = replace(seed_rows()[0], board="/dev/ttyACM0", latency_kind="measured", firmware_build="chip",
                  latency_median_ms=0.72, latency_p90_ms=0.74, layers=kws_layers())
    return replace(row, **values)


def test_drift_compares_the_estimates_with_a_measured_board(tmp_path):
    from harness.drift import drift_rows

    other = _measured_kws(model="ds_cnn", variant="int8", case_id="ds_cnn[int8]", latency_median_ms=21.0,
                          estimated_latency_ms=18.9, layers=())
    rows = [_measured_kws(), other]
    drift = drift_rows(rows)
    assert [item["index"] for item in drift] == [0, 1, 2, 3, 4]
    assert drift[2] == {"case_id": "keyword_cnn[int8-cal50]", "index": 2, "op": "CONV_2D",
                        "path": "esp-nn 1x1 conv (s8, ch%8==0)", "measured_cycles": 38_448,
                        "estimated_cycles": 33_810, "error_percent": -12.06}
    assert drift[4]["error_percent"] == 4.59
    write_results(tmp_path, metadata(), rows)
    csv = pd.read_csv(tmp_path / "drift.csv")
    assert list(csv.columns) == ["case_id", "index", "op", "path", "measured_cycles", "estimated_cycles",
                                 "error_percent"]
    assert len(csv) == 5 and csv.loc[0, "error_percent"] == pytest.approx(-4.58)
    markdown = (tmp_path / "results.md").read_text()
    section = markdown.split("## Estimates against this board")[1]
    # The layers' estimated cycles at 240 MHz: 146,717 cycles = 0.61 ms against 0.72 measured; ds_cnn has
    # the pipeline's own model-level estimate.
    assert "| keyword_cnn[int8-cal50] | 0.72                 | 0.61           | -15.1%  |" in section
    assert "| ds_cnn[int8]            | 21.00                | 18.90          | -10.0%  |" in section
    assert "esp-nn 1x1 conv (s8, ch%8==0)" in section and "38,448" in section and "-12.1%" in section


def test_no_drift_without_a_measured_row_with_estimates(tmp_path):
    from harness.drift import drift_rows

    virtual = [replace(row, layers=kws_layers()) for row in _estimated(seed_rows()[:2])]
    # A measured row from before layers carried the model's cycles: nothing to compare it with.
    unestimated = _measured_kws(layers=tuple(replace(layer, estimated_cycles=None) for layer in kws_layers()))
    for rows in (virtual, [unestimated]):
        assert drift_rows(rows) == []
        write_results(tmp_path, metadata(), rows)
        assert not (tmp_path / "drift.csv").exists()
        assert "Estimates against this board" not in (tmp_path / "results.md").read_text()
