"""`tinyhil` command line: a thin layer over the library. Errors print as one line; details go to
the session log. Exit codes: 0 all passed, 1 a threshold failed or a metric regressed, 2 an error
(including a baseline that cannot be compared)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .errors import TinyhilError
from .sources import DEFAULT_ESP_NN_VERSION, ESP_NN_VERSIONS
from .suite import PROFILES, load_suite

EXIT_OK, EXIT_THRESHOLD, EXIT_ERROR = 0, 1, 2


def _run(args: argparse.Namespace) -> int:
    from .farm import FarmSettings, board_specs, labgrid_tags
    from .pipeline import BenchSession
    from .progress import for_stream
    from .explain import diagnosis_summary
    from .report import terminal_table

    suites, status = [], EXIT_OK
    for path in args.suites:
        try:
            suites.append(load_suite(path, args.profile))
        except TinyhilError as error:
            print(f"error: {error.one_line()}", file=sys.stderr)
            status = EXIT_ERROR
    progress = for_stream(sys.stderr)

    def say(line: str, stream=sys.stderr) -> None:
        progress.clear()  # the live status shares the terminal: off the line before anything else
        print(line, file=stream, flush=True)

    try:
        farm = FarmSettings(labgrid_coordinator=args.labgrid_coordinator, flasher=args.flasher,
                            labgrid_tags=labgrid_tags(args.labgrid_tags))
        board_specs(args.board)
    except TinyhilError as error:
        print(f"error: {error.one_line()}", file=sys.stderr)
        return EXIT_ERROR
    try:
        with BenchSession(board=args.board, cache_dir=Path(args.cache_dir), results_dir=Path(args.results_dir),
                          run_id=args.run_id, resume=args.resume, progress=progress,
                          flash_anyway=args.flash_anyway, diagnose=args.diagnose, farm=farm) as session:
            session.plan([case for suite in suites for case in suite.cases()])
            for suite in suites:
                for case in suite.cases():
                    try:
                        row = session.run_case(case)
                    except TinyhilError as error:  # the run, not the case: e.g. a resumed run another holds
                        say(f"error: {case.where}: {error.one_line()}")
                        status = EXIT_ERROR
                        continue
                    diagnosis = f" -- diagnosis: {diagnosis_summary(row)}" if row.diagnoses else ""
                    if row.board_note:
                        say(f"tinyhil: {case.id}: {row.board_note}")
                    if row.status == "error":
                        say(f"error: {case.where}: {row.error}{diagnosis}")
                        status = EXIT_ERROR
                    elif row.violations:
                        say(f"failed: {case.where}: {case.id}: {'; '.join(row.violations)}{diagnosis}")
                        status = max(status, EXIT_THRESHOLD)
                    else:
                        say(f"passed: {case.id}")
            if session.rows:
                say(terminal_table(session.rows, shutil.get_terminal_size().columns), sys.stdout)
                for run_dir in session.run_dirs():
                    say(f"results: {run_dir}", sys.stdout)
                say(f"log: {session.log_path}", sys.stdout)
    finally:
        progress.close()
    return status


def _validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.suites:
        try:
            suite = load_suite(path, args.profile)
        except TinyhilError as error:
            print(f"error: {error.one_line()}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        print(f"{path}: suite '{suite.name}', {len(suite.cases())} cases: "
              + ", ".join(case.id for case in suite.cases()))
    return status


def _inspect(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .tflite_model import inspect_model

    path = Path(args.model)
    if not path.is_file():
        print(f"error: {path}: no such model file", file=sys.stderr)
        return EXIT_ERROR
    try:
        info = inspect_model(path.read_bytes(), where=str(path))
    except TinyhilError as error:
        print(f"error: {error.one_line()}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{path}: {info.size_bytes} bytes, {len(info.ops)} ops, {info.total_macs} MACs, "
          f"weights {info.weight_bytes} bytes")
    for label, tensors in (("input", info.input_tensors()), ("output", info.output_tensors())):
        for tensor in tensors:
            print(f"  {label}: {tensor.dtype}{list(tensor.shape)} scale {tensor.scales[:1]} zero point "
                  f"{tensor.zero_points[:1]}")
    print(tabulate([[op.index, op.name, op.macs] for op in info.ops], headers=["#", "op", "MACs"]))
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from . import gate
    from .report import read_runs

    baseline = read_runs(Path(args.baseline))
    current = list(read_runs(Path(args.current), what="current run").values())
    comparison = gate.compare_runs(baseline, current, args.baseline)
    if not comparison.cases:
        print(f"error: {args.current}: no case of this run is in the baseline {args.baseline} "
              f"(current: {', '.join(row.case_id for row in current) or 'none'})", file=sys.stderr)
        return EXIT_ERROR
    print(gate.comparison_table(comparison))
    if args.markdown:
        Path(args.markdown).write_text(gate.comparison_markdown(comparison), encoding="utf-8")
    if args.junit:
        Path(args.junit).write_text(gate.comparison_junit(comparison), encoding="utf-8")
    regressed = [case for case in comparison.cases if case.error or any(
        change.verdict == gate.REGRESSED for change in case.changes)]
    for case in regressed:
        print(f"regressed: {case.failure_text()}", file=sys.stderr)
    incomparable = [change for change in comparison.changes if change.verdict == gate.INCOMPARABLE]
    for change in incomparable:
        print(f"error: {change}", file=sys.stderr)
    # One line per reason, not per case: a quick run against a full one refuses every case alike.
    refused: dict[str, list[str]] = {}
    for case in comparison.cases:
        if case.incomparable:
            refused.setdefault(case.incomparable, []).append(case.case_id)
    for reason, cases in refused.items():
        print(f"error: {args.current} against {args.baseline}: {gate.INCOMPARABLE} ({len(cases)} of "
              f"{len(comparison.cases)} cases: {', '.join(cases)}): {reason}", file=sys.stderr)
    if regressed:
        return EXIT_THRESHOLD
    return EXIT_ERROR if incomparable or refused else EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from .publish import write_report

    run_dirs = [Path(run_dir) for run_dir in args.run_dirs]
    if args.out is None and len(run_dirs) > 1:
        print(f"error: {len(run_dirs)} run directories given: name where the report goes with --out", file=sys.stderr)
        return EXIT_ERROR
    # By default a report stays with its run: the committed results/BENCHMARKS.md is only ever
    # replaced on purpose (make benchmarks names --out results).
    written = write_report(run_dirs, Path(args.out) if args.out is not None else run_dirs[0])
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain_run

    text, found = explain_run(Path(args.run_dir), args.case)
    print(text)
    return EXIT_OK if found else EXIT_ERROR


def _calibrate(args: argparse.Namespace) -> int:
    import csv

    from .board.costmodel import calibrate_runs
    from .board.costmodel.tables import calibration_table

    fit = calibrate_runs([Path(run_dir) for run_dir in args.run_dirs])
    out = Path(args.out)
    fit.calibration.save(out)
    print(calibration_table(fit))
    print(f"\n{fit.calibration.describe()}: {fit.calibration.layers} layers of {len(fit.models)} models; estimates "
          f"made with it carry ±{fit.calibration.relative_error:.0%} ({fit.calibration.error_basis})")
    print(f"wrote {out}")
    if args.layers:
        with open(args.layers, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(fit.layers[0]))
            writer.writeheader()
            writer.writerows(fit.layers)
        print(f"wrote {args.layers}")
    return EXIT_OK


def _estimate(args: argparse.Namespace) -> int:
    from .board.costmodel import ChipConfig, estimate_latency, load_calibration
    from .board.costmodel.tables import estimate_summary, estimate_table
    from .tflite_model import inspect_model, read_model_file

    info = inspect_model(read_model_file(Path(args.model)), where=args.model)
    chip = ChipConfig(cpu_mhz=args.cpu_mhz, esp_nn=not args.no_esp_nn, tensors_in_psram=args.arena == "psram",
                      esp_nn_version=args.esp_nn_version)
    calibration = load_calibration(Path(args.calibration)) if args.calibration else None
    estimate = estimate_latency(info, chip, calibration)
    if not args.total:
        print(estimate_table(info, estimate))
    print(f"{args.model}: {estimate_summary(estimate)}, arena in {args.arena.upper()}")
    return EXIT_OK


def _example_data(args: argparse.Namespace) -> int:
    from .datasets.examples import write_example_data

    written = write_example_data(Path(args.directory), seed=args.seed)
    for name, path in written.items():
        print(f"wrote {name}: {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyhil", description="TinyML benchmarking on the ESP32-S3")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run suites on a board and write results tables")
    run.add_argument("suites", nargs="+", help="suite YAML files")
    run.add_argument("--board", default="virtual",
                     help="virtual (default), auto, /dev/ttyACM0, a pyserial URL, labgrid:PLACE or labgrid; a comma "
                          "list of ports or places is a pool: a board that fails is taken out and the case runs "
                          "again on the next (several at once: pytest -n N, docs/farm.md)")
    run.add_argument("--labgrid-coordinator", default=None, metavar="HOST:PORT",
                     help="labgrid coordinator (default: $LG_COORDINATOR, else 127.0.0.1:20408)")
    run.add_argument("--labgrid-tags", default="board=esp32s3", metavar="KEY=VALUE,...",
                     help="tags a place must have for --board=labgrid (default: %(default)s)")
    run.add_argument("--flasher", default="platformio", choices=("platformio", "virtual"),
                     help="platformio (a chip) or virtual (standing virtual boards, docs/farm.md)")
    run.add_argument("--profile", default="full", choices=PROFILES)
    run.add_argument("--results-dir", default="results")
    run.add_argument("--cache-dir", default=".tinyhil-cache")
    run.add_argument("--run-id", default=None)
    run.add_argument("--resume", action="store_true", help="continue an interrupted run (--run-id, or the latest)")
    run.add_argument("--flash-anyway", action="store_true", help="use and flash a port whose USB identity is not an ESP32-S3's (docs/hardware.md)")
    run.add_argument("--diagnose", default="auto", choices=("auto", "all", "off"),
                     help="auto: explain rows whose numbers are wrong; all: read every case's intermediate tensors "
                          "and per-layer quantization error too; off: none (docs/diagnosis.md)")
    run.set_defaults(handler=_run)
    explain = commands.add_parser(
        "explain", help="the diagnoses of a run: why a number is wrong (docs/diagnosis.md)",
        description="Prints, for every case of RUN_DIR (or only CASE), what the run found wrong and why: the first "
                    "operator whose output diverged on the board, the layers that lose most to quantization, the "
                    "calibration verdict, and the seed article's failure modes in plain words.")
    explain.add_argument("run_dir", help="a run directory or its results.json")
    explain.add_argument("case", nargs="?", default=None, help="a case id (model/variant); default: every case")
    explain.set_defaults(handler=_explain)
    validate = commands.add_parser("validate", help="check suite files without running anything")
    validate.add_argument("suites", nargs="+")
    validate.add_argument("--profile", default="full", choices=PROFILES)
    validate.set_defaults(handler=_validate)
    inspect = commands.add_parser("inspect", help="ops, tensors and MACs of a .tflite model")
    inspect.add_argument("model")
    inspect.set_defaults(handler=_inspect)
    compare = commands.add_parser(
        "compare", help="compare a run with a baseline run; exit 1 on a regression",
        description="Each case of CURRENT against the same case of BASELINE: latency (relative), flatbuffer and "
                    "arena bytes (exact), accuracy and output agreement (absolute points), with the thresholds "
                    "CURRENT's suite set. Both may be a results.json, a run directory or a directory of runs.")
    compare.add_argument("baseline")
    compare.add_argument("current")
    compare.add_argument("--markdown", metavar="FILE", help="write the changes as markdown (a pull-request comment)")
    compare.add_argument("--junit", metavar="FILE", help="write JUnit XML: one test case per model x variant")
    compare.set_defaults(handler=_compare)
    report_cmd = commands.add_parser(
        "report", help="render BENCHMARKS.md and an HTML report with plots from run directories")
    report_cmd.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report_cmd.add_argument("--out", default=None,
                            help="directory for BENCHMARKS.md and benchmarks.html (default: the run directory; "
                                 "required with several)")
    report_cmd.set_defaults(handler=_report)
    calibrate = commands.add_parser(
        "calibrate", help="fit the virtual board's cost model to the layers a real board measured",
        description="Reads the measured rows of run directories (tinyhil run --board=/dev/ttyACM0), fits the cost "
                    "model's constants to their per-layer cycles, and writes a calibration file for a suite's "
                    "board.calibration (docs/board-model.md).")
    calibrate.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    calibrate.add_argument("-o", "--out", default="calibration.json", help="the calibration file to write")
    calibrate.add_argument("--layers", metavar="CSV", help="also write each layer's measured and estimated cycles")
    calibrate.set_defaults(handler=_calibrate)
    estimate = commands.add_parser("estimate", help="the virtual board's latency estimate of a .tflite, per layer")
    estimate.add_argument("model")
    estimate.add_argument("--cpu-mhz", type=int, default=240, choices=(80, 160, 240))
    estimate.add_argument("--esp-nn-version", default=DEFAULT_ESP_NN_VERSION, choices=ESP_NN_VERSIONS)
    estimate.add_argument("--no-esp-nn", action="store_true", help="TFLM's reference kernels only")
    estimate.add_argument("--arena", default="psram", choices=("sram", "psram"))
    estimate.add_argument("--calibration", metavar="FILE", help="a file `tinyhil calibrate` wrote")
    estimate.add_argument("--total", action="store_true", help="print the total only")
    estimate.set_defaults(handler=_estimate)
    example = commands.add_parser("example-data", help="write the small data sets suites/examples/own-data.yaml reads "
                                                       "(CSV, image and WAV folders, an .npz)")
    example.add_argument("directory", help="where to write them (suites/examples/data for the example suite)")
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(handler=_example_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
        sys.stdout.flush()  # here, not at exit: a reader that left is then caught below
        return status
    except TinyhilError as error:
        print(f"error: {error.one_line()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left early (`tinyhil inspect model.tflite | head`): nothing more to tell it.
        # Python's own recipe: point stdout at devnull so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
