"""A run's diagnoses for people: `tinyhil explain RUN_DIR [CASE]` and the "Diagnoses" section of
results.md. Everything here reads the rows as results.json has them (harness.diagnose wrote the
diagnoses, the divergence report and the per-layer quantization error into each row)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .diagnose import calibration_of
from .errors import ResultsError
from .report import CaseResult, read_results

WORST_LAYERS = 3


def diagnosis_line(diagnosis: dict[str, Any]) -> str:
    """One diagnosis in one line: what it is, its first piece of evidence, what to do."""
    evidence = diagnosis.get("evidence") or ()
    return "; ".join(part for part in (f"{diagnosis.get('title', '')}: {evidence[0]}" if evidence
                                        else diagnosis.get("title", ""), diagnosis.get("suggestion", "")) if part)


def diagnosis_summary(row: CaseResult) -> str:
    """Every diagnosis of a row, one line each joined by ' | ' (results.csv, pytest, the CLI)."""
    return " | ".join(diagnosis_line(diagnosis) for diagnosis in row.diagnoses)


def _layer_line(layer: dict[str, Any]) -> str:
    # Float tensors have no quantization step: their differences are absolute values.
    unit = "" if str(layer.get("dtype", "")).startswith("float") else " LSB"
    litert = layer.get("vs_litert_max_lsb")
    versus_litert = (f", LiteRT {litert:g}{unit} on {layer.get('vs_litert_share', 0):.0%}"
                     if litert is not None else "")
    return (f"op {layer['op_index']:>3} {layer['op_name']:<24} {layer['kernel']:<9} "
            f"host TFLM {layer['vs_tflm_max_lsb']:g}{unit} on {layer['vs_tflm_share']:.0%} of "
            f"{layer['elements']} elements{versus_litert}")


def divergence_lines(divergence: dict[str, Any], *, all_layers: bool = False) -> list[str]:
    """The divergence report: its sentence, then the operators from the first that diverged (every
    operator with `all_layers`)."""
    lines = [divergence.get("text", "")]
    layers = divergence.get("layers", ())
    first = divergence.get("first_vs_tflm") or divergence.get("first_vs_litert")
    start = 0 if all_layers or first is None else next(
        (i for i, layer in enumerate(layers) if layer["op_index"] == first["op_index"]), 0)
    shown = layers[start:] if all_layers or first is not None else ()
    lines += [f"  {_layer_line(layer)}" for layer in shown[:12]]
    if len(shown) > 12:
        lines.append(f"  ... {len(shown) - 12} more operators in results.json")
    return lines


def quantization_lines(errors: Sequence[dict[str, Any]], count: int = WORST_LAYERS) -> list[str]:
    worst = sorted(errors, key=lambda error: error.get("rmse_per_scale", 0.0), reverse=True)[:count]
    return [f"  op {error['op_index']:>3} {error['op_name']:<18} RMSE {error['rmse']:.4g} = "
            f"{error['rmse_per_scale']:.2f} quantization steps (scale {error['scale']:.4g}), "
            f"max error {error['max_abs_error']:.4g}  [{error['tensor_name']}]" for error in worst]


def row_text(row: CaseResult, rows: Sequence[CaseResult]) -> str:
    status = row.status if row.status != "passed" or not row.diagnoses else "passed, with remarks"
    lines = [f"{row.case_id} ({row.suite}): {status}"]
    if row.error:
        lines.append(f"  error: {row.error}")
    lines += [f"  threshold: {violation}" for violation in row.violations]
    if not row.diagnoses and not row.divergence and not row.quantization_errors:
        lines.append("  nothing to explain: no diagnosis was needed or asked for (tinyhil run --diagnose=all "
                     "looks at every case)")
    for diagnosis in row.diagnoses:
        lines.append(f"  * {diagnosis.get('title', '')}")
        lines += [f"      {fact}" for fact in diagnosis.get("evidence", ())]
        if diagnosis.get("suggestion"):
            lines.append(f"      -> {diagnosis['suggestion']}")
    if row.divergence:
        lines.append("  intermediate tensors, board against the host interpreters:")
        lines += [f"  {line}" for line in divergence_lines(row.divergence)]
    if row.quantization_errors:
        lines.append("  layers that lose most to int8 (QuantizationDebugger, against the float model):")
        lines += [f"  {line}" for line in quantization_lines(row.quantization_errors)]
    verdict = calibration_of(row, rows)
    if verdict is not None and len(verdict.tried) > 1:
        lines.append(f"  calibration: {verdict.text}")
    return "\n".join(lines)


def explain_run(run_dir: Path, case_id: str | None = None) -> tuple[str, bool]:
    """The text `tinyhil explain` prints, and whether the case asked for was found."""
    try:
        _, rows = read_results(run_dir)
    except ResultsError as error:
        return f"error: {error.one_line()}", False
    chosen = [row for row in rows if case_id is None or row.case_id == case_id]
    if not chosen:
        known = ", ".join(row.case_id for row in rows[:20])
        return f"error: {run_dir}: no case {case_id!r} in this run (cases: {known})", False
    return "\n\n".join(row_text(row, rows) for row in chosen), True


def diagnoses_markdown(rows: Sequence[CaseResult]) -> list[str]:
    """results.md's "Diagnoses" section (one entry per row that has something to say) and its
    "Calibration" verdicts."""
    lines: list[str] = []
    for row in rows:
        if not row.diagnoses and not row.quantization_errors:
            continue
        lines.append(f"- **{row.case_id}**")
        for diagnosis in row.diagnoses:
            evidence = "; ".join(diagnosis.get("evidence", ()))
            lines.append(f"  - {diagnosis.get('title', '')}: {evidence}"
                         + (f". *{diagnosis['suggestion']}*" if diagnosis.get("suggestion") else ""))
        if row.quantization_errors:
            worst = sorted(row.quantization_errors, key=lambda e: e.get("rmse_per_scale", 0.0), reverse=True)[:3]
            lines.append("  - layers that lose most to int8: " + ", ".join(
                f"op {e['op_index']} {e['op_name']} ({e['rmse_per_scale']:.2f} steps)" for e in worst))
    out: list[str] = []
    if lines:
        out += ["## Diagnoses", "", "`tinyhil explain RUN_DIR CASE` prints these with every layer "
                "(docs/diagnosis.md).", "", *lines, ""]
    calibration = calibration_lines(rows)
    if calibration:
        out += ["## Calibration", "", "The smallest number of calibration samples within one point of the "
                "largest number tried:", "", *(f"- {line}" for line in calibration), ""]
    return out


def calibration_lines(rows: Sequence[CaseResult]) -> list[str]:
    """The calibration verdict of each calibration matrix in the run (two numbers of samples or more)."""
    verdicts = {}
    for row in rows:
        verdict = calibration_of(row, rows)
        if verdict is not None and len(verdict.tried) > 1:
            verdicts[(row.suite, row.model, row.calibration_source, row.per_channel, row.qat)] = (row.model, verdict)
    return [f"{model} ({verdict.source} calibration): {verdict.text}" for model, verdict in verdicts.values()]
