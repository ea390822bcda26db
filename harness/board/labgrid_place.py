"""Remote boards through labgrid: reserve and acquire a place, read its NetworkSerialPort, release.

labgrid (a coordinator, exporters on the hosts the boards hang off, places that clients reserve
and lock) is the board-farm engine; this module is the harness's client of it and schedules
nothing itself. Every acquire goes through a reservation: with `tags` as the filter, or with the
place's name (labgrid's scheduler matches a place's name as the tag `name`), so tinyhil queues
behind other CI jobs the way labgrid-client users do, and each place it holds carries a token
only this client knows.

A place left acquired blocks the farm until someone kicks it, so each client starts a reaper: a
small process reading a pipe from the client. The client writes the reservation tokens it opens
and closes; when the pipe ends with tokens still open (the client died, SIGKILL included), the
reaper releases the places holding those tokens and cancels them. The reaper runs this file as a
script (`python -P labgrid_place.py --reap`) so that it idles at the size of a bare interpreter
instead of importing the harness.

docs/farm.md has the farm side: coordinator, exporter configuration, places and tags.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

# Absolute: the reaper runs this file as a script, outside the package.
from harness.errors import PortUnavailableError

log = logging.getLogger(__name__)

DEFAULT_COORDINATOR = "127.0.0.1:20408"
SERIAL_CLS = "NetworkSerialPort"
# A place with several serial ports names the link with a named match (labgrid-client
# add-named-match EXPORTER/GROUP/NetworkSerialPort link).
LINK_NAME = "link"
# mark_out writes this in front of its reason; tag-based acquires skip places that carry it until
# someone clears the comment (labgrid-client -p PLACE set-comment "").
OUT_PREFIX = "tinyhil: out:"
# How often a waiting reservation is polled. Polling also keeps it alive: the coordinator expires
# a waiting reservation nobody polled for 60 s.
POLL_S = 0.25
# labgrid-client's keepalive settings (labgrid.remote.client.ClientSession), and a subchannel
# pool per channel so that each client has a connection of its own (LabgridClient._connect).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 7500),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.http2.ping_timeout_ms", 10000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.use_local_subchannel_pool", 1),
]
REAPER_START_S = 20.0
REAPER_RPC_S = 10.0


@dataclass(frozen=True)
class PlaceBoard:
    place: str            # labgrid place name
    url: str              # pyserial URL of its NetworkSerialPort, e.g. rfc2217://127.0.0.1:40123?ign_set_control
    host: str             # the exporter (host) the port hangs off, as labgrid names it
    tags: Mapping[str, str]
    flasher: str          # "virtual" when the place has tag flasher=virtual, else "platformio"


@dataclass
class _Held:
    """A place this client acquired, under the reservation that got it."""

    place: str
    token: str


def _grpc_details(error: BaseException) -> str:
    details = getattr(error, "details", None)
    if callable(details):
        code = error.code() if callable(getattr(error, "code", None)) else None
        name = getattr(code, "name", "")
        return f"{name}: {details()}" if name else str(details())
    return f"{type(error).__name__}: {error}"


def _describe_tags(tags: Mapping[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(tags.items())) or "(no tags)"


class LabgridClient:
    """One connection to a labgrid coordinator; a context manager. close() releases every place
    it acquired, and its reaper does the same if this process dies first.

    labgrid's ClientSession needs its event loop running to keep the coordinator's stream alive
    and receive place and resource updates, also while a case runs for minutes: the loop runs in
    a thread of its own, and every call here submits a coroutine to it."""

    def __init__(self, coordinator: str | None = None, *, timeout_s: float = 30.0) -> None:
        self.coordinator = coordinator or os.environ.get("LG_COORDINATOR") or DEFAULT_COORDINATOR
        # gRPC's fork handlers log a line on every fork while its threads are busy, and the
        # harness forks for every compiler, converter and board process. They only matter to a
        # child that uses gRPC itself, which none does. Read once, when gRPC first loads.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
        self._timeout_s = timeout_s
        self._held: dict[str, _Held] = {}
        self._open_tokens: set[str] = set()
        self._inflight: set[asyncio.Task] = set()
        self._closed = False
        self._session: Any = None
        self._reaper: subprocess.Popen | None = None
        # Before any thread of ours or gRPC's exists, so no fork happens under them.
        self._reaper = _start_reaper(self.coordinator)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="labgrid-client", daemon=True)
        self._thread.start()
        try:
            self._session = self._run(self._connect(), "connecting")
            self._reaper_ready()
        except BaseException:
            self._shutdown()
            raise

    # --- public API ------------------------------------------------------------------------------

    def acquire(self, place: str | None = None, *, tags: Mapping[str, str] | None = None,
                wait_s: float = 300.0) -> PlaceBoard:
        """Place given: that place, waiting up to wait_s while someone else holds it. Otherwise a
        free place whose tags include `tags`, picked by labgrid's scheduler."""
        self._check_open()
        wanted = f"place {place}" if place else f"a place with tags {_describe_tags(tags or {})}"
        return self._run(self._acquire(place, dict(tags or {}), wait_s), f"acquiring {wanted}",
                         timeout_s=wait_s + 2 * self._timeout_s)

    def release(self, place: str) -> None:
        self._check_open()
        if place not in self._held:
            raise PortUnavailableError(f"place {place} was not acquired by this client "
                                       f"(it holds: {', '.join(sorted(self._held)) or 'none'})",
                                       where=self._where())
        self._run(self._guarded(self._release(place)), f"releasing place {place}")

    def mark_out(self, place: str, reason: str) -> None:
        """Say on the place, where `labgrid-client places` shows it, why tinyhil stopped using it."""
        self._check_open()
        comment = " ".join(f"{OUT_PREFIX} {reason}".split())
        self._run(self._rpc("SetPlaceComment", "SetPlaceCommentRequest", sync=True, placename=place,
                            comment=comment), f"commenting on place {place}")

    def add_place(self, name: str, *, matches: list[str], tags: Mapping[str, str]) -> None:
        """Create a place (what `labgrid-client -p NAME create`, `add-match` and `set-tags` do),
        for setting up a farm from Python."""
        self._check_open()
        self._run(self._add_place(name, matches, dict(tags)), f"creating place {name}")

    def place_problem(self, place: str) -> str | None:
        """Why `place` cannot give a board right now (does not exist, acquired, exporter gone,
        marked out), or None when it can."""
        self._check_open()
        return self._run(self._problem_now(place), f"looking at place {place}")

    @property
    def held(self) -> list[str]:
        return sorted(self._held)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        problems: list[str] = []
        try:
            if self._session is not None:
                problems = self._run(self._close(), "releasing places", timeout_s=4 * self._timeout_s)
        finally:
            self._shutdown()
        if problems:
            raise PortUnavailableError("could not release everything: " + "; ".join(problems) + " (the reaper "
                                       "retries once now; else labgrid-client -p PLACE release-from "
                                       f"{self._user_name()})", where=self._where())

    def __enter__(self) -> LabgridClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"labgrid coordinator {self.coordinator}"

    def _user_name(self) -> str:
        if self._session is None:
            return "HOST/USER"
        return f"{self._session.gethostname()}/{self._session.getuser()}"

    def _check_open(self) -> None:
        if self._closed:
            raise PortUnavailableError("this labgrid client is closed", where=self._where())

    def _run(self, coro, what: str, *, timeout_s: float | None = None):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._timeout_s if timeout_s is None else timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PortUnavailableError(f"no answer while {what} within {timeout_s or self._timeout_s:.0f} s",
                                       where=self._where()) from None
        except BaseException:
            # Ctrl-C lands here in the calling thread: stop the waiting; the RPCs already sent run
            # to their end under _guarded, so close() knows what they took.
            future.cancel()
            raise

    async def _guarded(self, coro):
        """Run `coro` to its end even if the caller is cancelled: it changes what this client
        holds, and a half-recorded change would leak a place."""
        task = asyncio.get_running_loop().create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def _rpc(self, method: str, request: str, *, sync: bool = False, **fields: Any):
        """One call to the coordinator; `sync` waits until the place and resource updates it
        caused have reached this client."""
        import grpc
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2

        try:
            response = await getattr(self._session.stub, method)(getattr(pb2, request)(**fields),
                                                                 timeout=self._timeout_s)
            if sync:
                await self._sync()
            return response
        except grpc.aio.AioRpcError as error:
            raise PortUnavailableError(f"{method} {fields}: labgrid answered {_grpc_details(error)}",
                                       where=self._where()) from None

    async def _sync(self) -> None:
        """Wait until the coordinator's updates caused by our last call have reached us."""
        if not await asyncio.wait_for(self._session.sync_with_coordinator(), self._timeout_s):
            raise PortUnavailableError("lost the connection to the coordinator", where=self._where())

    async def _connect(self):
        # Built inside the loop's thread: gRPC's aio channel binds to the running loop. Not
        # labgrid's start_session, which stashes one loop per thread and asserts on a second.
        import grpc
        from labgrid.remote.client import ClientSession, ServerError
        from labgrid.remote.generated import labgrid_coordinator_pb2_grpc as pb2_grpc
        from labgrid.util.proxy import proxymanager

        address = proxymanager.get_grpc_address(self.coordinator, default_port=20408)
        session = ClientSession(address, asyncio.get_running_loop())
        # The coordinator tells clients apart by the peer address of their connection, and gRPC
        # shares one connection among a process's channels to the same address: a second client
        # in this process would be refused. A channel of our own, with labgrid's keepalive
        # settings and a subchannel pool of its own, gets its own connection.
        await session.channel.close()
        session.channel = grpc.aio.insecure_channel(target=address, options=CHANNEL_OPTIONS)
        session.stub = pb2_grpc.CoordinatorStub(session.channel)
        try:
            await asyncio.wait_for(session.start(), self._timeout_s)
        except (ServerError, asyncio.TimeoutError) as error:
            await session.stop()
            await session.close()
            raise PortUnavailableError(f"cannot reach the coordinator ({error or 'no answer'}): is "
                                       f"labgrid-coordinator running there? (docs/farm.md)",
                                       where=self._where()) from None
        return session

    def _reaper_ready(self) -> None:
        assert self._reaper is not None and self._reaper.stdout is not None
        ready, _, _ = select.select([self._reaper.stdout], [], [], REAPER_START_S)
        line = self._reaper.stdout.readline() if ready else b""
        self._reaper.stdout.close()
        if line.strip() != b"ready":
            raise PortUnavailableError(f"the reaper that releases places if this process dies did not start "
                                       f"(exit status {self._reaper.poll()}, said {line!r})", where=self._where())

    def _tell_reaper(self, verb: str, token: str, place: str = "") -> None:
        """open TOKEN, held TOKEN PLACE, done TOKEN: what the reaper must undo if we die."""
        if verb == "open":
            self._open_tokens.add(token)
        elif verb == "done":
            self._open_tokens.discard(token)
        if self._reaper is None or self._reaper.stdin is None:
            return
        try:
            self._reaper.stdin.write(f"{verb} {token} {place}".strip().encode() + b"\n")
            self._reaper.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.warning("the labgrid reaper (pid %s) is gone: places stay acquired if this process dies "
                        "before releasing them", self._reaper.pid)

    def _shutdown(self) -> None:
        if self._session is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._stop_session(), self._loop)
            try:
                future.result(self._timeout_s)
            except Exception:  # noqa: BLE001 - the process is leaving the farm either way
                future.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout_s)
        if not self._thread.is_alive():
            self._loop.close()
        reaper = self._reaper
        if reaper is not None:
            if reaper.stdin is not None:
                try:
                    reaper.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                # Quick when nothing is left open; otherwise it is releasing what we could not.
                reaper.wait(timeout=0.0 if self._open_tokens else 5.0)
            except subprocess.TimeoutExpired:
                pass

    async def _stop_session(self) -> None:
        await self._session.stop()
        await self._session.close()

    # --- acquiring -----------------------------------------------------------------------------

    async def _acquire(self, place: str | None, tags: dict[str, str], wait_s: float) -> PlaceBoard:
        if place is not None:
            if place not in self._session.places:
                known = ", ".join(sorted(self._session.places)) or "none"
                raise PortUnavailableError(f"no place {place} (places: {known})", where=self._where())
            if place in self._held:
                raise PortUnavailableError(f"place {place} is already acquired by this client",
                                           where=self._where())
            filters = {"name": place}
        else:
            filters = tags
        deadline = time.monotonic() + wait_s
        set_aside: dict[str, str] = {}   # token -> its place and why that place is no use
        try:
            while True:
                token = await self._guarded(self._reserve(filters))
                try:
                    allocated = await self._wait_allocation(token, deadline)
                except PortUnavailableError:
                    await self._guarded(self._cancel(token))
                    raise
                if allocated is None:
                    await self._guarded(self._cancel(token))
                    raise PortUnavailableError(self._nothing_free(place, tags, wait_s, set_aside),
                                               where=self._where())
                problem = self._problem(allocated, for_tags=place is None)
                if problem is None:
                    problem = await self._guarded(self._acquire_place(allocated, token))
                if problem is None:
                    try:
                        return await self._board(allocated)
                    except PortUnavailableError as error:
                        await self._guarded(self._release(allocated))
                        problem = error.message
                if place is not None:
                    await self._guarded(self._cancel(token))
                    raise PortUnavailableError(f"place {place}: {problem}", where=self._where())
                # Keep the reservation, so the scheduler cannot hand us the same place again,
                # and ask for another.
                set_aside[token] = f"{allocated} {problem}"
        finally:
            for token in set_aside:
                await self._guarded(self._cancel(token))

    def _nothing_free(self, place: str | None, tags: Mapping[str, str], wait_s: float,
                      set_aside: Mapping[str, str]) -> str:
        if place:
            wanted, names = f"place {place}", [place]
        else:
            wanted = f"a place with tags {_describe_tags(tags)}"
            names = [name for name, info in sorted(self._session.places.items())
                     if set(tags.items()) <= set(info.tags.items())]
        states = [f"{name} {self._state(name)}" for name in names] or ["no place has these tags"]
        if set_aside:
            states.append("passed over: " + ", ".join(set_aside.values()))
        return f"{wanted} did not come free within {wait_s:g} s ({'; '.join(states)})"

    def _state(self, name: str) -> str:
        info = self._session.places.get(name)
        if info is None:
            return "does not exist"
        if info.acquired:
            return f"acquired by {info.acquired}"
        problem = self._problem(name, for_tags=True)
        if problem:
            return problem
        if info.reservation:
            return f"reserved ({info.reservation})"
        return "free"

    async def _reserve(self, filters: dict[str, str]) -> str:
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2

        response = await self._rpc("CreateReservation", "CreateReservationRequest",
                                   filters={"main": pb2.Reservation.Filter(filter=filters)}, prio=0.0)
        token = response.reservation.token
        self._tell_reaper("open", token)
        return token

    async def _wait_allocation(self, token: str, deadline: float) -> str | None:
        from labgrid.remote.common import Reservation, ReservationState

        while True:
            response = await self._rpc("PollReservation", "PollReservationRequest", token=token)
            reservation = Reservation.from_pb2(response.reservation)
            if reservation.state is ReservationState.allocated:
                return reservation.allocations["main"][0]
            if reservation.state is not ReservationState.waiting:
                raise PortUnavailableError(f"reservation {token} became {reservation.state.name}", where=self._where())
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    async def _acquire_place(self, name: str, token: str) -> str | None:
        """None when acquired; else what the coordinator said."""
        try:
            await self._rpc("AcquirePlace", "AcquirePlaceRequest", sync=True, placename=name)
        except PortUnavailableError as error:
            return error.message
        self._held[name] = _Held(name, token)
        self._tell_reaper("held", token, name)
        return None

    async def _release(self, name: str) -> None:
        # The reservation goes first: the coordinator allocates places to waiting reservations
        # when something changes, and in that pass a place still counts as reserved if its
        # reservation was cancelled in the same call. Cancelled first, the release then hands
        # the place to the next waiting client at once instead of at the scheduler's next
        # 15-second tick.
        held = self._held[name]
        await self._cancel(held.token, tell=False)
        try:
            await self._rpc("ReleasePlace", "ReleasePlaceRequest", placename=name)
        except PortUnavailableError as error:
            # Someone kicked us off it (labgrid-client release --kick): released all the same.
            if "is not acquired" not in error.message:
                raise
        del self._held[name]
        self._tell_reaper("done", held.token)

    async def _cancel(self, token: str, *, tell: bool = True) -> None:
        try:
            await self._rpc("CancelReservation", "CancelReservationRequest", token=token)
        except PortUnavailableError as error:
            # Gone already: the coordinator expired it, or restarted.
            if "does not exist" not in error.message:
                raise
        if tell:
            self._tell_reaper("done", token)

    async def _close(self) -> list[str]:
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=2 * self._timeout_s)
        problems = []
        for name in list(self._held):
            try:
                await self._release(name)
            except PortUnavailableError as error:
                problems.append(f"place {name}: {error.message}")
        for token in list(self._open_tokens):
            try:
                await self._cancel(token)
            except PortUnavailableError as error:
                problems.append(f"reservation {token}: {error.message}")
        return problems

    async def _add_place(self, name: str, matches: list[str], tags: dict[str, str]) -> None:
        await self._rpc("AddPlace", "AddPlaceRequest", name=name)
        for pattern in matches:
            await self._rpc("AddPlaceMatch", "AddPlaceMatchRequest", placename=name, pattern=pattern)
        await self._rpc("SetPlaceTags", "SetPlaceTagsRequest", sync=True, placename=name, tags=tags)

    async def _problem_now(self, place: str) -> str | None:
        await self._sync()
        info = self._session.places.get(place)
        if info is not None and info.acquired:
            return f"acquired by {info.acquired}"
        return self._problem(place, for_tags=True)

    # --- what a place offers ---------------------------------------------------------------------

    def _serial_ports(self, name: str) -> list[tuple[tuple[str, str, str, str], Any, Any]]:
        """(path, resource entry, match) of each NetworkSerialPort the place matches, from the
        resources the coordinator knows now."""
        info = self._session.places[name]
        found = []
        for exporter, groups in self._session.resources.items():
            for group, resources in groups.items():
                for resource_name, entry in resources.items():
                    path = (exporter, group, entry.data.get("cls", ""), resource_name)
                    if path[2] != SERIAL_CLS:
                        continue
                    match = info.getmatch(path)
                    if match is not None:
                        found.append((path, entry, match))
        return found

    def _problem(self, name: str, *, for_tags: bool) -> str | None:
        """Why the place cannot give a board (without its name), or None. Tag-based acquires
        also pass over places mark_out commented on; a place asked for by name is taken anyway."""
        info = self._session.places.get(name)
        if info is None:
            return "does not exist"
        if for_tags and info.comment.startswith(OUT_PREFIX):
            return f"is marked out ({info.comment})"
        if not any(entry.avail for _, entry, _ in self._serial_ports(name)):
            exporters = sorted({match.exporter for match in info.matches})
            return (f"has no available {SERIAL_CLS} (matches: {', '.join(repr(m) for m in info.matches) or 'none'}; "
                    f"exporter {', '.join(exporters) or '?'} not connected?)")
        return None

    async def _board(self, name: str) -> PlaceBoard:
        """The acquired place's serial port, once its exporter has started ser2net for it."""
        deadline = time.monotonic() + self._timeout_s
        await self._sync()
        while True:
            info = self._session.places[name]
            acquired = {tuple(path) for path in info.acquired_resources}
            ports = [(path, entry, match) for path, entry, match in self._serial_ports(name) if path in acquired]
            if len(ports) > 1:
                named = [port for port in ports if port[2].rename == LINK_NAME]
                if len(named) != 1:
                    raise PortUnavailableError(
                        f"place {name} has {len(ports)} serial ports ({', '.join('/'.join(p[0]) for p in ports)}); "
                        f"name the board's link with labgrid-client -p {name} add-named-match "
                        f"EXPORTER/GROUP/{SERIAL_CLS} {LINK_NAME}", where=self._where())
                ports = named
            if ports:
                path, entry, _ = ports[0]
                params = entry.params
                if params.get("extra", {}).get("proxy_required"):
                    raise PortUnavailableError(
                        f"place {name}: exporter {path[0]} is isolated (its ports are reachable only through "
                        f"an SSH proxy), which a pyserial URL cannot use", where=self._where())
                if entry.avail and params.get("port"):
                    return self._place_board(name, path[0], str(params["host"]), int(params["port"]))
            if time.monotonic() >= deadline:
                raise PortUnavailableError(f"place {name}: acquired, but its {SERIAL_CLS} did not get a port within "
                                           f"{self._timeout_s:g} s (is ser2net installed on its exporter?)",
                                           where=self._where())
            await asyncio.sleep(0.05)

    def _place_board(self, name: str, exporter: str, host: str, port: int) -> PlaceBoard:
        tags = dict(self._session.places[name].tags)
        if ":" in host:
            host = f"[{host}]"
        # labgrid's own SerialDriver passes ign_set_control too: ser2net does not acknowledge
        # DTR/RTS changes on ports without modem lines (a pseudo-terminal), and pyserial would
        # wait for the acknowledgement for 3 s, then fail the open.
        url = f"rfc2217://{host}:{port}?ign_set_control"
        return PlaceBoard(place=name, url=url, host=exporter, tags=MappingProxyType(tags),
                          flasher="virtual" if tags.get("flasher") == "virtual" else "platformio")


