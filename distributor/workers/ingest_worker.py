"""The ingest worker process: one uvloop event loop serving the shared data port.

Started by the supervisor as ``python -m distributor.workers.ingest_worker
--slot N --table NAME`` with the resolved configuration as JSON in the
environment. It binds the data port itself with SO_REUSEPORT (the kernel
spreads connections across workers), reads analyzer definitions and routing
epochs from the shared table, and writes only its own row.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Awaitable

import orjson
import uvloop

from distributor.config import Config, from_dict
from distributor.ingest.http11 import HttpLimits, HttpServer, HttpStats
from distributor.ingest.listener import bind_reuseport
from distributor.ingest.recovery import Replay, open_log
from distributor.ingest.app import IngestApp
from distributor.logs import setup_logging
from distributor.tls import analyzer_context, server_context
from distributor.wal.export import WalExport
from distributor.wal.log import WorkerLog
from distributor.delivery.http_client import HttpClient
from distributor.delivery.routing import NO_ANALYZER, Router
from distributor.delivery.queue import Packet, PacketQueue
from distributor.delivery.sender import AnalyzerSender
from distributor.shared_table import (
    H_MEMORY_PRESSURE,
    C_EJECTION_REPORTS,
    C_FAILOVER_MESSAGES,
    C_FAILOVER_PACKETS,
    C_NET_ROUTED_MESSAGES,
    C_POSSIBLE_DUPLICATES,
    HTTP_STAT_CELLS,
    C_LOST_MESSAGES,
    C_LOST_PACKETS,
    C_QUEUE_BYTES,
    C_QUEUE_MESSAGES,
    C_QUEUE_PACKETS,
    W_BOOTING,
    W_CONNECTIONS,
    W_GENERATION,
    W_HEARTBEAT,
    W_LOOP_LAG,
    W_PID,
    W_QUEUED_BYTES,
    W_QUEUED_PACKETS,
    W_READY,
    W_READY_RSS,
    W_STARTED,
    W_STATE,
    W_STOPPING,
    SharedTable,
)

CONFIG_ENV = "DISTRIBUTOR_WORKER_CONFIG"
HEARTBEAT_INTERVAL = 0.25
BOOT_ERROR_EXIT = 3
log = logging.getLogger("distributor.worker")


class IngestWorker:
    def __init__(self, config: Config, slot: int, table: SharedTable) -> None:
        self.config = config
        self.slot = slot
        self.table = table
        self.ints = table.ints
        self.floats = table.floats
        self.row = table.worker_base(slot)
        self.router = Router(table, slot, config.routing_refresh_interval, self.apply_analyzers)
        self.app = IngestApp(config, self.router, table, slot)
        self.ejected_at: dict[int, int] = {}  # analyzer slot -> its admissions count when this worker ejected it
        self.admissions: dict[int, int] = {}
        self.incarnations: dict[int, int] = {}  # analyzer slot -> the incarnation this worker serves
        self.http_stats = HttpStats()
        self.parent = os.getppid()
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()  # a second SIGTERM: the drain ends now
        self.client: HttpClient | None = None
        self.wal: WorkerLog | None = None
        self.orphans: list[int] = []  # orphaned WAL slots still held by a live process: adopted later
        self.wal_export: WalExport | None = None

    def account_lost_predecessor(self) -> None:
        """Packets left in this slot's queues by a worker that died are counted as lost, not forgotten.

        With the write-ahead log on they are not lost: replay delivers them (what the log could not
        take was answered 503, never 202).
        """
        left_packets = left_messages = 0
        for analyzer in range(self.table.max_analyzers):
            cell = self.table.counter_index(self.slot, analyzer, 0)
            packets, messages = self.ints[cell + C_QUEUE_PACKETS], self.ints[cell + C_QUEUE_MESSAGES]
            left_packets += packets
            left_messages += messages
            if packets and self.wal is None:
                self.ints[cell + C_LOST_PACKETS] += packets
                self.ints[cell + C_LOST_MESSAGES] += messages
            for queue_cell in (C_QUEUE_PACKETS, C_QUEUE_BYTES, C_QUEUE_MESSAGES):
                self.ints[cell + queue_cell] = 0
        if not left_packets:
            return
        if self.wal is None:
            log.error("worker %d: %d packets (%d messages) were lost with the previous worker",
                      self.slot, left_packets, left_messages, extra={"event": "lost_worker_crash"})
        else:
            log.warning("worker %d: the previous worker left %d packets (%d messages) queued; the write-ahead "
                        "log replays them", self.slot, left_packets, left_messages, extra={"event": "wal_inherited"})

    def apply_analyzers(self) -> None:
        """Adopt the table's analyzer set, states and epoch.

        New analyzers get a queue and a sender; a slot with a new incarnation (another analyzer,
        or a new url or mode) keeps its queue and points its sender at the new address, with
        what this worker knew of the old one (ejection, failures) forgotten; an analyzer that can
        no longer be sent to has its queued packets failed over; one readmitted by the supervisor
        since this worker ejected it is usable again.
        """
        generation, rows = self.table.read_analyzers()
        assert self.client is not None
        app = self.app
        for row in rows:
            slot = row.slot
            if self.incarnations.get(slot) != row.incarnation:
                self.incarnations[slot] = row.incarnation
                self.ejected_at.pop(slot, None)
                if app.senders[slot] is not None:
                    app.senders[slot].retarget(row.name, row.url, row.mode, row.compression)  # type: ignore[union-attr]
            elif slot in self.ejected_at and row.admissions > self.ejected_at[slot]:
                del self.ejected_at[slot]
            self.admissions[slot] = row.admissions
            queue = app.queues[slot]
            if queue is None:
                if not row.routable:
                    continue
                cell = self.table.counter_index(self.slot, slot, 0)
                queue = PacketQueue(self.config.queue.max_packets, self.config.queue.max_bytes, self.ints, cell,
                                    app.totals)
                created = AnalyzerSender(
                    slot, row.name, row.url, row.mode, queue, self.config.sender, self.config.outlier,
                    self.client, self.ints, cell, self, self.wal, row.compression,
                )
                created.start()
                app.queues[slot] = queue
                app.senders[slot] = created
            sender = app.senders[slot]
            assert sender is not None
            available = row.deliverable and slot not in self.ejected_at
            was_available, queue.available = queue.available, available
            if available and not was_available:
                sender.readmitted()
            elif was_available and not available:
                sender.abort_inflight()
        self.router.set_analyzers(generation, rows)
        self.ints[self.row + W_GENERATION] = generation
        self.fail_over_unavailable()

    # --- FailoverHost: called by senders ------------------------------------------------------

    def eject(self, slot: int) -> None:
        """Stop using an analyzer in this worker at once and report it; the supervisor ejects it for all."""
        if slot in self.ejected_at:
            return
        self.ejected_at[slot] = self.admissions.get(slot, 0)
        queue = self.app.queues[slot]
        assert queue is not None
        queue.available = False
        sender = self.app.senders[slot]
        assert sender is not None
        sender.abort_inflight()
        sender.consecutive_failures = 0  # a readmission starts counting afresh
        self.ints[self.table.counter_index(self.slot, slot, C_EJECTION_REPORTS)] += 1
        name = sender.name
        log.warning("worker %d: ejecting analyzer %s after %d consecutive send failures", self.slot, name,
                    self.config.outlier.consecutive_failures, extra={"event": "analyzer_ejected", "analyzer": name})
        self.fail_over_queue(slot)

    def fail_over(self, slot: int, packets: list[Packet], ambiguous: bool) -> list[Packet]:
        """Re-route packets away from ``slot``; counters follow them (net routed moves to the new analyzer)."""
        app, ints = self.app, self.ints
        queues = app.queues
        source = self.table.counter_index(self.slot, slot, 0)
        leftover: list[Packet] = []
        for packet in packets:
            raw, messages, ref = packet
            size = len(raw)
            target = self.router.choose(
                messages, lambda s: s != slot and queues[s].has_room(size)  # type: ignore[union-attr]
            )
            if target == NO_ANALYZER:
                leftover.append(packet)
                continue
            app.enqueue(target, raw, messages, ref)
            ints[source + C_NET_ROUTED_MESSAGES] -= messages
            ints[source + C_FAILOVER_PACKETS] += 1
            ints[source + C_FAILOVER_MESSAGES] += messages
            if ambiguous:
                ints[source + C_POSSIBLE_DUPLICATES] += 1
        return leftover

    def fail_over_unavailable(self) -> None:
        for slot, queue in enumerate(self.app.queues):
            if queue is not None and not queue.available and queue.items:
                self.fail_over_queue(slot)

    def fail_over_queue(self, slot: int) -> None:
        queue = self.app.queues[slot]
        assert queue is not None
        leftover = self.fail_over(slot, queue.take_all(), ambiguous=False)
        if leftover:
            queue.put_back(leftover)
        self.app.senders[slot].notify()  # type: ignore[union-attr]  # an emptied queue may make it idle

    async def heartbeat(self) -> None:
        """Stamp liveness from the loop itself, measure loop lag, follow table changes.

        A failure in one beat's work is logged and the beats go on: a dead heartbeat would look
        like a stalled loop and hide the error.
        """
        floats, row = self.floats, self.row
        http_base = {cell: self.ints[row + cell] for cell in HTTP_STAT_CELLS.values()}  # a slot keeps its counters
        delivered_before = self.app.totals.delivered_bytes
        while True:  # until cancelled: a stopping worker stays watched for stalls
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            floats[row + W_LOOP_LAG] = self.app.guard.take_peak()
            floats[row + W_HEARTBEAT] = time.monotonic()
            try:
                delivered_before = self._beat(http_base, delivered_before)
            except Exception:
                log.exception("worker %d: heartbeat work failed; continuing", self.slot,
                              extra={"event": "heartbeat_failed"})

    def _beat(self, http_base: dict[int, int], delivered_before: int) -> int:
        """Publish this worker's gauges, follow the drain rate and the table; returns the delivered bytes seen."""
        ints, row = self.ints, self.row
        stats = self.http_stats
        ints[row + W_CONNECTIONS] = stats.connections_open
        for name, cell in HTTP_STAT_CELLS.items():
            ints[row + cell] = http_base[cell] + getattr(stats, name)
        queues = [q for q in self.app.queues if q is not None]
        ints[row + W_QUEUED_PACKETS] = sum(q.packets for q in queues)
        ints[row + W_QUEUED_BYTES] = sum(q.bytes for q in queues)
        delivered = self.app.totals.delivered_bytes
        rate = (delivered - delivered_before) / HEARTBEAT_INTERVAL
        self.app.drain_rate = rate if self.app.drain_rate == 0 else 0.7 * self.app.drain_rate + 0.3 * rate
        self.app.set_memory_pressure(bool(ints[H_MEMORY_PRESSURE]))
        if self.wal_export is not None:
            self.wal_export.publish()
        if self.table.generation != self.router.generation:
            self.apply_analyzers()
        self.fail_over_unavailable()  # other analyzers may have room now
        if os.getppid() != self.parent and not self.stop.is_set():
            log.error("worker %d: supervisor is gone; shutting down", self.slot)
            self.stop.set()
            if self.wal is not None:
                self.hurry.set()  # what is queued is in the log: the next start delivers it, no drain needed
        return delivered

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        ints, floats, row = self.ints, self.floats, self.row
        ints[row + W_PID] = os.getpid()
        ints[row + W_STATE] = W_BOOTING
        floats[row + W_STARTED] = time.time()
        floats[row + W_HEARTBEAT] = time.monotonic()
        if self.config.wal.dir:
            self.wal, self.orphans = await open_log(self.config.wal, self.slot, self.table.max_workers)
            self.wal_export = WalExport(self.table, self.slot, self.wal)
            self.wal_export.publish()
            self.app.wal = self.wal
        self.account_lost_predecessor()
        sender_config = self.config.sender
        self.client = HttpClient(sender_config.connect_timeout, sender_config.request_timeout,
                                 analyzer_context(self.config.tls), sender_config.max_inflight)
        self.apply_analyzers()
        ingest = self.config.ingest
        limits = HttpLimits(
            max_body_bytes=ingest.max_body_bytes,
            max_header_bytes=ingest.max_header_bytes,
            header_timeout=ingest.header_timeout,
            body_timeout=ingest.body_timeout,
            idle_timeout=ingest.idle_timeout,
            max_connections=ingest.max_connections,
        )
        server = HttpServer(self.app, limits, self.http_stats)
        ints[row + W_READY_RSS] = resident_bytes()  # before the first packet can arrive: the fresh size
        try:
            sock = bind_reuseport(self.config.listen.host, self.config.listen.port)
        except OSError as exc:
            log.error("worker %d: cannot bind %s: %s", self.slot, self.config.listen, exc.strerror)
            await self.client.close()
            return BOOT_ERROR_EXIT
        await server.start(sock, server_context(self.config.tls, verify_clients=True))
        self.app.guard.start()
        ints[row + W_STATE] = W_READY
        heartbeat = asyncio.create_task(self.heartbeat())
        replay = None
        if self.wal is not None:
            replay = asyncio.create_task(Replay(self.wal, self.app, self.config.queue.worker_max_bytes,
                                                self.orphans).run())
        await self.stop.wait()
        ints[row + W_STATE] = W_STOPPING
        if replay is not None:
            replay.cancel()  # what it did not hand out stays in the log for the next start
        deadline = loop.time() + self.config.graceful_timeout
        await self._unless_hurried(server.shutdown(timeout=self.config.graceful_timeout / 2))
        senders = [s for s in self.app.senders if s is not None]
        await asyncio.gather(*(s.drain(max(0.0, deadline - loop.time()), self.hurry) for s in senders))
        if self.wal is not None:
            await self.wal.close()
            self.wal_export.publish()  # type: ignore[union-attr]
        heartbeat.cancel()
        await self.client.close()
        return 0

    def _on_sigterm(self) -> None:
        """The first SIGTERM drains within graceful_timeout; a second one stops now, counting what it drops."""
        if self.stop.is_set():
            log.warning("worker %d: second SIGTERM: stopping now", self.slot)
            self.hurry.set()
        self.stop.set()

    async def _unless_hurried(self, awaitable: Awaitable[None]) -> None:
        task = asyncio.ensure_future(awaitable)
        hurried = asyncio.ensure_future(self.hurry.wait())
        await asyncio.wait({task, hurried}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def resident_bytes() -> int:
    """This process's RSS, as psutil (and the supervisor) read it: resident pages in /proc/self/statm."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distributor-worker")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--table", required=True)
    args = parser.parse_args(argv)
    config = from_dict(orjson.loads(os.environ[CONFIG_ENV]))
    setup_logging(config.log_format, "worker", args.slot)
    table = SharedTable.attach(args.table)
    worker = IngestWorker(config, args.slot, table)
    try:
        return uvloop.run(worker.run())
    finally:
        del worker
        table.close()


if __name__ == "__main__":
    sys.exit(main())
