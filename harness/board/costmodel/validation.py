"""The cost model against every published timing: the kernel rows and the one whole-model point it
was fitted on, and the whole-model points it was not (held out), with their errors.
docs/board-model.md shows these tables; tests/test_costmodel.py holds the held-out points to
the stated error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...tflite_model import ModelInfo
from . import published
from .fit import default_constants, stall_fits
from .model import ESP_NN_VERSIONS, ChipConfig, estimate_with, op_work

__all__ = ["Point", "kernel_points", "model_points", "points_markdown"]


@dataclass(frozen=True)
class Point:
    name: str
    esp_nn_version: str        # "" where the point does not depend on it (reference kernels)
    published: float
    estimated: float
    unit: str
    role: str                  # "fitted", "held out" or "not used" (with the reason in `note`)
    note: str = ""

    @property
    def error(self) -> float:
        return (self.estimated - self.published) / self.published


def kernel_points() -> list[Point]:
    """Each kernel row's optimized and ANSI C cycles against the model's count for it, with the
    constants fitted (the loops alone: no memory term, no TFLM dispatch, as the tables time)."""
    constants = default_constants()
    rows = published.kernel_rows()
    used = {id(row) for fit in stall_fits([r for r in rows if r.usable]).values() for row, _ in fit.rows}
    points = []
    for row in rows:
        chip = ChipConfig(tensors_in_psram=False, weights_in_flash=False, esp_nn_version=row.version)
        (op,) = row.graph.ops
        work = op_work(op, row.graph.tensors, chip)
        estimated = sum(count * constants[name] for name, count in work.counts.items())
        assembly = work.counts.keys() == {work.path}
        if not row.usable:
            role, note = "not used", "first call: instruction-cache misses dominate"
        elif assembly and id(row) not in used:
            role, note = "not used", "first call; the routine's stall factor comes from 1.2.3's warm rows"
        else:
            role, note = "fitted", ""
        points.append(Point(f"{row.name}: optimized ({work.path.split('/', 1)[1]})", row.version,
                            float(row.optimized_cycles), estimated, "cycles", role, note))
        ansi = _ansi_estimate(row, constants)
        if ansi is not None:
            points.append(Point(f"{row.name}: ANSI C", row.version, float(row.ansi_cycles), ansi, "cycles",
                                "fitted" if row.usable else "not used", "" if row.usable else note))
    return points


def _ansi_estimate(row: published.KernelRow, constants) -> float | None:
    from .espnn_conv import ansi_conv_work, ansi_depthwise_work
    from .espnn_other import ansi_pool_work
    from .work import window_of

    (op,) = row.graph.ops
    window = window_of(op, row.graph.tensors)
    if op.name == "CONV_2D":
        work = ansi_conv_work(window, "ansi", row.version)
    elif op.name == "DEPTHWISE_CONV_2D":
        work = ansi_depthwise_work(window, "ansi", row.version)
    elif op.name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        work = ansi_pool_work(window, "max" if op.name == "MAX_POOL_2D" else "avg", row.version)
    else:
        return None
    return sum(count * constants[name] for name, count in work.counts.items())


def model_points(mobilenet_v3: ModelInfo | None) -> list[Point]:
    """The whole-model points, milliseconds of invoke() at 240 MHz; MobileNetV3-Small's only when
    its graph is given (mobilenet_v3.py builds it). esp-nn points for both pinned versions."""
    constants = default_constants()
    graphs = {"person_detect": published.person_detect(), "mobilenet_v3_small": mobilenet_v3}
    points = []
    for point in published.whole_model_points():
        graph = graphs[point.model]
        if graph is None:
            continue
        for version in (ESP_NN_VERSIONS if point.esp_nn else ("",)):
            chip = ChipConfig(esp_nn=point.esp_nn, tensors_in_psram=point.arena_in_psram,
                              esp_nn_version=version or ESP_NN_VERSIONS[0])
            estimate = estimate_with(graph, chip, constants, relative_error=0.0, cost_model="")
            points.append(Point(point.name, version, point.published_ms, estimate.total_us / 1000, "ms",
                                "fitted" if point.fitted else "held out", point.source))
    return points


def points_markdown(points: list[Point]) -> str:
    lines = ["| point | esp-nn | published | estimated | error | role |", "| --- | --- | --- | --- | --- | --- |"]
    for point in points:
        digits = 0 if point.unit == "cycles" else 1
        role = point.role + (f" ({point.note})" if point.role == "not used" and point.note else "")
        lines.append(f"| {point.name} | {point.esp_nn_version or 'none'} | {point.published:,.{digits}f} "
                     f"| {point.estimated:,.{digits}f} | {100 * point.error:+.1f}% | {role} |")
    return "\n".join(lines)


def main() -> None:
    """Print the validation tables (python -m harness.board.costmodel.validation [CACHE_DIR])."""
    import sys

    from ...tflite_model import inspect_model
    from .mobilenet_v3 import mobilenet_v3_small_tflite

    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".tinyhil-cache")
    mobilenet = inspect_model(mobilenet_v3_small_tflite(cache).read_bytes())
    print("Kernel rows\n\n" + points_markdown(kernel_points()) + "\n")
    print("Whole models\n\n" + points_markdown(model_points(mobilenet)))


if __name__ == "__main__":
    main()
