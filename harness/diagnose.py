"""The diagnose stage: why a row's numbers are wrong, in plain words with the evidence.

After the compare and gate stages have made a row, and after a stage has failed, the pipeline
hands what it learnt about the case (`CaseEvidence`) to a `Diagnoser`. It collects what more the
diagnosis needs and only where it is needed (mode `auto`), or for every case (`all`):

- outputs off the reference: the board runs the case's debug firmware (every tensor preserved)
  on the worst sample, and each operator's output is compared with host TFLM and LiteRT
  (harness.diagnosis.divergence): the first diverging operator, with its kernel;
- int8 accuracy lost against the float model: TensorFlow's QuantizationDebugger per layer
  (harness.quant_debug, cached with the .tflite), and the calibration verdict over the suite's
  calibration matrix;
- the seed article's failure modes (harness.diagnosis): preprocessing that differs between
  training and the board, calibration, an arena that does not fit, an unsupported op, a slow model.

A diagnosis never changes a row's status or numbers, and a diagnosis that cannot be made is a note
in the row and the log, never a failed case.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import protocol as p
from .board import Board
from .compare import predicted_classes
from .errors import TinyhilError
from .firmware import FirmwareImage, arena_size_for
from .progress import Progress
from .reference import ReferenceRun
from .report import CaseResult
from .stages import EvalSet, PreparedModel, Stages
from .suite import Case

if TYPE_CHECKING:
    from . import diagnosis as d
    from .quant_debug import CalibrationVerdict

log = logging.getLogger("tinyhil")

DIAGNOSE_MODES = ("auto", "all", "off")
# An int8 row that scores this much below the float model on the same samples is explained layer
# by layer. Two points: the seed article calls a 1-2 point loss the normal cost of int8, and the
# seed suite's well-calibrated rows stay within it.
ACCURACY_DROP_TO_EXPLAIN = 0.02
# ... and only a drop of two samples or more: on the quick profile's dozen samples one sample is
# 8 points, and one sample flipping between a float and an int8 model is noise, not a loss.
MIN_SAMPLES_LOST = 2


def accuracy_drop_threshold(samples: int | None) -> float:
    """The drop (a share) above which an integer row has lost accuracy to quantization."""
    return max(ACCURACY_DROP_TO_EXPLAIN, (MIN_SAMPLES_LOST - 0.5) / samples) if samples else 1.0


@dataclass
class CaseEvidence:
    """What the pipeline knew about one case when its row was made or a stage failed: each stage
    fills its part, so a failure leaves the parts before it."""

    case: Case
    prepared: PreparedModel | None = None
    tflite: Path | None = None
    evaluation: EvalSet | None = None
    inputs: np.ndarray | None = None          # the evaluation inputs in the model's input type
    reference: ReferenceRun | None = None
    firmware: FirmwareImage | None = None
    board: Board | None = None
    info: p.DeviceInfo | None = None
    board_outputs: np.ndarray | None = None


class Diagnoser:
    def __init__(self, mode: str, stages: Stages, progress: Progress) -> None:
        if mode not in DIAGNOSE_MODES:
            raise ValueError(f"diagnose must be one of {', '.join(DIAGNOSE_MODES)}, got {mode!r}")
        self.mode = mode
        self.stages = stages
        self.progress = progress

    # --- a finished row ---------------------------------------------------------------------------

    def explain(self, row: CaseResult, evidence: CaseEvidence, siblings: Sequence[CaseResult]) -> CaseResult:
        """`row` with its diagnoses, divergence report and per-layer quantization error. Never
        raises: a step that fails leaves an "incomplete" diagnosis and its traceback in the log."""
        if self.mode == "off":
            return row
        from . import diagnosis as d

        case = evidence.case
        found: list[d.Diagnosis] = []
        divergence = self._attempt(found, case.id, "the board's intermediate tensors could not be read",
                                   lambda: self._divergence(row, evidence))
        if divergence is not None:
            report, normal_build = divergence
            found += [diagnosis for diagnosis in (d.divergence_diagnosis(report), normal_build) if diagnosis]
        errors = self._attempt(found, case.id, "the per-layer quantization error could not be computed",
                               lambda: self._quantization_errors(row, evidence)) or ()
        modes = self._attempt(found, case.id, "the failure modes could not be checked",
                              lambda: row_failure_modes(row, evidence, errors, calibration_of(row, siblings),
                                                        siblings)) or []
        found += [diagnosis for diagnosis in modes if diagnosis]
        if found:
            log.info("%s: diagnosis:\n%s", case.id, d.render_text(found, case_id=case.id))
        return replace(row, diagnoses=tuple(diagnosis.to_json() for diagnosis in found),
                       divergence=divergence[0].to_json() if divergence is not None else None,
                       quantization_errors=tuple(error.to_json() for error in errors))

    @staticmethod
    def _attempt(found: list, case_id: str, what: str, step):
        """`step()`, or None with an "incomplete" diagnosis: whatever a diagnosis step hits (a board
        that stops answering, a worker that dies, a file that is gone) is the diagnosis's failure,
        never the case's."""
        try:
            return step()
        except Exception as error:  # noqa: BLE001 - the row stands whatever went wrong here
            log.exception("%s: %s", case_id, what)
            found.append(_incomplete(what, error))
            return None

    def _divergence(self, row: CaseResult, evidence: CaseEvidence):
        """The first diverging operator on the sample furthest from the reference (any sample in
        mode `all`, where every case is looked at), from the case's debug firmware; and, when the
        debug build agrees with host TFLM where the normal build did not, a diagnosis saying so."""
        from . import diagnosis as d

        board, tflite, reference = evidence.board, evidence.tflite, evidence.reference
        if board is None or tflite is None or reference is None or evidence.board_outputs is None:
            return None
        if evidence.firmware is None or evidence.inputs is None:
            return None
        tolerance = evidence.case.thresholds.agreement_tolerance_lsb
        sample_index = d.pick_sample(evidence.board_outputs, reference.outputs, tolerance)
        if sample_index is None:
            if self.mode != "all":
                return None
            sample_index = 0
        case = evidence.case
        debug = plan_debug_image(evidence.firmware)
        self.progress.stage(case.id, "diagnosing", f"intermediate tensors of sample {sample_index}")
        log.info("%s: reading the intermediate tensors of sample %d with the debug firmware (arena %d bytes in %s)",
                 case.id, sample_index, debug.arena_size, "PSRAM" if debug.arena_in_psram else "SRAM")
        sample = evidence.inputs[sample_index].reshape(reference.input_quant.shape)
        board.load(debug)
        tensors = board.read_tensors([sample], d.tensors_to_read(tflite))
        report = d.diagnose_divergence(tflite, sample_index, sample, {index: t.values for index, t in tensors.items()},
                                       tolerance_lsb=tolerance, esp_nn=evidence.firmware.esp_nn,
                                       esp_nn_version=evidence.firmware.esp_nn_version)
        return report, _normal_build_differs(report, tensors, evidence, sample_index)

    def _quantization_errors(self, row: CaseResult, evidence: CaseEvidence):
        prepared = evidence.prepared
        if (row.quantization != "int8" or row.qat or prepared is None or prepared.trained is None
                or prepared.dataset_npz is None):
            return ()
        lost = (row.accuracy_drop_vs_float is not None
                and row.accuracy_drop_vs_float > accuracy_drop_threshold(row.eval_samples))
        if self.mode == "auto" and not lost:
            return ()
        self.progress.stage(evidence.case.id, "diagnosing", "per-layer quantization error")
        return self.stages.quantization_errors(evidence.case, prepared)

    # --- a failed case ----------------------------------------------------------------------------

    def explain_error(self, row: CaseResult, error: TinyhilError, evidence: CaseEvidence) -> CaseResult:
        if self.mode == "off":
            return row
        from . import diagnosis as d

        found: list[d.Diagnosis] = []
        modes = self._attempt(found, evidence.case.id, "the failure could not be diagnosed",
                              lambda: error_failure_modes(error, evidence)) or []
        found += [diagnosis for diagnosis in modes if diagnosis]
        if found:
            log.info("%s: diagnosis:\n%s", evidence.case.id, d.render_text(found, case_id=evidence.case.id))
        return replace(row, diagnoses=tuple(diagnosis.to_json() for diagnosis in found))


