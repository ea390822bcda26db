"""The compare stage: board outputs against the reference, and accuracy against labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reference import TensorQuant


@dataclass(frozen=True)
class Agreement:
    samples: int
    exact_match: float          # fraction of samples whose output equals the reference exactly
    within_tolerance: float     # fraction whose every element is within the tolerance (the gated figure)
    max_abs_diff: float         # in output LSB for quantized outputs, absolute for float outputs
    diff_unit: str              # "LSB" or "abs"
    top1_agreement: float       # same predicted class (same side of 0.5 for one sigmoid output)
    cosine_similarity: float    # mean over samples, on dequantized outputs
    rmse: float                 # on dequantized outputs


def predicted_classes(dequantized: np.ndarray) -> np.ndarray:
    flat = dequantized.reshape(len(dequantized), -1)
    return (flat[:, 0] >= 0.5).astype(np.int64) if flat.shape[1] == 1 else flat.argmax(axis=1)


def accuracy(dequantized: np.ndarray, labels: np.ndarray) -> float:
    return float((predicted_classes(dequantized) == labels).mean())


def compare_outputs(board: np.ndarray, reference: np.ndarray, quant: TensorQuant, tolerance_lsb: int) -> Agreement:
    count = len(board)
    board_flat = board.reshape(count, -1)
    ref_flat = reference.reshape(count, -1)
    quantized = quant.dtype != "float32"
    diff = np.abs(board_flat.astype(np.float64) - ref_flat.astype(np.float64))
    # Float outputs have no LSB; a relative tolerance stands in for "within one step".
    tolerance = tolerance_lsb if quantized else 1e-5 * np.maximum(1.0, np.abs(ref_flat.astype(np.float64)))
    board_real = quant.dequantize(board_flat).astype(np.float64)
    ref_real = quant.dequantize(ref_flat).astype(np.float64)
    norms = np.linalg.norm(board_real, axis=1) * np.linalg.norm(ref_real, axis=1)
    dots = (board_real * ref_real).sum(axis=1)
    # Two all-zero vectors agree perfectly; cosine is undefined there, so count them as 1.
    both_zero = norms == 0
    cosine = np.where(both_zero, 1.0, dots / np.where(both_zero, 1.0, norms))
    return Agreement(
        samples=count,
        exact_match=float((diff == 0).all(axis=1).mean()),
        within_tolerance=float((diff <= tolerance).all(axis=1).mean()),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        diff_unit="LSB" if quantized else "abs",
        top1_agreement=float((predicted_classes(board_real) == predicted_classes(ref_real)).mean()),
        cosine_similarity=float(cosine.mean()),
        rmse=float(np.sqrt(((board_real - ref_real) ** 2).mean())),
    )


@dataclass(frozen=True)
class LatencyStats:
    kind: str                   # "estimated" (virtual board) or "measured" (real board)
    median_ms: float
    p90_ms: float
    samples: int


def window_latency_stats(windows: tuple[tuple[float, ...], ...], kind: str) -> LatencyStats:
    """The median of the window medians (MLPerf Tiny's statistic) and the p90 of every invoke."""
    medians = [float(np.median(window)) for window in windows]
    every = np.concatenate([np.asarray(window, dtype=np.float64) for window in windows])
    return LatencyStats(kind, float(np.median(medians)), float(np.percentile(every, 90)), len(every))
