"""The artifact cache under damage: entries made by a real run (a trained keyword CNN, its int8
conversion, data set and reference outputs) are truncated, bit-flipped or lose files; the next run
notices, says which file, rebuilds the entry and passes with the same outputs."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cache import ArtifactCache, sweep_staging
from harness.pipeline import BenchSession
from harness.report import CaseResult
from harness.suite import load_suite

REPO = Path(__file__).resolve().parents[1]

SUITE = """\
suite: cached
models:
  - name: keyword_cnn
    architecture: keyword_cnn
    dataset: {name: keywords, options: {words: "yes,no", samples_per_class: 20}}
    training: {epochs: 1}
    eval_samples: 12
    variants:
      - quantization: int8
        calibration_samples: 20
"""


def _run(root: Path, run_id: str) -> tuple[CaseResult, str]:
    with BenchSession(cache_dir=root / "cache", results_dir=root / "results", run_id=run_id) as session:
        (row,) = [session.run_case(case) for case in load_suite(root / "cached.yaml").cases()]
        log = session.log_path.read_text()
    return row, log


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-first")
    (root / "cached.yaml").write_text(SUITE)
    row, log = _run(root, "first")
    assert row.status == "passed", (row.error, row.violations)
    assert "training keyword_cnn" in log and "converting" in log
    return root, row


@pytest.fixture()
def damaged(first_run, tmp_path):
    """A copy of the first run's suite and cache, to damage."""
    root, row = first_run
    shutil.copytree(root / "cache", tmp_path / "cache")
    shutil.copy(root / "cached.yaml", tmp_path / "cached.yaml")
    return tmp_path, row


def _only(cache: Path, stage: str, name: str) -> Path:
    (path,) = (cache / stage).glob(f"*/{name}")
    return path


def test_an_undamaged_cache_is_used_as_it_is(damaged):
    root, first = damaged
    row, log = _run(root, "again")
    assert row.status == "passed" and row.output_digest == first.output_digest
    # The stages' own lines: a diagnosis may speak of training inputs.
    assert "cache file" not in log and "training keyword_cnn" not in log and ": converting " not in log


def test_a_truncated_cached_tflite_is_named_dropped_and_rebuilt(damaged):
    root, first = damaged
    model = _only(root / "cache", "tflite", "model.tflite")
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[: size // 2])
    row, log = _run(root, "truncated")
    assert row.status == "passed", row.error
    assert f"cache file {model} has {size // 2} bytes, {size} were written; dropping the entry and rebuilding it" in log
    assert "converting keyword_cnn[int8]" in log and "training keyword_cnn" not in log
    assert row.output_digest == first.output_digest and model.stat().st_size == size


def test_a_bit_flip_in_a_cached_tflite_is_not_run(damaged):
    root, first = damaged
    model = _only(root / "cache", "tflite", "model.tflite")
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the weights: the model still loads, and answers differently
    model.write_bytes(bytes(data))
    row, log = _run(root, "flipped")
    assert row.status == "passed", row.error
    assert f"cache file {model} changed since it was written" in log
    assert row.output_digest == first.output_digest


def test_a_truncated_data_set_is_named_and_generated_again(damaged):
    root, first = damaged
    npz = _only(root / "cache", "datasets", "data.npz")
    npz.write_bytes(npz.read_bytes()[:1000])
    row, log = _run(root, "npz")
    assert row.status == "passed", row.error
    (line,) = [line for line in log.splitlines() if "cache file" in line]
    assert f"cache file {npz} has 1000 bytes" in line and "rebuilding" in line
    assert "generating data set keywords" in log


def test_deleted_files_of_cache_entries_are_rebuilt(damaged):
    root, first = damaged
    weights = _only(root / "cache", "models", "model.keras")
    meta = _only(root / "cache", "reference", "meta.json")
    weights.unlink()
    meta.unlink()
    row, log = _run(root, "deleted")
    assert row.status == "passed", row.error
    assert f"cache file {weights} is missing" in log and f"cache file {meta} is missing" in log
    assert "training keyword_cnn" in log
    leftovers = [path for path in (root / "cache").rglob("*") if ".partial" in path.name or ".dropped" in path.name]
    assert not leftovers


# --- staging ----------------------------------------------------------------------------------------

_BUILDER = """\
import sys, time
from pathlib import Path
from harness.cache import ArtifactCache

def build(staging):
    (staging / "half.bin").write_bytes(b"x" * 1000)
    print("building", flush=True)
    time.sleep(600)

ArtifactCache(Path(sys.argv[1])).ensure("stage", sys.argv[2], build)
"""


def _builder(tmp_path: Path, key: str) -> subprocess.Popen:
    script = tmp_path / "builder.py"
    script.write_text(_BUILDER)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), key], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "building"
    return process


def test_a_failed_build_leaves_no_staging_and_a_killed_builders_is_swept_but_not_a_live_ones(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")

    def fails(staging: Path) -> None:
        (staging / "model.tflite").write_bytes(b"half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        cache.ensure("stage", "failing", fails)
    assert sorted(path.name for path in (tmp_path / "cache" / "stage").iterdir()) == []

    # Both building at once (the second's first look at the stage leaves the first's staging be),
    # then one is killed mid-build.
    killed = _builder(tmp_path, "killed")
    live = _builder(tmp_path, "live")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    try:
        stage = tmp_path / "cache" / "stage"
        (stage / "old.partial").mkdir()  # the shared staging of earlier versions
        partials = sorted(path.name for path in stage.iterdir() if path.is_dir())
        assert len(partials) == 3 and sum(name.startswith("killed.partial-") for name in partials) == 1
        started = time.monotonic()
        removed = sweep_staging(stage)
        assert time.monotonic() - started < 5  # never waits for a live builder
        assert sorted(path.name.split(".partial")[0] for path in removed) == ["killed", "old"]
        remaining = [path.name for path in stage.iterdir() if path.is_dir()]
        assert len(remaining) == 1 and remaining[0].startswith("live.partial-")
        # What a new run does first with a stage: the same sweep, then its own entries.
        entry = ArtifactCache(tmp_path / "cache").ensure("stage", "fresh", lambda d: (d / "a").write_text("a"))
        assert (entry / "a").read_text() == "a"
        assert [path.name for path in stage.iterdir() if path.is_dir() and ".partial" in path.name] == remaining
    finally:
        live.kill()
        live.wait(timeout=30)
    sweep_staging(tmp_path / "cache" / "stage")
    assert sorted(path.name for path in (tmp_path / "cache" / "stage").iterdir()) == ["fresh"]
