"""Where a session's cases run: one board, or a farm of them.

`--board` names one board (`virtual`, `auto`, a port, a pyserial URL) or several: a comma list of
ports/URLs, `auto` with pytest-xdist's `-n` (every attached Espressif board), `labgrid:PLACE[,...]`
or `labgrid` (any free place with the farm's tags, one per worker). Each process of a run (one, or
one per xdist worker) gets a `BoardSource`:

- `SingleBoard`: one board for the process (`virtual`, also one per worker with `-n`; or one port).
- `PooledBoards`: a lease on one board of the run's pool (harness.board.pool). The process keeps
  it from case to case; when it fails (unplugged, silent, its host gone) it is taken out of the
  pool for every process of the run, with one line, and the case runs once more on another board.

The farm does not schedule: pytest-xdist hands out cases, labgrid hands out remote places.
"""

from __future__ import annotations

import abc
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from .board import Board, open_board
from .board.pool import BoardPool, PoolEntry
from .errors import BoardError, LinkError, PortIdentityError, PortUnavailableError, TinyhilError

log = logging.getLogger("tinyhil.farm")

LABGRID = "labgrid"
DEFAULT_LABGRID_TAGS = (("board", "esp32s3"),)


@dataclass(frozen=True)
class FarmMember:
    """This process's place in its run: pytest-xdist's worker id and count, or the one process."""

    worker: str = "main"
    index: int = 0
    count: int = 1

    @classmethod
    def from_xdist(cls, workerinput: dict) -> FarmMember:
        worker = str(workerinput["workerid"])
        digits = "".join(ch for ch in worker if ch.isdigit())
        return cls(worker, int(digits or 0), int(workerinput.get("workercount", 1)))


@dataclass(frozen=True)
class FarmSettings:
    member: FarmMember = FarmMember()
    # A worker of an xdist run: the controller claimed the run id and holds its lock; the workers
    # join it and merge their rows into the one results directory.
    joined_run: bool = False
    labgrid_coordinator: str | None = None
    labgrid_tags: tuple[tuple[str, str], ...] = DEFAULT_LABGRID_TAGS
    # How long a worker waits for a labgrid place (reservations queue behind other CI jobs).
    labgrid_wait_s: float = 600.0
    flasher: str = "platformio"      # for local ports: "virtual" for standing virtual boards


def board_specs(option: str) -> list[str]:
    """The --board value as a list of board specs, checked for what cannot be mixed."""
    specs = [part.strip() for part in option.split(",")]
    if not all(specs):
        raise TinyhilError(f"--board={option!r}: an empty entry in the list (expected ports or URLs separated by "
                           f"commas)", where="--board")
    if len(specs) > 1 and ("virtual" in specs or "auto" in specs or LABGRID in specs):
        raise TinyhilError(f"--board={option!r}: virtual, auto and labgrid stand alone (with -n N for several "
                           f"boards), not in a list", where="--board")
    if len(set(specs)) != len(specs):
        raise TinyhilError(f"--board={option!r}: a board is named twice; two workers would share it", where="--board")
    labgrid = [spec for spec in specs if _is_labgrid(spec)]
    if labgrid and len(labgrid) != len(specs):
        raise TinyhilError(f"--board={option!r}: labgrid places and local ports in one list; run them separately",
                           where="--board")
    return specs


def labgrid_tags(text: str) -> tuple[tuple[str, str], ...]:
    """`board=esp32s3,lab=b2` as pairs: the filter of a labgrid reservation."""
    pairs = [part.strip() for part in text.split(",") if part.strip()]
    if not pairs or not all("=" in pair and pair.split("=", 1)[0] and pair.split("=", 1)[1] for pair in pairs):
        raise TinyhilError(f"--labgrid-tags={text!r}: expected KEY=VALUE pairs separated by commas",
                           where="--labgrid-tags")
    return tuple((key, value) for key, value in (pair.split("=", 1) for pair in pairs))


def _is_labgrid(spec: str) -> bool:
    return spec == LABGRID or spec.startswith(f"{LABGRID}:")


def check_workers(option: str, workers: int) -> None:
    """Refuses, before any worker starts, a board list that cannot give each worker a board."""
    specs = board_specs(option)
    if workers <= 1 or specs in (["virtual"], ["auto"], [LABGRID]):
        return
    if len(specs) < workers:
        raise TinyhilError(f"-n {workers} needs a board per worker and --board names {len(specs)} "
                           f"({', '.join(specs)}): name more boards, or run fewer workers", where="--board")


