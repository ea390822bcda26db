"""The gate stage: a result against the suite's thresholds, and against the same case of a
baseline run (regressions), with the comparison rendered for terminals, pull requests and JUnit."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .report import CaseResult, band_text
from .suite import Thresholds


@dataclass(frozen=True)
class Violation:
    metric: str
    value: float
    limit: float
    comparison: str  # ">" (value above a maximum) or "<" (below a minimum)
    note: str = ""   # what the reader needs to judge it, e.g. which reference the board disagrees with

    def __str__(self) -> str:
        bound = "max" if self.comparison == ">" else "min"
        text = f"{self.metric} {_fmt(self.value)} {self.comparison} {bound} {_fmt(self.limit)}"
        return f"{text} ({self.note})" if self.note else text


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def agreement_note(host_tflm_exact_match: float | None) -> str:
    """Which reference the board disagrees with. The board runs TFLM's kernels: when its outputs
    equal host TFLM's on every sample, a low agreement can only come from LiteRT, the other
    interpreter (host TFLM is the reference only where LiteRT cannot run the model, and then the
    agreement would be 100%)."""
    if host_tflm_exact_match is None:
        return ""
    if host_tflm_exact_match == 1.0:
        return ("against LiteRT; the board matches host TFLM bit for bit on every sample: the two reference "
                "interpreters disagree, not the board")
    return f"the board matches host TFLM bit for bit on {100 * host_tflm_exact_match:.1f}% of samples"


def check(thresholds: Thresholds, *, latency_ms: float, model_bytes: int, arena_bytes: int,
          float_accuracy: float | None, int8_accuracy: float | None, agreement: float,
          host_tflm_exact_match: float | None = None,
          accuracy_drop_vs_float: float | None = None) -> list[Violation]:
    """Every threshold the result breaks; accuracy limits apply only where that accuracy exists.
    `host_tflm_exact_match` (board output == host TFLM output, fraction of samples) says in an
    agreement violation whether the board or the reference interpreters disagree."""
    maxima = ((thresholds.max_latency_ms, "latency_ms", latency_ms),
              (thresholds.max_model_bytes, "model_bytes", model_bytes),
              (thresholds.max_arena_bytes, "arena_bytes", arena_bytes),
              (thresholds.max_accuracy_drop_vs_float, "accuracy_drop_vs_float", accuracy_drop_vs_float))
    notes = {"output_agreement": agreement_note(host_tflm_exact_match),
             "accuracy_drop_vs_float": "the float model's accuracy minus the board's, on the same samples"}
    minima = ((thresholds.min_float_accuracy, "float_accuracy", float_accuracy),
              (thresholds.min_int8_accuracy, "int8_accuracy", int8_accuracy),
              (thresholds.min_output_agreement, "output_agreement", agreement))
    violations = [Violation(name, value, limit, ">", notes.get(name, "")) for limit, name, value in maxima
                  if limit is not None and value is not None and value > limit]
    violations += [Violation(name, value, limit, "<", notes.get(name, "")) for limit, name, value in minima
                   if limit is not None and value is not None and value < limit]
    return violations


# --- against a baseline run ------------------------------------------------------------------------

# asv's criterion (shared/reference/peer-tools.md): a change beyond the threshold counts only when
# a Mann-Whitney U test also says the two sets of samples differ, at p < 0.002.
SIGNIFICANCE_P = 0.002

REGRESSED, BORDERLINE, IMPROVED, WITHIN, UNCHANGED, UNGATED = (
    "regressed", "borderline", "improved", "within threshold", "unchanged", "not gated")
INCOMPARABLE = "not comparable"

_DEFAULT_LIMITS = Thresholds().regression_limits()


@dataclass(frozen=True)
class MetricChange:
    case_id: str
    metric: str                  # latency_ms, model_bytes, arena_bytes, accuracy, output_agreement
    baseline: float
    current: float
    limit: float | None          # latency: relative; bytes: count; accuracy, agreement: fraction
    verdict: str
    latency_kind: str = ""
    p_value: float | None = None
    note: str = ""
    latency_error: float | None = None  # an estimate's stated relative error (0.15: +-15%)

    @property
    def failed(self) -> bool:
        return self.verdict in (REGRESSED, INCOMPARABLE)

    def value_text(self, value: float) -> str:
        return _metric_value(self.metric, value, self.latency_kind)

    @property
    def change_text(self) -> str:
        return _metric_change(self.metric, self.baseline, self.current)

    @property
    def limit_text(self) -> str:
        if self.limit is None:
            return "none"
        if self.metric == "latency_ms":
            return f"+{100 * self.limit:.1f}%"
        if self.metric.endswith("bytes"):
            return f"+{self.limit:,.0f} B"
        return f"-{100 * self.limit:.1f} pts"

    def __str__(self) -> str:
        extra = [f"threshold {self.limit_text}"]
        if self.p_value is not None:
            extra.append(f"Mann-Whitney p={self.p_value:.2g}")
        if self.note:
            extra.append(self.note)
        return (f"{self.case_id}: {self.metric} {self.verdict}: {self.value_text(self.baseline)} -> "
                f"{self.value_text(self.current)} ({self.change_text}; {', '.join(extra)})")


@dataclass(frozen=True)
class CaseComparison:
    case_id: str
    suite: str
    changes: tuple[MetricChange, ...]
    error: str = ""              # the current run could not produce the row
    incomparable: str = ""       # why the two rows do not compare at all (profile, sample counts)

    @property
    def failures(self) -> tuple[MetricChange, ...]:
        return tuple(change for change in self.changes if change.failed)

    @property
    def borderline(self) -> tuple[MetricChange, ...]:
        return tuple(change for change in self.changes if change.verdict == BORDERLINE)

    @property
    def failed(self) -> bool:
        return bool(self.failures or self.error or self.incomparable)

    def failure_text(self) -> str:
        lines = [f"{self.case_id}: did not run: {self.error}"] if self.error else []
        lines += [f"{self.case_id}: {INCOMPARABLE}: {self.incomparable}"] if self.incomparable else []
        return "; ".join(lines + [str(change) for change in self.failures])


@dataclass(frozen=True)
class Comparison:
    baseline: str                # where the baseline came from
    cases: tuple[CaseComparison, ...]
    missing: tuple[str, ...]     # in the baseline, not in the current run (not run this time)
    new: tuple[str, ...]         # in the current run, not in the baseline (nothing to compare with)

    @property
    def failed(self) -> bool:
        return any(case.failed for case in self.cases)

    @property
    def changes(self) -> list[MetricChange]:
        return [change for case in self.cases for change in case.changes]


def _metric_value(metric: str, value: float, latency_kind: str = "") -> str:
    if metric == "latency_ms":
        return f"{value:.3f} ms" + (f" ({latency_kind})" if latency_kind else "")
    if metric.endswith("bytes"):
        return f"{value:,.0f} B"
    return f"{100 * value:.1f}%"


def _metric_change(metric: str, baseline: float, current: float) -> str:
    if metric == "latency_ms":
        return f"{100 * (current - baseline) / baseline:+.1f}%" if baseline else f"{current - baseline:+.3f} ms"
    if metric.endswith("bytes"):
        return f"{current - baseline:+,.0f} B"
    return f"{100 * (current - baseline):+.1f} pts"


def _mann_whitney_p(baseline: tuple[tuple[float, ...], ...], current: tuple[tuple[float, ...], ...]) -> float | None:
    from scipy.stats import mannwhitneyu

    before = [value for window in baseline for value in window]
    after = [value for window in current for value in window]
    if len(before) < 2 or len(after) < 2:
        return None
    if len(set(before) | set(after)) == 1:
        return 1.0
    return float(mannwhitneyu(after, before, alternative="two-sided").pvalue)


def _latency_change(base: CaseResult, cur: CaseResult, limit: float | None) -> MetricChange:
    kind = cur.latency_kind
    common = dict(case_id=cur.case_id, metric="latency_ms", baseline=base.latency_median_ms,
                  current=cur.latency_median_ms, limit=limit, latency_kind=kind)
    if base.latency_kind != kind:
        return MetricChange(**common, verdict=INCOMPARABLE,
                            note=f"baseline latency is {base.latency_kind or 'unmarked'} ({base.board}), current is "
                                 f"{kind or 'unmarked'} ({cur.board}): an estimate and a measurement do not compare")
    if kind == "estimated" and base.cost_model != cur.cost_model:
        # A new calibration, or none against one, moves every estimate at once: the change would be
        # the model's, not the firmware's or the model's under test.
        return MetricChange(**common, verdict=INCOMPARABLE,
                            note=f"the two estimates come from different cost models (baseline: "
                                 f"{base.cost_model or 'not recorded'}; current: {cur.cost_model or 'not recorded'})")
    notes = []
    if base.cpu_mhz != cur.cpu_mhz:
        notes.append(f"clock {base.cpu_mhz} -> {cur.cpu_mhz} MHz")
    delta = cur.latency_median_ms - base.latency_median_ms
    relative = delta / base.latency_median_ms if base.latency_median_ms else (math.inf if delta > 0 else 0.0)
    band = cur.latency_error if kind == "estimated" else None
    if band is not None:
        common["latency_error"] = band
        if 0 < abs(relative) <= band:
            notes.append(f"inside the estimate's {band_text(band)} band: the threshold alone decides")
    if limit is None:
        return MetricChange(**common, verdict=UNGATED, note=", ".join(notes))
    if relative == 0:
        return MetricChange(**common, verdict=UNCHANGED, note=", ".join(notes))
    if abs(relative) <= limit:
        return MetricChange(**common, verdict=WITHIN, note=", ".join(notes))
    verdict = REGRESSED if relative > 0 else IMPROVED
    p_value = None
    if kind == "measured":
        # Measurements are noisy: beyond the threshold is not enough, the samples must differ too.
        p_value = _mann_whitney_p(base.latency_windows_ms, cur.latency_windows_ms)
        if p_value is None or p_value >= SIGNIFICANCE_P:
            notes.append("not significant" if p_value is not None else "no window samples to test")
            verdict = BORDERLINE
    # Estimates are deterministic: the threshold alone decides.
    return MetricChange(**common, verdict=verdict, p_value=p_value, note=", ".join(notes))


def _plain_change(case_id: str, metric: str, baseline: float, current: float, limit: float | None,
                  higher_is_worse: bool) -> MetricChange:
    worse = (current - baseline) if higher_is_worse else (baseline - current)
    if limit is None:
        verdict = UNGATED
    elif worse == 0:
        verdict = UNCHANGED
    elif worse > limit + 1e-12:  # accuracies are fractions of a sample count: no float dust
        verdict = REGRESSED
    elif worse < 0:
        verdict = IMPROVED
    else:
        verdict = WITHIN
    return MetricChange(case_id, metric, baseline, current, limit, verdict)


def _window_shape(row: CaseResult) -> str:
    sizes = sorted({len(window) for window in row.latency_windows_ms})
    return f"{len(row.latency_windows_ms)} x {'/'.join(map(str, sizes)) or 0}"


def incomparable_reason(base: CaseResult, cur: CaseResult) -> str:
    """Why two rows of one case measure different things, or "" when they compare. A quick-profile
    row has fewer samples and a shorter training than a full one: its accuracy, and even its
    latency statistic, differ for that reason alone, so it gates nothing."""
    reasons = []
    if base.profile != cur.profile:
        reasons.append(f"baseline ran with profile {base.profile or 'unrecorded'}, current with profile "
                       f"{cur.profile or 'unrecorded'}")
    if base.eval_samples != cur.eval_samples:
        reasons.append(f"evaluation samples {base.eval_samples} -> {cur.eval_samples}")
    # An estimate's only window is the evaluation pass (compared above); measured windows are set
    # by the suite's latency section.
    if base.latency_kind == cur.latency_kind == "measured" and _window_shape(base) != _window_shape(cur):
        reasons.append(f"latency windows x inferences {_window_shape(base)} -> {_window_shape(cur)}")
    if not reasons:
        return ""
    return "; ".join(reasons) + ": runs with different profiles or sample counts do not compare"


def compare_case(base: CaseResult, cur: CaseResult) -> CaseComparison:
    """Each metric of `cur` against `base`, with `cur`'s limits (the suite under test decides)."""
    if cur.status == "error":
        return CaseComparison(cur.case_id, cur.suite, (), error=cur.error or "error")
    reason = incomparable_reason(base, cur)
    if reason:
        return CaseComparison(cur.case_id, cur.suite, (), incomparable=reason)
    limits = {**_DEFAULT_LIMITS, **cur.regression_limits}
    changes = []
    if base.latency_median_ms is not None and cur.latency_median_ms is not None:
        changes.append(_latency_change(base, cur, limits["latency_ms"]))
    for metric, higher_is_worse in (("model_bytes", True), ("arena_bytes", True)):
        old, new = getattr(base, metric), getattr(cur, metric)
        if old is not None and new is not None:
            changes.append(_plain_change(cur.case_id, metric, old, new, limits[metric], higher_is_worse))
    for metric, field_name in (("accuracy", "board_accuracy"), ("output_agreement", "output_agreement")):
        old, new = getattr(base, field_name), getattr(cur, field_name)
        if old is not None and new is not None:
            changes.append(_plain_change(cur.case_id, metric, old, new, limits[metric], higher_is_worse=False))
    return CaseComparison(cur.case_id, cur.suite, tuple(changes))


