"""Shared test fixtures: where ../shared lives, and a model that ships inside a package."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "models").is_dir():
        pytest.skip(f"third-party models not available: {SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def sine_model() -> Path:
    """TFLM's float sine model, shipped inside the tflite-micro package: always present."""
    import tflite_micro

    path = Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"
    assert path.is_file(), f"tflite-micro no longer ships {path}"
    return path
