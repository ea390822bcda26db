"""Shared test fixtures: where ../shared lives, and a model that ships inside a package."""

from __future__ import annotations

import shutil
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
def vendor() -> Path:
    """The pinned upstream sources the virtual board's firmware is built from, with a compiler."""
    vendor_dir = SHARED / "vendor"
    if not (vendor_dir / "esp-tflite-micro").is_dir():
        pytest.skip(f"pinned firmware sources not available: {vendor_dir} is absent")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH: the firmware cannot be built natively")
    return vendor_dir


@pytest.fixture(scope="session")
def sine_model() -> Path:
    """TFLM's float sine model, shipped inside the tflite-micro package: always present."""
    import tflite_micro

    path = Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"
    assert path.is_file(), f"tflite-micro no longer ships {path}"
    return path


def process_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


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


@pytest.fixture(scope="session", autouse=True)
def native_firmware_ready():
    """Builds the virtual board's native firmware (both pinned esp-nn versions) before the first
    test, so the cold build (a few minutes on 2 cores, once per cache) is paid here and not inside
    whichever test happens to load a virtual board first. Without ../shared/vendor the virtual
    board falls back to the Python engine and this does nothing."""
    from harness.board.native_firmware import build_native_firmware, default_native_cache
    from harness.sources import ESP_NN_VERSIONS, SourcesUnavailable

    if not (SHARED / "vendor" / "esp-tflite-micro").is_dir():
        return
    for version in ESP_NN_VERSIONS:
        try:
            build_native_firmware(version, True, cache_root=default_native_cache(), vendor_dir=SHARED / "vendor")
        except SourcesUnavailable:
            return


# The test modules that share the seed suite's runs (seed_quick_runs, the slowest fixture: five
# models trained, the suite run twice). A session fixture is made once per xdist worker that needs
# it, so these go to one worker together.
SEED_RUN_MODULES = frozenset({"test_costmodel.py", "test_firmware.py", "test_pipeline.py"})


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs the tests on two pytest-xdist workers, a module's tests on one worker (its
    module- and session-scoped fixtures are made once), the seed-run modules all on one. (xdist's
    own --dist=loadgroup would do it with marks, but under pytest 9 its group suffix is lost.)
    Anything else, a suite's cases included, is scheduled one item at a time, as --dist=load."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if not module.startswith("tests/"):
                return nodeid
            return "seed-runs" if Path(module).name in SEED_RUN_MODULES else module

    return ModuleScheduling(config, log)
