"""Per-analyzer bounded queues and the senders that drain them.

Each worker owns one ``PacketQueue`` and one ``AnalyzerSender`` per analyzer.
A queue's limits count packets that are queued *or in flight*, so a worker's
memory for an analyzer is bounded however slow the analyzer is. Senders post
batches of whole packets over keep-alive connections; a batch is only taken off
the books when the analyzer answered 2xx (delivered), rejected it with a 4xx
(counted as rejected), or the shutdown deadline passed (counted as dropped).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import Protocol

import aiohttp

from distributor.config import SenderConfig
from distributor.shared_table import (
    C_DELIVERED_MESSAGES,
    C_DELIVERED_PACKETS,
    C_FAILED_ATTEMPTS,
    C_QUEUE_BYTES,
    C_QUEUE_MESSAGES,
    C_QUEUE_PACKETS,
    C_REJECTED_MESSAGES,
    C_REJECTED_PACKETS,
    C_SHUTDOWN_DROPPED_MESSAGES,
    C_SHUTDOWN_DROPPED_PACKETS,
)

log = logging.getLogger("distributor.sender")

Packet = tuple[bytes, int]  # (raw bytes as received, message count)


class Counters(Protocol):
    """Where a sender records its outcomes: a worker's row of the shared table."""

    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...


class PacketQueue:
    """Bounded FIFO of raw packets for one analyzer in one worker."""

    __slots__ = ("max_packets", "max_bytes", "items", "packets", "bytes", "messages", "_counters", "_cell")

    def __init__(self, max_packets: int, max_bytes: int, counters: Counters, cell: int) -> None:
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.items: deque[Packet] = deque()
        self.packets = 0  # queued + in flight
        self.bytes = 0
        self.messages = 0
        self._counters = counters
        self._cell = cell

    def has_room(self, size: int) -> bool:
        return self.packets < self.max_packets and self.bytes + size <= self.max_bytes

    def put(self, raw: bytes, messages: int) -> None:
        self.items.append((raw, messages))
        self._account(1, len(raw), messages)

    def take(self, max_packets: int, max_bytes: int) -> list[Packet]:
        """Pop a batch (at least one packet) that stays on the books until ``release``."""
        batch = [self.items.popleft()]
        size = len(batch[0][0])
        items = self.items
        while items and len(batch) < max_packets and size + len(items[0][0]) <= max_bytes:
            packet = items.popleft()
            size += len(packet[0])
            batch.append(packet)
        return batch

    def release(self, batch: list[Packet]) -> None:
        self._account(-len(batch), -sum(len(raw) for raw, _ in batch), -sum(n for _, n in batch))

    def discard_all(self) -> None:
        """Forget every queued and in-flight packet (after the caller counted them as dropped)."""
        self.items.clear()
        self._account(-self.packets, -self.bytes, -self.messages)

    def _account(self, packets: int, size: int, messages: int) -> None:
        self.packets += packets
        self.bytes += size
        self.messages += messages
        counters, cell = self._counters, self._cell
        counters[cell + C_QUEUE_PACKETS] = self.packets
        counters[cell + C_QUEUE_BYTES] = self.bytes
        counters[cell + C_QUEUE_MESSAGES] = self.messages


class AnalyzerSender:
    """Ships one analyzer's queue with up to ``max_inflight`` concurrent requests."""

    def __init__(
        self,
        name: str,
        url: str,
        mode: str,
        queue: PacketQueue,
        config: SenderConfig,
        session: aiohttp.ClientSession,
        counters: Counters,
        cell: int,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.mode = mode
        self.queue = queue
        self._config = config
        self._session = session
        self._counters = counters
        self._cell = cell
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self._config.max_inflight)]

    def notify(self) -> None:
        """Called after ``queue.put``: wake a sender loop."""
        self._idle.clear()
        self._wakeup.set()

    async def drain(self, timeout: float) -> int:
        """Deliver what is queued within ``timeout``; count and return the packets dropped after it."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        dropped = self.queue.packets
        if dropped:
            messages = self.queue.messages
            self._counters[self._cell + C_SHUTDOWN_DROPPED_PACKETS] += dropped
            self._counters[self._cell + C_SHUTDOWN_DROPPED_MESSAGES] += messages
            log.error("analyzer %s: %d packets (%d messages) not delivered by the shutdown deadline",
                      self.name, dropped, messages)
            self.queue.discard_all()
        return dropped

    async def _run(self) -> None:
        queue = self.queue
        config = self._config
        while True:
            while not queue.items:
                if self._inflight == 0:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = queue.take(config.batch_max_packets if self.mode == "batch" else 1, config.batch_max_bytes)
            self._inflight += 1
            try:
                await self._deliver(batch, sum(n for _, n in batch))
            finally:
                self._inflight -= 1
            queue.release(batch)

    async def _deliver(self, batch: list[Packet], messages: int) -> None:
        """Send until the analyzer answers 2xx or rejects it; retries back off with jitter."""
        if self.mode == "batch":
            url = self.url + "/ingest/batch"
            body = b"\n".join(raw if b"\n" not in raw else raw.replace(b"\n", b" ") for raw, _ in batch)
            headers = {"Content-Type": "application/x-ndjson", "X-Packet-Count": str(len(batch))}
        else:
            url = self.url + "/ingest"
            body = batch[0][0]
            headers = {"Content-Type": "application/json"}
        backoff = self._config.retry_initial_backoff
        counters, cell = self._counters, self._cell
        while True:
            retry_after = None
            try:
                async with self._session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                status = 0
                log.warning("analyzer %s: send failed: %s", self.name, exc.__class__.__name__)
            if 200 <= status < 300:
                counters[cell + C_DELIVERED_PACKETS] += len(batch)
                counters[cell + C_DELIVERED_MESSAGES] += messages
                return
            if 400 <= status < 500 and status not in (408, 429):
                counters[cell + C_REJECTED_PACKETS] += len(batch)
                counters[cell + C_REJECTED_MESSAGES] += messages
                log.error("analyzer %s rejected %d packets with HTTP %d", self.name, len(batch), status)
                return
            counters[cell + C_FAILED_ATTEMPTS] += 1
            await asyncio.sleep(_retry_delay(backoff, retry_after))
            backoff = min(backoff * 2, self._config.retry_max_backoff)


def _retry_delay(backoff: float, retry_after: str | None) -> float:
    """Full jitter, but never sooner than the analyzer's Retry-After."""
    delay = random.uniform(0, backoff)
    if retry_after and retry_after.isdigit():
        delay = max(delay, float(retry_after))
    return delay
