"""Counting, idempotency window, received-key log and latency ring for the analyzer.

Kept free of aiohttp so it can be unit-tested and reused; everything here is
touched only from the event loop thread, so no locking is needed.

Every structure here is bounded: clients choose emitter ids, packet ids and
levels, so anything keyed by them would otherwise grow with every new value a
client invents (300k distinct emitters once took the RSS from 39 to 228 MB).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

PacketKey = tuple[str, str]

# Longest key kept in any table; the packet contract's limit for emitter_id and
# packet_id, so one huge string cannot make a single entry arbitrarily large.
MAX_KEY_CHARS = 256
# Entries per table that /stats returns, largest counts first: keeps the body
# (and the time the event loop spends encoding it) small whatever the traffic.
STATS_TOP = 100
ENCODINGS = ("identity", "gzip", "zstd", "deflate", "br", "other")  # aiohttp inflates all but "other"


class DedupWindow:
    """Bounded FIFO set of recently seen packet keys.

    A set gives O(1) membership and a deque gives O(1) eviction of the oldest
    key; a plain dict degrades when popped from the front repeatedly.
    """

    __slots__ = ("_keys", "_order", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("dedup window capacity must be >= 1")
        self.capacity = capacity
        self._keys: set[PacketKey] = set()
        self._order: deque[PacketKey] = deque()

    def add(self, key: PacketKey) -> bool:
        """Insert ``key``; return False if it was already in the window."""
        if key in self._keys:
            return False
        if len(self._order) >= self.capacity:
            self._keys.discard(self._order.popleft())
        self._keys.add(key)
        self._order.append(key)
        return True

    def __len__(self) -> int:
        return len(self._order)


class PacketLog:
    """Every accepted packet key in arrival order, up to ``limit`` keys (what /stats/packets pages through).

    Tests compare it with every key the distributor answered 202, so it must
    never be short without saying so: once full, further keys are only counted
    in ``not_recorded``. Append-only, so a position is a stable paging cursor
    even while packets keep arriving.
    """

    __slots__ = ("_keys", "limit", "not_recorded")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("packet log limit must be >= 0")
        self.limit = limit
        self._keys: list[PacketKey] = []
        self.not_recorded = 0

    def append(self, key: PacketKey) -> None:
        if len(self._keys) < self.limit:
            self._keys.append(key)
        else:
            self.not_recorded += 1

    def page(self, start: int, count: int, max_chars: int) -> list[PacketKey]:
        """Up to ``count`` keys from position ``start``, oldest first.

        Cut short once the ids pass ``max_chars`` characters (but never empty when
        keys remain), so long ids cannot make one page, and its encoding, large.
        """
        keys = self._keys[start:start + count]
        chars = 0
        for i, (emitter_id, packet_id) in enumerate(keys):
            chars += len(emitter_id) + len(packet_id)
            if chars > max_chars and i:
                return keys[:i]
        return keys

    def __len__(self) -> int:
        return len(self._keys)

    def snapshot(self) -> dict[str, int]:
        return {"limit": self.limit, "recorded": len(self._keys), "not_recorded": self.not_recorded}


class BoundedCounts:
    """Message counts per client-chosen key (emitter id, level) for at most ``limit`` keys.

    A key first seen when the table is full, or longer than MAX_KEY_CHARS, is
    not stored: its messages go to one ``overflow`` count, so the table plus
    the overflow still add up to every message counted. ``folded`` counts those
    updates (one per packet for emitters, per message for levels); how many
    *distinct* keys they were cannot be known without storing them.
    """

    __slots__ = ("counts", "folded", "limit", "overflow")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("table limit must be >= 0")
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.overflow = 0
        self.folded = 0

    def add(self, key: str, n: int = 1) -> None:
        counts = self.counts
        if key in counts:
            counts[key] += n
        elif len(counts) < self.limit and len(key) <= MAX_KEY_CHARS:
            counts[key] = n
        else:
            self.overflow += n
            self.folded += 1

    def top(self, n: int = STATS_TOP) -> dict[str, int]:
        """The ``n`` largest counts, largest first (ties in first-seen order)."""
        return dict(heapq.nlargest(n, self.counts.items(), key=itemgetter(1)))

    def summary(self, shown: int) -> dict[str, Any]:
        """Limit, size and overflow; ``total`` is exact even when only the top entries are shown."""
        return {
            "limit": self.limit,
            "tracked": len(self.counts),
            "shown": shown,
            "truncated": shown < len(self.counts),
            "overflow": self.overflow,
            "folded": self.folded,
            "total": sum(self.counts.values()) + self.overflow,
        }


class LatencyRing:
    """Last N request latencies, so /health reflects *recent* behaviour."""

    __slots__ = ("_ring",)

    def __init__(self, size: int = 1024) -> None:
        self._ring: deque[float] = deque(maxlen=size)

    def record(self, seconds: float) -> None:
        self._ring.append(seconds)

    def __len__(self) -> int:
        return len(self._ring)

    def percentiles_ms(self) -> dict[str, float]:
        """Nearest-rank p50/p99 in milliseconds (0.0 when empty)."""
        if not self._ring:
            return {"p50": 0.0, "p99": 0.0}
        ordered = sorted(self._ring)
        n = len(ordered)

        def rank(q: float) -> float:
            idx = min(n - 1, max(0, int(q * n + 0.999999) - 1))
            return round(ordered[idx] * 1000.0, 3)

        return {"p50": rank(0.50), "p99": rank(0.99)}


@dataclass(slots=True)
class Stats:
    """Aggregate "analysis" results plus request accounting."""

    window: DedupWindow
    log: PacketLog
    levels: BoundedCounts
    emitters: BoundedCounts
    packets: int = 0
    messages: int = 0
    duplicates: int = 0
    requests: int = 0
    batches: int = 0
    rejected_requests: int = 0
    injected_errors: int = 0
    bytes_received: int = 0  # decompressed
    wire_bytes: int = 0  # as sent (Content-Length): what compression saved is the difference
    encodings: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENCODINGS, 0))

    def count_encoding(self, encoding: str) -> None:
        """Requests per Content-Encoding; anything unknown is "other", so the table stays this size."""
        key = encoding.strip().lower() or "identity"
        self.encodings[key if key in self.encodings else "other"] += 1

    def accept(self, key: PacketKey) -> bool:
        """Remember a packet key; False if it is a duplicate within the dedup window."""
        if not self.window.add(key):
            return False
        self.log.append(key)  # the same tuple as in the window: no second copy while both hold it
        return True

    def ingest(self, packets: list[tuple[str, str, list[Any]]]) -> tuple[int, int]:
        """Count already-validated packets; return ``(accepted, duplicates)``.

        Callers validate the whole request first so a bad line never leaves a
        half-counted batch behind.
        """
        accepted = 0
        dups = 0
        add_level = self.levels.add
        for emitter_id, packet_id, messages in packets:
            if not self.accept((emitter_id, packet_id)):
                dups += 1
                continue
            accepted += 1
            n = len(messages)
            self.messages += n
            self.emitters.add(emitter_id, n)
            for msg in messages:
                level = msg.get("level") if isinstance(msg, dict) else None
                add_level(level if isinstance(level, str) else "UNKNOWN")
        self.packets += accepted
        self.duplicates += dups
        return accepted, dups

    def snapshot(self, name: str) -> dict[str, Any]:
        """Totals and the top STATS_TOP entries per table: small and quick to encode at any traffic."""
        levels = self.levels.top()
        emitters = self.emitters.top()
        return {
            "name": name,
            "packets": self.packets,
            "messages": self.messages,
            "duplicates": self.duplicates,
            "requests": self.requests,
            "batches": self.batches,
            "rejected_requests": self.rejected_requests,
            "injected_errors": self.injected_errors,
            "bytes_received": self.bytes_received,
            "wire_bytes": self.wire_bytes,
            "encodings": dict(self.encodings),
            "levels": levels,
            "emitters": emitters,
            "tables": {
                "levels": self.levels.summary(len(levels)),
                "emitters": self.emitters.summary(len(emitters)),
            },
            "dedup_window": {"capacity": self.window.capacity, "size": len(self.window)},
            "packet_log": self.log.snapshot(),
        }