# --- the reaper ---------------------------------------------------------------------------------

def _start_reaper(coordinator: str) -> subprocess.Popen:
    """The reaper outlives its client on purpose, so it does not die with its parent; its own
    session keeps a terminal's Ctrl-C, meant for the client, away from it."""
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(part for part in (repo, env.get("PYTHONPATH", "")) if part)
    return subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), "--reap", "--coordinator",
                             coordinator, "--client-pid", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=env,
                            start_new_session=True, close_fds=True)


def _reap(coordinator: str, client_pid: int, lines) -> int:
    open_tokens: dict[str, set[str]] = {}   # reservation token -> places acquired under it
    for line in lines:   # until the client's end of the pipe closes, however the client ended
        words = line.decode(errors="replace").split()
        if len(words) < 2:
            continue
        verb, token, *place = words
        if verb == "open":
            open_tokens[token] = set()
        elif verb == "held" and token in open_tokens:
            open_tokens[token].update(place)
        elif verb == "done":
            open_tokens.pop(token, None)
    if not open_tokens:
        return 0
    try:
        released = asyncio.run(asyncio.wait_for(_release_tokens(coordinator, open_tokens), 3 * REAPER_RPC_S))
    except Exception as error:  # noqa: BLE001 - one line for people, whatever went wrong
        print(f"tinyhil: process {client_pid} died holding labgrid reservations {', '.join(sorted(open_tokens))} "
              f"and they could not be released at {coordinator} ({_grpc_details(error)}); "
              f"labgrid-client -p PLACE release-from HOST/USER frees a place", file=sys.stderr, flush=True)
        return 1
    for place in released:
        print(f"tinyhil: released labgrid place {place}, left acquired by process {client_pid} that died",
              file=sys.stderr, flush=True)
    return 0


