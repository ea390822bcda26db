"""A real labgrid farm on 127.0.0.1 for tests: labgrid-coordinator, one labgrid-exporter per
serial port (each exporting its port as a RawSerialPort, which the exporter serves through
ser2net once a place is acquired), and one place per port.

One exporter per port, so that killing one exporter takes exactly one place's host away, as when
a lab machine goes down. labgrid 26's exporter starts ser2net listening on every address; the
farm puts a small ser2net in front of the real one on the exporters' PATH that binds it to
127.0.0.1 (the tests use no other address) and ties it to its exporter's life. With
`nodelay=True` it also turns Nagle's algorithm off on ser2net's side, which labgrid's generated
configuration leaves on (docs/farm.md, "What labgrid adds per case").
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.board.labgrid_place import LabgridClient
from harness.native_build import child_dies_with_parent, kill_group

BIN = Path(sys.executable).parent
SER2NET_CANDIDATES = ("/usr/sbin/ser2net", "/usr/bin/ser2net")
START_TIMEOUT_S = 30.0
GROUP = "board"   # the resource group in each exporter's configuration

# Execs the real ser2net with its accepter bound to 127.0.0.1, dying with the exporter that
# started it (labgrid starts ser2net without either).
SER2NET_SHIM = """\
#!{python} -P
import ctypes, os, signal, sys
args = [arg.replace(",tcp,", ",{tcp},127.0.0.1,", 1) if "accepter:" in arg else arg for arg in sys.argv[1:]]
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
os.execv({real!r}, [{real!r}] + args)
"""


def _ser2net() -> str | None:
    found = shutil.which("ser2net")
    if found:
        return found
    return next((path for path in SER2NET_CANDIDATES if os.access(path, os.X_OK)), None)


def ser2net_available() -> str | None:
    """None, or the one-line reason the farm cannot run here."""
    path = _ser2net()
    if path is None:
        return ("ser2net is not installed (Debian package ser2net; `make install` installs it where apt-get "
                "runs as root)")
    try:
        result = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{path} -v failed: {error}"
    version = result.stdout.strip().rsplit(" ", 1)[-1]
    if not version[:1].isdigit() or int(version.split(".")[0]) < 4:
        return f"{path} is not ser2net 4.x (it says {result.stdout.strip() or result.stderr.strip()!r})"
    for tool in ("labgrid-coordinator", "labgrid-exporter"):
        if not (BIN / tool).exists():
            return f"{tool} is not installed beside {sys.executable} (pip package labgrid)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LabgridFarm:
    coordinator: str
    places: list[str]
    exporters: list[str] = field(default_factory=list)        # exporter names, one per place
    workdir: Path = Path()
    _coordinator: subprocess.Popen | None = field(default=None, repr=False)
    _exporters: list[subprocess.Popen | None] = field(default_factory=list, repr=False)

    def kill_exporter(self, index: int) -> None:
        """SIGKILL exporter `index` and the ser2net it started: its place's port stops answering,
        and the coordinator drops the exporter's resources."""
        process = self._exporters[index]
        if process is not None:
            kill_group(process)
            self._exporters[index] = None

    def stop(self) -> None:
        for index in range(len(self._exporters)):
            self.kill_exporter(index)
        if self._coordinator is not None:
            kill_group(self._coordinator)
            self._coordinator = None

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _spawn(args: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        # Its own process group, so that kill_exporter reaches the ser2net it starts.
        return subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=child_dies_with_parent())


def _wait_listening(port: int, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text(errors='replace')[-800:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S:g} s")


def start_farm(tmp_path: Path, ports: list[str], *, tags: dict[str, str] | None = None,
               nodelay: bool = False) -> LabgridFarm:
    """A coordinator, one exporter per port (named farmhost0, farmhost1, ...) and one place per
    port (esp32s3-0, esp32s3-1, ...) with `tags`, ready to acquire. `nodelay`: ser2net sends
    without Nagle's delay (not labgrid's default)."""
    tags = {"board": "esp32s3", "flasher": "virtual"} if tags is None else tags
    reason = ser2net_available()
    if reason:
        raise RuntimeError(reason)
    workdir = tmp_path / "labgrid-farm"
    (workdir / "bin").mkdir(parents=True, exist_ok=True)
    (workdir / "coordinator").mkdir(exist_ok=True)
    for state in ("places.yaml", "resources.yaml"):   # a coordinator's memory of an earlier farm
        (workdir / "coordinator" / state).unlink(missing_ok=True)
    shim = workdir / "bin" / "ser2net"
    shim.write_text(SER2NET_SHIM.format(python=sys.executable, real=os.path.realpath(_ser2net()),
                                        tcp="tcp(nodelay=true)" if nodelay else "tcp"))
    shim.chmod(0o755)

    port = free_port()
    coordinator = f"127.0.0.1:{port}"
    farm = LabgridFarm(coordinator=coordinator, places=[], workdir=workdir)
    try:
        farm._coordinator = _spawn([str(BIN / "labgrid-coordinator"), "--listen", coordinator],
                                   cwd=workdir / "coordinator", log=workdir / "coordinator.log")
        _wait_listening(port, farm._coordinator, "labgrid-coordinator", workdir / "coordinator.log")
        env = dict(os.environ, PATH=f"{workdir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        for index, device in enumerate(ports):
            real = os.path.realpath(device)
            if not real.startswith("/dev/"):
                raise RuntimeError(f"{device} resolves to {real}: labgrid exports only ports under /dev/")
            config = workdir / f"exporter{index}.yaml"
            config.write_text(f"{GROUP}:\n  RawSerialPort:\n    port: {real}\n    speed: 921600\n")
            name = f"farmhost{index}"
            farm.exporters.append(name)
            farm._exporters.append(_spawn(
                [str(BIN / "labgrid-exporter"), "--coordinator", coordinator, "--name", name,
                 "--hostname", "127.0.0.1", str(config)],
                cwd=workdir, log=workdir / f"exporter{index}.log", env=env))
        with LabgridClient(coordinator) as client:
            for index, name in enumerate(farm.exporters):
                place = f"esp32s3-{index}"
                client.add_place(place, matches=[f"{name}/{GROUP}/NetworkSerialPort"], tags=tags)
                farm.places.append(place)
            deadline = time.monotonic() + START_TIMEOUT_S
            for index, place in enumerate(farm.places):
                while (problem := client.place_problem(place)) is not None:
                    process = farm._exporters[index]
                    if process is not None and process.poll() is not None:
                        raise RuntimeError(f"labgrid-exporter {farm.exporters[index]} exited with "
                                           f"{process.returncode}: {farm.log(f'exporter{index}')[-800:]}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"place {place} not ready within {START_TIMEOUT_S:g} s: {problem}")
                    time.sleep(0.05)
    except BaseException:
        farm.stop()
        raise
    return farm
