"""Build and upload firmware with PlatformIO, through argument lists with timeouts.

PlatformIO downloads the espressif32 platform, the Xtensa toolchain and ESP-IDF components on
first use. Where its registry is out of reach the build fails, and the error says so instead of
pretending: docs/hardware.md lists what a machine needs.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import BoardError
from ..firmware import FirmwareProject

BUILD_TIMEOUT_S = 1800   # a first build also installs the platform and toolchain
UPLOAD_TIMEOUT_S = 300


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass(frozen=True)
class PlatformIOFlasher:
    log_dir: Path
    pio: tuple[str, ...] = (sys.executable, "-m", "platformio")

    def _run(self, args: list[str], log_name: str, timeout_s: float, what: str) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / log_name
        command = [*self.pio, *args]
        with open(log_path, "wb") as log:
            log.write((" ".join(command) + "\n").encode())
            log.flush()
            try:
                completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           timeout=timeout_s)
            except FileNotFoundError as error:
                raise BoardError(f"cannot run PlatformIO ({error}); install it with `make install` "
                                 f"(platformio is in requirements.lock)") from error
            except subprocess.TimeoutExpired:
                raise BoardError(f"{what} did not finish within {timeout_s:g} s; log: {log_path}",
                                 details=_tail(log_path, 60)) from None
        if completed.returncode != 0:
            tail = _tail(log_path, 60)
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            hint = ""
            if any(word in tail for word in ("HTTPClientError", "Could not resolve", "ConnectionError",
                                             "Name or service not known", "registry")):
                hint = (" PlatformIO needs its registry to install the espressif32 platform and toolchain on "
                        "first use, and it is out of reach from this machine (docs/hardware.md).")
            raise BoardError(f"{what} failed (exit {completed.returncode}): {last.strip()[:200]}.{hint} "
                             f"Log: {log_path}", details=tail)
        return log_path

    def build(self, project: FirmwareProject) -> Path:
        """Build once per project content; PlatformIO's .pio/ keeps the objects for the next build."""
        marker = project.directory / ".built"
        if marker.is_file():
            return project.directory
        # The debug image (every tensor preserved) is built by its own env of platformio.ini.
        self._run(["run", "-e", project.firmware.platformio_env, "-d", str(project.directory)],
                  f"build-{project.content_hash}.log", BUILD_TIMEOUT_S,
                  f"building firmware for {project.firmware.model_name}")
        marker.write_text("")
        return project.directory

    def upload(self, project: FirmwareProject, port: str) -> None:
        self.build(project)
        self._run(["run", "-e", project.firmware.platformio_env, "-d", str(project.directory), "-t", "upload",
                   "--upload-port", port], f"upload-{project.content_hash}.log", UPLOAD_TIMEOUT_S,
                  f"flashing {project.firmware.model_name} to {port}")