async def _release_tokens(coordinator: str, tokens: dict[str, set[str]]) -> list[str]:
    import grpc
    from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2
    from labgrid.remote.generated import labgrid_coordinator_pb2_grpc as pb2_grpc
    from labgrid.util.proxy import proxymanager

    address = proxymanager.get_grpc_address(coordinator, default_port=20408)
    released = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb2_grpc.CoordinatorStub(channel)
        places = (await stub.GetPlaces(pb2.GetPlacesRequest(), timeout=REAPER_RPC_S)).places
        held = set().union(*tokens.values())
        for place in places:
            # Under one of the tokens; or between the two calls of a release (the reservation
            # cancelled, the place not yet released), when nobody else can have acquired it.
            ours = place.reservation in tokens or (not place.reservation and place.name in held)
            if ours and place.acquired:
                await stub.ReleasePlace(pb2.ReleasePlaceRequest(placename=place.name, fromuser=place.acquired),
                                        timeout=REAPER_RPC_S)
                released.append(place.name)
        for token in tokens:
            try:
                await stub.CancelReservation(pb2.CancelReservationRequest(token=token), timeout=REAPER_RPC_S)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:   # expired already
                    raise
    return released


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Release a labgrid client's places when it dies (internal).")
    parser.add_argument("--reap", action="store_true", required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--client-pid", type=int, required=True)
    args = parser.parse_args(argv)
    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.flush()
    return _reap(args.coordinator, args.client_pid, sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
