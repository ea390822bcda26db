"""The model's constants, fitted to the published timings (`published.py`).

Fitted, in this order:
  1. esp-nn's ANSI C constants (per tap and per output for conv and depthwise; per tap and per
     output for the pools), least squares on each version's ANSI C column;
  2. one stall factor per esp-nn assembly routine with a kernel row: the measured cycles over
     the instructions counted in its code for that row's shape (with two rows, the per-call cost
     separated). A factor belongs to the code and the chip, so both versions share each routine's
     factor, and a routine no row times takes `asm-default`, the geometric mean of the fitted ones;
  3. `tflm-reference`, cycles per proxy instruction of TFLM's reference kernels, on person_detect
     without esp-nn (2300 ms), the one whole-model point the fit spends.

Kernel rows carry no memory term: esp-nn's test app times each kernel on buffers it has just
filled, which sit in the test board's 64 KB data cache. Not fitted (no published figure; each
is small next to the fitted terms on real models): the memory rates, from the facts file's
memcpy measurement on an N8R8 module, and TFLM's per-operator and per-invoke overheads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from ...tflite_model import ModelInfo
from . import published
from .model import ESP_NN_VERSIONS, ChipConfig, Constants, estimate_with, op_work
from .reference import ELEMENT_FACTOR, REFERENCE_FACTOR

__all__ = ["default_constants", "UNFITTED"]

# Facts file, memcpy on an N8R8 module at 240 MHz: SRAM->SRAM 362 MB/s, PSRAM->SRAM 38.6 MB/s,
# SRAM->PSRAM 56.7 MB/s. A memcpy reads and writes every byte, so one SRAM access is half the SRAM
# copy and the rest of each PSRAM copy is the PSRAM side. Flash shares the cache and the bus.
_SRAM_NS = 0.5e9 / 362e6
UNFITTED: Mapping[str, float] = MappingProxyType({
    "memory.sram_cycles_per_byte": _SRAM_NS * 240 / 1000,
    "memory.psram_read_ns_per_byte": 1e9 / 38.6e6 - _SRAM_NS,
    "memory.psram_write_ns_per_byte": 1e9 / 56.7e6 - _SRAM_NS,
    "memory.flash_read_ns_per_byte": 1e9 / 38.6e6 - _SRAM_NS,
    # Assumptions: TFLM's per-operator dispatch (node lookup, kernel prologue, the wrappers'
    # esp_timer_get_time() pair) and per-invoke set-up.
    "dispatch.op_cycles": 500.0,
    "dispatch.invoke_cycles": 2000.0,
    # Assumption (reference.py): cycles per x86-64 proxy instruction of TFLM's element-wise kernels.
    ELEMENT_FACTOR: 1.5,
})
_KERNEL_ROW_CHIP: Mapping[str, ChipConfig] = MappingProxyType({version: ChipConfig(tensors_in_psram=False, weights_in_flash=False, esp_nn_version=version)
                    for version in ESP_NN_VERSIONS})


@functools.lru_cache(maxsize=1)
def default_constants() -> Constants:
    values = dict(UNFITTED)
    rows = [row for row in published.kernel_rows() if row.usable]
    for version in ESP_NN_VERSIONS:
        values.update(_fit_ansi(version, [row for row in rows if row.version == version]))
    factors = _fit_stall_factors(rows)
    for version in ESP_NN_VERSIONS:
        values.update({f"esp-nn-{version}/{routine}": factor for routine, factor in factors.items()})
        values[f"esp-nn-{version}/asm-default"] = _geometric_mean(factors.values())
    values[REFERENCE_FACTOR] = _fit_reference(values)
    return Constants(MappingProxyType(values))


def _single_op(graph: ModelInfo):
    (op,) = graph.ops
    return op


def _fit_ansi(version: str, rows: list[published.KernelRow]) -> dict[str, float]:
    """Least squares per family on the ANSI C column, with the ANSI paths' own counts."""
    from .espnn_conv import ansi_conv_work, ansi_depthwise_work
    from .espnn_other import ansi_pool_work
    from .work import window_of

    families: dict[str, tuple[list[dict[str, float]], list[float]]] = {}
    for row in rows:
        op = _single_op(row.graph)
        window = window_of(op, row.graph.tensors)
        if op.name == "CONV_2D":
            work = ansi_conv_work(window, "ansi", version)
        elif op.name == "DEPTHWISE_CONV_2D":
            work = ansi_depthwise_work(window, "ansi", version)
        elif op.name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            work = ansi_pool_work(window, "max" if op.name == "MAX_POOL_2D" else "avg", version)
        else:
            continue
        counts, measured = families.setdefault(op.name, ([], []))
        counts.append(dict(work.counts))
        measured.append(row.ansi_cycles)
    fitted: dict[str, float] = {}
    for name, (counts, measured) in families.items():
        keys = sorted({key for row in counts for key in row})
        matrix = np.array([[row.get(key, 0.0) for key in keys] for row in counts])
        solution = _nonnegative_least_squares(matrix, np.array(measured, dtype=float))
        fitted.update(zip(keys, solution))
    return fitted


