"""Why inference is slow: the seed article's "you forgot to quantize" and "huge filters", and the
settings that leave speed on the table (esp-nn off, int16, the arena in PSRAM)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..board.costmodel import ESP_NN_OPS, ChipConfig, estimate_latency
from ..firmware import MemoryBudget
from ..tflite_model import inspect_model, read_model_file
from .base import Diagnosis, num, pct

# A layer reaching under a quarter of its code path's ceiling is losing most of what the path can
# do to its shape (few channels, padding lanes, a filter re-read from flash): docs/board-model.md
# "Paths". Above a quarter, the shape costs less than the path choice.
LOW_EFFICIENCY = 0.25
# ... and only a layer that matters: a fifth of the model's MACs or cycles,
HEAVY_SHARE = 0.2
# ... and at least this long: a layer of a few thousand MACs is all call overhead on any path, and
# reshaping it would win microseconds nobody asked for.
MIN_SLOW_LAYER_US = 250.0
# float32 is named a cause when int8 would be at least this much faster (when the run has an int8 row).
MIN_INT8_SPEEDUP = 1.2
# The arena in PSRAM is named a cause when SRAM would save at least this share of the latency.
PSRAM_COST_SHARE = 0.02
# Ops esp-nn could run that fall back to TFLM's reference kernels, named when they take this share
# of the cycles: below it, the fallback is not where the time goes.
REFERENCE_SHARE = 0.1


def _layer_name(layer: Any) -> str:
    return f"op {layer.index} ({layer.op})"


def _estimate_ms(model_path: str, chip: ChipConfig) -> float | None:
    """The cost model's latency of the row's model under `chip`, when the .tflite is at hand."""
    if not model_path or not Path(model_path).is_file():
        return None
    info = inspect_model(read_model_file(Path(model_path)), where=model_path)
    return estimate_latency(info, chip).total_us / 1000.0


def _is_float(row: Any) -> bool:
    """A float model, whatever its variant is called: a user's float `tflite:` runs as `as-is`."""
    if row.quantization == "float32":
        return True
    if row.quantization != "as-is" or not row.model_path or not Path(row.model_path).is_file():
        return False
    info = inspect_model(read_model_file(Path(row.model_path)), where=row.model_path)
    # The heavy ops decide: a float model with an int8 input quantizer is still float inside.
    heavy = [op for op in info.ops if op.macs and op.inputs and op.inputs[0] >= 0]
    return bool(heavy) and all(info.tensors[op.inputs[0]].dtype == "float32" for op in heavy)


def _chip(row: Any) -> ChipConfig:
    return ChipConfig(cpu_mhz=row.cpu_mhz or 240, esp_nn=bool(row.esp_nn), tensors_in_psram=bool(row.arena_in_psram),
                      esp_nn_version=row.esp_nn_version or "1.1.2")


