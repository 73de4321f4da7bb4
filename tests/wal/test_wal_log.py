"""The writer: round trips, refs across rolls, acknowledgement and deletion, one write per turn, limits."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from distributor.wal.format import SEGMENT_HEADER
from distributor.wal.inspect import verify
from distributor.wal.log import NO_REF, WalLocked, WalUnavailable, WorkerLog, slots_on_disk
from wal_support import append_turn, data_segments, durable, number, packet, replay_all, run, slot_files


def test_round_trip_keeps_every_byte_and_count(tmp_path: Path) -> None:
    packets = [b"", b"{}", packet(1, 10), packet(2, 2048), packet(3, 300_000), bytes(range(256)) * 3]

    async def write() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        assert log.available
        for i, raw in enumerate(packets):
            refs, ok = await append_turn(log, [raw], messages=i + 1)
            assert ok and refs[0] >= 0
        assert log.stats.unacked_packets == len(packets)
        assert log.stats.unacked_messages == sum(range(1, len(packets) + 1))
        await log.close()

    async def read() -> list[tuple[bytes, int, bool]]:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        replayed = await replay_all(log)
        assert log.stats.replayed_packets == len(packets) and log.stats.possible_duplicates == 0
        assert log.stats.unacked_packets == len(packets)
        assert log.replay_finished
        await log.close()
        return [(r.raw, r.messages, r.possible_duplicate) for r in replayed]

    run(write())
    assert run(read()) == [(raw, i + 1, False) for i, raw in enumerate(packets)]


def test_refs_survive_rolls_and_replay_returns_exactly_what_is_not_done(tmp_path: Path) -> None:
    async def write() -> set[int]:
        log = await WorkerLog.open(tmp_path, 0, sync="interval", sync_interval=0.01, segment_bytes=2048)
        refs: dict[int, int] = {}
        for turn in range(40):  # ~30 segments of a few records each
            batch = [packet(turn * 5 + i, 100) for i in range(5)]
            got, ok = await append_turn(log, batch)
            assert ok
            refs.update(zip((number(raw) for raw in batch), got))
            await log.settle()  # the next spare segment exists: a roll is due at once, not when it is ready
        assert len({ref >> 32 for ref in refs.values()}) >= 8  # the refs name many segments
        for n, ref in refs.items():
            if n % 3 == 0:
                log.ack(ref)
        assert await durable(log)
        await log.close()
        return {n for n in refs if n % 3}

    expected = run(write())

    async def read() -> list[int]:
        log = await WorkerLog.open(tmp_path, 0)
        replayed = await replay_all(log)
        await log.close()
        return [number(r.raw) for r in replayed]

    assert run(read()) == sorted(expected)


def test_finished_segments_are_deleted_wal_first_but_never_the_active_one(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    unlinked: list[str] = []
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        unlinked.append(os.path.basename(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none", segment_bytes=1024)
        refs = []
        for turn in range(6):
            got, ok = await append_turn(log, [packet(turn * 4 + i, 300) for i in range(4)])
            refs += got
            await log.settle()
        segments_before = log.stats.segments
        assert segments_before >= 6
        for ref in refs:
            log.ack(ref)
        assert await durable(log)
        await log.close()  # waits for the deletions in flight
        assert log.stats.unacked_packets == 0
        remaining = slot_files(log.path)
        assert [name for name in remaining if name.endswith(".wal")] == \
            sorted(name for name in remaining if name.endswith(".wal"))
        # what remains: the active segment and the spare, each with its sidecar
        assert len([name for name in remaining if name.endswith(".wal")]) == 2
        assert log.stats.segments == 2

    run(scenario())
    deleted = [name for name in unlinked if name.endswith((".wal", ".ack"))]
    assert deleted, "finished segments were deleted"
    for position, name in enumerate(deleted):
        if name.endswith(".ack"):
            assert deleted[position - 1] == name[:-4] + ".wal", deleted  # the .wal goes first


def test_active_segment_stays_when_all_its_records_are_done(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        refs, ok = await append_turn(log, [packet(i) for i in range(10)])
        for ref in refs:
            log.ack(ref)
        assert await durable(log)
        assert len(data_segments(log.path)) == 1
        await log.close()
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        assert await replay_all(log) == []
        await log.close()
        assert data_segments(log.path) == []  # read to its end at the next start, all DONE: deleted

    run(scenario())


def test_attempted_but_not_done_replays_as_possible_duplicate(tmp_path: Path) -> None:
    async def write() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        refs, _ = await append_turn(log, [packet(i) for i in range(10)])
        await log.attempted(refs[:6])  # returns once the marks are written
        await log.attempted(refs[:6])  # again: nothing new to write, returns at once
        for ref in refs[:3]:
            log.ack(ref)
        log.ack(NO_REF)
        await log.attempted([NO_REF])
        assert await durable(log)
        await log.close()

    async def read() -> list[tuple[int, bool]]:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        replayed = await replay_all(log)
        assert log.stats.replayed_packets == 7 and log.stats.possible_duplicates == 3
        for item in replayed:  # acks of replayed packets go to the old segment's sidecar
            log.ack(item.ref)
        assert await durable(log)
        await log.close()
        return [(number(r.raw), r.possible_duplicate) for r in replayed]

    run(write())
    assert run(read()) == [(3, True), (4, True), (5, True), (6, False), (7, False), (8, False), (9, False)]

    async def again() -> int:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        count = len(await replay_all(log))
        await log.close()
        return count

    assert run(again()) == 0


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count os.write/os.writev calls per file suffix (.wal, .ack), from any thread."""
    counts: dict[str, int] = {}

    def counting(real: Callable[..., int]) -> Callable[..., int]:
        def wrapper(fd: int, data: Any) -> int:
            suffix = os.path.splitext(os.readlink(f"/proc/self/fd/{fd}"))[1]
            counts[suffix] = counts.get(suffix, 0) + 1
            return real(fd, data)
        return wrapper

    monkeypatch.setattr(os, "write", counting(os.write))
    monkeypatch.setattr(os, "writev", counting(os.writev))
    return counts


