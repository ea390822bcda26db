"""The board pool a farm run's processes share (harness.board.pool): real processes, real flocks."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from harness.board.pool import BoardPool, NoBoardLeft, PoolEntry
from harness.errors import PortUnavailableError

BOARDS = [PoolEntry("/dev/ttyACM0", "/dev/ttyACM0", "bench-a"), PoolEntry("/dev/ttyACM1", "/dev/ttyACM1", "bench-a"),
          PoolEntry("rfc2217://127.0.0.1:4001", "labgrid:esp-3", "exporter-b", "virtual")]


def _pool(directory: Path, member: str, boards=BOARDS) -> BoardPool:
    pool = BoardPool(directory, member)
    for entry in boards:
        pool.register(entry)
    return pool


def _hold(directory: str, member: str, preferred: str, held: multiprocessing.Queue, release) -> None:
    pool = BoardPool(Path(directory), member)
    held.put(pool.acquire(preferred).name)
    release.wait(30)
    pool.close()


def test_processes_get_their_preferred_boards_and_never_share_one(tmp_path):
    context = multiprocessing.get_context("spawn")
    _pool(tmp_path, "setup").close()
    held, release = context.Queue(), context.Event()
    workers = [context.Process(target=_hold, args=(str(tmp_path), f"gw{i}", BOARDS[i].name, held, release))
               for i in range(2)]
    for worker in workers:
        worker.start()
    try:
        got = sorted(held.get(timeout=30) for _ in workers)
        assert got == ["/dev/ttyACM0", "/dev/ttyACM1"]
        # A third process wanting ttyACM0 gets the board nobody holds instead.
        third = _pool(tmp_path, "gw2")
        assert third.acquire("/dev/ttyACM0").name == "labgrid:esp-3"
        third.close()
    finally:
        release.set()
        for worker in workers:
            worker.join(30)


def test_a_lease_dies_with_its_process(tmp_path):
    context = multiprocessing.get_context("spawn")
    _pool(tmp_path, "setup", BOARDS[:1]).close()
    held, release = context.Queue(), context.Event()
    worker = context.Process(target=_hold, args=(str(tmp_path), "gw0", "/dev/ttyACM0", held, release))
    worker.start()
    assert held.get(timeout=30) == "/dev/ttyACM0"
    mine = BoardPool(tmp_path, "gw1")
    with pytest.raises(PortUnavailableError, match=r"no board of the pool came free within 0.3 s \(/dev/ttyACM0"):
        mine.acquire("/dev/ttyACM0", timeout_s=0.3)
    worker.kill()
    worker.join(30)
    pool = BoardPool(tmp_path, "gw1")
    assert pool.acquire("/dev/ttyACM0").name == "/dev/ttyACM0"


def test_a_board_taken_out_is_out_for_every_process_and_the_last_one_out_ends_the_pool(tmp_path):
    first, second = _pool(tmp_path, "gw0"), _pool(tmp_path, "gw1")
    entry = first.acquire("/dev/ttyACM0")
    assert first.take_out(entry, "serial port /dev/ttyACM0 does not exist") is True
    assert first.held is None
    # Taking it out again (another process saw it fail too) keeps the first reason.
    assert second.take_out(entry, "another reason") is False
    assert second.out() == {"/dev/ttyACM0": "serial port /dev/ttyACM0 does not exist"}
    assert second.acquire("/dev/ttyACM0").name != "/dev/ttyACM0"
    second.close()
    for board in BOARDS[1:]:
        first.take_out(board, f"{board.name} stopped answering")
    with pytest.raises(NoBoardLeft) as raised:
        first.acquire()
    assert raised.value.message == (
        "no board left in the pool: every one was taken out (/dev/ttyACM0: serial port /dev/ttyACM0 does not "
        "exist; /dev/ttyACM1: /dev/ttyACM1 stopped answering; labgrid:esp-3: labgrid:esp-3 stopped answering)")


def _wait_for_any(directory: str, member: str, got: multiprocessing.Queue) -> None:
    pool = BoardPool(Path(directory), member)
    started = time.monotonic()
    entry = pool.acquire()
    got.put((entry.name, time.monotonic() - started))
    pool.close()


def test_a_process_without_a_board_gets_one_when_a_holder_hands_it_over_between_cases(tmp_path):
    holder = _pool(tmp_path, "gw0", BOARDS[:1])
    holder.acquire("/dev/ttyACM0")
    assert not holder.should_yield()
    context = multiprocessing.get_context("spawn")
    got = context.Queue()
    waiter = context.Process(target=_wait_for_any, args=(str(tmp_path), "gw1", got))
    waiter.start()
    try:
        deadline = time.monotonic() + 30
        while not holder.others_waiting() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder.others_waiting()
        assert not holder.should_yield(), "a holder that has not run a case on its board keeps it"
        holder.cases_on_held += 1
        assert holder.should_yield()
        holder.hand_over()
        name, _ = got.get(timeout=30)
        assert name == "/dev/ttyACM0"
    finally:
        waiter.join(30)
    assert not holder.others_waiting()
    assert holder.acquire("/dev/ttyACM0").name == "/dev/ttyACM0"
