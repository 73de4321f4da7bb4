"""The senders that drain the per-analyzer queues (``delivery/queue.py``).

Each worker owns one ``PacketQueue`` and one ``AnalyzerSender`` per analyzer.
Senders post batches of whole packets over keep-alive connections; a batch is only taken off
the books when the analyzer answered 2xx (delivered), rejected it with a 4xx
(counted as rejected), or the shutdown deadline passed (counted as dropped, or
left in the write-ahead log for the next start). With the log on, a packet is
marked as attempted before its first post and acknowledged in the log once it
is delivered or rejected. A batch that carries packets sampled for tracing gets a
send span (``distributor/tracing.py``) and a ``traceparent`` header; any other
batch pays one check of the tracing registry.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Protocol

from distributor.config import OutlierConfig, SenderConfig
from distributor.delivery.compression import compressed
from distributor.delivery.http_client import HttpClient, SendError, target
from distributor.delivery.queue import NO_REF, Counters, Packet, PacketQueue, byte_count, message_count
from distributor.logs import RateLimitedLog
from distributor.tracing import SendTrace, sampled, start_send
from distributor.wal.log import WorkerLog
from distributor.shared_table import (
    C_DELIVERED_MESSAGES,
    C_DELIVERED_PACKETS,
    C_FAILED_ATTEMPTS,
    C_REJECTED_MESSAGES,
    C_REJECTED_PACKETS,
    C_RETRIES,
    C_SHUTDOWN_DROPPED_MESSAGES,
    C_SHUTDOWN_DROPPED_PACKETS,
)

log = logging.getLogger("distributor.sender")

RETRY_BUDGET_FLOOR = 3  # retries always allowed on a quiet sender
RETRY_BUDGET_CAP = 10
MAX_ANALYZER_RETRY_AFTER = 30.0  # seconds: the most an analyzer's Retry-After delays a retry
ABORTED = -1  # status of an attempt this worker gave up (abort_inflight), not a failure of the analyzer


class FailoverHost(Protocol):
    """The worker, as seen by a sender: where failing batches go and who ejects."""

    def fail_over(self, slot: int, packets: list[Packet], ambiguous: bool) -> list[Packet]:
        """Re-route packets away from ``slot``; return those no other analyzer could take."""
        ...

    def eject(self, slot: int) -> None: ...


class AnalyzerSender:
    """Ships one analyzer's queue in batches, with up to ``max_inflight`` concurrent requests.

    A failed send is retried here while the analyzer stays available and the
    retry budget (``outlier.retry_budget`` retries per first attempt, like
    Finagle's) allows; otherwise the batch fails over to other analyzers.
    ``outlier.consecutive_failures`` failures in a row eject the analyzer.
    """

    def __init__(
        self,
        slot: int,
        name: str,
        url: str,
        mode: str,
        queue: PacketQueue,
        config: SenderConfig,
        outlier: OutlierConfig,
        client: HttpClient,
        counters: Counters,
        cell: int,
        host: FailoverHost,
        wal: WorkerLog | None = None,
        compression: str = "none",
    ) -> None:
        self.slot = slot
        self.name = name
        self.url = url.rstrip("/")
        self._target = target(self.url)
        self.mode = mode
        self.compression = compression
        self.queue = queue
        self._config = config
        self._outlier = outlier
        self._client = client
        self._counters = counters
        self._cell = cell
        self._host = host
        self._wal = wal
        self._abandoned: list[Packet] = []  # in flight when the shutdown deadline cancelled their batch
        self._wakeup = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(config.max_inflight)
        self._inflight = 0
        self._pending_since = 0.0  # loop time when the queue last went from empty to non-empty
        self._batch_max = config.batch_max_packets if mode == "batch" else 1
        self._linger = config.batch_linger if mode == "batch" else 0.0
        self._dispatcher: asyncio.Task[None] | None = None
        self._shipping: set[asyncio.Task[None]] = set()
        self._posts: set[asyncio.Future[tuple[int, str | None, bool]]] = set()
        self.consecutive_failures = 0
        self._retry_tokens = float(RETRY_BUDGET_FLOOR)
        self._log = RateLimitedLog(log, name)

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch())

    def notify(self) -> None:
        """Called after ``queue.put``, when the analyzer becomes available, or when failover emptied its queue."""
        self._idle.clear()
        queued = len(self.queue.items)
        if queued == 1:
            self._pending_since = asyncio.get_running_loop().time()
        if self._batch_ready():
            self._batch_full.set()
        self._wakeup.set()

    def _batch_ready(self) -> bool:
        """A full batch, or a queue half full: lingering then only brings backpressure closer."""
        queue = self.queue
        return (len(queue.items) >= self._batch_max or queue.bytes >= self._config.batch_max_bytes
                or queue.packets * 2 >= queue.max_packets or queue.bytes * 2 >= queue.max_bytes)

    def retarget(self, name: str, url: str, mode: str, compression: str) -> None:
        """The slot has a new analyzer, or a new url or mode: queued packets go there from the next batch on.

        Requests already in flight finish against the old address; what this sender knew of the
        old analyzer (its consecutive failures) no longer applies.
        """
        self.name = name
        self.url = url.rstrip("/")
        self._target = target(self.url)
        self.mode = mode
        self.compression = compression
        self._batch_max = self._config.batch_max_packets if mode == "batch" else 1
        self._linger = self._config.batch_linger if mode == "batch" else 0.0
        self._log = RateLimitedLog(log, name)
        self.consecutive_failures = 0
        self.notify()

    def readmitted(self) -> None:
        """The analyzer can be sent to again: count failures afresh and send what waited."""
        self.consecutive_failures = 0
        self.notify()

    def abort_inflight(self) -> None:
        """The analyzer went down: give up on its in-flight requests now instead of at request_timeout.

        Each aborted batch fails over as ambiguous (the analyzer may have taken
        it: counted as possible duplicates), like HAProxy's on-marked-down
        shutdown-sessions. Off with ``outlier.abort_inflight_on_down = false``.
        """
        if self._outlier.abort_inflight_on_down:
            for post in list(self._posts):
                post.cancel()

    async def drain(self, timeout: float, hurry: asyncio.Event | None = None) -> int:
        """Deliver what is queued within ``timeout`` (or until ``hurry`` is set); count and return the drops.

        Lingering ends at once: nothing more is coming. Afterwards the queue takes
        no packets (``available`` False), so a late failover cannot strand any here.
        """
        self._linger = 0.0
        self._batch_full.set()
        self._wakeup.set()
        waiters = {asyncio.ensure_future(self._idle.wait())}
        if hurry is not None:
            waiters.add(asyncio.ensure_future(hurry.wait()))
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        tasks = [*self._shipping, *([self._dispatcher] if self._dispatcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.queue.available = False
        left = [*self.queue.items, *self._abandoned]
        kept = sum(1 for packet in left if packet[2] != NO_REF)  # in the write-ahead log: replayed at next start
        if kept:
            log.warning("analyzer %s: %d packets not delivered by the shutdown deadline stay in the write-ahead "
                        "log for the next start", self.name, kept,
                        extra={"event": "left_in_wal", "analyzer": self.name, "packets": kept})
        dropped = [packet for packet in left if packet[2] == NO_REF]
        if dropped:
            messages = message_count(dropped)
            self._counters[self._cell + C_SHUTDOWN_DROPPED_PACKETS] += len(dropped)
            self._counters[self._cell + C_SHUTDOWN_DROPPED_MESSAGES] += messages
            log.error("analyzer %s: %d packets (%d messages) not delivered by the shutdown deadline",
                      self.name, len(dropped), messages,
                      extra={"event": "dropped_shutdown", "analyzer": self.name, "packets": len(dropped),
                             "messages": messages})
        self.queue.discard_all()
        return len(dropped)

    async def _dispatch(self) -> None:
        """Take batches off the queue and ship each in its own task, at most ``max_inflight`` at once.

        A batch leaves when it is full (or the queue half full) or ``batch_linger``
        after its first packet arrived (Kafka's ``linger.ms``): at moderate load that turns one request
        per packet into one per few dozen, which is most of the CPU an analyzer
        and the sender spend. The linger never delays the emitter's 202.
        """
        queue = self.queue
        while True:
            if not queue.items or not queue.available:
                if self._inflight == 0 and not queue.items:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._linger and not self._batch_ready():
                await self._linger_wait()
            await self._slots.acquire()
            if not queue.items or not queue.available:
                self._slots.release()
                continue
            batch = queue.take(self._batch_max, self._config.batch_max_bytes)
            self._inflight += 1
            task = asyncio.create_task(self._ship(batch))
            self._shipping.add(task)
            task.add_done_callback(self._shipping.discard)

    async def _linger_wait(self) -> None:
        """Until the batch is ready or ``batch_linger`` has passed since its first packet."""
        loop = asyncio.get_running_loop()
        deadline = self._pending_since + self._linger
        if deadline <= loop.time():
            return
        self._batch_full.clear()
        timer = loop.call_at(deadline, self._batch_full.set)
        try:
            await self._batch_full.wait()
        finally:
            timer.cancel()

    async def _ship(self, batch: list[Packet]) -> None:
        """Deliver one batch; cancelled at the shutdown deadline, it stays on the books (dropped or kept in the log)."""
        send = start_send(self.name, batch) if sampled else None
        try:
            await self._deliver(batch, send)
        except asyncio.CancelledError:
            self._abandoned.extend(batch)
            if send is not None:
                send.end(())
            raise
        except Exception:  # a bug must never strand a batch: it goes back to the head of the queue
            log.exception("analyzer %s: sending a batch failed unexpectedly; it is queued again", self.name,
                          extra={"event": "send_error", "analyzer": self.name})
            self.queue.requeue(batch)
            batch.clear()
        finally:
            self._inflight -= 1
            self._slots.release()
        if send is not None:
            send.end(batch)  # what _deliver leaves in the batch was delivered or rejected
        self.queue.release(batch)
        if self._inflight == 0 and not self.queue.items:
            self._idle.set()

    def _leave_log(self, batch: list[Packet]) -> None:
        """Delivered or rejected (a counted outcome): the packets leave the write-ahead log."""
        wal = self._wal
        if wal is not None:
            for packet in batch:
                wal.ack(packet[2])

    async def _deliver(self, batch: list[Packet], send: SendTrace | None) -> None:
        """Send until delivered, rejected, or failed over; retries back off with jitter."""
        backoff = self._config.retry_initial_backoff
        counters, cell = self._counters, self._cell
        self._retry_tokens = min(RETRY_BUDGET_CAP, self._retry_tokens + self._outlier.retry_budget)
        if self._wal is not None:  # on disk before it is on the wire: a replay then knows it may be a duplicate
            await self._wal.attempted([packet[2] for packet in batch])
        traceparent = None if send is None else send.traceparent
        while True:
            if len(batch) > 1 and self.mode != "batch":  # retargeted to one packet per request since the batch
                self.queue.requeue(batch[1:])  # was taken: the rest waits its turn instead of being counted
                del batch[1:]  # delivered with the first
                self.notify()
            status, retry_after, ambiguous = await self._attempt(batch, traceparent)
            if send is not None:
                send.attempted(status)
            aborted = status == ABORTED
            if 200 <= status < 300:
                self.consecutive_failures = 0
                counters[cell + C_DELIVERED_PACKETS] += len(batch)
                counters[cell + C_DELIVERED_MESSAGES] += message_count(batch)
                self.queue.totals.delivered_bytes += byte_count(batch)
                self._leave_log(batch)
                return
            if 400 <= status < 500 and status not in (408, 429):
                self.consecutive_failures = 0
                counters[cell + C_REJECTED_PACKETS] += len(batch)
                counters[cell + C_REJECTED_MESSAGES] += message_count(batch)
                self._log.error(f"rejected {len(batch)} packets with HTTP {status}", event="rejected")
                self._leave_log(batch)
                return
            if not aborted:  # we gave it up ourselves: no evidence against the analyzer
                counters[cell + C_FAILED_ATTEMPTS] += 1
                if status:
                    self._log.warning(f"send failed: HTTP {status}")
                self.consecutive_failures += 1
                if self.consecutive_failures >= self._outlier.consecutive_failures:
                    self._host.eject(self.slot)
            if not self.queue.available or self._retry_tokens < 1:
                leftover = self._host.fail_over(self.slot, batch, ambiguous)
                self.queue.shrink(batch, leftover)  # what moved is on other queues' books now
                batch[:] = leftover  # _ship releases what stays here
                if not batch:
                    return
                if not self.queue.available:  # out, and nowhere else has room: wait queued, not on the wire
                    self.queue.requeue(batch)
                    batch.clear()
                    return
            else:
                self._retry_tokens -= 1
                counters[cell + C_RETRIES] += 1
            await asyncio.sleep(_retry_delay(backoff, retry_after))
            backoff = min(backoff * 2, self._config.retry_max_backoff)

    async def _attempt(self, batch: list[Packet], traceparent: str | None) -> tuple[int, str | None, bool]:
        """``_post`` as a future that ``abort_inflight`` can cancel without cancelling the batch (ABORTED)."""
        post = asyncio.ensure_future(self._post(batch, traceparent))
        self._posts.add(post)
        try:
            return await post
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # shutdown cancelled the batch itself
                raise
            self._log.warning("in-flight request aborted: the analyzer is down")
            return ABORTED, None, True
        finally:
            self._posts.discard(post)

    async def _post(self, batch: list[Packet], traceparent: str | None) -> tuple[int, str | None, bool]:
        """(status or 0, Retry-After, whether the analyzer may have taken it despite the failure)."""
        # read once, before any await: a retarget meanwhile (a reload, a re-add) must not label a body
        # compressed one way with another's Content-Encoding, nor send it elsewhere
        mode, compression, to = self.mode, self.compression, self._target
        if mode == "batch":  # NDJSON: the packets as they are, a newline after each but the last
            path = "/ingest/batch"
            body: list[bytes] = []
            for raw, _, _ in batch:
                body.append(raw if b"\n" not in raw else raw.replace(b"\n", b" "))
                body.append(b"\n")
            body.pop()
            headers = b"Content-Type: application/x-ndjson\r\nX-Packet-Count: %d\r\n" % len(batch)
        else:
            path = "/ingest"
            body = [batch[0][0]]
            headers = b"Content-Type: application/json\r\n"
        if compression != "none":
            body = [await compressed(b"".join(body), compression)]
            headers += b"Content-Encoding: %s\r\n" % compression.encode()
        if traceparent is not None:
            headers += b"traceparent: %s\r\n" % traceparent.encode("ascii")
        try:
            answer = await self._client.post(to, path, headers, body)
        except SendError as exc:
            self._log.warning(f"send failed: {exc}")
            return 0, None, exc.ambiguous
        except Exception as exc:  # a bug must not strand the batch: retry or fail it over like any failure
            self._log.error(f"unexpected error while sending: {exc!r}", event="send_error")
            return 0, None, True
        return answer.status, answer.retry_after, False


def _retry_delay(backoff: float, retry_after: str | None) -> float:
    """Full jitter, but never sooner than the analyzer's Retry-After (delay-seconds; capped, so a bogus
    figure cannot park a batch for years; an HTTP-date or anything else is ignored)."""
    delay = random.uniform(0, backoff)
    if retry_after and retry_after.isascii() and retry_after.isdigit():
        delay = max(delay, min(int(retry_after), MAX_ANALYZER_RETRY_AFTER))
    return delay
