"""Sync modes: when the durability callbacks run relative to writes and fsyncs; group commit; fsync failure."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest

from distributor.wal.format import RECORD_HEADER, SEGMENT_HEADER
from distributor.wal.log import WorkerLog
from wal_support import append_turn, durable, packet, replay_all, run

Event = tuple[Any, ...]


def _name(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def _record_io(monkeypatch: pytest.MonkeyPatch, events: list[Event],
               before_fsync: Callable[[str], None] = lambda name: None) -> None:
    """Log every write (with the first record index it carries) and every fsync start and end, in order."""
    real_write, real_fdatasync, real_fsync = os.write, os.fdatasync, os.fsync

    def write(fd: int, data: Any) -> int:
        name = _name(fd)
        written = real_write(fd, data)
        if name.endswith(".wal") and len(data) >= RECORD_HEADER.size:
            events.append(("write", name, RECORD_HEADER.unpack_from(data)[3]))
        return written

    def syncing(real: Callable[[int], None]) -> Callable[[int], None]:
        def wrapper(fd: int) -> None:
            name = _name(fd)
            events.append(("fsync-start", name))
            before_fsync(name)
            real(fd)
            events.append(("fsync-end", name))
        return wrapper

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fdatasync", syncing(real_fdatasync))
    monkeypatch.setattr(os, "fsync", syncing(real_fsync))


def _released(events: list[Event], turn: int, future: asyncio.Future[bool], ok: bool) -> None:
    events.append(("durable", turn, ok))
    future.set_result(ok)


def _note(results: list[tuple[int, bool]], turn: int, ok: bool) -> None:
    results.append((turn, ok))


def test_always_releases_a_turn_only_after_an_fsync_that_started_after_its_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[Event] = []

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="always")
        await log.settle()
        _record_io(monkeypatch, events)
        turns: list[asyncio.Future[bool]] = []
        firsts: list[int] = []
        for turn in range(8):
            refs = [log.append(packet(turn * 10 + i), 1) for i in range(turn + 1)]
            firsts.append(refs[0] & 0xFFFFFFFF)
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            log.when_durable(partial(_released, events, turn, future))
            turns.append(future)
            await asyncio.sleep(0)  # a new loop turn: the flush of this one runs first
        assert all(await asyncio.gather(*turns))
        await log.close()
        for turn, first in enumerate(firsts):
            wrote = events.index(next(e for e in events if e[0] == "write" and e[2] == first))
            released = events.index(("durable", turn, True))
            name = events[wrote][1]
            starts = [i for i in range(wrote + 1, released) if events[i] == ("fsync-start", name)]
            assert starts, f"turn {turn} released without an fsync that started after its write"
            assert ("fsync-end", name) in events[starts[0] + 1:released]

    run(scenario())


def test_always_group_commits_every_turn_written_during_an_fsync(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[Event] = []
    gate = threading.Event()
    blocked = threading.Event()

    def hold_first_segment_fsync(name: str) -> None:
        if name.endswith(".wal") and not blocked.is_set():
            blocked.set()
            gate.wait(30)

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="always")
        await log.settle()
        _record_io(monkeypatch, events, hold_first_segment_fsync)
        results: list[tuple[int, bool]] = []
        loop = asyncio.get_running_loop()
        first: asyncio.Future[bool] = loop.create_future()
        log.append(packet(0), 1)
        log.when_durable(first.set_result)
        await asyncio.sleep(0)  # turn 0 written; its fsync starts and blocks in the fsync thread
        for turn in range(1, 6):
            for i in range(100):
                log.append(packet(turn * 1000 + i), 1)
                log.when_durable(partial(_note, results, turn))
            await asyncio.sleep(0)
        assert results == [] and not first.done()  # nothing released while the fsync covering it runs
        gate.set()
        assert await first
        assert await durable(log)
        assert sorted(set(results)) == [(turn, True) for turn in range(1, 6)] and len(results) == 500
        segment_fsyncs = [e for e in events if e[0] == "fsync-start" and e[1].endswith(".wal")]
        assert len(segment_fsyncs) == 2  # turn 0's, then one for the 500 packets of turns 1-5
        assert log.stats.fsyncs == 2
        await log.close()

    run(scenario())


def test_interval_answers_after_the_write_and_fsyncs_soon_after(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[Event] = []

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="interval", sync_interval=0.05)
        await log.settle()
        loop = asyncio.get_running_loop()
        synced: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not synced.done():
                synced.set_result(None)

        def notice(name: str) -> None:
            if name.endswith(".wal"):
                loop.call_soon_threadsafe(settle)

        _record_io(monkeypatch, events, notice)
        _, ok = await append_turn(log, [packet(i) for i in range(10)])
        assert ok
        assert not any(e[0] == "fsync-start" for e in events)  # released after the write alone
        events.append(("released",))
        await synced  # within sync_interval (no timing asserted: the round does come by itself)
        assert events.index(("released",)) < events.index(next(e for e in events if e[0] == "fsync-start"))
        await append_turn(log, [packet(i) for i in range(10, 20)])
        await log.close()
        last_write = max(i for i, e in enumerate(events) if e[0] == "write")
        assert any(e[0] == "fsync-end" and e[1].endswith(".wal") for e in events[last_write:])  # close syncs

    run(scenario())


def test_none_never_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[Event] = []
    _record_io(monkeypatch, events)

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none", segment_bytes=4096)
        for turn in range(10):
            refs, ok = await append_turn(log, [packet(turn * 10 + i, 200) for i in range(10)])
            assert ok
            for ref in refs:
                log.ack(ref)
            await log.settle()
        await log.close()

    run(scenario())
    assert [e for e in events if e[0].startswith("fsync")] == []
    assert any(e[0] == "write" for e in events)


def test_a_failed_fsync_answers_failure_and_the_log_recovers_by_itself(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    failing = threading.Event()

    def fdatasync(fd: int) -> None:
        if failing.is_set() and _name(fd).endswith(".wal"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="always", retry_interval=0.01)
        await log.settle()
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        assert (await append_turn(log, [packet(i) for i in range(5)]))[1]
        failing.set()
        assert not (await append_turn(log, [packet(i) for i in range(5, 10)]))[1]
        assert not log.available and log.unavailable_reason.startswith("fsync failed: EIO")
        assert log.stats.write_errors >= 1
        failing.clear()
        await log.wait_available()  # the probe (new segment, write, fsync) succeeded
        assert (await append_turn(log, [packet(i) for i in range(10, 15)]))[1]
        await log.close()
        log = await WorkerLog.open(tmp_path, 0, sync="always")
        replayed = await replay_all(log)
        await log.close()
        # what failed was answered failure and left the log: only what was promised replays
        assert [r.raw for r in replayed] == [packet(i) for i in (*range(5), *range(10, 15))]

    run(scenario())


def test_always_releases_a_turn_without_waiting_for_a_backlog_of_acknowledgement_fsyncs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (review of issue 11): with ``sync = always`` an fsync round used to fdatasync every dirty
    ``.ack`` sidecar too, one after the other, before it released its turns, so a backlog of sidecars
    (hundreds during a replay) delayed every 202. Acknowledgements only cost duplicates when lost: a turn
    waits for one fsync of its segment, never for the sidecars.

    The disk is slow for sidecars only: an ``.ack`` fdatasync blocks until the probe packet's callback has
    run (at most ``ACK_STALL`` seconds, after which every sidecar fsync goes through at once). The test
    asserts the order of the fsyncs and the callback, never a duration."""
    segments = 200
    ack_stall = 10.0
    events: list[Event] = []
    released = threading.Event()
    stall_until: list[float] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        name = _name(fd)
        if name.endswith(".ack"):
            events.append(("ack-fsync-start", name))
            released.wait(max(0.0, stall_until[0] - time.monotonic()))  # a slow disk, for sidecars only
            real(fd)
            events.append(("ack-fsync-end", name))
        else:
            real(fd)
            if name.endswith(".wal"):
                events.append(("segment-fsync-end", name))

    def on_durable(future: asyncio.Future[bool], ok: bool) -> None:
        events.append(("durable", ok))
        released.set()
        future.set_result(ok)

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="always", sync_interval=0.01,
                                   segment_bytes=SEGMENT_HEADER.size + 1)  # one segment per turn
        await log.settle()
        refs: list[int] = []
        for turn in range(segments):  # two packets per segment: one is acknowledged, one stays pending
            turn_refs, ok = await append_turn(log, [packet(2 * turn), packet(2 * turn + 1)])
            assert ok
            refs.append(turn_refs[0])
            await log.settle()  # the spare is ready: the next turn rolls to it
        assert log.stats.segments >= segments
        stall_until.append(time.monotonic() + ack_stall)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        for ref in refs:  # one DONE mark in each segment's sidecar: `segments` dirty .ack files
            log.ack(ref)
        await durable(log)  # the acks are written (a turn without records has no fsync to wait for)
        loop = asyncio.get_running_loop()
        probe: asyncio.Future[bool] = loop.create_future()
        events.append(("append",))
        log.append(packet(10_000), 1)
        log.when_durable(partial(on_durable, probe))
        assert await asyncio.wait_for(probe, 60)
        at = events.index(("durable", True))
        before = events[events.index(("append",)):at]
        acks_before = [e for e in before if e[0] == "ack-fsync-end"]
        assert not acks_before, (f"the sync=always callback waited for {len(acks_before)} acknowledgement "
                                 f"fsyncs (of {segments} dirty sidecars)")
        assert len([e for e in before if e[0] == "segment-fsync-end"]) == 1, before
        await log.close()  # the sidecars are still fsynced, in rounds of their own
        synced = {e[1] for e in events if e[0] == "ack-fsync-end"}
        assert len(synced) >= segments, f"only {len(synced)} sidecars fsynced"

    run(scenario())
