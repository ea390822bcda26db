"""Published tables: run directories -> BENCHMARKS.md and a self-contained HTML report with plots.

The report stage writes one run's files as the run goes; this renders finished runs for people
who were not there: which board, clock, kernels and library versions, when, and whether each
latency was estimated by the virtual board or measured on a real one. The HTML carries its plots
as inline SVG, so the one file is the whole report (no scripts, no fetches).
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from tabulate import tabulate

from .errors import ResultsError
from .report import (
    LATENCY_MARKS,
    P90_NOTE,
    QUICK_BANNER,
    CaseResult,
    RunMetadata,
    agreement_header,
    agreement_text,
    arena_placement,
    atomic_write,
    board_settings,
    data_label,
    dataset_notes,
    drop_text,
    estimate_notes,
    has_p90,
    host_label,
    latency_band,
    latency_label,
    quantization_text,
    read_results,
)

LATENCY_NOTE = {
    "estimated": "by the virtual ESP32-S3's cost model, not measured on a board",
    "measured": "on the board: TFLM Invoke(), timed with the microsecond timer",
}


@dataclass(frozen=True)
class PublishedRun:
    run_dir: Path
    metadata: RunMetadata
    rows: tuple[CaseResult, ...]

    @property
    def latency_kinds(self) -> list[str]:
        return sorted({row.latency_kind for row in self.rows if row.latency_kind})

    @property
    def latency_labels(self) -> list[str]:
        """The kinds, with calibrated estimates apart from the others."""
        return sorted({latency_label(row) for row in self.rows if row.latency_kind})

    @property
    def quick(self) -> bool:
        return self.metadata.profile == "quick"

    @property
    def title(self) -> str:
        return f"{self.metadata.suite} on {board_label(self)}" + (QUICK_TITLE if self.quick else "")


QUICK_TITLE = " (quick profile: not benchmark figures)"


def board_label(run: PublishedRun) -> str:
    return "the virtual ESP32-S3" if run.metadata.board == "virtual" else f"an ESP32-S3 ({run.metadata.board})"


def load_run(run_dir: Path) -> PublishedRun:
    metadata, rows = read_results(run_dir)
    try:
        meta = RunMetadata(**metadata)
    except TypeError as error:
        raise ResultsError(f"results metadata does not match this tinyhil ({error})", where=str(run_dir)) from error
    if not rows:
        raise ResultsError("the run has no result rows", where=str(run_dir))
    return PublishedRun(run_dir, meta, tuple(rows))


# --- values ----------------------------------------------------------------------------------------

def _kib(value: int | None) -> str:
    return "" if value is None else f"{value / 1024:.1f} KiB"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _ms(row: CaseResult, value: float | None, mark: bool) -> str:
    if value is None:
        return ""
    text = f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"
    band = latency_band(row)
    kind = LATENCY_MARKS.get(latency_label(row), "") if mark else ""
    return text + (f" {band}" if band else "") + (f" ({kind})" if kind else "")


def _status(row: CaseResult) -> str:
    return row.status if not (row.violations or row.error) else f"{row.status}: " + (
        "; ".join(row.violations) or row.error)


def table(run: PublishedRun) -> tuple[list[str], list[list[str]]]:
    labels = run.latency_labels
    mark = len(labels) != 1  # one kind: the header says it; a mix: every value says its own
    time_title = "Inference time" + (f" ({labels[0]})" if len(labels) == 1 else "")
    agreement_title, per_reference = agreement_header(run.rows, "Output agreement")
    p90 = has_p90(run.rows)
    headers = (["Model", "Variant", "Data", "Size", time_title, "Accuracy", "vs float32", "float32 (Keras)",
                "Quantization", "Arena", "Arena in"] + ["p90"] * p90
               + ["MAC/cycle", agreement_title, "Bit-exact with host TFLM", "Eval samples", "Status"])
    body = []
    for row in run.rows:
        body.append([row.model, row.variant, data_label(row), _kib(row.model_bytes), _ms(row, row.latency_median_ms, mark),
                     _pct(row.board_accuracy), drop_text(row), _pct(row.float_accuracy), quantization_text(row),
                     _kib(row.arena_bytes),
                     arena_placement(row)]
                    + [_ms(row, row.latency_p90_ms, mark) if row.latency_kind == "measured" else ""] * p90
                    + ["" if row.macs_per_cycle is None else f"{row.macs_per_cycle:.2f}",
                       agreement_text(row, per_reference), _pct(row.host_tflm_exact_match),
                       "" if row.eval_samples is None else str(row.eval_samples), _status(row)])
    return headers, body


def _windows_text(rows: Sequence[CaseResult]) -> str:
    texts = []
    if any(row.latency_kind == "estimated" for row in rows):
        texts.append(("estimated", "the median over the evaluation samples (an estimate does not vary from run "
                                   "to run, so it is not repeated)"))
    shapes = {(len(row.latency_windows_ms), len(row.latency_windows_ms[0])) for row in rows
              if row.latency_kind == "measured" and row.latency_windows_ms}
    texts += [("measured", f"the median of {w} window medians, {n} back-to-back inferences of one input each")
              for w, n in sorted(shapes)]
    if len(texts) == 1:
        return texts[0][1]
    return "; ".join(f"{kind}: {text}" for kind, text in texts) or "median invoke time"


def _heading(runs: Sequence[PublishedRun]) -> str:
    return "tinyhil benchmarks" + (QUICK_TITLE if all(run.quick for run in runs) else "")


def _notes(run: PublishedRun) -> list[str]:
    """What a reader needs beside the table: where an estimate's band comes from, units, p90."""
    notes = estimate_notes(run.rows)
    notes.append("Sizes are in KiB (1024 bytes): the model's flatbuffer and the tensor arena TFLM used.")
    if not has_p90(run.rows):
        notes.append(P90_NOTE)
    notes.append("Output agreement: the share of samples whose every output is within the suite's tolerance of the "
                 "reference named in the column (LiteRT with reference kernels, or host TFLM where LiteRT cannot run "
                 "the model). Bit-exact with host TFLM: the share of samples whose board output equals host TFLM's "
                 "(the same kernels); where it is 100% and agreement is low, the two interpreters disagree, not the "
                 "board.")
    return notes


