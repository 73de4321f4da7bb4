"""Admission from event-loop lag: when the CPU is saturated, answer 503 at once instead of queueing.

A worker that takes more work than its core can do does not fail: it gets
slower, and every answer waits behind every other in the loop. Like Envoy's
overload manager, the worker measures how late a 5 ms timer fires, and past
``ingest.max_loop_lag`` it refuses a growing share of new packets with a cheap
prebuilt 503 + Retry-After (no JSON parsing, no routing): a quarter more for
every late probe in a row after the first, so one pause (a garbage collection,
a neighbour's burst) refuses nothing and a sustained overload sheds everything
within 25 ms; the share falls by a tenth for every probe back under half the
threshold. Shedding a share, not all or nothing, keeps the worker near its
capacity while the lag stays bounded.
"""

from __future__ import annotations

import asyncio

PROBE_INTERVAL = 0.005
STEP_UP, STEP_DOWN = 0.25, 0.1


class LoopLagGuard:
    """Measures the loop's lag with a periodic timer; ``share`` of new packets to refuse, 0 to 1."""

    __slots__ = ("share", "_credit", "_peak", "_threshold", "_late_run", "_loop", "_expected")

    def __init__(self, max_lag: float) -> None:
        self.share = 0.0
        self._credit = 0.0  # error diffusion: refusals owed so far, so exactly `share` of packets are refused
        self._peak = 0.0
        self._threshold = max_lag  # 0: off (the lag is still measured)
        self._late_run = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expected = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule()

    def refuse(self) -> bool:
        """Whether to refuse this packet (call only while ``share`` is not 0)."""
        credit = self._credit + self.share
        if credit >= 1.0:
            self._credit = credit - 1.0
            return True
        self._credit = credit
        return False

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
                self._late_run += 1
                if self._late_run > 1:
                    self.share = min(1.0, self.share + STEP_UP)
            else:
                self._late_run = 0
                if late < threshold / 2 and self.share:
                    self.share = max(0.0, self.share - STEP_DOWN)
        self._schedule()
