"""Runs cases through the stages: suite -> model -> quantize -> reference -> firmware -> board ->
compare -> report -> gate. The CLI and the pytest plugin both drive a `BenchSession`.

The stages up to the reference are cached by a hash of their inputs (stages.py); the board stage
always runs, because it is the measurement.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from . import cache as c
from . import compare, gate, report
from . import protocol as p
from .board import Board, SerialBoard, VirtualBoard
from .board.costmodel import ChipConfig, LatencyEstimate, estimate_latency, load_calibration
from .diagnose import DIAGNOSE_MODES, CaseEvidence, Diagnoser
from .errors import BoardError, CalibrationError, TinyhilError
from .farm import BoardSource, FarmSettings, board_source
from .firmware import FIRMWARE_DIR, FirmwareBuild, plan_firmware
from .progress import Progress
from .reference import ReferenceRun, TensorQuant, model_io
from .stages import EvalSet, PreparedModel, Stages, directory_fingerprint, files_fingerprint, hash_array
from .suite import Case, LatencyWindows, Suite, is_safe_name
from .tflite_model import ModelInfo, inspect_model

log = logging.getLogger("tinyhil")

_HARNESS = Path(__file__).resolve().parent


FINGERPRINTS = "fingerprints.json"
_INTEGER_TYPES = ("int8", "uint8", "int16")


def _new_run_id() -> str:
    return f"{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _named_run_id(requested: str) -> str:
    # A run id names directories (results/<suite>/<id>, results/logs/<id>.log): the rule for
    # suite names, so nothing can leave them or hide.
    if not is_safe_name(requested):
        raise TinyhilError(f"run id {requested!r} must be letters, digits, '.', '_' or '-' (not first), at most 64",
                           where="--run-id")
    return requested


def _run_busy(logs: Path, run_id: str) -> TinyhilError:
    return TinyhilError(f"run {run_id!r} is being written by another tinyhil process that is still running "
                        f"({logs / f'{run_id}-board' / 'run.lock'} is locked); name another --run-id, or wait for it "
                        f"to end", where=str(logs.parent))


def farm_run_id(logs: Path, requested: str | None) -> str:
    """The id of a run that pytest-xdist's workers write together, chosen by the controller before
    they start. Nothing is created here (a controller of a run with no suites leaves no trace);
    each worker then holds the run with a shared lock (`BenchSession` with a joined run), so that
    another tinyhil process wanting it alone is refused while they write."""
    if requested is None:
        while True:
            run_id = _new_run_id()
            if not (logs / f"{run_id}-board").exists():
                return run_id
    run_id = _named_run_id(requested)
    lock = logs / f"{run_id}-board" / "run.lock"
    if lock.is_file():
        with c.file_lock(lock, blocking=False) as free:
            if not free:
                raise _run_busy(logs, run_id)
    return run_id


def claim_run(logs: Path, requested: str | None, held: ExitStack) -> str:
    """A run id this process has to itself: its board directory (logs/<id>-board) is created and
    locked for the session's lifetime. A new id is the time plus a random suffix, claimed by an
    exclusive mkdir, so runs started in the same second differ; an id the user names is refused
    while another live run holds it."""
    logs.mkdir(parents=True, exist_ok=True)
    if requested is None:
        while True:
            run_id = _new_run_id()
            try:
                (logs / f"{run_id}-board").mkdir()
                break
            except FileExistsError:
                continue
    else:
        run_id = _named_run_id(requested)
    _lock_run(logs, run_id, held)
    return run_id


def _lock_run(logs: Path, run_id: str, held: ExitStack, *, shared: bool = False) -> None:
    """Holds run `run_id` for this process; `shared` for the workers of one xdist run, which
    write it together (their rows merged under a lock, see BenchSession._write): another process
    wanting it alone is still refused."""
    board_dir = logs / f"{run_id}-board"
    board_dir.mkdir(parents=True, exist_ok=True)
    lock = ExitStack()
    if lock.enter_context(c.file_lock(board_dir / "run.lock", blocking=False, shared=shared)):
        held.enter_context(lock)
    else:
        lock.close()
        raise _run_busy(logs, run_id)


def _version() -> str:
    try:
        return metadata.version("tinyhil")
    except metadata.PackageNotFoundError:
        return "dev"


@dataclass
class _SuiteRun:
    suite: Suite
    run_dir: Path
    rows: list[report.CaseResult] = field(default_factory=list)
    # Rows of an interrupted run being resumed, by case id: finished ones are reused, not rerun.
    resumed: dict[str, report.CaseResult] = field(default_factory=dict)
    started: str = ""
    # What each row depends on (case_fingerprint), by case id: written beside the results, so that a
    # resumed run reuses a row only when nothing it depends on has changed.
    fingerprints: dict[str, dict] = field(default_factory=dict)
    announced: bool = False  # `latest` points here once the run has written its first results

    def all_rows(self) -> list[report.CaseResult]:
        done = {row.case_id for row in self.rows}
        return self.rows + [row for case_id, row in self.resumed.items() if case_id not in done]


@dataclass(frozen=True)
class _Measurement:
    outputs: np.ndarray                           # the board's outputs, one row per sample
    totals: list[float]                           # the evaluation pass's invoke times, ms
    cycles: list[int]
    per_op_us: list[tuple[int, ...]]
    per_op_cycles: list[tuple[int, ...]]
    windows: tuple[tuple[float, ...], ...]        # the latency windows' invoke times, ms


def measure_latency_windows(board: Board, sample: list[np.ndarray], plan: LatencyWindows,
                            case_id: str, progress: Progress | None = None) -> tuple[tuple[float, ...], ...]:
    """MLPerf Tiny's performance practice: back-to-back inferences of one input in windows;
    invoke times in ms, one tuple per window."""
    progress = progress or Progress()
    windows = []
    for window in range(plan.windows):
        progress.count(case_id, "latency windows", window + 1, plan.windows, "windows")
        results = board.infer_many([sample] * plan.inferences_per_window, profile=False)
        windows.append(tuple(result.total_us / 1000.0 for result in results))
    log.info("%s: latency windows (median ms): %s", case_id,
             ", ".join(f"{np.median(window):.3f}" for window in windows))
    return tuple(windows)


class BenchSession:
    """State of one benchmarking session: the board, the cache, the rows written so far."""

    def __init__(self, *, board: str = "virtual", cache_dir: Path, results_dir: Path, run_id: str | None = None,
                 progress: Progress | None = None, resume: bool = False, flash_anyway: bool = False,
                 diagnose: str = "auto", farm: FarmSettings | None = None) -> None:
        if diagnose not in DIAGNOSE_MODES:
            raise ValueError(f"diagnose must be one of {', '.join(DIAGNOSE_MODES)}, got {diagnose!r}")
        self.board_spec = board
        self.flash_anyway = flash_anyway
        self.resume = resume
        self._resume_run_id = run_id
        self.cache = c.ArtifactCache(Path(cache_dir))
        self.results_dir = Path(results_dir)
        self._harness_fingerprint = ""
        self.progress = progress or Progress()
        self.stages = Stages(self.cache, self.progress)
        self.diagnoser = Diagnoser(diagnose, self.stages, self.progress)
        self.host = report.host_facts()
        # Locks held while the session lives: its own run id, and a resumed run's. Taken last, so
        # a constructor that fails holds none.
        self._held = ExitStack()
        self.farm = farm or FarmSettings()
        if self.farm.joined_run:
            if run_id is None:
                raise ValueError("a worker joins the run its controller claimed: run_id is required")
            self.run_id = run_id  # chosen by the xdist controller (farm_run_id); its workers share it
            _lock_run(self.results_dir / "logs", run_id, self._held, shared=True)
        else:
            self.run_id = claim_run(self.results_dir / "logs", run_id, self._held)
        self.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self._boards: BoardSource | None = None
        self._runs: dict[str, _SuiteRun] = {}
        self.log_path = self.results_dir / "logs" / f"{self.run_id}.log"
        self._log_handler: logging.Handler | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> BenchSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_log(self) -> None:
        if self._log_handler is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_handler = logging.FileHandler(self.log_path)
            # The workers of a farm run write one log: each line says whose it is.
            worker = f"[{self.farm.member.worker}] " if self.farm.joined_run else ""
            self._log_handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {worker}%(name)s: %(message)s"))
            log.addHandler(self._log_handler)
            log.setLevel(logging.INFO)
            if self.farm.joined_run:
                log.info("worker %s of %d joined run %s (--board=%s)", self.farm.member.worker, self.farm.member.count,
                         self.run_id, self.board_spec)

    def close(self) -> None:
        if self._boards is not None:
            self._boards.close()
            self._boards = None
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        self._held.close()

    @property
    def rows(self) -> list[report.CaseResult]:
        return [row for run in self._runs.values() for row in run.rows]

    def run_dirs(self) -> list[Path]:
        return [run.run_dir for run in self._runs.values()]

    @property
    def boards(self) -> BoardSource:
        """Where this process's cases run (harness.farm): one board, or a lease on one of a farm's."""
        if self._boards is None:
            board_dir = self.results_dir / "logs" / f"{self.run_id}-board"
            member = self.farm.member
            # Each worker's board logs apart; the pool, shared by the run's processes, beside them.
            workdir = board_dir / member.worker if self.farm.joined_run else board_dir
            self._boards = board_source(self.board_spec, workdir, self.cache.root / "firmware", board_dir / "pool",
                                        self.farm, flash_anyway=self.flash_anyway)
        return self._boards

    @property
    def _board(self) -> Board | None:
        return self._boards.current if self._boards is not None else None

    def plan(self, cases: list[Case]) -> None:
        """The cases this session is about to run, so that work they share is done together
        (the variants of a model are converted in one worker)."""
        self.stages.plan(cases)

    # --- one case ------------------------------------------------------------------------------

    def run_case(self, case: Case) -> report.CaseResult:
        """Run one model x variant; failures become an `error` row (with the one-line reason)."""
        self._ensure_log()
        suite_run = self._suite_run(case.suite)
        base = report.CaseResult(suite=case.suite.name, model=case.model.name, variant=case.variant.name,
                                 case_id=case.id, quantization=case.variant.quantization, status="error",
                                 calibration_samples=case.variant.calibration_samples,
                                 calibration_source=case.variant.calibration_source or "",
                                 per_channel=case.variant.per_channel if case.variant.quantization == "int8" else None,
                                 qat=case.variant.qat, source=case.model.describe_source(),
                                 dataset=case.model.dataset.name if case.model.dataset else "",
                                 board=self.board_spec, profile=case.suite.profile)
        try:
            fingerprint = self.case_fingerprint(case)
        except (OSError, TinyhilError) as error:
            # Unreadable inputs: the run below says what is wrong; such a row is never reused.
            fingerprint = {"fingerprint": "", "parts": {}, "unavailable": str(error)}
        previous = suite_run.resumed.get(case.id)
        if previous is not None and previous.status != "error":
            why = _rerun_reason(suite_run.fingerprints.get(case.id), fingerprint)
            if not why:
                log.info("%s: reusing the finished row of run %s", case.id, suite_run.run_dir.name)
                suite_run.rows.append(previous)
                self._write(suite_run)
                return previous
            log.info("%s: running again, not reusing the row of run %s: %s", case.id, suite_run.run_dir.name, why)
            fingerprint = {**fingerprint, "rerun_because": why}
        suite_run.fingerprints[case.id] = fingerprint
        boards = self.boards
        boards.begin_case()
        notes: list[str] = []
        while True:
            # The board counts retries over its life; a case's are those it made meanwhile, failed or not.
            retries_before = self._board.retries if self._board is not None else 0
            evidence = CaseEvidence(case)
            failure: TinyhilError | None = None
            try:
                row = self._run_case(case, base, evidence)
            except TinyhilError as error:
                log.error("%s: %s", case.id, error.one_line())
                if error.details:
                    log.error("%s details:\n%s", case.id, error.details)
                row, failure = replace(base, error=error.one_line()), error
            # Set-up retries (handshake, op names) count too, for every row alike; the diagnosis's
            # own board work (the debug firmware) is not the case's.
            retries = self._board.retries - retries_before if self._board is not None else 0
            # A farm's board that failed is taken out, and the case runs once more on another one.
            # Once: a case that fails on a second board too is the case's failure, and that board stays in.
            lost = boards.lost(failure) if failure is not None and not notes else None
            if lost is None:
                break
            log.warning("%s: %s; running the case again on another board", case.id, lost)
            notes.append(lost)
        row = replace(row, retries=retries, board=boards.name,
                      board_host=boards.host, worker=self.farm.member.worker if self.farm.joined_run else "",
                      board_note="; ".join(notes + ([f"ran again on {boards.name}"] if notes else [])))
        boards.end_case()
        row = (self.diagnoser.explain_error(row, failure, evidence) if failure is not None
               else self.diagnoser.explain(row, evidence, suite_run.rows))
        suite_run.rows.append(row)
        self._write(suite_run)
        return row

    def case_fingerprint(self, case: Case) -> dict:
        """Hashes of everything a case's row depends on, part by part, so that a resumed run can say
        which of them changed: the suite's settings for it, the profile, the board, the model
        (file, or the data directory it trains on) and the harness (version, code, libraries)."""
        model = case.model
        variant = case.variant
        settings = {
            "model": model.name, "source": model.source().key() if model.trains else str(model.tflite),
            "fine_tune": model.fine_tune, "arena_bytes": model.arena_bytes,
            "dataset": model.dataset.key() if model.dataset else None,
            "device_preprocessing": (model.dataset.device_preprocessing.to_dict()
                                     if model.dataset and model.dataset.device_preprocessing else None),
            "training": model.training.__dict__, "eval_samples": model.eval_samples, "variant": variant.name,
            "quantization": _plain(variant.settings()) if variant.quantization != "as-is" else "as-is",
            "esp_nn_version": case.esp_nn_version, "thresholds": case.thresholds.__dict__,
            "latency": case.suite.latency.__dict__}
        data_part = (directory_fingerprint(model.dataset.options.get("path"), model.dataset.base_dir)
                     if model.dataset is not None else "")
        if model.tflite is not None:
            model_part = c.content_key(c.file_hash(model.tflite), data_part)
        elif model.keras is not None:
            model_part = c.content_key(files_fingerprint(model.keras, content=True), data_part)
        else:
            model_part = c.content_key(data_part)
        calibration = case.suite.board.virtual.calibration
        parts = {"suite": c.content_key(settings), "profile": case.suite.profile,
                 # The calibration by content: the same file name with new constants is another board model.
                 "board": c.content_key(self.board_spec, _plain(case.suite.board),
                                        c.file_hash(Path(calibration)) if calibration else ""),
                 "model": model_part, "harness": self._harness_hash(),
                 # A row made without a diagnosis (or with less of one) is not what this run asks for.
                 "diagnose": self.diagnoser.mode}
        return {"fingerprint": c.content_key(parts), "parts": parts}

    def _harness_hash(self) -> str:
        if not self._harness_fingerprint:
            files = sorted(path for path in (*_HARNESS.rglob("*.py"), *FIRMWARE_DIR.rglob("*"))
                           if path.is_file() and "__pycache__" not in path.parts)
            self._harness_fingerprint = c.content_key(_version(), c.library_versions(), c.source_hash(*map(str, files)))
        return self._harness_fingerprint

    def _run_case(self, case: Case, row: report.CaseResult, evidence: CaseEvidence) -> report.CaseResult:
        """The case's stages in order; what each gives is kept in `evidence`, for the diagnosis
        of the row or of the stage that failed."""
        evidence.prepared = prepared = self.stages.prepare(case)
        evidence.tflite = tflite = self.stages.tflite(case, prepared)
        input_quant, output_quant, _ = model_io(tflite)
        evidence.evaluation = evaluation = self.stages.eval_set(case, prepared, input_quant, output_quant)
        inputs = evaluation.inputs if evaluation.quantized else input_quant.quantize(evaluation.inputs)
        evidence.inputs = inputs
        evidence.reference = reference = self.stages.reference(case.id, tflite, inputs)
        board, info = self._load(case, tflite, reference, evidence)
        evidence.board, evidence.info = board, info
        measured = self._measure(case, board, info, inputs, input_quant, output_quant)
        evidence.board_outputs = measured.outputs
        return self._result_row(case, row, prepared, tflite, evaluation, reference, board, info, measured)

    def _load(self, case: Case, tflite: Path, reference: ReferenceRun,
              evidence: CaseEvidence) -> tuple[Board, p.DeviceInfo]:
        settings = case.suite.board
        _check_calibration(case)
        firmware = plan_firmware(case.id, tflite, reference.host_arena_bytes, cpu_mhz=settings.cpu_mhz,
                                 esp_nn=settings.esp_nn, arena=settings.arena, link=settings.link,
                                 esp_nn_version=case.esp_nn_version, arena_bytes=case.model.arena_bytes)
        evidence.firmware = firmware
        board = self.boards.board()
        evidence.board = board
        if isinstance(board, VirtualBoard):
            board.options = settings.virtual
        elif isinstance(board, SerialBoard) and getattr(board.flasher, "is_virtual", False):
            board.flasher.options = settings.virtual  # a standing virtual board takes them with its image
        self.progress.stage(case.id, "loading", board.name)
        try:
            return board, board.load(firmware)
        except BoardError as error:
            raise self._with_log(board, error) from error

    def _measure(self, case: Case, board: Board, info: p.DeviceInfo, inputs: np.ndarray,
                 input_quant: TensorQuant, output_quant: TensorQuant) -> _Measurement:
        """The evaluation pass (every sample, profiled per op), then the latency windows."""
        outputs, totals, cycles, per_op_us, per_op_cycles = [], [], [], [], []
        samples = [[sample.reshape(input_quant.shape)] for sample in inputs]
        self.progress.stage(case.id, "board", board.name)
        try:
            for done, result in enumerate(board.infer_many(samples), 1):
                self.progress.count(case.id, "board", done, len(samples), "samples")
                outputs.append(result.outputs[0].reshape(output_quant.shape)[0])
                totals.append(result.total_us / 1000.0)
                cycles.append(result.total_cycles)
                per_op_us.append(result.op_us)
                per_op_cycles.append(result.op_cycles)
            # An estimate is a deterministic function of the model and the board settings: repeating
            # it measures nothing, so the evaluation pass's estimates stand as the one window.
            windows = (measure_latency_windows(board, samples[0], case.suite.latency, case.id, self.progress)
                       if info.latency_kind == "measured" else (tuple(totals),))
        except BoardError as error:
            raise self._with_log(board, error) from error
        return _Measurement(np.stack(outputs), totals, cycles, per_op_us, per_op_cycles, windows)

    def _result_row(self, case: Case, row: report.CaseResult, prepared: PreparedModel, tflite: Path,
                    evaluation: EvalSet, reference: ReferenceRun, board: Board, info: p.DeviceInfo,
                    measured: _Measurement) -> report.CaseResult:
        """Compare with the reference, gate against the suite's limits, and fill the row."""
        input_quant, output_quant = reference.input_quant, reference.output_quant
        board_outputs = measured.outputs
        samples = len(board_outputs)
        agreement = compare.compare_outputs(board_outputs, reference.outputs, output_quant,
                                            case.thresholds.agreement_tolerance_lsb)
        host_tflm_exact_match = float((board_outputs.reshape(samples, -1)
                                       == reference.tflm_outputs.reshape(samples, -1)).all(axis=1).mean())
        latency = compare.window_latency_stats(measured.windows, info.latency_kind)
        reference_accuracy = board_accuracy = None
        if evaluation.labels is not None:
            reference_accuracy = compare.accuracy(output_quant.dequantize(reference.outputs), evaluation.labels)
            board_accuracy = compare.accuracy(output_quant.dequantize(board_outputs), evaluation.labels)
        model_info = inspect_model(tflite.read_bytes(), where=str(tflite))
        float_accuracy = prepared.trained.float_accuracy if prepared.trained else None
        model_bytes = tflite.stat().st_size
        # On a board the windows ran without per-op profiling and the evaluation pass with it: the
        # difference is what the profiler costs, reported beside the latency it is not part of.
        profiler_overhead_ms = (float(np.median(measured.totals)) - latency.median_ms
                                if info.latency_kind == "measured" and measured.totals
                                and latency.median_ms is not None else None)
        # Every board names its build when it loads; an empty one only for a Board that does not.
        build = board.build or FirmwareBuild(kind="", esp_tflite_micro="", esp_nn="", idf="", optimisation="")
        # Integer rows (int8, int16x8, or a given .tflite whose input and output types are integer)
        # are held to the quantized accuracy limit; float rows to the float one.
        integer = input_quant.dtype in _INTEGER_TYPES and output_quant.dtype in _INTEGER_TYPES
        if prepared.trained is not None:
            gated_float, gated_int8 = float_accuracy, board_accuracy if integer else None
        else:
            gated_float, gated_int8 = (None, board_accuracy) if integer else (board_accuracy, None)
        # Against the float model on the very samples the board ran: the cost of quantizing.
        float_eval_accuracy = accuracy_drop = None
        if evaluation.float_outputs is not None and evaluation.labels is not None:
            float_eval_accuracy = compare.accuracy(evaluation.float_outputs, evaluation.labels)
            if integer and board_accuracy is not None:
                accuracy_drop = float_eval_accuracy - board_accuracy
        violations = gate.check(case.thresholds, latency_ms=latency.median_ms, model_bytes=model_bytes,
                                arena_bytes=info.arena_used, float_accuracy=gated_float, int8_accuracy=gated_int8,
                                agreement=agreement.within_tolerance, host_tflm_exact_match=host_tflm_exact_match,
                                accuracy_drop_vs_float=accuracy_drop)
        median_cycles = float(np.median(measured.cycles))
        estimate = _cost_model_estimate(case, info, model_info)
        return replace(
            row, status="failed" if violations else "passed", board=board.name, latency_kind=info.latency_kind,
            cpu_mhz=info.cpu_mhz, esp_nn=bool(info.flags & p.FLAG_ESP_NN),
            arena_in_psram=bool(info.flags & p.FLAG_ARENA_IN_PSRAM), firmware_id=info.firmware_id,
            firmware_build=build.kind, esp_tflite_micro=build.esp_tflite_micro, esp_nn_version=build.esp_nn,
            idf_version=build.idf, optimisation=build.optimisation, firmware_note=build.note,
            dataset_source=evaluation.source, preprocessing=evaluation.preprocessing,
            device_preprocessing=evaluation.device_preprocessing,
            float_eval_accuracy=float_eval_accuracy, accuracy_drop_vs_float=accuracy_drop,
            profiler_overhead_ms=profiler_overhead_ms, output_digest=hash_array(board_outputs)[:16],
            model_path=str(tflite), model_bytes=model_bytes, arena_bytes=info.arena_used,
            arena_size=info.arena_size, latency_median_ms=latency.median_ms, latency_p90_ms=latency.p90_ms,
            float_accuracy=float_accuracy, reference_accuracy=reference_accuracy, board_accuracy=board_accuracy,
            reference_source=reference.source, reference_note=reference.litert_note,
            exact_match=agreement.exact_match, host_tflm_exact_match=host_tflm_exact_match,
            output_agreement=agreement.within_tolerance,
            max_abs_diff=agreement.max_abs_diff, diff_unit=agreement.diff_unit,
            top1_agreement=agreement.top1_agreement, cosine_similarity=agreement.cosine_similarity,
            rmse=agreement.rmse, eval_samples=samples, total_macs=model_info.total_macs,
            macs_per_cycle=model_info.total_macs / median_cycles if median_cycles else None,
            violations=tuple(str(v) for v in violations), latency_windows_ms=measured.windows,
            regression_limits=case.thresholds.regression_limits(),
            latency_error=estimate.relative_error if info.latency_kind == "estimated" else None,
            cost_model=estimate.cost_model, estimated_latency_ms=estimate.total_us / 1000,
            layers=_layers(model_info, board.op_names, measured.per_op_us, measured.per_op_cycles, estimate))

    @staticmethod
    def _with_log(board: Board, error: BoardError) -> BoardError:
        tail = board.log_tail(60)
        return type(error)(error.message, where=error.where,
                           details="\n".join(filter(None, [error.details, "board log:", tail])))

    # --- results --------------------------------------------------------------------------------

    def _suite_run(self, suite: Suite) -> _SuiteRun:
        key = str(suite.path)
        if key not in self._runs:
            run = _SuiteRun(suite, self.results_dir / suite.name / self.run_id, started=self.started)
            if self.resume:
                run = self._resumed(run)
            self._runs[key] = run
        return self._runs[key]

    def _resumed(self, run: _SuiteRun) -> _SuiteRun:
        """The run to continue: the one named by --run-id, else the suite's latest."""
        suite_dir = run.run_dir.parent
        target = suite_dir / self._resume_run_id if self._resume_run_id else (suite_dir / "latest").resolve()
        if not (target / "results.json").is_file():
            log.info("nothing to resume for suite %s (no %s); starting run %s", run.suite.name,
                     target / "results.json", run.run_dir.name)
            return run
        if target.name != self.run_id:
            # Continuing another run: its directory is ours only while nobody else writes it, and
            # its rows are read once it is ours, so none written meanwhile can be lost.
            _lock_run(self.results_dir / "logs", target.name, self._held, shared=self.farm.joined_run)
        metadata, rows = report.read_results(target)
        log.info("resuming run %s of suite %s: %d rows on file", target.name, run.suite.name, len(rows))
        try:
            fingerprints = json.loads((target / FINGERPRINTS).read_text())
        except (OSError, ValueError):
            fingerprints = {}  # a run of an older tinyhil: none of its rows can be vouched for
        return _SuiteRun(run.suite, target, resumed={row.case_id: row for row in rows},
                         started=metadata.get("started", self.started),
                         fingerprints=fingerprints if isinstance(fingerprints, dict) else {})

    def _write(self, run: _SuiteRun) -> None:
        meta = report.RunMetadata(suite=run.suite.name, suite_path=str(run.suite.path), profile=run.suite.profile,
                                  board=self.board_spec, run_id=run.run_dir.name, started=run.started,
                                  tinyhil_version=_version(),
                                  # Host libraries only: the firmware's versions are per row, as one run
                                  # may put esp-nn versions side by side.
                                  libraries=c.library_versions(), host=self.host)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with c.file_lock(run.run_dir / ".write.lock") if self.farm.joined_run else ExitStack():
            rows, fingerprints = run.all_rows(), run.fingerprints
            if self.farm.joined_run:
                rows, fingerprints = _merge_with_siblings(run, rows)
            # Fingerprints first: a run killed between the two writes then has a fingerprint for a
            # row not yet on file (harmless), never a row on file that resume cannot vouch for.
            report.atomic_write(run.run_dir / FINGERPRINTS, json.dumps(
                {row.case_id: fingerprints[row.case_id] for row in rows if row.case_id in fingerprints},
                indent=1, sort_keys=True))
            report.write_results(run.run_dir, meta, rows)
        if not run.announced:
            # Once per run, when it first has results: concurrent runs would otherwise take turns.
            # A private name, then one rename: another run replacing it at the same time cannot
            # leave it missing or half made.
            tmp = run.run_dir.parent / f".latest.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            tmp.symlink_to(run.run_dir.name)
            tmp.replace(run.run_dir.parent / "latest")
            run.announced = True