def _normal_build_differs(report, tensors, evidence: CaseEvidence, sample_index: int):
    """Where every operator of the debug build agrees with host TFLM but the normal build's output
    for the same sample did not: the difference is in how the normal build lays out its memory
    (tensors sharing arena space, a kernel writing past its output), not in a kernel's numbers."""
    from . import diagnosis as d
    from .tflite_model import inspect_model

    if report.first_vs_tflm is not None or evidence.reference is None or evidence.tflite is None:
        return None
    output = inspect_model(evidence.tflite.read_bytes(), where=str(evidence.tflite)).output_tensors()[0].index
    normal = np.asarray(evidence.board_outputs[sample_index]).reshape(-1).astype(np.float64)
    host = np.asarray(evidence.reference.tflm_outputs[sample_index]).reshape(-1).astype(np.float64)
    debug = tensors[output].values.reshape(-1).astype(np.float64) if output in tensors else None
    if debug is None or np.array_equal(normal, host):
        return None
    return d.Diagnosis(
        "divergence", "The normal firmware's outputs differ from its debug build's, which agrees with host TFLM",
        (f"sample {sample_index}: the normal build's output is up to {np.abs(normal - host).max():g} from host TFLM's; "
         f"the debug build (every tensor kept apart) is up to {np.abs(debug - host).max():g} from it",),
        "the normal build's arena layout is at fault (tensors sharing memory, a kernel writing past its output): "
        "report the model with this row; meanwhile the debug build's numbers are the right ones")


