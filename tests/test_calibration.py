"""Calibrating the cost model on a board: `tinyhil calibrate` on runs whose per-layer cycles come
from known constants must give those constants back; a suite's `board.calibration` makes the
virtual board estimate with them and say so."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from harness.board.costmodel import (
    STATED_ERROR_REFERENCE,
    Calibration,
    ChipConfig,
    Constants,
    calibrate_runs,
    default_constants,
    estimate_latency,
    load_calibration,
)
from harness.board.costmodel.mobilenet_v3 import mobilenet_v3_small_tflite
from harness.board.costmodel.model import estimate_with, layer_terms, op_work
from harness.cli import main
from harness.errors import CalibrationError, SuiteError
from harness.pipeline import BenchSession
from harness.report import CaseResult, LayerTiming, RunMetadata, write_results
from harness.suite import load_suite
from harness.tflite_model import inspect_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PROFILER_CYCLES = 350


def _board_constants(base: Constants) -> dict[str, float]:
    """A made-up board: slower stalls, faster PSRAM, slower flash, heavier dispatch."""
    values = dict(base.values)
    for name in list(values):
        if name.startswith("esp-nn-") and "/ansi." not in name:
            values[name] *= 1.15
    values["memory.psram_read_ns_per_byte"] *= 0.6
    values["memory.psram_write_ns_per_byte"] *= 0.7
    values["memory.flash_read_ns_per_byte"] *= 1.3
    values["memory.sram_cycles_per_byte"] *= 1.5
    values["dispatch.op_cycles"] = 900.0
    values["dispatch.invoke_cycles"] = 4000.0
    values["tflm-reference.element"] *= 1.4
    return values


def _measured_run(run_dir: Path, models: dict[str, Path], truth: Constants, configs: list[ChipConfig]) -> None:
    """results.json of a board whose every layer took what `truth` says: the rows a real run on
    that board would have written (measured, per-layer cycles of the profiled pass)."""
    rows = []
    for name, path in models.items():
        info = inspect_model(path.read_bytes())
        for config in configs:
            estimate = estimate_with(info, config, truth, relative_error=0.0, cost_model="")
            # The layers come from the profiled pass: each carries the profiler's own cost, which
            # the unprofiled latency does not.
            layers = tuple(LayerTiming(op.index, op.name, (op.cycles + PROFILER_CYCLES) / config.cpu_mhz,
                                       op.cycles + PROFILER_CYCLES, op.macs) for op in estimate.ops)
            profiler_ms = PROFILER_CYCLES * len(layers) / config.cpu_mhz / 1000
            suffix = f"{config.cpu_mhz}-{'psram' if config.tensors_in_psram else 'sram'}"
            rows.append(CaseResult(
                suite="calibration", model=name, variant=suffix, case_id=f"{name}[{suffix}]", quantization="as-is",
                status="passed", board="/dev/ttyACM0", latency_kind="measured", cpu_mhz=config.cpu_mhz,
                esp_nn=config.esp_nn, arena_in_psram=config.tensors_in_psram, firmware_build="chip",
                esp_tflite_micro="1.3.8", esp_nn_version=config.esp_nn_version, idf_version="5.5.3",
                optimisation="-O2", model_path=str(path), latency_median_ms=estimate.total_us / 1000,
                profiler_overhead_ms=profiler_ms, layers=layers))
    write_results(run_dir, RunMetadata(suite="calibration", suite_path="suite.yaml", profile="full",
                                       board="/dev/ttyACM0", run_id=run_dir.name, started="2026-11-30T10:00:00",
                                       tinyhil_version="test", libraries={}), rows)


@pytest.fixture(scope="module")
def calibration_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    models = {"mobilenet_v3_small": mobilenet_v3_small_tflite(REPO / ".tinyhil-cache")}
    for name in ("mlperf-tiny/kws_ref_model", "tflm-examples/person_detect"):
        if (SHARED / "models" / f"{name}.tflite").is_file():
            models[name.split("/")[1]] = SHARED / "models" / f"{name}.tflite"
    copies = {}
    for name, path in models.items():
        copies[name] = folder / f"{name}.tflite"
        shutil.copyfile(path, copies[name])
    return copies


CONFIGS = [ChipConfig(cpu_mhz=240, tensors_in_psram=True, esp_nn_version="1.2.3"),
           ChipConfig(cpu_mhz=240, tensors_in_psram=False, esp_nn_version="1.2.3"),
           ChipConfig(cpu_mhz=160, tensors_in_psram=True, esp_nn_version="1.2.3")]


def _one_network_calibration(tmp_path: Path, calibration_models: dict[str, Path], saved_as: Path) -> Calibration:
    """MobileNetV3-Small measured once on the made-up board (esp-nn 1.2.3, 240 MHz, PSRAM), fitted
    and saved: the calibration most tests here need."""
    run = tmp_path / "run-one-network"
    _measured_run(run, {"mobilenet_v3_small": calibration_models["mobilenet_v3_small"]},
                  Constants(_board_constants(default_constants())), CONFIGS[:1])
    calibration = calibrate_runs([run]).calibration
    calibration.save(saved_as)
    return calibration


def test_calibration_recovers_the_constants_the_layers_were_made_with(tmp_path, calibration_models) -> None:
    base = default_constants()
    truth = Constants(_board_constants(base))
    run = tmp_path / "20261130-100000-abcd"
    _measured_run(run, calibration_models, truth, CONFIGS)
    fit = calibrate_runs([run])
    values = fit.calibration.values
    # Every constant the layers pay is fitted; the ones they pay enough of must come back.
    assert {"memory.psram_read_ns_per_byte", "memory.flash_read_ns_per_byte", "dispatch.op_cycles",
            "esp-nn-1.2.3/conv_1x1_mult8", "tflm-reference.element"} <= set(values)
    wrong = {name: (value, truth[name]) for name, value in values.items()
             if value != pytest.approx(truth[name], rel=0.02)}
    assert not wrong
    assert values["dispatch.invoke_cycles"] == pytest.approx(4000, rel=1e-3)
    for model in fit.models:
        assert model["calibrated_error"] == pytest.approx(0.0, abs=0.005)
        assert abs(model["published_error"]) > 0.05          # the published fit was off for this board
    # Its error: each network left out of the fit, in every setting it ran in, and predicted from
    # the others; a path only it runs keeps its published constant, so the error is not nil.
    networks = len(calibration_models)
    assert fit.calibration.error_basis == f"largest error of a network left out of the fit, over {networks} networks"
    assert 0.01 <= fit.calibration.relative_error <= 0.30


def test_a_calibration_file_round_trips_and_names_its_board(tmp_path, calibration_models) -> None:
    path = tmp_path / "board.json"
    calibration = _one_network_calibration(tmp_path, calibration_models, path)
    loaded = load_calibration(path)
    assert replace(loaded, source="") == calibration
    assert loaded.describe() == ("calibrated on /dev/ttyACM0, 2026-11-30, chip build, esp-tflite-micro 1.3.8, "
                                 "esp-nn 1.2.3, ESP-IDF 5.5.3 -O2")
    # One model: nothing is left to check the fit on, so the published fit's error stands (the
    # reference kernels' here: on this board they take most of MobileNetV3-Small's time).
    info = inspect_model(calibration_models["mobilenet_v3_small"].read_bytes())
    estimate = estimate_latency(info, CONFIGS[0], loaded)
    assert sum(op.cycles for op in estimate.ops if op.kernel == "reference") > estimate.total_cycles / 2
    assert loaded.relative_error == STATED_ERROR_REFERENCE and "one network" in loaded.error_basis


@pytest.mark.parametrize("text,message", [
    ("{", "cannot read the calibration file"),
    ('{"format": "other"}', "expected format 'tinyhil-calibration/1'"),
    ('{"format": "tinyhil-calibration/1", "board": "b", "date": "d", "firmware_build": "f", "relative_error": 0.1,'
     ' "constants": {"no.such": 1.0}}', "unknown cost-model constant 'no.such'"),
    ('{"format": "tinyhil-calibration/1", "board": "b", "date": "d", "firmware_build": "f", "relative_error": 0.1,'
     ' "constants": {"dispatch.op_cycles": -3}}', "must be a finite number >= 0"),
    # Nothing runs for free: a zero here would make every ceiling infinite.
    ('{"format": "tinyhil-calibration/1", "board": "b", "date": "d", "firmware_build": "f", "relative_error": 0.1,'
     ' "constants": {"tflm-reference": 0}}', "must be > 0"),
    ('{"format": "tinyhil-calibration/1", "board": "b", "date": "d", "firmware_build": "f", "relative_error": 0.1,'
     ' "constants": {"esp-nn-1.2.3/conv_1x1_mul8": 1.2}}', "unknown cost-model constant"),
])
def test_a_bad_calibration_file_says_what_is_wrong(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=message) as raised:
        load_calibration(path)
    assert raised.value.where == str(path)


def test_calibrating_virtual_runs_is_refused(tmp_path, calibration_models) -> None:
    run = tmp_path / "virtual"
    _measured_run(run, {"m": calibration_models["mobilenet_v3_small"]}, default_constants(), CONFIGS[:1])
    data = json.loads((run / "results.json").read_text())
    for row in data["results"]:
        row["latency_kind"] = "estimated"
    (run / "results.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="virtual-board runs only hold estimates"):
        calibrate_runs([run])


def test_the_cli_calibrates_and_estimates_with_the_file(tmp_path, calibration_models, capsys) -> None:
    run = tmp_path / "20261130-100000-abcd"
    _measured_run(run, calibration_models, Constants(_board_constants(default_constants())), CONFIGS)
    out = tmp_path / "board.json"
    assert main(["calibrate", str(run), "-o", str(out), "--layers", str(tmp_path / "layers.csv")]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on /dev/ttyACM0, 2026-11-30" in printed and f"wrote {out}" in printed
    assert (tmp_path / "layers.csv").read_text().startswith("case_id,index,op,path,measured_cycles")
    model = str(calibration_models["mobilenet_v3_small"])
    assert main(["estimate", model, "--esp-nn-version", "1.2.3", "--total"]) == 0
    published = capsys.readouterr().out
    assert main(["estimate", model, "--esp-nn-version", "1.2.3", "--calibration", str(out)]) == 0
    calibrated = capsys.readouterr().out
    assert re.search(r"ms ±(25|30)%, estimated \(fitted to published timings \(esp-nn 1\.2\.3\)\)", published)
    assert "calibrated on /dev/ttyACM0" in calibrated and "conv_1x1_mult8" in calibrated
    truth = estimate_with(inspect_model(Path(model).read_bytes()), ChipConfig(esp_nn_version="1.2.3"),
                          Constants(_board_constants(default_constants())), relative_error=0, cost_model="")
    assert f"{truth.total_us / 1000:.1f} ms" in calibrated


def test_a_suite_names_a_calibration_and_the_virtual_board_estimates_with_it(tmp_path, calibration_models) -> None:
    calibration_file = tmp_path / "suites" / "board.json"
    run = tmp_path / "run"
    models = {"mobilenet_v3_small": calibration_models["mobilenet_v3_small"]}
    _measured_run(run, models, Constants(_board_constants(default_constants())), CONFIGS)
    calibrate_runs([run]).calibration.save(calibration_file)
    model = tmp_path / "models" / "sine.tflite"
    model.parent.mkdir()
    import tflite_micro

    shutil.copyfile(Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite", model)
    suite_path = tmp_path / "suites" / "suite.yaml"
    suite_path.write_text("""\
