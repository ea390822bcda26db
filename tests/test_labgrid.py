"""Remote boards through labgrid (harness.board.labgrid_place) against a real farm on 127.0.0.1:
labgrid-coordinator, one labgrid-exporter per port serving it through ser2net, places with tags
(tests/labgrid_farm.py). The ports are pseudo-terminals with an echo peer behind them."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tty
from pathlib import Path

import pytest
import serial

from conftest import process_alive
from harness.board.labgrid_place import LabgridClient, PlaceBoard
from harness.errors import PortUnavailableError
from labgrid_farm import LabgridFarm, free_port, ser2net_available, start_farm

REPO = Path(__file__).resolve().parents[1]
TAGS = {"board": "esp32s3"}


# --- fixtures -------------------------------------------------------------------------------------

class EchoPorts:
    """Pseudo-terminals whose other end sends back every byte it gets."""

    def __init__(self, count: int) -> None:
        self._stop = threading.Event()
        self._fds: list[int] = []
        self.paths: list[str] = []
        self._threads = []
        for _ in range(count):
            master, slave = pty.openpty()
            tty.setraw(slave)
            # The slave stays open here too: when ser2net closes its side, the master must not
            # see a hang-up.
            self._fds += [master, slave]
            self.paths.append(os.ttyname(slave))
            thread = threading.Thread(target=self._echo, args=(master,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _echo(self, master: int) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 4096)
                    os.write(master, data)
                except OSError:
                    time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        for fd in self._fds:
            os.close(fd)


@pytest.fixture
def echo_ports():
    ports = EchoPorts(2)
    yield ports.paths
    ports.close()


@pytest.fixture
def farm(tmp_path, echo_ports) -> LabgridFarm:
    reason = ser2net_available()
    if reason:
        pytest.skip(reason)
    started = start_farm(tmp_path, echo_ports)
    yield started
    started.stop()


# --- helpers --------------------------------------------------------------------------------------

def _echo_through(board: PlaceBoard, payload: bytes) -> bytes:
    with serial.serial_for_url(board.url, baudrate=921600, timeout=5) as port:
        port.write(payload)
        received = b""
        while len(received) < len(payload):
            chunk = port.read(len(payload) - len(received))
            if not chunk:
                break
            received += chunk
        return received


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))
                    found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def _reservations(coordinator: str) -> list[str]:
    """Tokens of the reservations the coordinator holds, in states waiting/allocated/acquired."""
    import grpc
    from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2
    from labgrid.remote.generated import labgrid_coordinator_pb2_grpc as pb2_grpc

    async def get():
        async with grpc.aio.insecure_channel(coordinator) as channel:
            answer = await pb2_grpc.CoordinatorStub(channel).GetReservations(pb2.GetReservationsRequest(), timeout=10)
            return [r.token for r in answer.reservations if r.state in (0, 1, 2)]

    return asyncio.run(get())


def _wait_free(client: LabgridClient, places: list[str], within_s: float) -> dict[str, str | None]:
    deadline = time.monotonic() + within_s
    while True:
        problems = {place: client.place_problem(place) for place in places}
        if not any(problems.values()) or time.monotonic() > deadline:
            return problems
        time.sleep(0.1)


def _child(script: str, coordinator: str) -> subprocess.Popen:
    """A Python process running `script` with COORDINATOR set; it prints lines the test waits on."""
    code = f"COORDINATOR = {coordinator!r}\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_line(process: subprocess.Popen, prefix: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith(prefix):
                return line.strip()
            if not line:
                break
    process.kill()
    raise AssertionError(f"child never said {prefix!r}; stderr: {process.stderr.read()[-2000:]}")


# --- tests ----------------------------------------------------------------------------------------

def test_tag_acquires_get_two_places_whose_urls_carry_bytes_and_a_third_waits_then_fails(farm):
    with LabgridClient(farm.coordinator) as first, LabgridClient(farm.coordinator) as second:
        boards = [first.acquire(tags=TAGS), first.acquire(tags=TAGS)]
        assert sorted(board.place for board in boards) == sorted(farm.places)
        payload = os.urandom(1024)
        for board in boards:
            index = farm.places.index(board.place)
            assert board.host == farm.exporters[index]
            assert board.flasher == "virtual" and board.tags["board"] == "esp32s3"
            assert board.url.startswith("rfc2217://127.0.0.1:")
            port = int(board.url.split(":")[2].split("?")[0])
            # ser2net serves the port on the loopback address only.
            assert _listening_addresses(port) == {"127.0.0.1"}
            assert _echo_through(board, payload) == payload

        started = time.monotonic()
        with pytest.raises(PortUnavailableError) as failure:
            second.acquire(tags=TAGS, wait_s=1.5)
        waited = time.monotonic() - started
        assert 1.5 <= waited < 10, waited
        message = str(failure.value)
        assert message.startswith(f"labgrid coordinator {farm.coordinator}: a place with tags board=esp32s3 "
                                  f"did not come free within 1.5 s"), message
        for place in farm.places:
            assert f"{place} acquired by " in message, message
        # The waiting reservation went with the failure; the two acquired ones stay.
        assert len(_reservations(farm.coordinator)) == 2


def test_named_acquire_waits_for_the_holder_and_release_and_close_free_everything(farm):
    first_place, second_place = farm.places
    with LabgridClient(farm.coordinator) as watcher:
        holder = LabgridClient(farm.coordinator)
        board = holder.acquire(first_place)
        assert board.place == first_place and board.host == farm.exporters[0]
        assert watcher.place_problem(first_place).startswith("acquired by ")

        with pytest.raises(PortUnavailableError, match=rf"place {first_place} did not come free within 1 s "
                                                       rf"\({first_place} acquired by "):
            watcher.acquire(first_place, wait_s=1)
        with pytest.raises(PortUnavailableError, match=r"no place nowhere \(places: esp32s3-0, esp32s3-1\)"):
            watcher.acquire("nowhere")

        # A named acquire waits while another client holds the place, and gets it on release.
        threading.Timer(1.0, holder.release, args=(first_place,)).start()
        started = time.monotonic()
        taken = watcher.acquire(first_place, wait_s=30)
        assert taken.place == first_place and 0.9 < time.monotonic() - started < 10
        watcher.release(first_place)
        assert watcher.place_problem(first_place) is None

        holder.acquire(first_place)
        holder.acquire(tags=TAGS)
        assert holder.held == [first_place, second_place]
        holder.close()
        assert _wait_free(watcher, farm.places, 0) == {first_place: None, second_place: None}
        assert _reservations(farm.coordinator) == []
        holder.close()   # twice is harmless
        with pytest.raises(PortUnavailableError, match="closed"):
            holder.acquire(first_place)


def test_reaper_releases_the_places_of_a_process_killed_with_sigkill(farm):
    child = _child("""
        from harness.board.labgrid_place import LabgridClient
        client = LabgridClient(COORDINATOR)
        client.acquire("esp32s3-0")
        client.acquire(tags={"board": "esp32s3"})
        print("held", client._reaper.pid, flush=True)
        import time
        time.sleep(120)
    """, farm.coordinator)
    reaper = int(_wait_line(child, "held").split()[1])
    with LabgridClient(farm.coordinator) as watcher:
        assert all(watcher.place_problem(place).startswith("acquired by") for place in farm.places)
        child.kill()
        child.wait(timeout=10)
        started = time.monotonic()
        assert _wait_free(watcher, farm.places, 10) == {place: None for place in farm.places}
        assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while process_alive(reaper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(reaper)
    assert _reservations(farm.coordinator) == []
    said = child.stderr.read()
    assert f"released labgrid place esp32s3-0, left acquired by process {child.pid} that died" in said, said


def test_ctrl_c_releases_held_places_and_cancels_a_waiting_reservation(farm):
    child = _child("""
        from harness.board.labgrid_place import LabgridClient
        with LabgridClient(COORDINATOR) as holder, LabgridClient(COORDINATOR) as waiter:
            holder.acquire(tags={"board": "esp32s3"})
            holder.acquire(tags={"board": "esp32s3"})
            print("waiting", flush=True)
            waiter.acquire(tags={"board": "esp32s3"}, wait_s=120)
    """, farm.coordinator)
    _wait_line(child, "waiting")
    with LabgridClient(farm.coordinator) as watcher:
        deadline = time.monotonic() + 10
        while len(_reservations(farm.coordinator)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_reservations(farm.coordinator)) == 3   # two acquired, one waiting
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) != 0
        said = child.stderr.read()
        assert "KeyboardInterrupt" in said
        # Released by close() on the way out, not by the reaper.
        assert "released labgrid place" not in said, said
        assert _wait_free(watcher, farm.places, 0) == {place: None for place in farm.places}
        assert _reservations(farm.coordinator) == []


def test_a_killed_exporter_takes_its_port_away_and_acquires_pass_over_its_place(farm):
    dead, alive = farm.places
    with LabgridClient(farm.coordinator) as user, LabgridClient(farm.coordinator) as other:
        board = user.acquire(dead)
        port = int(board.url.split(":")[2].split("?")[0])
        assert _echo_through(board, b"ping") == b"ping"
        farm.kill_exporter(0)
        # ser2net went with its exporter: nothing answers on the port any more.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        user.mark_out(dead, "link lost")
        user.release(dead)
        problem = _wait_free(other, [dead], 10)[dead]
        assert problem == "is marked out (tinyhil: out: link lost)"

        # By tags: the dead place is passed over (marked out, and its exporter gone).
        taken = other.acquire(tags=TAGS, wait_s=5)
        assert taken.place == alive and taken.host == farm.exporters[1]
        assert _echo_through(taken, b"pong") == b"pong"
        # By name, a place without its exporter fails at once, saying why.
        started = time.monotonic()
        with pytest.raises(PortUnavailableError, match=rf"place {dead}: has no available NetworkSerialPort "
                                                       r".*exporter farmhost0 not connected"):
            user.acquire(dead, wait_s=30)
        assert time.monotonic() - started < 5


def test_an_unreachable_coordinator_is_one_line_and_leaves_no_reaper():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(PortUnavailableError, match=rf"^labgrid coordinator {address}: cannot reach the "
                                                   r"coordinator .*is labgrid-coordinator running there"):
        LabgridClient(address, timeout_s=10)
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True,
                                  text=True, timeout=10).stdout
        if "--reap" not in children:
            break
        time.sleep(0.05)
    assert "--reap" not in children, children