def plan_debug_image(image: FirmwareImage) -> FirmwareImage:
    from .firmware import plan_debug_firmware

    return plan_debug_firmware(image)


def row_failure_modes(row: CaseResult, evidence: CaseEvidence, errors: Sequence, verdict: CalibrationVerdict | None,
                      siblings: Sequence[CaseResult]) -> list[d.Diagnosis | None]:
    """The seed article's failure modes that a finished row shows: preprocessing that differs
    between training and the board, calibration, slowness."""
    from . import diagnosis as d

    found: list[d.Diagnosis | None] = []
    evaluation, reference = evidence.evaluation, evidence.reference
    train_inputs = _training_inputs(evidence)
    preprocessing = None
    if (evaluation is not None and reference is not None and evaluation.labels is not None
            and not evaluation.quantized and evidence.board_outputs is not None):
        predicted = predicted_classes(reference.output_quant.dequantize(evidence.board_outputs))
        preprocessing = d.preprocessing_mismatch(d.PreprocessingEvidence(
            predicted=predicted, labels=evaluation.labels, eval_inputs=evaluation.inputs,
            input_quant=reference.input_quant, train_inputs=train_inputs))
        found.append(preprocessing)
    # The float model's accuracy was measured on the inputs training saw: with the board fed other
    # inputs, the drop is the preprocessing's, and calling it calibration would send the user to
    # the wrong place.
    if (preprocessing is None and row.float_eval_accuracy is not None and row.board_accuracy is not None
            and row.accuracy_drop_vs_float is not None):
        calibration = d.calibration_problem(d.CalibrationEvidence(
            quantization=row.quantization, float_accuracy=row.float_eval_accuracy,
            quantized_accuracy=row.board_accuracy, samples=row.eval_samples or 0,
            calibration_samples=row.calibration_samples, calibration_source=row.calibration_source, qat=row.qat,
            layer_errors=tuple(errors), verdict=verdict if verdict is not None and len(verdict.tried) > 1 else None),
            threshold_points=100 * accuracy_drop_threshold(row.eval_samples))
        coverage = input_coverage(reference.input_quant, train_inputs) if reference is not None else None
        if calibration is not None and coverage:
            calibration = replace(calibration, evidence=calibration.evidence[:2] + (coverage,) + calibration.evidence[2:])
        found.append(calibration)
    if row.layers:
        int8 = [other.latency_median_ms for other in siblings if other.model == row.model and other.suite == row.suite
                and other.quantization == "int8" and other.latency_median_ms and other.esp_nn == row.esp_nn]
        memory = evidence.firmware.memory if evidence.firmware is not None else None
        found.append(d.slow(row, int8_latency_ms=min(int8) if int8 else None, memory=memory))
    return found


# Training values the int8 input cannot represent: above this share, the calibration data did not
# span what the model is fed (a share of clipped values the data itself has, like 0/1 pixels, stays
# well under it).
INPUT_CLIP_SHARE = 0.01


def input_coverage(quant, train_inputs: np.ndarray | None) -> str | None:
    """When the model's input quantization, fixed by its calibration data, clips the training
    inputs: the range it represents against theirs. QuantizationDebugger compares each layer
    with a float model fed the same clipped input, so it cannot show this loss itself."""
    if train_inputs is None or quant.dtype == "float32" or quant.scale == 0.0:
        return None
    info = np.iinfo(quant.dtype)
    low, high = (info.min - quant.zero_point) * quant.scale, (info.max - quant.zero_point) * quant.scale
    values = np.asarray(train_inputs, dtype=np.float64).reshape(-1)
    clipped = float(((values < low - quant.scale / 2) | (values > high + quant.scale / 2)).mean())
    if clipped < INPUT_CLIP_SHARE:
        return None
    return (f"the input quantization represents [{low:.3g}, {high:.3g}] (scale {quant.scale:.3g}, zero point "
            f"{quant.zero_point}), the training inputs span [{values.min():.3g}, {values.max():.3g}]: "
            f"{clipped:.0%} of their values clip at {info.min} or {info.max}")


def _training_inputs(evidence: CaseEvidence) -> np.ndarray | None:
    """The data set's training split as training saw it (what the board's inputs should resemble)."""
    if evidence.prepared is None or evidence.prepared.dataset_npz is None:
        return None
    with np.load(evidence.prepared.dataset_npz) as data:
        return data["x_train"]


