"""A worker's write-ahead log at start: open its slot, adopt orphaned slots, replay what was not delivered.

The order, which the README documents:

1. the worker opens its slot's log (``wal.dir/worker-<slot>/``); a directory still
   locked by a process that has not exited yet is retried until it is free (the
   supervisor's boot timeout bounds the wait);
2. it adopts the directories of slots above the current worker count (after
   ``workers`` shrank), slot ``s`` going to worker ``s % workers``; a directory
   still locked (its old worker has not exited yet) is tried again every
   ``ADOPT_RETRY`` seconds until it is adopted, and counted meanwhile;
3. it starts listening: new packets are answered at once, within the usual
   limits, while replay streams the old ones into the queues as room appears.
   Replay fills the worker's queues up to ``REPLAY_FILL`` of
   ``queue.worker_max_bytes`` and no further, so it never holds more than the
   queue bound in memory (the rest stays on disk) and new packets always find
   the rest of the room; they are shed only at the overload watermarks above it.

Replayed packets are routed by the current analyzers and weights and counted as
routed, like new ones; the log counts them as replayed, and as possible
duplicates when they had been handed to an analyzer before the crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from distributor.config import WalConfig
from distributor.wal.log import WorkerLog, slots_on_disk
from distributor.wal.replay import Replayed
from distributor.wal.segment import WalLocked

log = logging.getLogger("distributor.recovery")

REPLAY_FILL = 0.5  # of queue.worker_max_bytes: replay leaves the other half to new packets
ROOM_POLL = 0.05  # seconds between looks for room while replay waits for the queues to drain
LOCK_RETRY = 0.2
ADOPT_RETRY = 1.0


class Placer(Protocol):
    """The ingest app, as replay sees it."""

    def place(self, raw: bytes, messages: int, ref: int) -> bool:
        """Route and enqueue an accepted packet; False when no analyzer has room now."""

    @property
    def queued_bytes(self) -> int: ...


async def open_log(config: WalConfig, slot: int, workers: int) -> tuple[WorkerLog, list[int]]:
    """Open this slot's log, waiting for a predecessor that still holds it, and adopt orphaned slots.

    Returns the log and the orphaned slots still locked by a live process (for ``Replay`` to retry).
    """
    warned = False
    while True:
        try:
            wal = await WorkerLog.open(config.dir, slot, sync=config.sync, sync_interval=config.sync_interval,
                                       segment_bytes=config.segment_bytes, max_bytes=config.max_bytes)
            break
        except WalLocked:
            if not warned:
                log.warning("worker %d: write-ahead log %s/worker-%d is still locked by another process; waiting",
                            slot, config.dir, slot, extra={"event": "wal_locked"})
                warned = True
            await asyncio.sleep(LOCK_RETRY)
    orphans = [orphan for orphan in slots_on_disk(config.dir) if orphan >= workers and orphan % workers == slot]
    return wal, await adopt(wal, orphans)


async def adopt(wal: WorkerLog, orphans: list[int]) -> list[int]:
    """Adopt what can be adopted; return the slots a live process still holds."""
    locked = []
    for orphan in orphans:
        try:
            adopted = await wal.adopt(orphan)
        except WalLocked:
            locked.append(orphan)
            continue
        if adopted:
            log.info("worker %d: adopted %d segments of worker-%d (workers shrank)", wal.slot, adopted, orphan,
                     extra={"event": "wal_adopted", "segments": adopted})
    wal.stats.orphan_slots = len(locked)
    if locked:
        log.warning("worker %d: worker-%s still held by a live process; trying again every %.0f s", wal.slot,
                    ",".join(map(str, locked)), ADOPT_RETRY, extra={"event": "wal_adopt_locked"})
    return locked


class Replay:
    """Streams the log's undelivered packets into the queues as room appears, until done or cancelled."""

    def __init__(self, wal: WorkerLog, app: Placer, worker_max_bytes: int, orphans: list[int]) -> None:
        self._wal = wal
        self._app = app
        self._fill = int(worker_max_bytes * REPLAY_FILL)
        self._orphans = orphans  # still locked by a live process: adopted as soon as it lets go

    async def run(self) -> None:
        while True:
            await self._replay()
            if not self._orphans:
                return
            await asyncio.sleep(ADOPT_RETRY)
            self._orphans = await adopt(self._wal, self._orphans)

    async def _replay(self) -> None:
        wal, app = self._wal, self._app
        if wal.replay_finished:
            return
        log.info("replaying undelivered packets from the write-ahead log (%d bytes to read)",
                 wal.stats.replay_remaining_bytes, extra={"event": "wal_replay_started"})
        pending: deque[Replayed] = deque()
        while True:
            if not pending:
                room = self._fill - app.queued_bytes
                if room <= 0:
                    await asyncio.sleep(ROOM_POLL)
                    continue
                batch = await wal.replay_batch(room)
                if not batch:
                    break
                pending.extend(batch)
            while pending and app.place(pending[0].raw, pending[0].messages, pending[0].ref):
                pending.popleft()
            if pending:  # no analyzer has room: wait for the queues to drain
                await asyncio.sleep(ROOM_POLL)
        stats = wal.stats
        log.info("replay finished: %d packets replayed, %d possible duplicates, %d corrupt records skipped",
                 stats.replayed_packets, stats.possible_duplicates, stats.corrupt_records,
                 extra={"event": "wal_replay_finished", "replayed": stats.replayed_packets,
                        "possible_duplicates": stats.possible_duplicates})