def _merge_with_siblings(run: _SuiteRun, rows: list[report.CaseResult]) -> tuple[list[report.CaseResult], dict]:
    """This worker's rows with those the run's other workers have written (read under the run's
    write lock), in the suite's order: every worker writes the whole run, so the last write has
    every row. A row this worker ran stands over the file's; the file's over a resumed one."""
    own = {row.case_id: row for row in run.rows}
    fingerprints = dict(run.fingerprints)
    merged = {row.case_id: row for row in rows}
    if (run.run_dir / "results.json").is_file():
        for row in report.read_results(run.run_dir)[1]:
            if row.case_id not in own:
                merged[row.case_id] = row
        try:
            on_file = json.loads((run.run_dir / FINGERPRINTS).read_text())
        except (OSError, ValueError):
            on_file = {}
        if isinstance(on_file, dict):
            fingerprints.update({case_id: value for case_id, value in on_file.items() if case_id not in own})
    order = {case.id: index for index, case in enumerate(run.suite.cases())}
    return sorted(merged.values(), key=lambda row: (order.get(row.case_id, len(order)), row.case_id)), fingerprints


def _rerun_reason(recorded: dict | None, current: dict) -> str:
    """Why a finished row cannot stand for this case now, or "" when it can."""
    if not current.get("fingerprint"):
        return f"its inputs cannot be fingerprinted ({current.get('unavailable', 'unknown reason')})"
    if not isinstance(recorded, dict) or not recorded.get("fingerprint"):
        return f"no fingerprint of it on file ({FINGERPRINTS}; a run of an older tinyhil)"
    if recorded["fingerprint"] == current["fingerprint"]:
        return ""
    old, new = recorded.get("parts", {}), current["parts"]
    described = {"profile": f"the profile changed ({old.get('profile')} -> {new['profile']})",
                 "suite": "the suite's settings for it changed", "board": "the board or its settings changed",
                 "model": "the model file or its training data changed",
                 "harness": "the harness changed (version, code or libraries)",
                 "diagnose": f"the diagnosis asked for changed ({old.get('diagnose')} -> {new.get('diagnose')})"}
    changed = [text for part, text in described.items() if old.get(part) != new.get(part)]
    return "; ".join(changed) or "its fingerprint changed"


