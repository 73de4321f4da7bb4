"""Bounded per-analyzer packet queues: what a worker holds for each analyzer, and its books.

A queue's limits count packets that are queued *or in flight*, so a worker's
memory for an analyzer is bounded however slow the analyzer is. Every change
of a queue's contents goes through ``_account``, which keeps the queue's own
figures, the worker's totals (the basis of overload shedding) and the gauges in
the worker's row of the shared table in step.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from distributor.shared_table import C_QUEUE_BYTES, C_QUEUE_MESSAGES, C_QUEUE_PACKETS

Packet = tuple[bytes, int, int]  # (raw bytes as received, message count, WAL ref or NO_REF)
NO_REF = -1  # not in the write-ahead log (the log is off, or its write failed)


class Counters(Protocol):
    """Where a sender records its outcomes: a worker's row of the shared table."""

    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...


class QueueTotals:
    """What all of a worker's queues hold together; the basis of overload shedding and drain rate."""

    __slots__ = ("bytes", "delivered_bytes")

    def __init__(self) -> None:
        self.bytes = 0
        self.delivered_bytes = 0  # cumulative: the drain rate is its derivative


class PacketQueue:
    """Bounded FIFO of raw packets for one analyzer in one worker."""

    __slots__ = ("max_packets", "max_bytes", "items", "packets", "bytes", "messages", "available", "totals",
                 "_counters", "_cell")

    def __init__(self, max_packets: int, max_bytes: int, counters: Counters, cell: int, totals: "QueueTotals") -> None:
        self.available = True  # False while the analyzer is down/ejected for this worker
        self.totals = totals
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.items: deque[Packet] = deque()
        self.packets = 0  # queued + in flight
        self.bytes = 0
        self.messages = 0
        self._counters = counters
        self._cell = cell

    def has_room(self, size: int) -> bool:
        return self.available and self.packets < self.max_packets and self.bytes + size <= self.max_bytes

    def put(self, raw: bytes, messages: int, ref: int) -> None:
        self.items.append((raw, messages, ref))
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
        self._account(-len(batch), -byte_count(batch), -message_count(batch))

    def shrink(self, batch: list[Packet], kept: list[Packet]) -> None:
        """Take off the books the part of an in-flight ``batch`` that is not in ``kept`` (it failed over)."""
        self._account(len(kept) - len(batch), byte_count(kept) - byte_count(batch),
                      message_count(kept) - message_count(batch))

    def requeue(self, packets: list[Packet]) -> None:
        """Move in-flight packets back to the head of the queue (they stay on the books)."""
        self.items.extendleft(reversed(packets))

    def take_all(self) -> list[Packet]:
        """Every queued (not in-flight) packet, off the books: the caller re-routes or puts them back."""
        packets = list(self.items)
        self.items.clear()
        self.release(packets)
        return packets

    def put_back(self, packets: list[Packet]) -> None:
        """Return packets to the head of the queue, in order (nothing else could take them)."""
        self.items.extendleft(reversed(packets))
        self._account(len(packets), byte_count(packets), message_count(packets))

    def discard_all(self) -> None:
        """Forget every queued and in-flight packet (after the caller counted them as dropped)."""
        self.items.clear()
        self._account(-self.packets, -self.bytes, -self.messages)

    def _account(self, packets: int, size: int, messages: int) -> None:
        self.packets += packets
        self.bytes += size
        self.messages += messages
        self.totals.bytes += size
        counters, cell = self._counters, self._cell
        counters[cell + C_QUEUE_PACKETS] = self.packets
        counters[cell + C_QUEUE_BYTES] = self.bytes
        counters[cell + C_QUEUE_MESSAGES] = self.messages


def byte_count(packets: list[Packet]) -> int:
    return sum(len(packet[0]) for packet in packets)


def message_count(packets: list[Packet]) -> int:
    return sum(packet[1] for packet in packets)
