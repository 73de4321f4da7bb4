"""A log's segments over time: the active one, a spare made ahead, rolling, retiring finished ones, probing after a fault.

Runs on the event loop; the file work (creating, deleting, setting aside, probing) goes to the
log's I/O thread and comes back as loop callbacks, after which ``on_change`` tells the log to
recheck its availability (and to roll, between turns). The spare segment is created as soon as
a segment becomes active, so a roll is a pointer swap on the loop, never a wait on the disk.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from concurrent.futures import Executor
from functools import partial
from pathlib import Path
from typing import Any, Callable

from distributor.wal.format import SEGMENT_HEADER, segment_name
from distributor.wal.segment import (
    DataFile,
    Segment,
    SlotDir,
    Survey,
    create_segment,
    delete_segment,
    make_reserve,
    set_aside_segment,
    write_all,
)
from distributor.wal.stats import WalStats

log = logging.getLogger("distributor.wal")

PROBE_BYTES = 64 << 10


def probe_segment(path: Path, slot: int, segment_id: int, sync: bool) -> tuple[int, int, int]:
    """A new segment, proven writable: a probe write cut back again (fsynced with ``sync``)."""
    fd, ack_fd, created_ns = create_segment(path, slot, segment_id, sync)
    try:
        write_all(fd, bytes(PROBE_BYTES))
        os.ftruncate(fd, SEGMENT_HEADER.size)
        if sync:
            os.fdatasync(fd)
    except OSError:
        os.close(fd)
        os.close(ack_fd)
        delete_segment(path, segment_id)
        raise
    make_reserve(path)  # there is room again: put the reserve back before anything else fills it
    return fd, ack_fd, created_ns


def describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name} {exc.strerror or exc}".strip()


class Rotation:
    """Owns every segment a log holds (its own slot's and adopted ones) and the file jobs on them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, io: Executor, own: SlotDir, stats: WalStats, sync: bool,
                 segment_bytes: int, max_bytes: int, retry_interval: float, on_change: Callable[[], None]) -> None:
        self._loop = loop
        self._io = io
        self.own = own
        self._stats = stats
        self._sync = sync
        self._segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self._retry_interval = retry_interval
        self._on_change = on_change
        self.adopted: list[SlotDir] = []
        self.handles: dict[int, Segment] = {}  # what refs name
        self._next_handle = 1
        self.next_id = 0
        self.active: Segment | None = None
        self._spare: Segment | None = None
        self._creating = False
        self._spare_retry_at = 0.0
        self.fault: str | None = None  # a failed write or fsync; cleared by a successful probe
        self._probe_timer: asyncio.TimerHandle | None = None
        self._probing = False
        self._jobs: set[asyncio.Future[Any]] = set()
        self.closed = False

    # --- taking segments -----------------------------------------------------------------------

    def take(self, home: SlotDir, found: Survey) -> list[Segment]:
        """Book the segments a survey found (not yet replayed); returned in replay order."""
        self._stats.set_aside += found.set_aside
        self._stats.damaged_acks += found.damaged_acks
        taken = []
        for entry in found.segments:
            segment = self._new_segment(home, entry.id, entry.size, entry.created_ns, entry.ack_fd)
            segment.flags = entry.acks.flags
            segment.ack_damaged = entry.acks.damaged
            segment.scanned = False
            segment.sealed = True
            taken.append(segment)
        if home is not self.own:
            if home.held:
                self.adopted.append(home)
            else:
                home.unlock()
        return taken

    def _new_segment(self, home: SlotDir, segment_id: int, size: int, created_ns: int, ack_fd: int) -> Segment:
        segment = Segment(self._next_handle, home, segment_id, 0, created_ns, DataFile(ack_fd))
        self._next_handle += 1
        self.handles[segment.handle] = segment
        home.held += 1
        self._stats.segments += 1
        self.grew(segment, size)
        return segment

    def grew(self, segment: Segment, size: int) -> None:
        segment.size += size
        self._stats.bytes += size
        if segment.home is self.own:
            self._stats.own_bytes += size

    @property
    def full(self) -> bool:
        return self._stats.own_bytes >= self.max_bytes

    # --- the active segment and the spare ------------------------------------------------------

    async def start(self) -> None:
        """Create the first segment of this process (a disk fault only makes the log unavailable)."""
        segment_id = self._take_id()
        try:
            fd, ack_fd, created_ns = await self._loop.run_in_executor(
                self._io, create_segment, self.own.path, self.own.slot, segment_id, self._sync)
        except OSError as exc:
            self._stats.write_errors += 1
            self.fail(f"cannot create a segment: {describe(exc)}")
            return
        self._activate(segment_id, fd, ack_fd, created_ns)

    def _take_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _activate(self, segment_id: int, fd: int, ack_fd: int, created_ns: int) -> None:
        segment = self._new_segment(self.own, segment_id, SEGMENT_HEADER.size, created_ns, ack_fd)
        segment.file = DataFile(fd)
        self.active = segment
        self._create_spare()

    def _create_spare(self) -> None:
        if self._creating or self._spare is not None or self.closed or self._loop.time() < self._spare_retry_at:
            return
        self._creating = True
        segment_id = self._take_id()
        self._submit(create_segment, (self.own.path, self.own.slot, segment_id, self._sync),
                     partial(self._spare_created, segment_id))

    def _spare_created(self, segment_id: int, future: asyncio.Future[tuple[int, int, int]]) -> None:
        self._creating = False
        try:
            fd, ack_fd, created_ns = future.result()
        except OSError as exc:  # the active segment grows past segment_bytes meanwhile
            self._stats.write_errors += 1
            self._spare_retry_at = self._loop.time() + self._retry_interval
            log.error("write-ahead log: cannot create a segment: %s", describe(exc))
            return
        segment = self._new_segment(self.own, segment_id, SEGMENT_HEADER.size, created_ns, ack_fd)
        segment.file = DataFile(fd)
        self._spare = segment
        if self.closed:
            self.seal(segment)
        self._on_change()

    def maybe_roll(self) -> None:
        """Make the spare active if the active segment is due (full size, or the log full). Between turns only."""
        active = self.active
        if active is None or not (active.size >= self._segment_bytes or (self.full and active.records)):
            return
        if self._spare is None:
            self._create_spare()
            return
        self.active, self._spare = self._spare, None
        self.seal(active)
        self._create_spare()

    def abandon(self, reason: str) -> None:
        """The active segment failed: no more writes to it; unavailable until a probe succeeds."""
        self.fail(reason)
        active, self.active = self.active, None
        if active is not None:
            self.seal(active)

    def seal(self, segment: Segment) -> None:
        """No more writes to ``segment``: its descriptor closes after its last fsync; deleted once finished."""
        segment.sealed = True
        if segment.file is not None:
            segment.file.close_when_idle()
        self.maybe_retire(segment)

    # --- finished segments ---------------------------------------------------------------------

    def scanned(self, segment: Segment, cut: int) -> None:
        """Replay read ``segment`` to its end (and cut ``cut`` bytes of torn tail)."""
        self.grew(segment, -cut)
        self.maybe_retire(segment)
        self._on_change()

    def maybe_retire(self, segment: Segment) -> None:
        if segment.sealed and segment.scanned and not segment.pending and not segment.retiring:
            self._retire(segment)

    def _retire(self, segment: Segment) -> None:
        """Delete a finished segment (set it aside if damage was found in it), in the I/O thread."""
        segment.retiring = True
        del self.handles[segment.handle]
        for file in (segment.file, segment.ack):
            if file is not None:
                file.dirty = False  # a file about to go needs no fsync
                file.close_when_idle()
        self._remove(segment)

    def _remove(self, segment: Segment) -> None:
        self._stats.segments -= 1
        size = segment.size
        self.grew(segment, -size)
        job = set_aside_segment if segment.corrupt else delete_segment
        self._submit(job, (segment.home.path, segment.id), partial(self._retired, segment, size))

    def _retired(self, segment: Segment, size: int, future: asyncio.Future[None]) -> None:
        error = future.exception()
        name = segment_name(segment.id)
        if error is not None:
            # still on disk: counted again (bytes toward max_bytes, segments) and tried again later
            self._stats.write_errors += 1
            self._stats.segments += 1
            self.grew(segment, size)
            log.error("write-ahead log: cannot remove %s: %s; trying again in %.0f s", segment.home.path / name,
                      error, self._retry_interval, extra={"event": "wal_remove_failed"})
            if not self.closed:
                self._loop.call_later(self._retry_interval, self._remove, segment)
            self._on_change()
            return
        if segment.corrupt:
            self._stats.set_aside += 1
            log.error("write-ahead log: damaged segment %s set aside as %s.corrupt-*", segment.home.path / name, name,
                      extra={"event": "wal_set_aside"})
        home = segment.home
        home.held -= 1
        if home is not self.own and not home.held:
            home.unlock()
            self.adopted.remove(home)
        if self.fault is not None and self._probe_timer is not None:  # space was freed: probe now
            self._probe_timer.cancel()
            self._probe_timer = None
            self._schedule_probe(0)
        self._on_change()

    # --- faults --------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        if self.fault is None:
            log.error("write-ahead log of worker %d unavailable: %s", self.own.slot, reason,
                      extra={"event": "wal_unavailable", "reason": reason})
        self.fault = reason
        self._schedule_probe(self._retry_interval)

    def _schedule_probe(self, delay: float) -> None:
        if self._probe_timer is None and not self._probing and not self.closed:
            self._probe_timer = self._loop.call_later(delay, self._probe)

    def _probe(self) -> None:
        self._probe_timer = None
        if self.fault is None or self._probing or self.closed:
            return
        self._probing = True
        segment_id = self._take_id()
        self._submit(probe_segment, (self.own.path, self.own.slot, segment_id, self._sync),
                     partial(self._probed, segment_id))

    def _probed(self, segment_id: int, future: asyncio.Future[tuple[int, int, int]]) -> None:
        self._probing = False
        try:
            fd, ack_fd, created_ns = future.result()
        except OSError:
            self._schedule_probe(self._retry_interval)
            return
        if self.closed or self.active is not None:
            os.close(fd)
            os.close(ack_fd)
            return
        log.warning("write-ahead log of worker %d available again (was: %s)", self.own.slot, self.fault,
                    extra={"event": "wal_available"})
        self.fault = None
        self._activate(segment_id, fd, ack_fd, created_ns)
        self._on_change()

    # --- jobs and the end ----------------------------------------------------------------------

    def _submit(self, job: Callable[..., Any], args: tuple[Any, ...], done: Callable[[asyncio.Future[Any]], None]) -> None:
        future = self._loop.run_in_executor(self._io, job, *args)
        self._jobs.add(future)
        future.add_done_callback(self._jobs.discard)
        future.add_done_callback(done)

    async def settle(self) -> None:
        """Wait for the file jobs in flight; their effects (space freed, locks released) are then visible."""
        while self._jobs:
            await asyncio.wait(list(self._jobs))

    async def close(self) -> None:
        """Stop creating and probing, finish the jobs in flight, close every descriptor and lock."""
        self.closed = True
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        await self.settle()
        for segment in self.handles.values():
            for file in (segment.file, segment.ack):
                if file is not None:
                    file.close_when_idle()
        for home in [self.own, *self.adopted]:
            home.unlock()

    def oldest_unacked_ms(self) -> int | None:
        times = [found for segment in self.handles.values() if (found := segment.oldest_unacked_ms()) is not None]
        return min(times, default=None)