def test_one_write_per_file_per_loop_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        await replay_all(log)
        await log.settle()  # the spare segment is created: no other file is written meanwhile
        counts = _count_writes(monkeypatch)
        refs, ok = await append_turn(log, [packet(i, 2048) for i in range(1000)])
        assert ok
        assert counts == {".wal": 1}
        await log.attempted(refs)
        for ref in refs:
            log.ack(ref)
        assert await durable(log)
        assert counts == {".wal": 1, ".ack": 2}  # the ATTEMPTED marks' turn, then the DONE marks' turn
        await log.close()

    run(scenario())


def test_durability_callbacks_never_run_synchronously(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        results: list[bool] = []
        log.append(packet(1), 1)
        log.when_durable(results.append)
        assert results == []
        assert await durable(log)
        assert results == [True]
        await log.close()

    run(scenario())


def test_full_at_max_bytes_until_acks_delete_a_segment(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none", segment_bytes=4096, max_bytes=20_000)
        refs: list[int] = []
        while log.available:
            got, ok = await append_turn(log, [packet(len(refs), 1000)])
            assert ok
            refs += got
            await log.settle()
        assert log.unavailable_reason == "full"
        assert 15 <= len(refs) <= 20
        assert log.stats.own_bytes >= 20_000
        with pytest.raises(WalUnavailable, match="full"):
            log.append(packet(0), 1)
        waiting = asyncio.ensure_future(log.wait_available())
        for ref in refs[:4]:  # the oldest segment's records
            log.ack(ref)
        await waiting  # the segment is deleted in the I/O thread, then the log has room
        assert log.available and log.stats.own_bytes < 20_000
        assert (await append_turn(log, [packet(99, 1000)]))[1]
        await log.close()

    run(scenario())


def test_full_with_everything_in_the_active_segment_rolls_so_acks_can_free_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none", segment_bytes=1 << 20, max_bytes=10_000)
        refs: list[int] = []
        while log.available:
            refs += (await append_turn(log, [packet(len(refs), 1000)]))[0]
            await log.settle()
        waiting = asyncio.ensure_future(log.wait_available())
        for ref in refs:
            log.ack(ref)
        await waiting
        await log.close()

    run(scenario())


def test_a_second_writer_on_the_same_slot_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 3, sync="none")
        with pytest.raises(WalLocked):
            await WorkerLog.open(tmp_path, 3, sync="none")
        with pytest.raises(WalLocked):
            await log.adopt(3)
        await log.close()
        again = await WorkerLog.open(tmp_path, 3, sync="none")  # the lock went with the first one
        await again.close()

    run(scenario())


def test_adopted_slot_replays_after_own_and_is_released_when_done(tmp_path: Path) -> None:
    async def fill(slot: int, first: int) -> None:
        log = await WorkerLog.open(tmp_path, slot, sync="none")
        await append_turn(log, [packet(first + i) for i in range(5)])
        await log.close()

    run(fill(0, 0))
    run(fill(1, 100))

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        assert slots_on_disk(tmp_path) == [0, 1]
        assert await log.adopt(1) >= 1  # the segment with records (and the spare, if it was ready)
        assert await log.adopt(7) == 0 and not (tmp_path / "worker-7").exists()
        replayed = await replay_all(log)
        assert [number(r.raw) for r in replayed] == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]
        assert log.stats.own_bytes < log.stats.bytes  # adopted bytes are not under this log's max_bytes
        for item in replayed:
            log.ack(item.ref)
        assert await durable(log)
        await log.settle()  # the deletions in the I/O thread are done
        other = await WorkerLog.open(tmp_path, 1, sync="none")  # the adopted directory's lock is released
        assert await replay_all(other) == []
        await other.close()
        await log.close()

    run(scenario())


