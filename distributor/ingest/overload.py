"""Admission from event-loop lag: when the CPU is saturated, answer 503 at once instead of queueing.

A worker that takes more work than its core can do does not fail: it gets
slower, and every answer waits behind every other in the loop. Like Envoy's
overload manager, the worker measures how late a 5 ms timer fires. Once it is
later than ``ingest.max_loop_lag`` on ``SUSTAIN`` probes in a row, new packets
get a cheap prebuilt 503 + Retry-After (no JSON parsing, no routing) until the
lateness stays under half the threshold for as many probes. Requiring a run of
late probes keeps a single pause (a garbage collection, a neighbour's burst)
from refusing anything.
"""

from __future__ import annotations

import asyncio

PROBE_INTERVAL = 0.005
SUSTAIN = 3  # probes in a row on the same side of the threshold before admission changes


class LoopLagGuard:
    """Measures the loop's lag with a periodic timer; ``shedding`` says whether to refuse new packets."""

    __slots__ = ("shedding", "_peak", "_threshold", "_over", "_under", "_loop", "_expected")

    def __init__(self, max_lag: float) -> None:
        self.shedding = False
        self._peak = 0.0
        self._threshold = max_lag  # 0: off (the lag is still measured)
        self._over = self._under = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expected = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule()

    def take_peak(self) -> float:
        """The largest lag seen since the last call (for the worker's heartbeat and /metrics)."""
        peak, self._peak = self._peak, 0.0
        return peak

    def _schedule(self) -> None:
        loop = self._loop
        assert loop is not None
        self._expected = loop.time() + PROBE_INTERVAL
        loop.call_at(self._expected, self._probe)  # runs for the worker's life: the loop's close ends it

    def _probe(self) -> None:
        late = max(0.0, self._loop.time() - self._expected)  # type: ignore[union-attr]
        if late > self._peak:
            self._peak = late
        threshold = self._threshold
        if threshold:
            if late > threshold:
                self._over += 1
                self._under = 0
                if self._over >= SUSTAIN:
                    self.shedding = True
            elif late < threshold / 2:
                self._under += 1
                self._over = 0
                if self._under >= SUSTAIN:
                    self.shedding = False
        self._schedule()
