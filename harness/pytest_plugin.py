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
from .pipeline import DIAGNOSE_MODES, BenchSession
from .progress import LineProgress, LiveProgress, Progress
from .explain import diagnosis_summary
from .report import CaseResult, read_runs, terminal_table
from .suite import PROFILES, Case, load_suite

_SESSION = pytest.StashKey[BenchSession]()
_PLANNED = pytest.StashKey[list]()
_PROGRESS = pytest.StashKey[Progress]()
_BASELINE = pytest.StashKey[dict[tuple[str, str], CaseResult]]()
_COMPARED = pytest.StashKey[list[gate.CaseComparison]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tinyhil", "tinyhil benchmarking")
    group.addoption("--board", default="virtual",
                    help="virtual (default), auto (find an ESP32-S3 by USB id), a port such as /dev/ttyACM0, "
                         "or a pyserial URL such as rfc2217://host:port")
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


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_ClearProgress(config), "tinyhil-progress")
    path = config.getoption("baseline", None)
    if path is None:
        return
    try:
        config.stash[_BASELINE] = read_runs(Path(path))
    except TinyhilError as error:
        raise pytest.UsageError(f"--baseline: {error.one_line()}") from None
    config.stash[_COMPARED] = []


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


def _session(config: pytest.Config) -> BenchSession:
    if _SESSION not in config.stash:
        root = config.rootpath
        config.stash[_SESSION] = BenchSession(
            board=config.getoption("board"), cache_dir=root / config.getoption("cache_dir"),
            results_dir=root / config.getoption("results_dir"), run_id=config.getoption("run_id"),
            resume=config.getoption("resume"), progress=terminal_progress(config),
            flash_anyway=config.getoption("flash_anyway"), diagnose=config.getoption("diagnose"))
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
    def __init__(self, *, error: TinyhilError, **kwargs) -> None:
        super().__init__(**kwargs)
        self.error = error

    def runtest(self) -> None:
        pytest.fail(self.error.one_line(), pytrace=False)

    def reportinfo(self):
        return self.path, 0, f"suite {self.path.name}"


class CaseItem(pytest.Item):
    def __init__(self, *, case: Case, **kwargs) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.user_properties.append(("suite", case.suite.name))

    def runtest(self) -> None:
        try:
            row = _session(self.config).run_case(self.case)
        except TinyhilError as error:  # the run, not the case: e.g. a --run-id another live run holds
            pytest.fail(f"{self.case.where}: {error.one_line()}", pytrace=False)
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
        self.config.stash[_COMPARED].append(comparison)
        return comparison

    def reportinfo(self):
        return self.path, max(self.case.variant.line or self.case.model.line, 1) - 1, self.case.id


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None or not session.rows:
        return
    terminalreporter.section("tinyhil results")
    terminalreporter.write_line(terminal_table(session.rows, config.get_terminal_writer().fullwidth))
    for run_dir in session.run_dirs():
        terminalreporter.write_line(f"results: {run_dir}")
    terminalreporter.write_line(f"log: {session.log_path}")
    compared = config.stash.get(_COMPARED, None)
    if compared is None:
        return
    baseline = config.getoption("baseline")
    ran = {(row.suite, row.case_id) for row in session.rows}
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
