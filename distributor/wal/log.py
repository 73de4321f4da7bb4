"""The writer of one worker's log: append and acknowledge on the hot path, one write per file per loop turn.

``append`` and ``ack`` only fill in-memory buffers; the first of a loop turn schedules one
``_flush`` (``loop.call_soon``) that writes the turn's records to the active segment with one
write call, then each touched ``.ack`` sidecar with one write call, then releases the turn's
durability callbacks by the sync mode (``durability.py``). Fsyncs, file creation, deletion and
replay reads run in threads; the loop itself only ever calls ``write``.

A failed write cuts the segment back to its last whole record, abandons it (nothing is ever
written after a damaged stretch), answers the turn's callbacks with failure and makes the log
unavailable; a probe (a new segment, a probe write, an fsync) retries every ``retry_interval``,
and at once when deleting finished segments frees space (``rotation.py``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable
from zlib import crc32

from distributor.wal.durability import Callback, Durability, Turn, fire
from distributor.wal.format import ATTEMPTED, DONE, RECORD_CRC_META, RECORD_HEADER, RECORD_MAGIC, SEGMENT_HEADER, \
    encode_ack, segment_name
from distributor.wal.replay import Replayed, Replayer
from distributor.wal.rotation import Rotation, describe
from distributor.wal.segment import (
    TIME_STRIDE,
    DataFile,
    Segment,
    SlotDir,
    Survey,
    WalLocked,
    release_reserve,
    survey,
    write_all,
)
from distributor.wal.stats import WalStats

log = logging.getLogger("distributor.wal")

NO_REF = -1  # "not in the log": ack() and attempted() ignore it
SYNC_MODES = ("none", "interval", "always")
_MASK = 0xFFFFFFFF
_pack_header = RECORD_HEADER.pack
_pack_meta = RECORD_CRC_META.pack


class WalUnavailable(RuntimeError):
    """``append`` while the log is not ``available``: answer 503 ``wal_unavailable`` with Retry-After."""


def slot_path(root: str | os.PathLike[str], slot: int) -> Path:
    return Path(root) / f"worker-{slot}"


def slots_on_disk(root: str | os.PathLike[str]) -> list[int]:
    """Slots with a directory under ``root``: those without a live worker are for ``adopt``."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(int(name[7:]) for name in names if name.startswith("worker-") and name[7:].isdigit())