def compare_runs(baseline: dict[tuple[str, str], CaseResult], current: list[CaseResult],
                 baseline_name: str) -> Comparison:
    cases, new = [], []
    for row in current:
        base = baseline.get((row.suite, row.case_id))
        if base is None or base.status == "error":
            new.append(row.case_id)
        else:
            cases.append(compare_case(base, row))
    ran = {(row.suite, row.case_id) for row in current}
    missing = tuple(case_id for (suite, case_id) in baseline if (suite, case_id) not in ran
                    and suite in {row.suite for row in current})
    return Comparison(baseline_name, tuple(cases), missing, tuple(new))


# --- the comparison, for people and for CI ------------------------------------------------------

_SHOWN = (REGRESSED, INCOMPARABLE, BORDERLINE, IMPROVED, WITHIN)


def comparison_rows(comparison: Comparison, everything: bool = False) -> list[list[str]]:
    rows = []
    for change in comparison.changes:
        if everything or change.verdict in _SHOWN:
            verdict = change.verdict + (f" (p={change.p_value:.2g})" if change.p_value is not None else "")
            rows.append([change.case_id, change.metric, change.value_text(change.baseline),
                         change.value_text(change.current), change.change_text, change.limit_text,
                         verdict + (f"; {change.note}" if change.note else "")])
    return rows