def espressif_ports() -> list[str]:
    """Every attached Espressif USB device, for `--board=auto` with several workers."""
    from serial.tools import list_ports

    from .board.serial_board import ESPRESSIF_USB_VID

    return sorted(port.device for port in list_ports.comports() if port.vid == ESPRESSIF_USB_VID)


def board_source(option: str, workdir: Path, build_root: Path, pool_dir: Path, settings: FarmSettings, *,
                 flash_anyway: bool = False) -> BoardSource:
    specs = board_specs(option)
    member = settings.member
    if specs == ["virtual"] or (len(specs) == 1 and member.count == 1 and not _is_labgrid(specs[0])):
        return SingleBoard(specs[0], workdir, build_root, flash_anyway=flash_anyway, flasher=settings.flasher)
    return PooledBoards(specs, workdir, build_root, BoardPool(pool_dir, member.worker), settings,
                        flash_anyway=flash_anyway)


def is_board_failure(error: TinyhilError) -> bool:
    """The board, not the case: it vanished (port gone, its host gone) or stopped answering after
    the link's own recoveries. A port refused for its USB identity is the user's to fix, and a
    device's own answer (model too large, unsupported op) is the case's."""
    if isinstance(error, PortIdentityError):
        return False
    return isinstance(error, (PortUnavailableError, LinkError))


class BoardSource(abc.ABC):
    """The board a process runs its next case on."""

    current: Board | None = None

    @abc.abstractmethod
    def board(self) -> Board: ...

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The board as rows name it: its port, URL or labgrid place."""

    @property
    @abc.abstractmethod
    def host(self) -> str:
        """The machine the board hangs off."""

    def begin_case(self) -> None:
        """Between cases: the place to hand a board over to a process waiting for one."""

    def end_case(self) -> None: ...

    def lost(self, error: TinyhilError) -> str | None:
        """After a case failed: when `error` is the board's failure and another board can run the
        case again, takes this one out and says so in one line; else None (the row stands)."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...


class SingleBoard(BoardSource):
    """One board for the process. A port that cannot be opened fails every later case at once."""

    def __init__(self, spec: str, workdir: Path, build_root: Path, *, flash_anyway: bool, flasher: str) -> None:
        self.spec = spec
        self._workdir, self._build_root = workdir, build_root
        self._flash_anyway, self._flasher = flash_anyway, flasher
        self._unavailable: BoardError | None = None

    @property
    def name(self) -> str:
        return self.current.name if self.current is not None else self.spec

    @property
    def host(self) -> str:
        return _remote_host(self.spec) or socket.gethostname()

    def board(self) -> Board:
        if self._unavailable is not None:
            raise self._unavailable
        if self.current is None:
            try:
                self.current = open_board(self.spec, self._workdir, self._build_root,
                                          flash_anyway=self._flash_anyway, flasher=self._flasher)
            except PortUnavailableError as error:
                self._unavailable = error
                raise
        return self.current

    def lost(self, error: TinyhilError) -> str | None:
        if isinstance(error, PortUnavailableError):
            self._unavailable = error  # gone: the next cases say so at once instead of waiting on it
        return None

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def _remote_host(spec: str) -> str:
    if "://" not in spec:
        return ""
    rest = spec.split("://", 1)[1]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest.split("/", 1)[0]


