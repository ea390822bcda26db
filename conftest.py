"""Shared test fixtures: where ../shared lives, and a model that ships inside a package."""

from __future__ import annotations

import subprocess
import sys
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


def run_pytest(*args: str, cwd: Path = REPO, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def seed_quick_runs(tmp_path_factory):
    """`pytest suites/seed.yaml --profile=quick` twice on one cache: a first run, and an unchanged
    rerun of two models gated against the first (`--baseline`). Session-scoped: training five
    models is the slowest thing the tests do."""
    root = tmp_path_factory.mktemp("seed")
    common = ["suites/seed.yaml", "--profile=quick", f"--results-dir={root / 'results'}",
              f"--cache-dir={root / 'cache'}"]
    first = run_pytest(*common, "--run-id=first", f"--junitxml={root / 'junit.xml'}")
    second = run_pytest(*common, "--run-id=second", "-k", "keyword_cnn or lstm",
                        f"--baseline={root / 'results' / 'seed' / 'first'}",
                        f"--baseline-summary={root / 'second-summary.md'}")
    return root, first, second
