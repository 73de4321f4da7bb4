"""Replay: the records a previous process left not DONE, streamed back as the caller has room for them.

Segments found at start (the own slot's, then adopted ones) are read in id order, about one MiB
at a time in the log's I/O thread, so the event loop never blocks on the disk and memory holds
at most what the caller asked for plus one chunk: never the whole log (Vector's #26035). Each
record keeps its ref (same segment, same index), so its acknowledgement goes to the old sidecar.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from concurrent.futures import Executor
from typing import Callable, NamedTuple

from distributor.wal.format import ATTEMPTED, DONE, SEGMENT_HEADER, segment_name
from distributor.wal.scan import CHUNK, SegmentScanner
from distributor.wal.segment import Segment
from distributor.wal.stats import WalStats

log = logging.getLogger("distributor.wal")


class Replayed(NamedTuple):
    raw: bytes  # the packet exactly as received
    messages: int
    ref: int  # hand back to ack() / attempted() like a fresh append's ref
    possible_duplicate: bool  # it may have reached an analyzer before the crash


class Replayer:
    """Streams the not-DONE records of the segments given to ``add``, in order, on demand."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Executor, stats: WalStats,
                 on_scanned: Callable[[Segment, int], None], chunk: int = CHUNK) -> None:
        self._loop = loop
        self._pool = pool
        self._stats = stats
        self._on_scanned = on_scanned  # (segment, bytes cut from a torn tail), once a segment is read to its end
        self._chunk = chunk
        self._queue: deque[Segment] = deque()
        self._segment: Segment | None = None
        self._fd = -1
        self._scanner: SegmentScanner | None = None
        self._ready: deque[Replayed] = deque()
        self._busy = False

    def add(self, segment: Segment) -> None:
        self._queue.append(segment)
        self._stats.replay_remaining_bytes += max(0, segment.size - SEGMENT_HEADER.size)

    @property
    def finished(self) -> bool:
        return not self._queue and self._segment is None and not self._ready

    async def batch(self, max_bytes: int) -> list[Replayed]:
        """Up to ``max_bytes`` of packets (always at least one while any remain); ``[]`` when replay is over."""
        if self._busy:
            raise RuntimeError("replay has one reader: await each batch before asking for the next")
        self._busy = True
        try:
            out: list[Replayed] = []
            size = 0
            ready = self._ready
            while True:
                while ready and (not out or size + len(ready[0].raw) <= max_bytes):
                    item = ready.popleft()
                    out.append(item)
                    size += len(item.raw)
                if ready or size >= max_bytes or (self._segment is None and not self._queue):
                    return out
                await self._read_more()
        finally:
            self._busy = False

    async def _read_more(self) -> None:
        if self._scanner is None:
            await self._start_next()
            return
        segment, scanner = self._segment, self._scanner
        assert segment is not None
        before = scanner.pos
        try:
            records = await self._loop.run_in_executor(self._pool, scanner.read)
        except OSError as exc:  # an unreadable stretch: what was read stays replayed, the rest is damage
            log.error("write-ahead log: cannot read %s: %s", segment_name(segment.id), exc)
            scanner.corrupt += 1
            scanner.finished = True
            records = []
        stats = self._stats
        flags = segment.flags
        ref_base = segment.handle << 32
        for record in records:
            index = record.record_index
            segment.know(index, record.messages, record.accepted_ms)
            flag = flags[index]
            if flag & DONE:
                continue
            duplicate = bool(flag & ATTEMPTED) or segment.ack_damaged
            segment.pending += 1
            stats.unacked_packets += 1
            stats.unacked_messages += record.messages
            stats.replayed_packets += 1
            stats.possible_duplicates += duplicate
            self._ready.append(Replayed(record.payload, record.messages, ref_base | index, duplicate))
        stats.replay_remaining_bytes -= max(0, scanner.pos - before)
        if scanner.finished:
            await self._finish(segment, scanner)

    async def _start_next(self) -> None:
        segment = self._queue.popleft()
        path = segment.home.path / segment_name(segment.id)
        try:
            self._fd = await self._loop.run_in_executor(self._pool, os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # deleted by hand since the start: nothing left to replay from it
            log.error("write-ahead log: cannot open %s: %s", path, exc)
            self._stats.replay_remaining_bytes -= max(0, segment.size - SEGMENT_HEADER.size)
            segment.scanned = True
            self._on_scanned(segment, 0)
            return
        self._segment = segment
        self._scanner = SegmentScanner(self._fd, segment.size, self._chunk)

    async def _finish(self, segment: Segment, scanner: SegmentScanner) -> None:
        self.close()
        self._stats.replay_remaining_bytes -= max(0, segment.size - scanner.pos)
        cut = 0
        if scanner.torn_at is not None:
            self._stats.torn_tails += 1
            log.warning("write-ahead log: %s ends in a torn record (a crash mid-write); cut at byte %d",
                        segment_name(segment.id), scanner.torn_at)
            path = segment.home.path / segment_name(segment.id)
            try:
                await self._loop.run_in_executor(self._pool, os.truncate, path, scanner.torn_at)
                cut = segment.size - scanner.torn_at
            except OSError as exc:  # left as is: the next start finds the same tail
                log.error("write-ahead log: cannot cut %s: %s", path, exc)
        if scanner.corrupt:
            self._stats.corrupt_records += scanner.corrupt
            segment.corrupt = True
            log.error("write-ahead log: %d records of %s lost to corruption; it is set aside once the rest is "
                      "delivered", scanner.corrupt, segment_name(segment.id))
        segment.scanned = True
        self._on_scanned(segment, cut)

    def close(self) -> None:
        """Close the segment being read: at its end, or when the log closes."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._segment = None
        self._scanner = None