def error_failure_modes(error: TinyhilError, evidence: CaseEvidence) -> list[d.Diagnosis | None]:
    """The failure modes a failed stage shows: an arena that does not fit, an op the converter or
    the firmware has no kernel for."""
    from . import diagnosis as d
    from .tflite_model import inspect_model

    text = "\n".join(filter(None, [error.message, error.details, _worker_log(error.message)]))
    firmware = evidence.firmware
    arena = d.arena_too_small(
        text, arena_needed=evidence.reference.host_arena_bytes if evidence.reference is not None else None,
        arena_given=firmware.arena_size if firmware is not None else None,
        arena_in_psram=firmware.arena_in_psram if firmware is not None else None,
        memory=firmware.memory if firmware is not None else None)
    fixed = evidence.case.model.arena_bytes
    if arena is not None and fixed is not None and evidence.reference is not None:
        wanted = arena_size_for(evidence.reference.host_arena_bytes)
        arena = replace(arena, suggestion=(
            f"raise the suite's `arena_kb: {fixed / 1024:g}` to at least {-(-wanted // 1024)}, or leave `arena_kb` "
            f"out and tinyhil sizes the arena from host TFLM's allocation ({wanted:,} bytes here)"))
    model = None
    if evidence.tflite is not None and evidence.tflite.is_file():
        try:
            model = inspect_model(evidence.tflite.read_bytes(), where=str(evidence.tflite))
        except TinyhilError:
            model = None
    build = d.unsupported_op_at_build(text, model)
    conversion = None
    trained = evidence.prepared.trained if evidence.prepared is not None else None
    if evidence.tflite is None and trained is not None:
        names = d.keras_layers(trained.model_path)
        conversion = d.unsupported_op_at_conversion(text, names)
        if conversion is not None:
            conversion = _with_suite_lines(conversion, names, evidence.case)
    return [arena, build, conversion]


def _worker_log(message: str) -> str:
    """The whole log of the worker a message names ("(log: PATH)"): the converter writes the
    locations of what it refuses there, not into its exception."""
    # "... (log: PATH)" when the worker failed, "...; log: PATH" when it ran out of time.
    named = re.search(r"log: (\S+?)\)?$", message.strip())
    if named is None:
        return ""
    path = Path(named.group(1))
    try:
        return path.read_text(errors="replace")[-200_000:]
    except OSError:
        return ""


def _with_suite_lines(diagnosis: d.Diagnosis, names: dict[str, str], case: Case) -> d.Diagnosis:
    """For a `layers:` model, the suite line of each Keras layer the diagnosis names: the Keras
    model's layers are the suite's, in order."""
    if not case.model.layers:
        return diagnosis
    ordered = [name for name, kind in names.items() if kind != "InputLayer" and name != case.model.name]
    lines = []
    for index, name in enumerate(ordered[:len(case.model.layers)]):
        if f"'{name}'" in " ".join(diagnosis.evidence) or f"'{name}'" in diagnosis.title:
            spec = case.model.layers[index]
            lines.append(f"layer '{name}' is item {index + 1} of the suite's layers: {spec.class_name} at "
                         f"{case.suite.path}:{spec.line}")
    return replace(diagnosis, evidence=diagnosis.evidence + tuple(lines))


def calibration_of(row: CaseResult, rows: Sequence[CaseResult]) -> CalibrationVerdict | None:
    """The calibration verdict of `row`'s calibration matrix: the int8 rows of the same model,
    calibration source and weight and QAT settings, one per number of calibration samples."""
    from .quant_debug import calibration_verdict

    if row.quantization != "int8" or row.calibration_samples is None or row.board_accuracy is None:
        return None
    points = {row.calibration_samples: row.board_accuracy}
    for other in rows:
        if (other.suite, other.model, other.quantization, other.calibration_source, other.per_channel, other.qat) == (
                row.suite, row.model, row.quantization, row.calibration_source, row.per_channel, row.qat) \
                and other.calibration_samples is not None and other.board_accuracy is not None \
                and other.case_id != row.case_id:
            points.setdefault(other.calibration_samples, other.board_accuracy)
    return calibration_verdict(sorted(points.items()), row.calibration_source or "train")


def _incomplete(what: str, error: Exception) -> d.Diagnosis:
    from . import diagnosis as d

    text = error.one_line() if isinstance(error, TinyhilError) else f"{type(error).__name__}: {error}"
    return d.Diagnosis(kind="incomplete", title=f"Diagnosis incomplete: {what}", evidence=(text,),
                       suggestion="the session log has the details")
