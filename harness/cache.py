"""Content-addressed artifact cache: a stage's output lives under the hash of everything it depends
on (its inputs, its settings, the code of the stage and the versions of the ML libraries), so an
unchanged rerun trains and converts nothing, and any change recomputes only what it touches.

Several runs may share one cache at the same time. An entry is built by one process at a time (a
lock per entry; the others wait and then use it), in a staging directory private to that process,
and appears under its key by one rename, with the sizes and SHA-256 of its files. Each process
checks those once per entry before using it: a damaged entry (truncated, bit-flipped, files
missing) is dropped and rebuilt, and the log names the file. Staging directories go when their
build fails; those of killed processes go when the next process looks at that stage.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("tinyhil.cache")

_LIBRARIES = ("tensorflow", "tf-keras", "ai-edge-litert", "tflite-micro", "numpy", "scikit-learn", "sktime")
# Written last into an entry: the files it holds, with their sizes and hashes.
MANIFEST = ".complete"
# Staging directories are named <entry>.partial-<pid>-<random>, next to a <same>.lock file that their
# builder holds locked (flock) for as long as the directory exists.
_PARTIAL = ".partial-"


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
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# --- staging directories ------------------------------------------------------------------------

@contextmanager
def file_lock(path: Path, *, blocking: bool = True, shared: bool = False) -> Iterator[bool]:
    """An exclusive (or `shared`) flock on `path` for the block (True), or False at once when
    another holder has it and `blocking` is off. The kernel releases it when its holder dies,
    however it dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A fresh directory, private to this process, to build `parent/name` in. It is removed when the
    block ends (a commit renames it away first); one left by a killed process is removed by
    `sweep_staging`, which can tell it from a live builder's by the lock."""
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    lock_path = path.with_name(path.name + ".lock")
    # The lock before the directory: a sweeper never sees the directory unlocked while we live.
    with file_lock(lock_path):
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


def sweep_staging(parent: Path) -> list[Path]:
    """Removes the staging directories under `parent` whose builder has died; returns them."""
    removed = []
    if not parent.is_dir():
        return removed
    for path in sorted(parent.glob(f"*{_PARTIAL}*")):
        if not path.is_dir():
            continue
        lock_path = path.with_name(path.name + ".lock")
        # Only a directory's owner or a sweeper that removed the directory deletes its lock file, so
        # the file locked here is the one a live owner would hold.
        with file_lock(lock_path, blocking=False) as free:
            if not free:
                continue  # a live process is building there
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(path)
    # Staging of tinyhil before private staging (one shared <key>.partial per entry), and dropped
    # entries whose remover died before it had deleted them.
    for path in (*parent.glob("*.partial"), *parent.glob("*.dropped-*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in removed:
        log.info("cache: removed %s, left behind by a process that ended mid-build", path)
    return removed


def publish_dir(staging: Path, final: Path) -> bool:
    """Renames a finished staging directory to `final` unless a complete one is already there
    (another process finished first: ours is then dropped with its staging). True if ours went in."""
    try:
        staging.rename(final)
        return True
    except OSError:
        if not final.is_dir():
            raise
        return False


# --- the cache ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Damage:
    entry: Path
    what: str

    def __str__(self) -> str:
        return self.what


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_hash(path)}
    return files


def _damage(entry: Path) -> _Damage | None:
    """What is wrong with an entry, or None when every file has its recorded size and hash."""
    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        return _Damage(entry, f"cache entry {entry} is incomplete (no {MANIFEST})")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return _Damage(entry, f"cache entry {entry} has no content hashes in {manifest_path} "
                              f"(written by an older tinyhil, or damaged)")
    for relative, expected in files.items():
        path = entry / relative
        if not path.is_file():
            return _Damage(entry, f"cache file {path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            return _Damage(entry, f"cache file {path} has {size} bytes, {expected['bytes']} were written")
        digest = file_hash(path)
        if digest != expected["sha256"]:
            return _Damage(entry, f"cache file {path} changed since it was written (sha256 {digest[:16]}, "
                                  f"recorded {expected['sha256'][:16]})")
    return None


@dataclass
class ArtifactCache:
    root: Path
    # Entries this process has checked (their hashes read once per process) and stages it has swept.
    _verified: set[Path] = field(default_factory=set, init=False, repr=False)
    _swept: set[str] = field(default_factory=set, init=False, repr=False)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def ensure(self, stage: str, key: str, build: Callable[[Path], None]) -> Path:
        """The entry `stage/key`, checked; when it is absent or damaged, `build(directory)` writes
        its files into a private staging directory that then becomes the entry."""
        entry = self.entry(stage, key)
        if entry in self._verified and (entry / MANIFEST).is_file():
            return entry
        if stage not in self._swept:
            sweep_staging(self.root / stage)
            self._swept.add(stage)
        with file_lock(self.root / "locks" / f"{stage}-{key}.lock"):
            damage = _damage(entry)
            if damage is not None:
                if entry.exists():
                    log.warning("%s; dropping the entry and rebuilding it", damage)
                    self._drop(entry)
                with staging_dir(entry.parent, key) as staging:
                    build(staging)
                    (staging / MANIFEST).write_text(json.dumps({"files": _manifest(staging)}, indent=1))
                    # Under the entry's lock nobody else writes it, and a damaged one was dropped.
                    staging.rename(entry)
        self._verified.add(entry)
        return entry

    @staticmethod
    def _drop(entry: Path) -> None:
        # Out of the way in one rename, so no reader ever sees half an entry under the key.
        doomed = entry.with_name(f"{entry.name}.dropped-{os.getpid()}-{secrets.token_hex(4)}")
        entry.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
