"""image_folder: the user's images, one sub-folder per class (docs/datasets.md, "image_folder")."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError
from .base import Dataset, cap_option, int_option, rng_for, stratified_split
from .files import check_minimum, choice_option, class_files, class_folders, count_text, path_option, pick_per_class

WHERE = "dataset 'image_folder'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# MPO is how Pillow names the JPEGs many phone cameras write (a JPEG with a second preview frame).
_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP"})
_MODES = {"grayscale": "L", "rgb": "RGB"}


def load_image_folder(options: Mapping[str, object], seed: int, base_dir: Path) -> Dataset:
    root, text = path_option(options, base_dir, WHERE, "directory")
    size = int_option(options, "image_size", WHERE, 1, 1024)
    color_mode = choice_option(options, "color_mode", tuple(_MODES), WHERE)
    cap = cap_option(options, WHERE, allow_all=True)
    classes = class_folders(root, WHERE, "image")
    files = [class_files(folder, IMAGE_SUFFIXES, "image", WHERE) for _, folder in classes]
    labels = tuple(name for name, _ in classes)
    check_minimum({label: len(found) for label, found in zip(labels, files, strict=True)}, "images", WHERE)
    # The cap picks files before reading, so a large folder costs only the images kept.
    keep = pick_per_class([len(found) for found in files], cap, rng_for(seed, "image_folder/cap"))
    chosen = [(index, found[i]) for index, (found, rows) in enumerate(zip(files, keep, strict=True)) for i in rows]
    x = np.stack([read_image(path, size, _MODES[color_mode]) for _, path in chosen])
    y = np.array([index for index, _ in chosen], dtype=np.int64)
    kept = f", at most {cap} per class kept" if cap else ""
    source = (
        f"recorded: {count_text(sum(map(len, files)), 'image')} in {len(labels)} class folders under {text}, "
        f"resized to {size}x{size} {color_mode}{kept}"
    )
    return stratified_split("image_folder", x, y, labels, "multiclass", source, seed)


def read_image(path: Path, size: int, mode: str) -> np.ndarray:
    """(size, size, channels) float32 pixel values 0..255 of one image file."""
    try:
        with warnings.catch_warnings():
            # A very large image is a warning in Pillow; here it is simply resized like any other.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in _FORMATS:
                    raise DatasetError(
                        f"expected a PNG, JPEG or BMP image, found {image.format or 'an unknown'} data",
                        where=str(path),
                    )
                # Cameras store rotation as an EXIF tag; the pixels the model should see are upright.
                upright = ImageOps.exif_transpose(image)
                converted = upright.convert(mode)
                # Squashed to the square, not cropped, as Keras's image_dataset_from_directory does.
                resized = converted.resize((size, size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(
            f"cannot read image: expected a PNG, JPEG or BMP file, {' '.join(str(error).split())}", where=str(path)
        ) from error
    pixels = np.asarray(resized, dtype=np.float32)
    return pixels[..., None] if pixels.ndim == 2 else pixels