class WorkerLog:
    """The write-ahead log of one worker slot (plus slots it adopted); use from one event loop thread only.

    Open with ``await WorkerLog.open(...)``. Every method must be called on the loop that opened
    it; callbacks run on that loop. Refs are ints (``handle << 32 | record index``) meaningful
    only to this object; ``NO_REF`` (-1) means "not in the log".
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, io: ThreadPoolExecutor, own: SlotDir, sync: str,
                 sync_interval: float, segment_bytes: int, max_bytes: int, retry_interval: float) -> None:
        self._loop = loop
        self._io = io
        self.path = own.path
        self.slot = own.slot
        self.stats = WalStats()
        self._rotation = Rotation(loop, io, own, self.stats, sync != "none", segment_bytes, max_bytes,
                                  retry_interval, self._changed)
        self._durability = Durability(loop, sync, sync_interval, self.stats, self._sync_failed)
        self._replayer = Replayer(loop, io, self.stats, self._rotation.scanned)
        self._handles = self._rotation.handles
        self._closed = False
        # this loop turn
        self.turns = 0  # numbers the turns: appends with the same number share one write (and callbacks)
        self._flush_handle: asyncio.Handle | None = None
        self._buf = bytearray()  # records for the active segment, written at the end of the turn
        self._turn_first = 0
        self._turn_ms = 0
        self._callbacks: list[Callback] = []
        self._turn_failed = False  # the log failed mid-turn: the turn's appends were dropped
        self._touched: list[Segment] = []
        self._written: asyncio.Future[None] | None = None
        # availability
        self.available = False
        self.unavailable_reason = "starting"
        self._room = 0  # bytes left under max_bytes
        self._available_waiters: list[asyncio.Future[None]] = []

    @classmethod
    async def open(cls, root: str | os.PathLike[str], slot: int, *, sync: str = "interval",
                   sync_interval: float = 0.2, segment_bytes: int = 64 << 20, max_bytes: int = 1 << 30,
                   retry_interval: float = 1.0) -> WorkerLog:
        """Open ``root/worker-<slot>/`` after any crash: survey it, queue its old segments for replay, start a new segment.

        Raises ``WalLocked`` when another live process holds the directory, ``OSError`` when it
        cannot be created, listed or locked. A disk that cannot take a new segment does not fail
        the start: the log opens unavailable and probes until it can.
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}")
        if min(sync_interval, retry_interval) <= 0 or min(segment_bytes, max_bytes) <= SEGMENT_HEADER.size:
            raise ValueError("sync_interval, retry_interval, segment_bytes and max_bytes must be positive")
        loop = asyncio.get_running_loop()
        io = ThreadPoolExecutor(1, thread_name_prefix="wal-io")
        path = slot_path(root, slot)
        try:
            own = await loop.run_in_executor(io, SlotDir, path, slot)
        except BaseException:
            io.shutdown(wait=False)
            raise
        try:
            found = await loop.run_in_executor(io, survey, path, slot)
        except BaseException:
            own.unlock()
            io.shutdown(wait=False)
            raise
        wal = cls(loop, io, own, sync, sync_interval, segment_bytes, max_bytes, retry_interval)
        wal._take(own, found)
        wal._rotation.next_id = found.next_id
        await wal._rotation.start()
        wal._update_available()
        return wal

    async def adopt(self, slot: int) -> int:
        """Take over the segments of another slot's directory (its worker no longer exists) for replay.

        Nothing new is written there; its segments replay after this log's own, their acks go to
        their own sidecars, and its lock is released once its last segment is gone. Returns the
        number of segments adopted. Raises ``WalLocked`` if a live process holds it. Replay then
        goes on with them: call ``replay_batch`` again even if it had returned ``[]``.
        """
        path = slot_path(self.path.parent, slot)
        if not path.is_dir():
            return 0
        home = await self._loop.run_in_executor(self._io, SlotDir, path, slot)
        try:
            found = await self._loop.run_in_executor(self._io, survey, path, slot)
        except BaseException:
            home.unlock()
            raise
        self._take(home, found)
        return len(found.segments)

    def _take(self, home: SlotDir, found: Survey) -> None:
        for segment in self._rotation.take(home, found):
            self._replayer.add(segment)

    # --- the hot path --------------------------------------------------------------------------

    def append(self, raw: bytes, messages: int) -> int:
        """Buffer one packet for this turn's write and return its ref; no syscall.

        Call only while ``available`` (else ``WalUnavailable``). The packet is in the log once a
        ``when_durable`` callback registered in the same turn gets True; on False it is not.
        """
        if not self.available:
            raise WalUnavailable(self.unavailable_reason)
        segment = self._rotation.active
        assert segment is not None
        if self._flush_handle is None:
            self._begin_turn()
        buf = self._buf
        index = segment.records
        if not buf:
            self._turn_first = index
        length = len(raw)
        accepted = self._turn_ms
        crc = crc32(raw, crc32(_pack_meta(length, index, messages, 0, accepted)))
        buf += _pack_header(RECORD_MAGIC, length, crc, index, messages, 0, accepted)
        buf += raw
        if not index % TIME_STRIDE:
            segment.times.append(accepted)
        segment.flags.append(0)
        segment.messages.append(messages)
        segment.records = index + 1
        segment.pending += 1
        stats = self.stats
        stats.unacked_packets += 1
        stats.unacked_messages += messages
        if len(buf) >= self._room:
            self._update_available()
        return segment.handle << 32 | index

    def when_durable(self, callback: Callback) -> None:
        """``callback(ok)`` once everything appended so far in this turn is as durable as the sync mode
        promises: after the write (``none``, ``interval``) or after an fsync that started after it
        (``always``). The turn's acks are written by then too (fsynced within ``sync_interval``).
        ``ok`` False: the write or the fsync failed and the turn's packets are not in the log (their
        refs are void: never ack them): answer 503 ``wal_unavailable``. Never called synchronously.
        """
        self._callbacks.append(callback)
        if self._flush_handle is None:
            self._begin_turn()

    def ack(self, ref: int) -> None:
        """The packet left the log (delivered, or dropped with a counted reason): mark it DONE. Idempotent."""
        segment = self._handles.get(ref >> 32)
        if segment is None:
            return
        index = ref & _MASK
        flags = segment.flags
        if index >= segment.records or flags[index] & DONE:
            return
        flags[index] |= DONE
        segment.pending -= 1
        self.stats.unacked_packets -= 1
        self.stats.unacked_messages -= segment.messages[index]
        if not segment.done_buf and not segment.attempted_buf:
            self._touched.append(segment)
        segment.done_buf.append(index)
        if self._flush_handle is None:
            self._begin_turn()

    async def attempted(self, refs: Iterable[int]) -> None:
        """Mark packets as handed to the wire; returns once that mark is written to the OS.

        Await it *before* posting: a packet replayed after a crash is then flagged as a possible
        duplicate whenever it may have been sent. Marks are batched with the turn's other writes.
        """
        handles = self._handles
        marked = False
        for ref in refs:
            segment = handles.get(ref >> 32)
            if segment is None:
                continue
            index = ref & _MASK
            if index >= segment.records or segment.flags[index]:
                continue
            segment.flags[index] |= ATTEMPTED
            if not segment.done_buf and not segment.attempted_buf:
                self._touched.append(segment)
            segment.attempted_buf.append(index)
            marked = True
        if not marked:
            return
        if self._flush_handle is None:
            self._begin_turn()
        if self._written is None:
            self._written = self._loop.create_future()
        await asyncio.shield(self._written)

    def flush_now(self) -> None:
        """Write this turn's buffers at once (at shutdown) instead of at the end of the turn."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()

    # --- replay --------------------------------------------------------------------------------

    async def replay_batch(self, max_bytes: int) -> list[Replayed]:
        """The next not-DONE packets left by a previous process, up to ``max_bytes`` of them.

        At least one while any remain, ``[]`` once replay is over. Ask again only when there is
        room: what is not asked for stays on disk. One caller at a time. Ack replayed packets
        with their ``ref`` like fresh ones; a segment is deleted once read to its end and all DONE.
        """
        return await self._replayer.batch(max_bytes)

    @property
    def replay_finished(self) -> bool:
        return self._replayer.finished

    # --- state -----------------------------------------------------------------------------

    async def wait_available(self) -> None:
        """Return once the log is available (at once if it is)."""
        if self.available:
            return
        waiter = self._loop.create_future()
        self._available_waiters.append(waiter)
        await waiter

    def oldest_unacked_ms(self) -> int | None:
        """Accepted unix ms of the oldest packet not DONE (segments not yet replayed: their creation time)."""
        return self._rotation.oldest_unacked_ms()

    async def settle(self) -> None:
        """Wait for the file jobs in flight (deletions, segment creation, probes): their effects are then visible."""
        await self._rotation.settle()

    async def close(self) -> None:
        """Write what is buffered, wait for fsyncs (a last one unless ``none``) and file jobs, close everything.

        Replay stops where it is; what it did not hand out stays on disk for the next start.
        """
        if self._closed:
            return
        self.flush_now()
        self._closed = True
        self._update_available()
        await self._durability.close()
        await self._rotation.close()
        self._io.shutdown(wait=True)  # a replay read in flight ends before its descriptor is closed
        self._replayer.close()

    # --- the turn's write ----------------------------------------------------------------------

    def _begin_turn(self) -> None:
        self.turns += 1
        self._flush_handle = self._loop.call_soon(self._flush)
        self._turn_ms = time.time_ns() // 1_000_000

    def _flush(self) -> None:
        self._flush_handle = None
        turn = Turn(self._callbacks)
        self._callbacks = []
        if self._closed:  # acks after close are dropped: the next start replays those packets
            self._release_writers()
            fire(turn.callbacks, False)
            return
        segments: list[DataFile] = []
        ok, self._turn_failed = not self._turn_failed, False
        buf = self._buf
        if buf:
            self._buf = bytearray()
            segment = self._rotation.active
            assert segment is not None and segment.file is not None
            turn.segment, turn.first, turn.end = segment, self._turn_first, segment.records
            try:
                write_all(segment.file.fd, buf)
            except OSError as exc:
                ok = False
                self._write_failed(segment, exc)
            else:
                self._rotation.grew(segment, len(buf))
                self.stats.bytes_written += len(buf)
                self.stats.appended_packets += turn.end - turn.first
                segments.append(segment.file)
        acks = self._write_acks()
        self._release_writers()
        if ok:
            self._durability.written(turn, segments, acks)
        else:
            self._durability.dirty(segments, acks)
            fire(turn.callbacks, False)
        self._changed()

    def _release_writers(self) -> None:
        """Wake the ``attempted`` callers of this turn: their marks are written (or could not be)."""
        written, self._written = self._written, None
        if written is not None:
            written.set_result(None)

    def _write_acks(self) -> list[DataFile]:
        touched, self._touched = self._touched, []
        written: list[DataFile] = []
        for segment in touched:
            parts = []
            if segment.done_buf:
                parts.append(encode_ack(DONE, segment.done_buf))
                segment.done_buf = []
            if segment.attempted_buf:
                parts.append(encode_ack(ATTEMPTED, segment.attempted_buf))
                segment.attempted_buf = []
            if segment.retiring:
                continue
            try:
                try:
                    write_all(segment.ack.fd, b"".join(parts))
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not release_reserve(self.path):
                        raise
                    write_all(segment.ack.fd, b"".join(parts))  # the reserve's space is for exactly this
            except OSError as exc:  # acks lost only make duplicates after a crash, never a loss
                self.stats.write_errors += 1
                log.error("write-ahead log: cannot write acknowledgements of %s: %s", segment_name(segment.id), exc)
                continue
            self._rotation.maybe_retire(segment)
            if not segment.retiring:
                written.append(segment.ack)
        return written

    def _write_failed(self, segment: Segment, exc: OSError) -> None:
        self.stats.write_errors += 1
        assert segment.file is not None
        try:
            os.ftruncate(segment.file.fd, segment.size)  # no torn record stays; the scan copes if this fails
        except OSError:
            pass
        packets, messages = segment.forget_from(self._turn_first)
        self.stats.unacked_packets -= packets
        self.stats.unacked_messages -= messages
        self._rotation.abandon(f"write failed: {describe(exc)}")

    def _sync_failed(self, covered: list[Turn], exc: OSError) -> None:
        """An fsync failed: its turns' packets were not promised, so they leave the log (DONE); start afresh.

        Packets appended in the current turn are dropped too (their turn answers failure): they
        belong to the segment being abandoned.
        """
        active = self._rotation.active
        if self._buf and active is not None:
            packets, messages = active.forget_from(self._turn_first)
            self.stats.unacked_packets -= packets
            self.stats.unacked_messages -= messages
            self._buf = bytearray()
            self._turn_failed = True
        for turn in covered:
            segment = turn.segment
            if segment is not None and not segment.retiring:
                for index in range(turn.first, min(turn.end, segment.records)):
                    self.ack(segment.handle << 32 | index)
        self._rotation.abandon(f"fsync failed: {describe(exc)}")
        self._update_available()

    def _changed(self) -> None:
        """Segments came or went: roll if due (only between turns: the buffer belongs to the active one), recheck."""
        if not self._buf:
            self._rotation.maybe_roll()
        self._update_available()

    def _update_available(self) -> None:
        rotation = self._rotation
        self._room = rotation.max_bytes - self.stats.own_bytes
        if self._closed:
            reason = "closed"
        elif rotation.fault is not None:
            reason = rotation.fault
        elif rotation.active is None:
            reason = "starting"
        elif len(self._buf) >= self._room:
            reason = "full"
        else:
            reason = ""
        if reason == "full" and self.unavailable_reason != "full":
            log.warning("write-ahead log of worker %d is full (max_bytes %d)", self.slot, rotation.max_bytes,
                        extra={"event": "wal_full"})
        self.available = not reason
        self.unavailable_reason = reason
        if not reason:
            waiters, self._available_waiters = self._available_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


__all__ = ["NO_REF", "SYNC_MODES", "Replayed", "WalLocked", "WalStats", "WalUnavailable", "WorkerLog", "slot_path",
           "slots_on_disk"]
