"""digits: scikit-learn's bundled handwritten digits, resized bilinearly."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from ..errors import DatasetError
from .base import Dataset, cap_indices, cap_option, int_option, rng_for, stratified_split


def _bilinear_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) interpolation weights with half-pixel centres (TF/OpenCV convention)."""
    positions = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    lower = np.floor(positions).astype(int)
    upper = np.minimum(lower + 1, source - 1)
    frac = positions - lower
    weights = np.zeros((target, source))
    weights[np.arange(target), lower] += 1 - frac
    weights[np.arange(target), upper] += frac
    return weights


def load_digits_dataset(options: Mapping[str, object], seed: int, base_dir: Path) -> Dataset:
    where = "dataset 'digits'"
    size = int_option(options, "image_size", where, 8, 512)
    channels = int(options["channels"])  # type: ignore[call-overload]
    if channels not in (1, 3):
        raise DatasetError(f"option 'channels' must be 1 or 3, got {channels}", where=where)
    cap = cap_option(options, where, allow_all=True)
    bunch = load_digits()
    images = bunch.images / 16.0  # pixel counts 0..16 of the 4x4-block-downsampled scans
    classes = bunch.target.astype(np.int64)
    keep = cap_indices(classes, cap, rng_for(seed, "digits"))
    weights = _bilinear_matrix(images.shape[1], size)
    resized = np.einsum("ij,njk,lk->nil", weights, images[keep], weights, optimize=True)
    resized = np.clip(resized, 0.0, 1.0).astype(np.float32)[..., None]
    if channels == 3:
        resized = np.repeat(resized, 3, axis=-1)  # for ImageNet-style backbones that expect RGB
    labels = tuple(str(d) for d in range(10))
    description = (
        "real: scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits), 8x8 upscaled"
    )
    return stratified_split("digits", resized, classes[keep], labels, "multiclass", description, seed)
