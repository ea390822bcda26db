"""pytest plugin: `pytest suites/` collects every suite file, one test item per model x variant.

A thin layer over `BenchSession`: collection is `load_suite`, an item is `run_case`, a failure is
the case's one-line reason (the details go to the session log), and the session ends with the
summary table. Suite files are the .yaml/.yml files inside a directory named `suites`, or any
named explicitly on the command line.

With `--baseline=PATH`, each item is also compared with the same case of an earlier run
(harness.gate): a regression fails the item with the model, metric, old and new values and the
threshold; a borderline change passes and is listed in the summary.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from . import gate
from .errors import TinyhilError
from .farm import DEFAULT_LABGRID_TAGS, FarmMember, FarmSettings, board_specs, check_workers, labgrid_tags
from .pipeline import DIAGNOSE_MODES, BenchSession, farm_run_id
from .progress import LineProgress, LiveProgress, Progress
from .explain import diagnosis_summary
from .report import CaseResult, read_runs, terminal_table
from .suite import PROFILES, Case, load_suite

_SESSION = pytest.StashKey[BenchSession]()
_PLANNED = pytest.StashKey[list]()
_PROGRESS = pytest.StashKey[Progress]()
_BASELINE = pytest.StashKey[dict[tuple[str, str], CaseResult]]()
# The run id the xdist controller chose for its workers to write together.
_FARM_RUN = pytest.StashKey[str]()
# Rows reported by this process or its workers: (suite, case id) -> the run directory holding the row.
_REPORTED = pytest.StashKey[dict[tuple[str, str], Path]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tinyhil", "tinyhil benchmarking")
    group.addoption("--board", default="virtual",
                    help="virtual (default), auto (find an ESP32-S3 by USB id), a port such as /dev/ttyACM0, "
                         "a pyserial URL such as rfc2217://host:port, labgrid:PLACE, or labgrid (any free place "
                         "with --labgrid-tags). With pytest-xdist's -n N: a comma list of ports/URLs/places (a "
                         "board per worker), auto (every Espressif board), virtual (N virtual boards) or "
                         "labgrid (N places) (docs/farm.md)")
    group.addoption("--labgrid-coordinator", default=None, metavar="HOST:PORT",
                    help="labgrid coordinator for --board=labgrid... (default: $LG_COORDINATOR, else "
                         "127.0.0.1:20408)")
    group.addoption("--labgrid-tags", default=",".join(f"{k}={v}" for k, v in DEFAULT_LABGRID_TAGS),
                    metavar="KEY=VALUE,...", help="the tags a place must have for --board=labgrid "
                                                  "(default: %(default)s)")
    group.addoption("--flasher", default="platformio", choices=("platformio", "virtual"),
                    help="how ports are flashed: platformio (a chip, the default) or virtual (standing virtual "
                         "boards, python -m harness.board.standing; docs/farm.md)")
    group.addoption("--profile", default="full", choices=PROFILES,
                    help="full (published tables) or quick (few samples and epochs, for tests)")
    group.addoption("--results-dir", default="results", help="where results/<suite>/<run-id>/ goes")
    group.addoption("--cache-dir", default=".tinyhil-cache", help="artifact cache (trained models, .tflite, ...)")
    group.addoption("--run-id", default=None, help="name of the run directory (default: a timestamp)")
    group.addoption("--resume", action="store_true",
                    help="continue an interrupted run (--run-id, or each suite's latest): finished rows are "
                         "kept, the rest run")
    group.addoption("--baseline", default=None, metavar="PATH",
                    help="fail on regressions against an earlier run: its results.json, its run directory, or a "
                         "directory of runs (thresholds from the suite: max_latency_increase, ...)")
    group.addoption("--baseline-summary", default=None, metavar="FILE",
                    help="with --baseline: write the changes as markdown (for a pull-request comment)")
    group.addoption("--flash-anyway", action="store_true",
                    help="use and flash a port whose USB identity is not an ESP32-S3's (docs/hardware.md)")
    group.addoption("--diagnose", default="auto", choices=DIAGNOSE_MODES,
                    help="auto (default): explain rows whose numbers are wrong (outputs off the reference, "
                         "accuracy lost to quantization, errors); all: also read every case's intermediate "
                         "tensors and per-layer quantization error; off: no diagnosis (docs/diagnosis.md)")


def _xdist_controller(config: pytest.Config) -> bool:
    return (not hasattr(config, "workerinput") and config.getoption("dist", "no") != "no"
            and bool(config.getoption("tx", None)))


def _farm_settings(config: pytest.Config) -> FarmSettings:
    workerinput = getattr(config, "workerinput", None)
    return FarmSettings(member=FarmMember.from_xdist(workerinput) if workerinput else FarmMember(),
                        joined_run=bool(workerinput and "tinyhil_run_id" in workerinput),
                        labgrid_coordinator=config.getoption("labgrid_coordinator"),
                        labgrid_tags=labgrid_tags(config.getoption("labgrid_tags")),
                        flasher=config.getoption("flasher"))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_ClearProgress(config), "tinyhil-progress")
    config.stash[_REPORTED] = {}
    if config.getoption("board", None) is not None:
        try:
            board_specs(config.getoption("board"))
            labgrid_tags(config.getoption("labgrid_tags"))
            if _xdist_controller(config):
                if config.getoption("dist") == "each":
                    raise pytest.UsageError("--dist=each would run every case on every board, and a run has one row "
                                            "per case: use the default --dist=load")
                check_workers(config.getoption("board"), len(config.getoption("tx")))
                # One run for all workers: the controller names it, each worker joins it
                # (pytest_configure_node) and writes its rows into it.
                config.stash[_FARM_RUN] = farm_run_id(config.rootpath / config.getoption("results_dir") / "logs",
                                                      config.getoption("run_id"))
                config.pluginmanager.register(_FarmController(config), "tinyhil-farm")
        except TinyhilError as error:
            raise pytest.UsageError(error.one_line()) from None
    path = config.getoption("baseline", None)
    if path is None:
        return
    try:
        config.stash[_BASELINE] = read_runs(Path(path))
    except TinyhilError as error:
        raise pytest.UsageError(f"--baseline: {error.one_line()}") from None


def _is_suite(file_path: Path, config: pytest.Config) -> bool:
    if file_path.suffix not in (".yaml", ".yml"):
        return False
    if file_path.parent.name == "suites":
        return True
    explicit = {Path(arg.split("::")[0]).resolve() for arg in config.args}
    return file_path.resolve() in explicit


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if _is_suite(file_path, parent.config):
        return SuiteFile.from_parent(parent, path=file_path)
    return None


def terminal_progress(config: pytest.Config) -> Progress:
    """The session's progress sink, through pytest's terminal reporter: on a terminal, a status
    after pytest's own text on the current line (written past the writer's line bookkeeping, so
    pytest's progress column stays where it belongs); otherwise a line per stage change, printed
    as pytest prints its own lines. Without a terminal reporter (-p no:terminal), nothing."""
    if _PROGRESS not in config.stash:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")

        def uncaptured(function):
            # During an item pytest captures fd 1, the terminal writer's too (and its width then
            # reads as the 80-column fallback); pytest's live logging writes the same way, with
            # capture suspended for the one call.
            def wrapped(*args):
                with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                    return function(*args)
            return wrapped

        if reporter is None:
            sink: Progress = Progress()
        elif reporter.isatty() and os.environ.get("TERM", "") != "dumb":
            writer = config.get_terminal_writer()
            sink = LiveProgress(uncaptured(lambda text: writer.write_raw(text, flush=True)),
                                uncaptured(lambda: writer.fullwidth - writer.width_of_current_line - 1), lead=" ")
        else:
            sink = LineProgress(uncaptured(reporter.write_line))
        config.stash[_PROGRESS] = sink
    return config.stash[_PROGRESS]


class _FarmController:
    """Hooks of the xdist controller (registered only there: xdist's hooks exist only with xdist)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        node.workerinput["tinyhil_run_id"] = self.config.stash[_FARM_RUN]


def _session(config: pytest.Config) -> BenchSession:
    if _SESSION not in config.stash:
        root = config.rootpath
        farm = _farm_settings(config)
        run_id = config.workerinput["tinyhil_run_id"] if farm.joined_run else config.getoption("run_id")
        config.stash[_SESSION] = BenchSession(
            board=config.getoption("board"), cache_dir=root / config.getoption("cache_dir"),
            results_dir=root / config.getoption("results_dir"), run_id=run_id,
            resume=config.getoption("resume"), progress=terminal_progress(config),
            flash_anyway=config.getoption("flash_anyway"), diagnose=config.getoption("diagnose"), farm=farm)
        config.stash[_SESSION].plan(config.stash.get(_PLANNED, []))
    return config.stash[_SESSION]


def pytest_collection_finish(session: pytest.Session) -> None:
    """The cases left after selection (-k, -m): what the session will run."""
    session.config.stash[_PLANNED] = [item.case for item in session.items if isinstance(item, CaseItem)]


class _ClearProgress:
    """Takes the live status off the line before pytest writes: an item's letter or word, an
    interruption, the summary. Registered per session, so the hooks can reach the sink."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def _clear(self) -> None:
        sink = self.config.stash.get(_PROGRESS, None)
        if sink is not None:
            sink.clear()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._clear()
        if hasattr(self.config, "workerinput") or report.when != "call":
            return
        # Here, in the one process or the xdist controller, whichever worker ran the case.
        properties = dict(report.user_properties)
        if "tinyhil_run_dir" in properties:
            self.config.stash[_REPORTED][(properties["suite"], properties["tinyhil_case"])] = Path(
                properties["tinyhil_run_dir"])
        note = properties.get("tinyhil_board_note")
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if note and reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"tinyhil: {properties['tinyhil_case']}: {note}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_keyboard_interrupt(self, excinfo) -> None:
        self._clear()

    @pytest.hookimpl(tryfirst=True)
    def pytest_internalerror(self, excrepr, excinfo) -> None:
        self._clear()

    @pytest.hookimpl(tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter, exitstatus, config) -> None:
        self._clear()


class SuiteFile(pytest.File):
    def collect(self):
        try:
            suite = load_suite(self.path, self.config.getoption("profile"))
        except TinyhilError as error:
            # An item, not a collection error: pytest would stop the whole session on the latter,
            # and the other suites must still run.
            yield BrokenSuiteItem.from_parent(self, name="suite", error=error)
            return
        for case in suite.cases():
            yield CaseItem.from_parent(self, name=case.id, case=case)



class BrokenSuiteItem(pytest.Item):
    # Our items take no fixtures; plugins that take every item for a test function read this
    # (labgrid's runtest_setup does, wherever labgrid is installed).
    fixturenames: tuple[str, ...] = ()

    def __init__(self, *, error: TinyhilError, **kwargs) -> None:
        super().__init__(**kwargs)
        self.error = error

    def runtest(self) -> None:
        pytest.fail(self.error.one_line(), pytrace=False)

    def reportinfo(self):
        return self.path, 0, f"suite {self.path.name}"


class CaseItem(pytest.Item):
    fixturenames: tuple[str, ...] = ()  # as BrokenSuiteItem's

    def __init__(self, *, case: Case, **kwargs) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.user_properties.append(("suite", case.suite.name))

    def runtest(self) -> None:
        try:
            row = _session(self.config).run_case(self.case)
        except TinyhilError as error:  # the run, not the case: e.g. a --run-id another live run holds
            pytest.fail(f"{self.case.where}: {error.one_line()}", pytrace=False)
        session = _session(self.config)
        self.user_properties += [("tinyhil_case", row.case_id), ("board", row.board), ("board_host", row.board_host)]
        run_dir = next((path for path in session.run_dirs() if path.parent.name == row.suite), None)
        if run_dir is not None:
            self.user_properties.append(("tinyhil_run_dir", str(run_dir)))
        if row.board_note:
            self.user_properties.append(("tinyhil_board_note", row.board_note))
        if row.latency_median_ms is not None:
            self.user_properties.append((f"latency_ms_{row.latency_kind}", f"{row.latency_median_ms:.3f}"))
        comparison = self._compare(row)
        diagnosis = f" -- diagnosis: {diagnosis_summary(row)}" if row.diagnoses else ""
        if row.status == "error":
            pytest.fail(f"{self.case.where}: {row.error}{diagnosis}", pytrace=False)
        problems = list(row.violations)
        if comparison is not None:
            problems += [f"{gate.INCOMPARABLE} with the baseline: {comparison.incomparable}"] * bool(
                comparison.incomparable)
            problems += [str(change) for change in comparison.failures]
            self.user_properties += [(f"baseline_{change.metric}", str(change)) for change in comparison.changes
                                     if change.verdict != gate.UNCHANGED]
        if problems:
            pytest.fail(f"{self.case.where}: {self.case.id}: " + "; ".join(
                problem.removeprefix(f"{self.case.id}: ") for problem in problems) + diagnosis, pytrace=False)

    def _compare(self, row: CaseResult) -> gate.CaseComparison | None:
        baseline = self.config.stash.get(_BASELINE, None)
        if baseline is None:
            return None
        base = baseline.get((row.suite, row.case_id))
        if base is None or base.status == "error":
            self.user_properties.append(("baseline", "no baseline row for this case"))
            return None
        comparison = gate.compare_case(base, row)
        return comparison

    def reportinfo(self):
        return self.path, max(self.case.variant.line or self.case.model.line, 1) - 1, self.case.id


def _reported_rows(config: pytest.Config) -> tuple[list[CaseResult], list[Path], Path | None]:
    """The rows of this session, its run directories and its log: from the session in one process;
    in an xdist controller, read from the run directories the workers reported (they wrote them)."""
    session = config.stash.get(_SESSION, None)
    if session is not None:
        return session.rows, session.run_dirs(), session.log_path
    reported = config.stash.get(_REPORTED, {})
    if not reported or _FARM_RUN not in config.stash:
        return [], [], None
    rows = []
    for run_dir in sorted(set(reported.values())):
        try:
            rows += [row for row in read_runs(run_dir, "run").values() if (row.suite, row.case_id) in reported]
        except TinyhilError as error:
            config.pluginmanager.get_plugin("terminalreporter").write_line(f"tinyhil: {error.one_line()}")
    log_path = config.rootpath / config.getoption("results_dir") / "logs" / f"{config.stash[_FARM_RUN]}.log"
    return rows, sorted(set(reported.values())), log_path


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    rows, run_dirs, log_path = _reported_rows(config)
    if not rows:
        return
    terminalreporter.section("tinyhil results")
    terminalreporter.write_line(terminal_table(rows, config.get_terminal_writer().fullwidth))
    for run_dir in run_dirs:
        terminalreporter.write_line(f"results: {run_dir}")
    terminalreporter.write_line(f"log: {log_path}")
    if _BASELINE not in config.stash:
        return
    baseline = config.getoption("baseline")
    ran = {(row.suite, row.case_id) for row in rows}
    # Compared again here, from the rows: under xdist the workers compared their own items.
    compared = [gate.compare_case(base, row) for row in rows
                if (base := config.stash[_BASELINE].get((row.suite, row.case_id))) is not None
                and base.status != "error"]
    comparison = gate.Comparison(baseline, tuple(compared), missing=(),
                                 new=tuple(case_id for suite, case_id in sorted(ran)
                                           if (suite, case_id) not in config.stash[_BASELINE]))
    terminalreporter.section("tinyhil baseline comparison")
    terminalreporter.write_line(gate.comparison_table(comparison))
    summary = config.getoption("baseline_summary")
    if summary:
        Path(summary).write_text(gate.comparison_markdown(comparison), encoding="utf-8")
        terminalreporter.write_line(f"markdown summary: {summary}")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is not None:
        session.close()
    progress = config.stash.get(_PROGRESS, None)
    if progress is not None:
        progress.close()
