"""Counting, idempotency window and latency ring for the analyzer.

Kept free of aiohttp so it can be unit-tested and reused; everything here is
touched only from the event loop thread, so no locking is needed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

PacketKey = tuple[str, str]


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

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._order)

    def keys(self) -> list[PacketKey]:
        """Keys oldest first (what /stats/packets exposes)."""
        return list(self._order)


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
    packets: int = 0
    messages: int = 0
    duplicates: int = 0
    requests: int = 0
    batches: int = 0
    rejected_requests: int = 0
    injected_errors: int = 0
    bytes_received: int = 0
    levels: dict[str, int] = field(default_factory=dict)
    emitters: dict[str, int] = field(default_factory=dict)

    def ingest(self, packets: list[tuple[str, str, list[Any]]]) -> tuple[int, int]:
        """Count already-validated packets; return ``(accepted, duplicates)``.

        Callers validate the whole request first so a bad line never leaves a
        half-counted batch behind.
        """
        accepted = 0
        dups = 0
        levels = self.levels
        for emitter_id, packet_id, messages in packets:
            if not self.window.add((emitter_id, packet_id)):
                dups += 1
                continue
            accepted += 1
            n = len(messages)
            self.messages += n
            self.emitters[emitter_id] = self.emitters.get(emitter_id, 0) + n
            for msg in messages:
                level = msg.get("level") if isinstance(msg, dict) else None
                if not isinstance(level, str):
                    level = "UNKNOWN"
                levels[level] = levels.get(level, 0) + 1
        self.packets += accepted
        self.duplicates += dups
        return accepted, dups

    def snapshot(self, name: str) -> dict[str, Any]:
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
            "levels": dict(self.levels),
            "emitters": dict(self.emitters),
        }