board:
  esp_nn_version: "1.2.3"
  calibration: board.json
models:
  - name: sine
    tflite: ../models/sine.tflite
    eval_samples: 3
""")
    suite = load_suite(suite_path)
    assert suite.board.virtual.calibration == str(calibration_file)
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", run_id="r") as session:
        (row,) = [session.run_case(case) for case in suite.cases()]
    assert row.status == "passed", row.error
    calibration = load_calibration(calibration_file)
    assert row.cost_model == calibration.describe() and row.latency_error == calibration.relative_error
    info = inspect_model(model.read_bytes())
    chip = ChipConfig(tensors_in_psram=False, esp_nn_version="1.2.3")
    expected = estimate_latency(info, chip, calibration)
    published = estimate_latency(info, chip)
    assert row.latency_median_ms == pytest.approx(expected.total_us / 1000, rel=0.01)
    assert row.latency_median_ms != pytest.approx(published.total_us / 1000, rel=0.01)
    assert all(layer.estimated_cycles and layer.path for layer in row.layers)
    table = (tmp_path / "results" / suite.name / "r" / "results.md").read_text()
    assert "calibrated on /dev/ttyACM0" in table


def test_a_calibration_of_another_esp_nn_build_is_refused(tmp_path, calibration_models) -> None:
    _one_network_calibration(tmp_path, calibration_models, tmp_path / "board.json")       # esp-nn 1.2.3
    suite_path = tmp_path / "suite.yaml"
    model = f"models:\n  - name: m\n    tflite: {calibration_models['mobilenet_v3_small']}\n"
    suite_path.write_text('board:\n  esp_nn_version: "1.1.2"\n  calibration: board.json\n' + model)
    with pytest.raises(SuiteError, match="measured on firmware built with esp-nn 1.2.3, this one is built "
                                         "esp-nn 1.1.2") as raised:
        load_suite(suite_path)
    assert raised.value.where == f"{suite_path}:3"
    suite_path.write_text('board:\n  esp_nn_version: "1.2.3"\n  calibration: board.json\n' + model)
    assert load_suite(suite_path).board.virtual.calibration == str(tmp_path / "board.json")


def test_a_suite_with_a_broken_calibration_fails_at_load_with_its_line(tmp_path) -> None:
    (tmp_path / "bad.json").write_text('{"format": "nope"}')
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text("board:\n  cpu_mhz: 240\n  calibration: bad.json\nmodels: []\n")
    with pytest.raises(SuiteError, match="board.calibration bad.json: not a tinyhil calibration") as raised:
        load_suite(suite_path)
    assert raised.value.where == f"{suite_path}:3"
    suite_path.write_text("board:\n  calibration: ../../etc/passwd\nmodels: []\n")
    with pytest.raises(SuiteError, match="leads out of the suite's project"):
        load_suite(suite_path)


def test_layer_terms_price_exactly_what_the_estimate_charges(calibration_models) -> None:
    # The calibration solves for constants through layer_terms; the estimate must be the same sum.
    info = inspect_model(calibration_models["mobilenet_v3_small"].read_bytes())
    constants = default_constants()
    for config in CONFIGS:
        estimate = estimate_with(info, config, constants, relative_error=0.0, cost_model="")
        for op, cost in zip(info.ops, estimate.ops):
            terms = layer_terms(op_work(op, info.tensors, config), config)
            priced = sum(amount * constants[name] for name, amount in terms.items())
            assert cost.cycles >= priced - 1e-6
            if cost.ceiling is None or cost.macs_per_cycle < cost.ceiling * 0.999:
                assert cost.cycles == pytest.approx(priced, abs=1.0)


def test_calibration_values_are_constants_the_model_has() -> None:
    known = default_constants()
    calibration = Calibration(board="b", date="d", firmware_build="f", values={"dispatch.op_cycles": 700.0},
                              relative_error=0.1, error_basis="")
    assert calibration.constants()["dispatch.op_cycles"] == 700.0
    assert calibration.constants()["memory.sram_cycles_per_byte"] == known["memory.sram_cycles_per_byte"]
    with pytest.raises(KeyError, match="esp-nn-1.2.3/conv_1x1_mul8"):
        calibration.constants()["esp-nn-1.2.3/conv_1x1_mul8"]          # a typo is not a routine


def test_a_resumed_run_reruns_cases_when_the_calibration_file_changes(tmp_path, calibration_models) -> None:
    calibration_file = tmp_path / "board.json"
    calibration = _one_network_calibration(tmp_path, calibration_models, calibration_file)
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(f"board:\n  esp_nn_version: '1.2.3'\n  calibration: board.json\nmodels:\n  - name: m\n"
                          f"    tflite: {calibration_models['mobilenet_v3_small']}\n")
    with BenchSession(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results") as session:
        (case,) = load_suite(suite_path).cases()
        before = session.case_fingerprint(case)
        # Same file name, other constants: another board model, so a resumed run must not keep its rows.
        replace(calibration, values={**calibration.values, "dispatch.op_cycles": 1234.0}).save(calibration_file)
        (case,) = load_suite(suite_path).cases()
        after = session.case_fingerprint(case)
    assert before["parts"]["board"] != after["parts"]["board"]
    assert before["parts"]["model"] == after["parts"]["model"]


def test_a_variant_on_another_esp_nn_than_the_calibration_fails_its_case(tmp_path, calibration_models) -> None:
    from harness.pipeline import _check_calibration

    _one_network_calibration(tmp_path, calibration_models, tmp_path / "board.json")       # esp-nn 1.2.3
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text("""\
board:
  esp_nn_version: "1.2.3"
  calibration: board.json
