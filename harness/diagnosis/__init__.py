"""Why a number is wrong: where the board's outputs first diverge, and the seed article's failure
modes (preprocessing, calibration, arena, unsupported op, slow) named with their evidence.

Pure Python over typed evidence; the pipeline gathers the evidence, these functions judge it.
Each diagnosis function returns a `Diagnosis`, or None when its failure is not what happened.
"""

from __future__ import annotations

from typing import Sequence

from .accuracy import (CALIBRATION_DROP_POINTS, CalibrationEvidence, PreprocessingEvidence, calibration_problem,
                       preprocessing_mismatch)
from .base import KINDS, Diagnosis
from .build import (TF_OP_ALTERNATIVES, TFLM_OP_ALTERNATIVES, arena_too_small, keras_layers, unsupported_op_at_build,
                    unsupported_op_at_conversion)
from .divergence import (DivergenceReport, TensorDivergence, diagnose_divergence, host_tensors, pick_sample,
                         tensors_to_read)
from .speed import slow

__all__ = [
    "Diagnosis", "KINDS", "DivergenceReport", "TensorDivergence", "diagnose_divergence", "host_tensors",
    "tensors_to_read", "pick_sample", "divergence_diagnosis", "PreprocessingEvidence", "preprocessing_mismatch",
    "CalibrationEvidence", "calibration_problem", "CALIBRATION_DROP_POINTS", "arena_too_small",
    "unsupported_op_at_conversion", "unsupported_op_at_build", "keras_layers", "TF_OP_ALTERNATIVES",
    "TFLM_OP_ALTERNATIVES", "slow", "render_text", "render_markdown",
]


def divergence_diagnosis(report: DivergenceReport) -> Diagnosis | None:
    """A divergence report as a diagnosis: None when every op agrees with both references."""
    first = report.first_vs_tflm or report.first_vs_litert
    if first is None:
        return None
    if report.first_vs_tflm is not None:
        title = f"The board's outputs first diverge at op {first.op_index} ({first.op_name}, {first.kernel} kernel)"
        suggestion = (f"the board runs other numbers than TFLite Micro on the host from op {first.op_index} on: "
                      f"check that op's kernel ({first.kernel}) in the firmware build (esp-nn version, "
                      f"CONFIG_NN_SKIP_NUDGE) and the model bytes the board holds")
    else:
        title = f"Host TFLite Micro and LiteRT first differ at op {first.op_index} ({first.op_name})"
        suggestion = ("the board matches TFLite Micro; the difference is TFLite Micro's kernel against LiteRT's "
                      "reference kernel: a tolerance of that many LSB is what this op needs")
    after = [layer for layer in report.layers if layer.op_index > first.op_index
             and (layer.vs_tflm_max_lsb > report.tolerance_lsb if report.first_vs_tflm else
                  (layer.vs_litert_max_lsb or 0) > report.tolerance_lsb)]
    evidence = [report.text]
    if after:
        evidence.append(f"{len({layer.op_index for layer in after})} later ops differ too (their inputs carry op "
                        f"{first.op_index}'s difference), the last op {after[-1].op_index} ({after[-1].op_name})")
    return Diagnosis("divergence", title, tuple(evidence), suggestion)


def render_text(diagnoses: Sequence[Diagnosis], *, case_id: str) -> str:
    """What `tinyhil explain` prints for one case: each diagnosis with its evidence and suggestion."""
    if not diagnoses:
        return f"{case_id}: nothing to diagnose (no failure mode's evidence shows)\n"
    lines = [f"{case_id}: {len(diagnoses)} " + ("diagnoses" if len(diagnoses) > 1 else "diagnosis")]
    for number, diagnosis in enumerate(diagnoses, 1):
        lines.append(f"  {number}. {diagnosis.title} [{diagnosis.kind}]")
        lines += [f"     - {line}" for line in diagnosis.evidence]
        lines.append(f"     what to do: {diagnosis.suggestion}")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(diagnoses: Sequence[Diagnosis], *, case_id: str) -> str:
    """One case's diagnoses for results.md: a heading, then each diagnosis's evidence and suggestion."""
    if not diagnoses:
        return ""
    parts = [f"### {case_id}", ""]
    for diagnosis in diagnoses:
        parts.append(f"**{_md(diagnosis.title)}** ({diagnosis.kind})")
        parts.append("")
        parts += [f"- {_md(line)}" for line in diagnosis.evidence]
        parts += ["", f"What to do: {_md(diagnosis.suggestion)}", ""]
    return "\n".join(parts)