_HEADERS = ["case", "metric", "baseline", "current", "change", "threshold", "verdict"]


def comparison_headline(comparison: Comparison) -> str:
    changes = comparison.changes
    count = {verdict: sum(change.verdict == verdict for change in changes) for verdict in _SHOWN}
    errors = sum(bool(case.error) for case in comparison.cases)
    refused = sum(bool(case.incomparable) for case in comparison.cases)
    parts = [f"{count[REGRESSED]} regressed", f"{count[BORDERLINE]} borderline", f"{count[IMPROVED]} improved"]
    if count[INCOMPARABLE] or refused:
        parts.append(f"{count[INCOMPARABLE] + refused} not comparable")
    if errors:
        parts.append(f"{errors} failed to run")
    return (f"{len(comparison.cases)} cases against baseline {comparison.baseline}: " + ", ".join(parts)
            + f" ({len(changes)} metrics compared)")


def estimate_band_note(comparison: Comparison) -> str:
    """What the stated error of estimated latencies means for the verdicts, or "" without any."""
    bands = sorted({change.latency_error for change in comparison.changes
                    if change.metric == "latency_ms" and change.latency_error is not None})
    if not bands:
        return ""
    spread = band_text(bands[0]) if len(bands) == 1 else f"{band_text(bands[0])} to {band_text(bands[-1])}"
    return (f"estimates carry {spread} (the cost model's stated error): a change inside the band is judged by the "
            "threshold alone, since an estimate is deterministic and the same inputs give the same figure")