models:
  - name: kws
    architecture: keyword_cnn
    dataset: {name: keywords}
    variants:
      - quantization: int8
        esp_nn_version: ["1.2.3", "1.1.2"]
""")
    same, other = load_suite(suite_path).cases()
    _check_calibration(same)
    # Checked before the board loads the firmware, so the case fails with the reason, not a
    # table that says "calibrated" over published constants.
    with pytest.raises(CalibrationError, match="measured on firmware built with esp-nn 1.2.3, this one is built "
                                               "esp-nn 1.1.2") as raised:
        _check_calibration(other)
    assert raised.value.where == other.where


def test_a_calibration_without_esp_nn_fits_the_reference_kernels(tmp_path, calibration_models) -> None:
    truth = Constants(_board_constants(default_constants()))
    run = tmp_path / "run"
    _measured_run(run, calibration_models, truth, [ChipConfig(esp_nn=False, tensors_in_psram=True)])
    calibration = calibrate_runs([run]).calibration
    assert calibration.values["tflm-reference"] == pytest.approx(truth["tflm-reference"], rel=0.02)
    calibration.save(tmp_path / "reference.json")
    loaded = load_calibration(tmp_path / "reference.json")
    assert loaded.esp_nn_versions == ("",)
    assert loaded.mismatch(False, "1.1.2") == ""
    assert "built with without esp-nn" not in loaded.mismatch(True, "1.1.2")
    assert "measured on firmware built without esp-nn, this one is built esp-nn 1.1.2" in loaded.mismatch(True, "1.1.2")