def test_oldest_unacked_and_stats(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="interval", sync_interval=0.01)
        assert log.oldest_unacked_ms() is None
        refs, _ = await append_turn(log, [packet(i) for i in range(200)], messages=3)
        oldest = log.oldest_unacked_ms()
        assert oldest is not None
        for ref in refs[:150]:
            log.ack(ref)
        assert await durable(log)
        assert log.oldest_unacked_ms() == oldest  # record 150 shares the turn's accepted time
        assert log.stats.unacked_packets == 50 and log.stats.unacked_messages == 150
        assert log.stats.appended_packets == 200
        assert log.stats.bytes == log.stats.own_bytes > 200 * 64
        await log.close()
        assert log.stats.fsyncs >= 1 and log.stats.fsync_seconds.count == log.stats.fsyncs

    run(scenario())


def test_open_validates_its_arguments(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError):
            await WorkerLog.open(tmp_path, 0, sync="sometimes")
        with pytest.raises(ValueError):
            await WorkerLog.open(tmp_path, 0, segment_bytes=0)
        assert not (tmp_path / "worker-0").exists()

    run(scenario())


def test_empty_log_reopens_without_replay(tmp_path: Path) -> None:
    async def scenario() -> None:
        for _ in range(3):
            log = await WorkerLog.open(tmp_path, 0, sync="none")
            assert await replay_all(log) == []
            await log.close()
        # each start's empty segments were read and deleted by the next one
        assert len([name for name in slot_files(tmp_path / "worker-0") if name.endswith(".wal")]) == 2
        assert all(entry.stat().st_size == SEGMENT_HEADER.size for entry in (tmp_path / "worker-0").glob("*.wal"))

    run(scenario())


def test_segments_finishing_creation_mid_turn_never_take_that_turns_records(tmp_path: Path) -> None:
    """Every turn rolls, so spare segments keep arriving from the I/O thread while turns are being filled."""
    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none", segment_bytes=64)
        numbers: list[int] = []
        for turn in range(400):
            batch = [packet(len(numbers) + i, 50) for i in range(1 + turn % 4)]
            numbers += [number(raw) for raw in batch]
            assert (await append_turn(log, batch))[1]
        await log.close()
        assert verify(tmp_path) == []
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        assert [number(r.raw) for r in await replay_all(log)] == numbers
        await log.close()
        assert log.stats.corrupt_records == 0

    run(scenario())