def comparison_table(comparison: Comparison, tablefmt: str = "simple") -> str:
    from tabulate import tabulate

    lines = [comparison_headline(comparison)]
    rows = comparison_rows(comparison)
    if rows:
        lines.append(tabulate(rows, headers=_HEADERS, tablefmt=tablefmt, disable_numparse=True))
    lines += [f"{case.case_id}: did not run: {case.error}" for case in comparison.cases if case.error]
    lines += [f"{case.case_id}: {INCOMPARABLE}: {case.incomparable}" for case in comparison.cases if case.incomparable]
    if comparison.new:
        lines.append("not in the baseline: " + ", ".join(comparison.new))
    if comparison.missing:
        lines.append("in the baseline, not run: " + ", ".join(comparison.missing))
    band = estimate_band_note(comparison)
    if band:
        lines.append(band)
    return "\n".join(lines)


def comparison_markdown(comparison: Comparison) -> str:
    """A pull-request comment: the verdict first, then the changes that matter, then the rest folded."""
    from tabulate import tabulate

    regressed = any(case.error or any(change.verdict == REGRESSED for change in case.changes)
                    for case in comparison.cases)
    title = "regression" if regressed else (INCOMPARABLE if comparison.failed else "no regression")
    lines = [f"### tinyhil: {title}", "", comparison_headline(comparison) + ".", ""]
    for case in comparison.cases:
        if case.failed:
            lines.append(f"- **{case.failure_text()}**")
    lines += [f"- ~ {change} (beyond the threshold, not significant: shown, not failed)"
              for case in comparison.cases for change in case.borderline]
    rows = comparison_rows(comparison)
    if rows:
        lines += ["", tabulate(rows, headers=_HEADERS, tablefmt="github", disable_numparse=True)]
    everything = comparison_rows(comparison, everything=True)
    if everything:
        lines += ["", "<details><summary>All compared metrics</summary>", "",
                  tabulate(everything, headers=_HEADERS, tablefmt="github", disable_numparse=True), "", "</details>"]
    if comparison.new:
        lines += ["", "Not in the baseline (nothing to compare): " + ", ".join(comparison.new)]
    if comparison.missing:
        lines += ["", "In the baseline but not run: " + ", ".join(comparison.missing)]
    band = estimate_band_note(comparison)
    lines += ["", "Latency: estimated values (virtual board) are compared by threshold only; measured values "
              f"count as regressed only when a Mann-Whitney U test of the window samples gives p < {SIGNIFICANCE_P}."
              + (f" The {band}." if band else "") + " Estimates from different cost models (one calibrated on a "
              "board, one not, or two calibrations) are not compared.", ""]
    return "\n".join(lines)