def _plain(value: object) -> object:
    """Dataclasses, mappings and sequences as JSON-ready values, for fingerprints."""
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _layers(model: ModelInfo, op_names: tuple[str, ...], per_op_us: list[tuple[int, ...]],
            per_op_cycles: list[tuple[int, ...]], estimate: LatencyEstimate) -> tuple[report.LayerTiming, ...]:
    """The per-layer timings, each beside the code path the cost model says runs it, that path's
    ceiling, and the cycles the model gives it (on a board: what it predicted)."""
    if not per_op_us or not per_op_us[0]:
        return ()
    ops = model.ops
    us = np.median(np.asarray(per_op_us, dtype=np.float64), axis=0)
    cycles = np.median(np.asarray(per_op_cycles, dtype=np.float64), axis=0)
    layers = []
    for index in range(len(us)):
        cost = estimate.ops[index] if index < len(estimate.ops) else None
        layers.append(report.LayerTiming(
            index, op_names[index] if index < len(op_names) else "?", float(us[index]), int(cycles[index]),
            ops[index].macs if index < len(ops) else 0, path=cost.path if cost else "",
            path_ceiling=cost.ceiling if cost else None, estimated_cycles=cost.cycles if cost else None))
    return tuple(layers)


def _cost_model_estimate(case: Case, info: p.DeviceInfo, model_info: ModelInfo) -> LatencyEstimate:
    """The cost model's view of this firmware: the estimate a virtual board reports, and on a
    board the prediction its measurement is held against (with the suite's calibration, if any)."""
    chip = ChipConfig(cpu_mhz=info.cpu_mhz if info.cpu_mhz in (80, 160, 240) else 240,
                      esp_nn=bool(info.flags & p.FLAG_ESP_NN), tensors_in_psram=bool(info.flags & p.FLAG_ARENA_IN_PSRAM),
                      esp_nn_version=case.esp_nn_version)
    calibration_file = case.suite.board.virtual.calibration
    return estimate_latency(model_info, chip, load_calibration(Path(calibration_file)) if calibration_file else None)


def _check_calibration(case: Case) -> None:
    """A variant may pin another esp-nn than the board the calibration was measured on."""
    calibration_file = case.suite.board.virtual.calibration
    if calibration_file:
        mismatch = load_calibration(Path(calibration_file)).mismatch(case.suite.board.esp_nn, case.esp_nn_version)
        if mismatch:
            raise CalibrationError(f"board.calibration {calibration_file}: {mismatch}", where=case.where)