def benchmarks_markdown(runs: Sequence[PublishedRun], generated: str) -> str:
    lines = [f"# {_heading(runs)}", "",
             f"Rendered by `tinyhil report` on {generated} from "
             + ", ".join(f"`{run.run_dir}`" for run in runs) + ". `make benchmarks` runs the seed suite on the "
             "virtual board and renders this file again; `benchmarks.html` beside it has the plots.", ""]
    for run in runs:
        meta = run.metadata
        settings = board_settings(run.rows)
        kinds = run.latency_kinds
        lines += [f"## {run.title}", ""]
        if run.quick:
            lines += [f"> {QUICK_BANNER}", ""]
        datasets = dataset_notes(run.rows)
        lines += [f"- Suite: `{meta.suite_path}` (profile {meta.profile}), run `{meta.run_id}`, started {meta.started}",
                  f"- Board: {board_label(run)}; clock {settings['clock']}; kernels {settings['kernels']}; "
                  f"arena in {settings['arena']}",
                  f"- Firmware: {settings['firmware']}",
                  f"- Host (training, conversion, reference): {host_label(meta.host)}",
                  "- Latency: " + "; ".join(f"**{kind}** {LATENCY_NOTE.get(kind, '')}" for kind in kinds)
                  + f". Statistic: {_windows_text(run.rows)}.",
                  "- Accuracy: top-1 on the board over each model's held-out evaluation samples; "
                  "float32 (Keras) is the trained model before conversion."]
        lines += ["- Data sets: " + ("; ".join(datasets) if datasets else "not recorded")]
        lines += [f"- tinyhil {meta.tinyhil_version}; libraries: "
                  + ", ".join(f"{name} {version}" for name, version in sorted(meta.libraries.items())), ""]
        headers, body = table(run)
        lines += [tabulate(body, headers=headers, tablefmt="github", disable_numparse=True), ""]
        lines += [line for note in _notes(run) for line in (note, "")]
        if "estimated" in kinds:
            lines += ["Estimated latencies come from the cost model of docs/board-model.md, fitted to published "
                      "ESP32-S3 kernel figures or calibrated on a board; they are not measurements, and each carries "
                      "its stated error. Run the suite with `--board` on a real ESP32-S3 for measured figures.", ""]
        from .explain import diagnoses_markdown

        lines += [line.replace("## ", "### ", 1) if line.startswith("## ") else line
                  for line in diagnoses_markdown(run.rows)]
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Text stays text (not glyph outlines): a third of the size, and searchable in the browser.
    plt.rcParams.update({"svg.hashsalt": "tinyhil", "svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10})
    return plt.subplots(figsize=(width, height), layout="constrained")


def _plain_numbers():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _latency_label(run: PublishedRun) -> str:
    kinds = run.latency_kinds
    if len(kinds) != 1:
        return "latency, ms (estimated and measured mixed)"
    labels = run.latency_labels
    return f"latency, ms ({labels[0] if len(labels) == 1 else kinds[0]})"


def _per_op(values: Sequence[dict], key: str) -> dict[int, float]:
    """The largest `key` of each operator (an operator may have several output tensors)."""
    per_op: dict[int, float] = {}
    for value in values:
        if value.get("op_index", -1) >= 0 and value.get(key) is not None:
            per_op[value["op_index"]] = max(per_op.get(value["op_index"], 0.0), float(value[key]))
    return per_op


def layer_plot(run: PublishedRun, row: CaseResult) -> str:
    """Time per layer; beside it, where the row was diagnosed, how far each layer's output was from
    host TFLM on the board (the divergence strip) and what int8 costs each layer (RMSE in steps)."""
    layers = row.layers
    strips = []
    if row.divergence and row.divergence.get("layers"):
        strips.append(("divergence", _per_op(row.divergence["layers"], "vs_tflm_max_lsb")))
    if row.quantization_errors:
        strips.append(("quantization", _per_op(row.quantization_errors, "rmse_per_scale")))
    ratios = [3.0] + [1.4] * len(strips)
    fig, axes = _figure(7.5 + 2.2 * len(strips), max(1.6, 0.16 * len(layers) + 0.9))
    if strips:
        fig.clf()
        axes = fig.subplots(1, len(ratios), sharey=True, gridspec_kw={"width_ratios": ratios})
    panels = list(axes) if strips else [axes]
    ax = panels[0]
    labels = [f"{layer.index:>3} {layer.op}" for layer in layers]
    ax.barh(range(len(layers)), [layer.time_us / 1000.0 for layer in layers], color="#4477aa")
    ax.set_yticks(range(len(layers)), labels, fontsize=6 if len(layers) > 30 else 8, family="monospace")
    ax.invert_yaxis()
    ax.set_xlabel(f"time per layer, ms ({row.latency_kind or 'unmarked'})")
    ax.set_title(f"{row.case_id}: {len(layers)} layers, {_ms(row, row.latency_median_ms, False)} per inference")
    ax.grid(axis="x", alpha=0.3)
    tolerance = (row.divergence or {}).get("tolerance_lsb", 0)
    first = ((row.divergence or {}).get("first_vs_tflm") or {}).get("op_index")
    for panel, (kind, per_op) in zip(panels[1:], strips):
        values = [per_op.get(layer.index, 0.0) for layer in layers]
        if kind == "divergence":
            colors = ["#cc3311" if layer.index == first else "#ee7733" if value > tolerance else "#bbbbbb"
                      for layer, value in zip(layers, values)]
            panel.barh(range(len(layers)), values, color=colors)
            panel.set_xlabel("board vs host TFLM, max LSB")
            panel.set_title(f"divergence (sample {row.divergence.get('sample_index')})", fontsize=9)
        else:
            panel.barh(range(len(layers)), values, color="#aa3377")
            panel.set_xlabel("int8 RMSE, quantization steps")
            panel.set_title("quantization error", fontsize=9)
        panel.grid(axis="x", alpha=0.3)
    return _svg(fig)


def size_latency_plot(run: PublishedRun) -> str:
    fig, ax = _figure(7.5, 4.2)
    rows = [row for row in run.rows if row.model_bytes and row.latency_median_ms]
    for quantization, marker, color in (("int8", "o", "#228833"), ("float32", "s", "#cc6677"), ("as-is", "^", "#4477aa")):
        chosen = [row for row in rows if row.quantization == quantization]
        if chosen:
            ax.scatter([row.model_bytes / 1024 for row in chosen], [row.latency_median_ms for row in chosen],
                       marker=marker, color=color, label=quantization, zorder=3)
        banded = [row for row in chosen if latency_band(row)]
        if banded:
            # An estimate is a band, not a point: the bar spans its stated error.
            ax.errorbar([row.model_bytes / 1024 for row in banded], [row.latency_median_ms for row in banded],
                        yerr=[row.latency_median_ms * row.latency_error for row in banded], fmt="none",
                        ecolor=color, alpha=0.6, capsize=2, zorder=2)
    # Variants that differ only in calibration land on one point: one label for them all.
    labels: dict[tuple[float, float], list[CaseResult]] = {}
    for row in rows:
        labels.setdefault((row.model_bytes / 1024, row.latency_median_ms), []).append(row)
    for point, same in labels.items():
        text = same[0].case_id if len(same) == 1 else f"{same[0].model}[{', '.join(r.variant for r in same)}]"
        ax.annotate(text, point, fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(_plain_numbers())
    ax.set_xlabel("model size, KiB (flatbuffer)")
    ax.set_ylabel(_latency_label(run))
    ax.set_title("Size against latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left")
    return _svg(fig)


def calibration_plot(run: PublishedRun) -> str | None:
    by_model: dict[str, list[CaseResult]] = {}
    for row in run.rows:
        if (row.quantization == "int8" and row.calibration_samples and row.board_accuracy is not None
                and row.per_channel is not False and not row.qat):
            label = row.model + (f" ({row.calibration_source} calibration)" if row.calibration_source == "random" else "")
            by_model.setdefault(label, []).append(row)
    if not by_model:
        return None
    fig, ax = _figure(7.5, 3.8)
    for model, rows in sorted(by_model.items()):
        rows.sort(key=lambda row: row.calibration_samples)
        ax.plot([row.calibration_samples for row in rows], [100 * row.board_accuracy for row in rows],
                marker="o", label=model)
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(sorted({row.calibration_samples for rows in by_model.values() for row in rows}))
    ax.xaxis.set_major_formatter(_plain_numbers())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("calibration samples (int8 conversion)")
    ax.set_ylabel("int8 accuracy on the board, %")
    ax.set_title("Accuracy against calibration set size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _svg(fig)


def float_int8_plot(run: PublishedRun) -> str | None:
    models = []
    for model in dict.fromkeys(row.model for row in run.rows):
        rows = [row for row in run.rows if row.model == model and row.board_accuracy is not None]
        floats = [row for row in rows if row.quantization == "float32"]
        ints = [row for row in rows if row.quantization == "int8"]
        if floats and ints:
            models.append((model, floats[0], ints))
    if not models:
        return None
    fig, ax = _figure(7.5, 3.8)
    width = 0.8 / max(1 + len(ints) for _, _, ints in models)
    for position, (model, float_row, int_rows) in enumerate(models):
        bars = [(float_row, "#cc6677")] + [(row, "#228833") for row in int_rows]
        for offset, (row, color) in enumerate(bars):
            x = position + (offset - (len(bars) - 1) / 2) * width
            ax.bar(x, 100 * row.board_accuracy, width * 0.95, color=color)
            ax.annotate(row.variant, (x, 100 * row.board_accuracy), fontsize=6, rotation=90, ha="center",
                        va="bottom", xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(models)), [model for model, _, _ in models])
    ax.set_ylabel("accuracy on the board, %")
    ax.set_ylim(0, 115)
    ax.set_title("float32 (red) against int8 (green), same evaluation samples")
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


# --- the HTML ----------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; white-space: nowrap; }
th { background: #f2f2f2; }
.estimated { background: #fff6d5; padding: 0.5em; border-left: 4px solid #e0b000; }
.measured { background: #e3f4e3; padding: 0.5em; border-left: 4px solid #2a8a2a; }
.quick { background: #fde2e2; padding: 0.5em; border-left: 4px solid #c00000; font-size: 1.1em; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
.layers { display: grid; grid-template-columns: 1fr; }
"""


def _markdown_inline(text: str) -> str:
    """A banner's **bold** and `code`, as HTML."""
    def wrap(source: str, marker: str, tag: str) -> str:
        parts = source.split(marker)
        return "".join(f"<{tag}>{part}</{tag}>" if index % 2 else part for index, part in enumerate(parts))
    return wrap(wrap(html.escape(text), "**", "strong"), "`", "code")


def _html_table(headers: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _figure_html(svg: str | None, caption: str) -> str:
    if svg is None:
        return f"<p><em>{html.escape(caption)}: no data in this run.</em></p>"
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


def benchmarks_html(runs: Sequence[PublishedRun], generated: str) -> str:
    heading = html.escape(_heading(runs))
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{heading}</title>", f"<style>{_STYLE}</style></head><body>",
             f"<h1>{heading}</h1>", f"<p>Rendered on {html.escape(generated)}.</p>"]
    for run in runs:
        meta = run.metadata
        settings = board_settings(run.rows)
        parts.append(f"<h2>{html.escape(run.title)}</h2>")
        if run.quick:
            parts.append(f"<p class='quick'>{_markdown_inline(QUICK_BANNER)}</p>")
        for kind in run.latency_kinds:
            parts.append(f"<p class='{kind}'>Latency is <strong>{kind}</strong> "
                         f"{html.escape(LATENCY_NOTE.get(kind, ''))}. Statistic: {html.escape(_windows_text(run.rows))}."
                         "</p>")
        datasets = dataset_notes(run.rows)
        parts.append(f"<p>Suite <code>{html.escape(meta.suite_path)}</code> (profile {html.escape(meta.profile)}), "
                     f"run <code>{html.escape(meta.run_id)}</code>, started {html.escape(meta.started)}; clock "
                     f"{html.escape(settings['clock'])}; kernels {html.escape(settings['kernels'])}; arena in "
                     f"{html.escape(settings['arena'])}; tinyhil {html.escape(meta.tinyhil_version)}; "
                     + html.escape(", ".join(f"{k} {v}" for k, v in sorted(meta.libraries.items()))) + ".</p>")
        parts.append(f"<p>Firmware: {html.escape(settings['firmware'])}.</p>")
        parts.append(f"<p>Host (training, conversion, reference): {html.escape(host_label(meta.host))}.</p>")
        parts.append("<p>Data sets: " + html.escape("; ".join(datasets) if datasets else "not recorded") + ".</p>")
        parts.append(_html_table(*table(run)))
        parts += [f"<p>{html.escape(note)}</p>" for note in _notes(run)]
        bars = " Bars span the stated error of each estimate." if any(latency_band(row) for row in run.rows) else ""
        parts.append(_figure_html(size_latency_plot(run), "Model size against latency (log scales)." + bars))
        parts.append(_figure_html(float_int8_plot(run), "Board accuracy of the float32 and int8 variants of each "
                                                        "model."))
        from .explain import calibration_lines, diagnosis_line

        verdicts = " ".join(f"{line}." for line in calibration_lines(run.rows))
        parts.append(_figure_html(calibration_plot(run), "int8 accuracy against the number of calibration samples."
                                  + (f" Verdict: {verdicts}" if verdicts else "")))
        diagnosed = [row for row in run.rows if row.diagnoses]
        if diagnosed:
            parts.append("<h3>Diagnoses</h3><ul>" + "".join(
                f"<li><strong>{html.escape(row.case_id)}</strong>: " + "; ".join(
                    html.escape(diagnosis_line(diagnosis)) for diagnosis in row.diagnoses) + "</li>"
                for row in diagnosed) + "</ul>")
        parts.append("<h3>Per-layer latency</h3><div class='layers'>")
        for row in run.rows:
            if row.layers:
                strips = ("; beside it, each operator's output on the board against host TFLM (red: the first to "
                          "diverge, orange: beyond the tolerance)" if row.divergence else "") + (
                    "; int8 error per layer against the float model" if row.quantization_errors else "")
                parts.append(_figure_html(layer_plot(run, row), f"{row.case_id}: time per operator, in execution "
                                                                 f"order{strips}."))
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: Sequence[Path], out_dir: Path, generated: str | None = None) -> list[Path]:
    """BENCHMARKS.md and benchmarks.html in `out_dir`, from the runs in the order given."""
    runs = [load_run(Path(run_dir)) for run_dir in run_dirs]
    generated = generated or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, page = out_dir / "BENCHMARKS.md", out_dir / "benchmarks.html"
    atomic_write(markdown, benchmarks_markdown(runs, generated))
    atomic_write(page, benchmarks_html(runs, generated))
    return [markdown, page]