def _nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray,
                               scale: np.ndarray | None = None) -> np.ndarray:
    """Least squares with every unknown at least 0, for the handful of rows and unknowns the
    fits have: drop the unknowns that come out negative and solve again (exact for these sizes,
    and no scipy in the virtual board's process)."""
    # Relative errors count alike on rows of very different size.
    weights = 1.0 / (target if scale is None else scale)
    weighted, goal = matrix * weights[:, None], target * weights
    active = list(range(matrix.shape[1]))
    solution = np.zeros(matrix.shape[1])
    while active:
        found, *_ = np.linalg.lstsq(weighted[:, active], goal, rcond=None)
        if (found >= 0).all():
            solution[active] = found
            break
        active = [column for column, value in zip(active, found) if value > 0]
    return solution


def _fit_stall_factors(rows: list[published.KernelRow]) -> dict[str, float]:
    """Cycles per counted instruction of each assembly path, never below one instruction per
    cycle. A stall factor belongs to the code and the chip, so a routine both versions share
    takes it from either version's rows (`published.py` says which rows time a warm call).

    Every timed call also pays a fixed cost outside the routine's loops (the C wrapper, the call,
    code brought into the instruction cache), which a steady invoke() replaces with TFLM's own
    per-operator cost (`dispatch.op_cycles`). A routine timed at two sizes separates the two; a
    routine with one row keeps them together, which errs slow on large layers.
    """
    return {routine: fit.factor for routine, fit in stall_fits(rows).items()}


@dataclass(frozen=True)
class StallFit:
    factor: float
    call_cycles: float
    rows: tuple[tuple[published.KernelRow, float], ...]   # (row, instructions counted)


def stall_fits(rows: list[published.KernelRow]) -> dict[str, StallFit]:
    fits = {}
    for routine, found in stall_rows(rows).items():
        counted = np.array([instructions for _, instructions in found])
        measured = np.array([float(row.optimized_cycles) for row, _ in found])
        if len(found) >= 2:
            # Stalls beyond one instruction per cycle = (factor - 1) x instructions + per call.
            extra, call = _nonnegative_least_squares(np.column_stack([counted, np.ones_like(counted)]),
                                                     measured - counted, scale=np.ones_like(counted))
            factor = 1.0 + extra
        else:
            factor, call = max(1.0, float(measured[0] / counted[0])), 0.0
        fits[routine] = StallFit(factor, float(call), tuple(found))
    return fits


def stall_rows(rows: list[published.KernelRow]) -> dict[str, list[tuple[published.KernelRow, float]]]:
    """The rows each assembly routine's stall factor rests on, with the instructions counted for
    them: its warm rows, or its cold ones when no warm row times it."""
    found: dict[str, list[tuple[published.KernelRow, float]]] = {}
    for row in rows:
        op = _single_op(row.graph)
        work = op_work(op, row.graph.tensors, _KERNEL_ROW_CHIP[row.version])
        if work.counts.keys() != {work.path}:
            continue                      # a C path: fitted on the ANSI column
        found.setdefault(work.path.split("/", 1)[1], []).append((row, work.counts[work.path]))
    return {routine: [entry for entry in entries if entry[0].warm] or entries for routine, entries in found.items()}


def _fit_reference(values: dict[str, float]) -> float:
    """person_detect without esp-nn: the factor that makes the whole model take 2300 ms."""
    (point,) = [p for p in published.whole_model_points() if p.fitted]
    chip = ChipConfig(esp_nn=False, tensors_in_psram=point.arena_in_psram)
    graph = published.person_detect()
    target = point.published_ms * 1000 * chip.cpu_mhz

    def total(factor: float) -> float:
        trial = Constants({**values, REFERENCE_FACTOR: factor})
        return estimate_with(graph, chip, trial, relative_error=0.0, cost_model="").total_cycles

    # The total is linear in the factor while no layer sits at its ceiling: solve it from two
    # points, and bisect only if the solution misses (some layer clamped).
    at_one, at_two = total(1.0), total(2.0)
    factor = 1.0 + (target - at_one) / (at_two - at_one)
    if factor > 0 and abs(total(factor) - target) <= 1e-6 * target:
        return factor
    low, high = 0.0, 1.0
    while total(high) < target:
        high *= 2
    for _ in range(60):                   # the estimate grows with the factor: bisect
        middle = (low + high) / 2
        low, high = (middle, high) if total(middle) < target else (low, middle)
    return (low + high) / 2


def _geometric_mean(values: Iterable[float]) -> float:
    found = list(values)
    return math.exp(sum(math.log(v) for v in found) / len(found))