def slow(row: Any, *, int8_latency_ms: float | None = None, memory: MemoryBudget | None = None) -> Diagnosis | None:
    """Causes of slow inference in one result row (harness.report.CaseResult, with its per-layer
    LayerTiming): a float32 model (with the int8 row's latency of the same model when the run has
    one), reference kernels where esp-nn could run, a heavy layer far below its path's ceiling, the
    arena in PSRAM though it fits SRAM. One evidence line per cause; None when none applies."""
    memory = memory or MemoryBudget()
    layers = tuple(row.layers)
    total_cycles = sum(layer.cycles for layer in layers)
    total_macs = sum(layer.macs for layer in layers)
    latency = f" ({num(row.latency_median_ms)} ms, {row.latency_kind or 'latency'})" if row.latency_median_ms else ""
    facts, suggestions = [], []

    is_float = _is_float(row)
    # Where the int8 row of the same model is no faster (its time is in ops esp-nn does not
    # accelerate, an LSTM's), float32 is not what makes this row slow.
    no_gain = bool(int8_latency_ms and row.latency_median_ms
                   and row.latency_median_ms < MIN_INT8_SPEEDUP * int8_latency_ms)
    if is_float and not no_gain:
        line = f"the model is float32{latency}: esp-nn's kernels are int8 only, so every op runs TFLM's float kernels"
        if int8_latency_ms and row.latency_median_ms:
            line += (f"; the int8 row of the same model takes {num(int8_latency_ms)} ms, "
                     f"{row.latency_median_ms / int8_latency_ms:.1f}x faster")
        facts.append(line)
        suggestions.append("quantize to int8 (`quantization: int8`, calibrated on training samples)"
                           if row.quantization != "as-is" else
                           "give tinyhil the Keras model (`keras:`) so its int8 variant is built, or convert the "
                           ".tflite to int8 with representative data")

    fallback = [layer for layer in layers if layer.op in ESP_NN_OPS and not layer.path.startswith("esp-nn")]
    fallback_cycles = sum(layer.cycles for layer in fallback)
    if fallback and total_cycles and fallback_cycles / total_cycles >= REFERENCE_SHARE and not is_float:
        ops = ", ".join(f"{name} x{count}" for name, count in Counter(layer.op for layer in fallback).items())
        share = f"{pct(fallback_cycles / total_cycles)} of the cycles"
        if row.esp_nn is False:
            line = f"the firmware is built without esp-nn{latency}: {len(fallback)} ops esp-nn has kernels for ({ops}) take {share} on TFLM's reference kernels"
            faster = _estimate_ms(row.model_path, replace(_chip(row), esp_nn=True))
            if faster is not None:
                line += f"; with esp-nn the cost model estimates {num(faster)} ms"
            suggestions.append("build with esp-nn (`board.esp_nn: true`)")
        elif row.quantization == "int16x8":
            line = (f"int16 activations: esp-tflite-micro's esp-nn wrappers run int8 only, so {len(fallback)} ops "
                    f"({ops}) take {share} on TFLM's reference kernels")
            suggestions.append("int8 quantization runs these ops on esp-nn, if its accuracy is enough")
        else:
            line = (f"{len(fallback)} ops esp-nn has kernels for ({ops}) run TFLM's reference kernels for their shape "
                    f"or types (dilation, broadcasting, non-int8 weights) and take {share}: "
                    + ", ".join(f"{_layer_name(layer)} on {layer.path or 'reference'}" for layer in fallback[:3]))
            suggestions.append("reshape those layers to what esp-nn's wrappers take (no dilation, equal-shape "
                               "ADD/MUL, int8 weights)")
        facts.append(line)

    for layer in layers:
        efficiency = layer.ceiling_efficiency
        # Only esp-nn paths: their ceilings are what the shape could reach on that path; a layer on
        # TFLM's reference kernels is slow for the kernel, which the lines above already say.
        if efficiency is None or efficiency >= LOW_EFFICIENCY or not layer.macs or not layer.path.startswith("esp-nn"):
            continue
        mac_share = layer.macs / total_macs if total_macs else 0.0
        cycle_share = layer.cycles / total_cycles if total_cycles else 0.0
        if max(mac_share, cycle_share) < HEAVY_SHARE or layer.time_us < MIN_SLOW_LAYER_US:
            continue
        facts.append(f"{_layer_name(layer)} does {layer.macs_per_cycle:.2f} MAC/cycle, {pct(efficiency)} of the "
                     f"{num(layer.path_ceiling)} MAC/cycle its path {layer.path} reaches, with {pct(mac_share)} of "
                     f"the model's MACs and {pct(cycle_share)} of its cycles")
        if not any(s.startswith("reshape the slow layer") for s in suggestions):
            suggestions.append("reshape the slow layer for its path: channels a multiple of 8 or 16, smaller filters "
                               "(the seed article's \"huge filters\"), no padding lanes (docs/board-model.md, Paths)")

    if row.arena_in_psram and row.arena_size and row.arena_size <= memory.sram_arena_budget:
        line = (f"the {row.arena_size / 1024:.1f} KiB arena is in PSRAM though internal SRAM has "
                f"{memory.sram_arena_budget / 1024:.1f} KiB for it")
        faster = _estimate_ms(row.model_path, replace(_chip(row), tensors_in_psram=False))
        # Estimate against estimate (a measured row's latency is not the cost model's): where
        # compute dominates (reference kernels), PSRAM costs next to nothing and is no cause.
        current = _estimate_ms(row.model_path, _chip(row)) if faster is not None else None
        if faster is None or current is None or faster < (1 - PSRAM_COST_SHARE) * current:
            if faster is not None:
                line += f"; in SRAM the cost model estimates {num(faster)} ms"
            facts.append(line)
            suggestions.append("place the arena in SRAM (`board.arena: auto` or `sram`)")

    if not facts:
        return None
    return Diagnosis("slow", "Inference is slower than this board allows", tuple(facts), "; ".join(suggestions))
