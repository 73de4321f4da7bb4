"""Replay streams: a log many times larger than what is asked for comes back in bounded batches."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from distributor.wal.log import WorkerLog
from wal_support import append_turn, durable, number, packet, run

ASKED = 256 << 10


def test_a_large_log_replays_in_bounded_batches_without_reading_it_all_into_memory(tmp_path: Path) -> None:
    big = 600 << 10  # one packet larger than a batch: handed out alone

    async def write() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none", segment_bytes=4 << 20)
        for turn in range(60):
            await append_turn(log, [packet(turn * 50 + i, 8192) for i in range(50)])
            if turn == 30:
                await append_turn(log, [packet(10**6, big)])
        await log.close()

    run(write())
    total = sum(entry.stat().st_size for entry in (tmp_path / "worker-0").glob("*.wal"))
    assert total > 24 << 20

    async def read() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        assert log.stats.replay_remaining_bytes > 24 << 20
        tracemalloc.start()
        try:
            numbers: list[int] = []
            batches = 0
            while batch := await log.replay_batch(ASKED):
                batches += 1
                size = sum(len(item.raw) for item in batch)
                assert size <= ASKED or len(batch) == 1, (size, len(batch))
                numbers += [number(item.raw) for item in batch]
                for item in batch:
                    log.ack(item.ref)
                assert await durable(log)
                del batch
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert numbers == [*range(31 * 50), 10**6, *range(31 * 50, 60 * 50)]
        assert batches >= total // ASKED
        assert peak < 6 << 20, f"replay held {peak} bytes at once for a {total}-byte log"
        assert log.stats.replay_remaining_bytes == 0 and log.stats.replayed_packets == 3001
        await log.settle()
        assert log.stats.unacked_packets == 0
        await log.close()

    run(read())
