"""Content-addressed artifact cache: a stage's output lives under the hash of everything it depends
on (its inputs, its settings, the code of the stage and the versions of the ML libraries), so an
unchanged rerun trains and converts nothing, and any change recomputes only what it touches."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

_LIBRARIES = ("tensorflow", "tf-keras", "ai-edge-litert", "tflite-micro", "numpy", "scikit-learn", "sktime")


@cache
def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@cache
def source_hash(*module_files: str) -> str:
    digest = hashlib.sha256()
    for name in module_files:
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def content_key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ArtifactCache:
    root: Path

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_complete(self, stage: str, key: str) -> bool:
        return (self.entry(stage, key) / ".complete").is_file()

    def staging(self, stage: str, key: str) -> Path:
        """A fresh directory to build an entry in; `commit` moves it into place."""
        path = self.root / stage / f"{key}.partial"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, stage: str, key: str, staging: Path) -> Path:
        (staging / ".complete").write_text("")
        final = self.entry(stage, key)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        return final
