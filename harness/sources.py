"""Where the firmware's pinned third-party sources come from: esp-tflite-micro and esp-nn.

The native build (harness/native_build.py) compiles the same TFLite Micro and esp-nn sources the
firmware pins, so they must be exactly those versions. Two places can supply them:

- a directory laid out like ../shared/vendor (`esp-tflite-micro/`, `esp-nn-<version>/`), whose
  versions are checked against the pins;
- the ESP Component Registry, read the way idf-component-manager reads it: its file storage holds
  `components/<namespace>/<name>.json` (every version, with the archive's `url` relative to the
  storage and the registry's `component_hash`) and the archives themselves (.tgz of the component
  directory, entries under `./`). Every download is checked against hashes pinned here before it is
  used, and lands in the cache only once checked.

Nothing here patches or copies sources into the project; a registry download lives in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

import yaml

from .errors import TinyhilError

TFLITE_MICRO_VERSION = "1.3.8"
ESP_NN_VERSIONS = ("1.1.2", "1.2.3")
DEFAULT_ESP_NN_VERSION = "1.1.2"

TFLITE_MICRO = "espressif/esp-tflite-micro"
ESP_NN = "espressif/esp-nn"

# The registry's file storage (idf-component-manager's IDF_COMPONENT_STORAGE_URL): the component
# manager downloads from here, not from the API host components.espressif.com.
REGISTRY_STORAGE_URL = "https://components-file.espressif.com"
# TINYHIL_REGISTRY_URL=off keeps every lookup local (no network at all).
REGISTRY_ENV = "TINYHIL_REGISTRY_URL"
VENDOR_ENV = "TINYHIL_VENDOR_DIR"

REPO_ROOT = Path(__file__).resolve().parents[1]

_HTTP_TIMEOUT_S = 30.0
_MAX_ARCHIVE_BYTES = 256 * 1024 * 1024
_VERIFIED_MARK = "verified.json"
_TREE = "component"


class SourcesUnavailable(TinyhilError):
    """The pinned sources can be had neither from a directory nor from the registry."""


@dataclass(frozen=True)
class ComponentSources:
    name: str       # "espressif/esp-tflite-micro"
    version: str
    root: Path      # the component directory (the one holding its CMakeLists.txt)
    origin: str     # "directory /.../vendor/esp-nn-1.1.2" or "registry http://..., sha256 ..."


@dataclass(frozen=True)
class FirmwareSources:
    tflite_micro: ComponentSources
    esp_nn: ComponentSources


@dataclass(frozen=True)
class Pin:
    """What a pinned version must hash to.

    component_hash is the registry's own hash of the component directory (idf-component-manager's
    hash_dir over the archive), as public dependencies.lock files record it; None where no public
    lock file records it. source_hash is the same algorithm over only the files the build reads
    (SOURCE_PARTS), computed from upstream's git tree at `commit`: it holds for a registry archive
    and for a trimmed copy such as ../shared/vendor alike. At least one of the two must match a
    download before it is used; every one that is known must.
    """

    commit: str
    source_hash: str
    component_hash: str | None = None
    evidence: str = ""


# The top-level entries of each component that the native build reads (sources, headers, the
# CMakeLists.txt the source list is derived from, and the licence that must travel with them).
SOURCE_PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    TFLITE_MICRO: ("CMakeLists.txt", "LICENSE", "signal", "tensorflow", "third_party"),
    ESP_NN: ("CMakeLists.txt", "Kconfig.projbuild", "LICENSE", "include", "src"),
})

# The repository URL the registry's upload action writes into an archive's idf_component.yml.
UPSTREAM_REPOSITORY: Mapping[str, str] = MappingProxyType({
    TFLITE_MICRO: "git://github.com/espressif/esp-tflite-micro.git",
    ESP_NN: "git://github.com/espressif/esp-nn.git",
})

PINS: Mapping[tuple[str, str], Pin] = MappingProxyType({
    # Tag v1.3.8. No public lock file with this version was found, and the registry's hash for
    # esp-tflite-micro cannot be recomputed: for 1.3.7 the archive's files (checked against its
    # published CHECKSUMS.json: same 589 paths, sizes and file hashes as the v1.3.7 git tree plus the
    # rewritten manifest) hash to 8ac08e71..., while lock files record 22fc501a.... So only the
    # source hash is pinned, from upstream's v1.3.8 tree; ../shared/vendor/esp-tflite-micro gives
    # the same.
    (TFLITE_MICRO, "1.3.8"): Pin(
        commit="d6465fd54a029641e58f2342eeec85f3492ba084",
        source_hash="c6604ff4ebb41dbd388c947d7a749556330670dd6ef6600c387b10165a7f77cf",
        evidence="git tag v1.3.8 of espressif/esp-tflite-micro",
    ),
    # Tag v1.1.2. component_hash: esphome/esphome's dependencies.lock (commit 05f966be9590); the
    # vendor copy, with the registry's rewritten idf_component.yml and without its COMMIT file,
    # hashes to exactly this value.
    (ESP_NN, "1.1.2"): Pin(
        commit="596b08401a63da3a2e1b40868c442f582a99ae26",
        source_hash="0ccccf4e141fe72f89229888d0265b03ec2cb60214e5e6230517dba67c9810d0",
        component_hash="f4633a02f05fef53b80de65ade1f733ebdef637e4c8b8be4eb11f5e27f6d9f3e",
        evidence="esphome/esphome dependencies.lock @05f966be9590",
    ),
    # Published from master at d45b843 (no tag). component_hash: trevidy/headless_sensor_node's
    # dependencies.lock (commit 9e5582b2aea2); upstream's git tree at d45b843 reproduces it. The
    # vendor copy lacks two files the archive has (.gitignore, CONTRIBUTING.md), so only its source
    # hash matches.
    (ESP_NN, "1.2.3"): Pin(
        commit="d45b843ca5f873ca9d0706ab0e7f14eafd132e98",
        source_hash="f347158fab636b3925be5fe69ffa23e8ee6f21ddcbecacb08265174ffcd68da8",
        component_hash="e98a7dd3dfde460b1b4ca982e2ebae0b4831719a8e4659d19c145943deaf682b",
        evidence="trevidy/headless_sensor_node dependencies.lock @9e5582b2aea2",
    ),
})


def default_vendor_dir() -> Path:
    override = os.environ.get(VENDOR_ENV)
    return Path(override) if override else REPO_ROOT.parent / "shared" / "vendor"


def default_registry_url() -> str | None:
    return _registry_or_none(os.environ.get(REGISTRY_ENV, REGISTRY_STORAGE_URL))


def _registry_or_none(value: str) -> str | None:
    value = value.strip()
    return None if value.lower() in ("", "off", "none") else value


def locate_sources(esp_nn_version: str = DEFAULT_ESP_NN_VERSION, *, vendor_dir: Path | None = None,
                   registry_url: str | None = None, cache_root: Path,
                   pins: Mapping[tuple[str, str], Pin] = PINS) -> FirmwareSources:
    """esp-tflite-micro TFLITE_MICRO_VERSION and esp-nn `esp_nn_version`, each from the directory
    if it holds it, else from the registry (downloaded once into cache_root/sources).

    registry_url is the registry's file storage; None means $TINYHIL_REGISTRY_URL or the public
    one, "off" no registry. Raises SourcesUnavailable when a component can be had from neither, or
    when the directory holds a different version (a wrong copy is refused, not replaced by a
    download)."""
    if esp_nn_version not in ESP_NN_VERSIONS:
        raise SourcesUnavailable(f"esp-nn {esp_nn_version} is not pinned (pinned: {', '.join(ESP_NN_VERSIONS)})")
    directory = Path(vendor_dir) if vendor_dir is not None else default_vendor_dir()
    registry = _registry_or_none(registry_url) if registry_url is not None else default_registry_url()
    return FirmwareSources(
        tflite_micro=_locate(TFLITE_MICRO, TFLITE_MICRO_VERSION, directory / "esp-tflite-micro", registry,
                             Path(cache_root), pins),
        esp_nn=_locate(ESP_NN, esp_nn_version, directory / f"esp-nn-{esp_nn_version}", registry, Path(cache_root),
                       pins))


def _locate(name: str, version: str, directory: Path, registry: str | None, cache_root: Path,
            pins: Mapping[tuple[str, str], Pin]) -> ComponentSources:
    if directory.is_dir():
        return _from_directory(name, version, directory, pins)
    if registry is None:
        raise SourcesUnavailable(f"{name} {version} not found: no directory {directory}, and the registry is off "
                                 f"(${REGISTRY_ENV})")
    try:
        return _from_registry(name, version, registry, cache_root, pins)
    except SourcesUnavailable as failure:
        raise SourcesUnavailable(f"{name} {version} not found: no directory {directory}; {failure.message}",
                                 details=failure.details) from failure


# --- From a directory ---------------------------------------------------------------------------

def _from_directory(name: str, version: str, root: Path, pins: Mapping[tuple[str, str], Pin]) -> ComponentSources:
    # The path is in each message itself: callers show the message without `where`.
    manifest = root / "idf_component.yml"
    if not manifest.is_file() or not (root / "CMakeLists.txt").is_file():
        raise SourcesUnavailable(f"{root} is not a {name} component (no idf_component.yml or CMakeLists.txt)")
    found, how = directory_version(root, name, pins)
    if found is None:
        raise SourcesUnavailable(f"cannot tell which {name} version {root} holds: its idf_component.yml has no "
                                 f"version and no COMMIT file names a pinned commit (expected {version})")
    if found != version:
        raise SourcesUnavailable(f"{root} holds {name} {found} ({how}), expected {version}")
    return ComponentSources(name=name, version=version, root=root.resolve(), origin=f"directory {root}")


def _manifest(root: Path) -> dict:
    path = root / "idf_component.yml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SourcesUnavailable(f"cannot read {path}: {' '.join(str(error).split())}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SourcesUnavailable(f"{path} is not a component manifest (not a mapping)")
    return data


def directory_version(root: Path, name: str, pins: Mapping[tuple[str, str], Pin] = PINS) -> tuple[str | None, str]:
    """The version a component directory holds, and how that is known.

    idf_component.yml's `version:` when it has one. Upstream's manifest of esp-nn 1.1.2 has none
    (the registry's upload adds it), so a COMMIT file (as ../shared/vendor has) naming a pinned
    commit also counts."""
    data = _manifest(root)
    if data.get("version") is not None:
        return str(data["version"]), "idf_component.yml"
    commit_file = root / "COMMIT"
    if commit_file.is_file():
        commit = commit_file.read_text().strip()
        for (pinned_name, pinned_version), pin in pins.items():
            if pinned_name == name and pin.commit == commit:
                return pinned_version, f"COMMIT {commit[:12]}"
    return None, ""


# --- The component manager's hash ---------------------------------------------------------------

# idf-component-manager's file_tools.DEFAULT_EXCLUDE: what it leaves out when it packs a component.
DEFAULT_EXCLUDE = ("**/__pycache__", "**/*.pyc", "**/*.pyd", "**/*.pyo", "**/.DS_Store", "**/.git/**/*",
                   "**/.svn/**/*", "**/dist/**/*", "**/build/**/*", "**/build_*/**/*",
                   "**/managed_components/**/*", "**/dependencies.lock", "**/.github/**/*", "**/.gitlab-ci.yml",
                   "**/.idea/**/*", "**/.vscode/**/*", "**/.settings/**/*", "**/sdkconfig", "**/sdkconfig.old",
                   "**/.component_hash")


def _filtered_files(root: Path, *, include: Iterable[str] = (), exclude: Iterable[str] = (),
                    exclude_default: bool) -> set[Path]:
    # Same pathlib glob semantics as idf-component-manager's filtered_paths: a pattern such as
    # "tests" matches the directory itself only, so the files under it stay (that is what the
    # registry's archives of esp-nn hold).
    paths = set(root.glob("**/*"))
    for pattern in (DEFAULT_EXCLUDE if exclude_default else ()):
        paths.difference_update(root.glob(pattern))
    for pattern in exclude:
        paths.difference_update(root.glob(pattern))
    paths = {path for path in paths if not path.is_dir()}
    for pattern in include:
        paths.update(path for path in root.glob(pattern) if not path.is_dir())
    return paths


def hash_files(root: Path, files: Iterable[Path], *, replace: Mapping[str, bytes] | None = None) -> str:
    """idf-component-manager's hash_dir over `files`: sha256 of each relative path followed by the
    hex sha256 of its content, in path order. `replace` substitutes the content of some paths."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda item: item.relative_to(root).as_posix()):
        relative = path.relative_to(root).as_posix()
        data = replace[relative] if replace and relative in replace else path.read_bytes()
        digest.update(relative.encode())
        digest.update(hashlib.sha256(data).hexdigest().encode())
    return digest.hexdigest()


def component_hash(root: Path) -> str:
    """The hash idf-component-manager checks an installed component against (validate_hash_eq_hashdir):
    every file but the manifest's exclusions and its own bookkeeping files."""
    files = _manifest(root).get("files") or {}
    exclude = [*files.get("exclude", []), "**/.component_hash", "**/CHECKSUMS.json"]
    return hash_files(root, _filtered_files(root, include=files.get("include", []), exclude=exclude,
                                            exclude_default=False))


def source_hash(root: Path, name: str) -> str:
    """The same hash over only SOURCE_PARTS[name]: what the build reads."""
    files = []
    for part in SOURCE_PARTS[name]:
        path = root / part
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(item for item in path.glob("**/*") if item.is_file())
    return hash_files(root, files)


def registry_manifest(root: Path, name: str, version: str, commit: str) -> str:
    """The idf_component.yml a registry archive of this upstream checkout holds: the upload action
    adds version and repository_info, sets repository, and idf-component-manager writes the
    manifest back with sorted keys."""
    data = _manifest(root)
    data["version"] = version
    data["repository"] = UPSTREAM_REPOSITORY[name]
    data["repository_info"] = {"commit_sha": commit, "path": "."}
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


def registry_files(root: Path, name: str) -> set[Path]:
    """The files of `root` a registry archive holds (packing leaves out the default and the manifest's
    exclusions; a COMMIT file as ../shared/vendor has is not upstream's)."""
    files = _manifest(root).get("files") or {}
    chosen = _filtered_files(root, include=files.get("include", []), exclude=files.get("exclude", []),
                             exclude_default=True)
    return {path for path in chosen if path.relative_to(root).as_posix() != "COMMIT"}


def registry_view_hash(root: Path, name: str, version: str, commit: str) -> str:
    """component_hash of the archive the registry would hold for this checkout (for comparing a
    local copy with a pinned registry hash without any download)."""
    manifest = registry_manifest(root, name, version, commit).encode()
    return hash_files(root, registry_files(root, name) | {root / "idf_component.yml"},
                      replace={"idf_component.yml": manifest})


# --- From the registry --------------------------------------------------------------------------

def _from_registry(name: str, version: str, registry: str, cache_root: Path,
                   pins: Mapping[tuple[str, str], Pin]) -> ComponentSources:
    pin = pins.get((name, version))
    if pin is None:
        raise SourcesUnavailable(f"no pinned hash for {name} {version}: a registry download could not be checked")
    pin_id = hashlib.sha256(json.dumps([pin.source_hash, pin.component_hash]).encode()).hexdigest()[:12]
    final = cache_root / "sources" / f"{name.replace('/', '__')}-{version}-{pin_id}"
    if (final / _VERIFIED_MARK).is_file():
        return _registry_component(name, version, final, registry)

    index_url = _join(registry, "components", *name.split("/")) + ".json"
    index = _get_json(index_url)
    entry = next((item for item in index.get("versions", []) if str(item.get("version")) == version), None)
    if entry is None or not entry.get("url"):
        raise SourcesUnavailable(f"registry {registry} has no {name} {version} ({index_url})")
    reported = str(entry.get("component_hash") or "")
    if pin.component_hash is not None and reported != pin.component_hash:
        raise SourcesUnavailable(f"registry {registry} reports {name} {version} with component hash "
                                 f"{reported or 'none'}, expected {pin.component_hash} (pinned)")
    archive_url = _join(registry, entry["url"])

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(final)
    # Per-process staging next to the final place: the rename that publishes it is atomic, and a
    # crash leaves only a staging directory, never something that looks verified.
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-{os.getpid()}-", dir=final.parent))
    try:
        archive = staging / "archive.tgz"
        _download(archive_url, archive)
        entry_dir = staging / "entry"
        tree = entry_dir / _TREE
        entry_dir.mkdir()
        _extract(archive, tree, archive_url)
        _verify(tree, name, version, pin, archive_url)
        # The mark sits next to the tree, not in it: the tree stays exactly the archive's content.
        (entry_dir / _VERIFIED_MARK).write_text(json.dumps({"url": archive_url, "source_hash": pin.source_hash,
                                                            "component_hash": pin.component_hash}))
        try:
            entry_dir.rename(final)
        except OSError:
            # Another process published the same verified download first.
            if not (final / _VERIFIED_MARK).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _registry_component(name, version, final, registry)


def _remove_dead_staging(final: Path) -> None:
    """Staging directories of processes that died mid-download (their pid is in the name)."""
    for stale in final.parent.glob(f".{final.name}.staging-*"):
        pid = stale.name.removeprefix(f".{final.name}.staging-").split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _registry_component(name: str, version: str, entry: Path, registry: str) -> ComponentSources:
    mark = json.loads((entry / _VERIFIED_MARK).read_text())
    checked = mark["component_hash"] or mark["source_hash"]
    return ComponentSources(name=name, version=version, root=(entry / _TREE).resolve(),
                            origin=f"registry {registry}, sha256 {checked}")


def _verify(tree: Path, name: str, version: str, pin: Pin, url: str) -> None:
    if not (tree / "idf_component.yml").is_file():
        raise SourcesUnavailable(f"{url} is not a component archive (no idf_component.yml at its top)")
    found_version, _ = directory_version(tree, name)
    if found_version != version:
        raise SourcesUnavailable(f"{url} holds {name} {found_version}, expected {version}")
    if pin.component_hash is not None:
        found = component_hash(tree)
        if found != pin.component_hash:
            raise SourcesUnavailable(f"{url}: component hash mismatch: expected {pin.component_hash}, found {found}")
    found = source_hash(tree, name)
    if found != pin.source_hash:
        raise SourcesUnavailable(f"{url}: source hash mismatch: expected {pin.source_hash}, found {found}")


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def _open(url: str):
    try:
        return urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        raise SourcesUnavailable(f"registry request {url} failed: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SourcesUnavailable(f"registry {url} unreachable: {reason}") from error


def _get_json(url: str) -> dict:
    with _open(url) as response:
        body = response.read(16 * 1024 * 1024)
    try:
        return json.loads(body)
    except ValueError as error:
        raise SourcesUnavailable(f"registry {url} did not answer JSON: {error}") from error


def _download(url: str, target: Path) -> None:
    total = 0
    with _open(url) as response, open(target, "wb") as out:
        while chunk := response.read(1 << 20):
            total += len(chunk)
            if total > _MAX_ARCHIVE_BYTES:
                raise SourcesUnavailable(f"{url} is larger than {_MAX_ARCHIVE_BYTES >> 20} MiB")
            out.write(chunk)


def _extract(archive: Path, target: Path, url: str) -> None:
    target.mkdir()
    try:
        with tarfile.open(archive, "r:*") as tar:
            # The "data" filter refuses absolute paths, "..", links leaving the tree and device files.
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as error:
        raise SourcesUnavailable(f"{url} is not a readable component archive: {error}") from error