def comparison_junit(comparison: Comparison) -> str:
    """One test case per model x variant; a regression is a failure, a borderline change a property."""
    import xml.etree.ElementTree as ET

    failures = sum(case.failed for case in comparison.cases)
    suite = ET.Element("testsuite", name="tinyhil.compare", tests=str(len(comparison.cases)),
                       failures=str(failures), errors="0", skipped="0")
    for case in comparison.cases:
        element = ET.SubElement(suite, "testcase", classname=f"tinyhil.{case.suite}", name=case.case_id, time="0")
        properties = ET.SubElement(element, "properties")
        for change in case.changes:
            ET.SubElement(properties, "property", name=f"{change.metric}",
                          value=f"{change.verdict}: {change.value_text(change.baseline)} -> "
                                f"{change.value_text(change.current)} ({change.change_text})")
        if case.failed:
            kind = "regression" if case.error or case.failures else "incomparable"
            failure = ET.SubElement(element, "failure", message=case.failure_text()[:2000], type=kind)
            failure.text = "\n".join([f"did not run: {case.error}"] * bool(case.error)
                                     + [f"{INCOMPARABLE}: {case.incomparable}"] * bool(case.incomparable)
                                     + [str(change) for change in case.failures])
    document = ET.Element("testsuites")
    document.append(suite)
    ET.indent(document)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(document, encoding="unicode") + "\n"