class PooledBoards(BoardSource):
    """A lease on one board of the run's pool (see the module's docstring)."""

    def __init__(self, specs: list[str], workdir: Path, build_root: Path, pool: BoardPool, settings: FarmSettings,
                 *, flash_anyway: bool) -> None:
        self._specs = specs
        self._workdir, self._build_root = workdir, build_root
        self._pool = pool
        self._settings = settings
        self._flash_anyway = flash_anyway
        self._preferred: str | None = None
        self._labgrid = None
        self._own_places: list[str] = []
        self._joined = False
        self._join_failed: PortUnavailableError | None = None

    @property
    def name(self) -> str:
        return self._pool.held.name if self._pool.held is not None else ",".join(self._specs)

    @property
    def host(self) -> str:
        return self._pool.held.host if self._pool.held is not None else ""

    # --- joining the pool ----------------------------------------------------------------------

    def _join(self) -> None:
        """Registers the boards this process brings: the listed ports (every process registers
        the same ones), or the labgrid places it acquires."""
        if self._joined:
            return
        if self._join_failed is not None:
            raise self._join_failed  # said once: the next cases fail at once instead of waiting again
        try:
            self._join_boards()
        except PortUnavailableError as error:
            self._join_failed = error
            raise
        self._joined = True

    def _join_boards(self) -> None:
        member = self._settings.member
        if _is_labgrid(self._specs[0]):
            self._join_labgrid()
        else:
            ports = espressif_ports() if self._specs == ["auto"] else self._specs
            if not ports:
                raise PortUnavailableError("--board=auto found no Espressif USB device (vendor id 0x303A)")
            if self._specs == ["auto"] and len(ports) < member.count:
                raise PortUnavailableError(f"--board=auto found {len(ports)} Espressif devices ({', '.join(ports)}) "
                                           f"for {member.count} workers")
            local = socket.gethostname()
            for port in ports:
                self._pool.register(PoolEntry(port, port, _remote_host(port) or local, self._settings.flasher))
            self._preferred = ports[member.index % len(ports)]

    def _join_labgrid(self) -> None:
        from .board.labgrid_place import LabgridClient

        member = self._settings.member
        self._labgrid = LabgridClient(self._settings.labgrid_coordinator)
        if self._specs == [LABGRID]:
            wanted: list[str | None] = [None]
        else:
            places = [spec.split(":", 1)[1] for spec in self._specs]
            # The listed places are split among the workers; one process alone takes them all
            # (the others are its spares).
            wanted = places[member.index::member.count] if member.count > 1 else places
        for place in wanted:
            board = self._labgrid.acquire(place, tags=dict(self._settings.labgrid_tags),
                                          wait_s=self._settings.labgrid_wait_s)
            self._own_places.append(board.place)
            log.info("%s: acquired labgrid place %s (%s on %s)", member.worker, board.place, board.url, board.host)
            self._pool.register(PoolEntry(board.url, f"{LABGRID}:{board.place}", board.host, board.flasher))
            if self._preferred is None:
                self._preferred = f"{LABGRID}:{board.place}"

    # --- leases ---------------------------------------------------------------------------------

    def board(self) -> Board:
        self._join()
        entry = self._pool.acquire(self._preferred)
        if self.current is None:
            log.info("%s: using board %s (%s)", self._settings.member.worker, entry.name, entry.host)
            self.current = open_board(entry.spec, self._workdir, self._build_root, flash_anyway=self._flash_anyway,
                                      flasher=entry.flasher)
        return self.current

    def begin_case(self) -> None:
        if self._pool.should_yield():
            log.info("%s: handing board %s over to a worker that has none", self._settings.member.worker,
                     self._pool.held.name)
            self._close_board()
            self._pool.hand_over()

    def end_case(self) -> None:
        if self._pool.held is not None:
            self._pool.cases_on_held += 1

    def lost(self, error: TinyhilError) -> str | None:
        entry = self._pool.held
        if entry is None or not is_board_failure(error):
            return None
        reason = error.one_line()
        self._close_board()
        self._pool.take_out(entry, reason)
        if self._labgrid is not None and entry.name.startswith(f"{LABGRID}:"):
            place = entry.name.split(":", 1)[1]
            try:
                self._labgrid.mark_out(place, f"tinyhil took it out of run: {reason}"[:200])
            except TinyhilError as failed:
                log.warning("could not comment on labgrid place %s: %s", place, failed.one_line())
        if self._preferred == entry.name:
            self._preferred = None
        return f"board {entry.name} ({entry.host}) taken out of the pool: {reason}"

    def _close_board(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def close(self) -> None:
        self._close_board()
        self._pool.close()
        if self._labgrid is not None:
            # A sibling may be running a case on a place this process acquired: the place is
            # released once that case is over (its lease comes free), never under it.
            for place in self._own_places:
                entry = next((e for e in self._pool.entries() if e.name == f"{LABGRID}:{place}"), None)
                if entry is not None and entry.name not in self._pool.out():
                    self._pool.wait_free(entry, timeout_s=600)
            try:
                self._labgrid.close()
            except TinyhilError as error:  # its reaper tries once more; people must know if that fails too
                log.warning("%s", error.one_line())
            self._labgrid = None
