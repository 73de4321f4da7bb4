"""When a loop turn's writes count as durable: the sync modes, fsync rounds in a thread, group commit.

``none``: a turn's callbacks run right after its write (in the OS: survives any process crash,
not a power loss). ``interval``: the same, and an fsync round starts at most ``sync_interval``
after the write (a power loss loses at most that window plus the round's own fsync time).
``always``: callbacks wait for an fsync round that *started after* their write; one round covers
every turn written before it started, turns written while it runs wait for the next one (group
commit: never one fsync per packet). Segment rounds run one at a time in a dedicated thread, so
the event loop never waits on the disk. Acknowledgement sidecars are fsynced at most every
``sync_interval`` in rounds of their own, in a second thread: losing acks only makes duplicates,
never a loss, so a backlog of sidecars (hundreds during a replay) never delays a 202.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable

from distributor.wal.segment import DataFile, Segment
from distributor.wal.stats import WalStats

log = logging.getLogger("distributor.wal")

Callback = Callable[[bool], None]


class Turn:
    """One loop turn's write: the callbacks waiting on it and the records it appended (to void on failure)."""

    __slots__ = ("callbacks", "segment", "first", "end")

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks
        self.segment: Segment | None = None
        self.first = 0
        self.end = 0


def fire(callbacks: list[Callback], ok: bool) -> None:
    """Run every callback; one that raises is logged and does not keep the others waiting."""
    for callback in callbacks:
        try:
            callback(ok)
        except Exception:
            log.exception("write-ahead log: a durability callback raised")


def _fsync_all(fds: list[int]) -> float:
    started = time.perf_counter()
    for fd in fds:
        os.fdatasync(fd)
    return time.perf_counter() - started


class Durability:
    """Tracks files written since their last fsync and releases turns by the sync mode's promise."""

    def __init__(self, loop: asyncio.AbstractEventLoop, mode: str, interval: float, stats: WalStats,
                 on_failure: Callable[[list[Turn], OSError], None]) -> None:
        self._loop = loop
        self._mode = mode
        self._interval = interval
        self._stats = stats
        self._on_failure = on_failure
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wal-fsync")
        self._ack_pool = ThreadPoolExecutor(1, thread_name_prefix="wal-fsync-acks")
        self._segments: list[DataFile] = []  # written since their last round started
        self._acks: list[DataFile] = []
        self._waiting: list[Turn] = []  # always: written, waiting for the next round
        self._round: asyncio.Future[float] | None = None
        self._ack_round: asyncio.Future[float] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None

    def written(self, turn: Turn, segments: list[DataFile], acks: list[DataFile]) -> None:
        """A turn's writes succeeded: release its callbacks now, or after the round that covers them."""
        if self._mode == "none":
            fire(turn.callbacks, True)
            return
        self.dirty(segments, acks)
        if self._mode == "interval" or (turn.segment is None and self._round is None and not self._waiting):
            fire(turn.callbacks, True)  # (always: a turn that appended nothing has nothing to wait for)
        elif turn.callbacks or turn.segment is not None:
            self._waiting.append(turn)
            if self._round is None:
                self._start_round()
        self._arm()

    def dirty(self, segments: list[DataFile], acks: list[DataFile]) -> None:
        if self._mode == "none":
            return
        for files, queue in ((segments, self._segments), (acks, self._acks)):
            for file in files:
                if not file.dirty and file.fd >= 0:
                    file.dirty = True
                    queue.append(file)

    def _arm(self) -> None:
        if self._timer is None and self._round is None and self._segments:
            self._timer = self._loop.call_later(self._interval, self._start_round)
        if self._ack_timer is None and self._ack_round is None and self._acks:
            self._ack_timer = self._loop.call_later(self._interval, self._start_ack_round)

    def _start_ack_round(self) -> None:
        self._ack_timer = None
        files = [file for file in self._acks if file.dirty]  # a retired file needs no fsync
        self._acks = []
        for file in files:
            file.dirty = False
            file.syncing += 1
        self._ack_round = self._loop.run_in_executor(self._ack_pool, _fsync_all, [file.fd for file in files])
        self._ack_round.add_done_callback(partial(self._ack_round_done, files))

    def _ack_round_done(self, files: list[DataFile], future: asyncio.Future[float]) -> None:
        """Acknowledgements that could not be fsynced cost duplicates after a power loss, never a packet."""
        self._ack_round = None
        for file in files:
            file.syncing -= 1
            file.release()
        if future.exception() is not None:
            self._stats.write_errors += 1
            log.error("write-ahead log: fsync of acknowledgement files failed: %s", future.exception(),
                      extra={"event": "wal_ack_fsync_failed"})
        elif files:
            self._stats.fsyncs += 1
            self._stats.fsync_seconds.observe(future.result())
        self._arm()

    def _start_round(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        files = [file for file in self._segments if file.dirty]  # a retired file needs no fsync
        self._segments = []
        for file in files:
            file.dirty = False
            file.syncing += 1
        covered, self._waiting = self._waiting, []
        self._round = self._loop.run_in_executor(self._pool, _fsync_all, [file.fd for file in files])
        self._round.add_done_callback(partial(self._round_done, covered, files))

    def _round_done(self, covered: list[Turn], files: list[DataFile], future: asyncio.Future[float]) -> None:
        self._round = None
        for file in files:
            file.syncing -= 1
            file.release()
        error = future.exception()
        if error is not None:
            # what was written while this round ran cannot be trusted either: after a failed fsync,
            # the next one may succeed although those pages were dropped (PostgreSQL's "fsyncgate")
            covered += self._waiting
            self._waiting = []
            failure = error if isinstance(error, OSError) else OSError(errno.EIO, repr(error))
            self._stats.write_errors += 1
            self._on_failure(covered, failure)
            for turn in covered:
                fire(turn.callbacks, False)
        else:
            if files:
                self._stats.fsyncs += 1
                self._stats.fsync_seconds.observe(future.result())
            for turn in covered:
                fire(turn.callbacks, True)
        if self._waiting:
            self._start_round()
        else:
            self._arm()

    async def close(self) -> None:
        """Wait for the rounds in flight, fsync whatever is still dirty (acks too), stop the threads."""
        while self._round is not None or (self._mode != "none" and (self._segments or self._waiting)):
            if self._round is None:
                self._start_round()
            assert self._round is not None
            await asyncio.wait([self._round])
            await asyncio.sleep(0)  # let _round_done run
        while self._ack_round is not None or (self._mode != "none" and self._acks):
            if self._ack_round is None:
                self._start_ack_round()
            assert self._ack_round is not None
            await asyncio.wait([self._ack_round])
            await asyncio.sleep(0)
        for timer in (self._timer, self._ack_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._ack_timer = None
        self._pool.shutdown(wait=True)
        self._ack_pool.shutdown(wait=True)
