"""Runtime-adjustable fault injection and processing-slot accounting.

Faults are mutable at runtime via /control so a single long-lived analyzer
process can be made slow, flaky or hung mid-test without restarting it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

CONTROL_KEYS = frozenset({"delay_ms", "error_rate", "stall"})


class ControlError(ValueError):
    """A /control update that must be answered with 400."""


def _number(value: Any) -> float | None:
    # bool is an int subclass; "stall": true must not pass as delay_ms=1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


class FaultState:
    """Delay / error-rate / stall knobs shared by all handlers."""

    def __init__(
        self,
        delay_ms: float = 0.0,
        error_rate: float = 0.0,
        stall: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.delay_ms = delay_ms
        self.error_rate = error_rate
        self._rng = rng or random.Random()
        # Set == "not stalled": stalled handlers await it, then carry on.
        self._running = asyncio.Event()
        self._stall = False
        self.closing = False
        self.set_stall(stall)
        self.stalled_waiters = 0

    @property
    def stall(self) -> bool:
        return self._stall

    def set_stall(self, stall: bool) -> None:
        self._stall = stall
        if stall:
            self._running.clear()
        else:
            self._running.set()

    def release_for_shutdown(self) -> None:
        """Wake stalled handlers so shutdown is not held up for the full timeout."""
        self.closing = True
        self._running.set()

    async def wait_unstalled(self) -> None:
        """Block while stalled (the request is accepted but never answered)."""
        if self._running.is_set():
            return
        self.stalled_waiters += 1
        try:
            while not self._running.is_set():
                await self._running.wait()
        finally:
            self.stalled_waiters -= 1

    def should_fail(self) -> bool:
        rate = self.error_rate
        return rate > 0.0 and self._rng.random() < rate

    def snapshot(self) -> dict[str, Any]:
        return {"delay_ms": self.delay_ms, "error_rate": self.error_rate, "stall": self._stall}

    def apply(self, update: Any) -> dict[str, Any]:
        """Validate an update fully, then apply it atomically."""
        if not isinstance(update, dict):
            raise ControlError("body must be a JSON object")
        unknown = set(update) - CONTROL_KEYS
        if unknown:
            raise ControlError(f"unknown keys: {sorted(unknown)}; allowed: {sorted(CONTROL_KEYS)}")
        delay = self.delay_ms
        rate = self.error_rate
        stall = self._stall
        if "delay_ms" in update:
            d = _number(update["delay_ms"])
            if d is None or d < 0:
                raise ControlError("delay_ms must be a finite number >= 0")
            delay = d
        if "error_rate" in update:
            r = _number(update["error_rate"])
            if r is None or not 0.0 <= r <= 1.0:
                raise ControlError("error_rate must be a number in [0, 1]")
            rate = r
        if "stall" in update:
            if not isinstance(update["stall"], bool):
                raise ControlError("stall must be a boolean")
            stall = update["stall"]
        self.delay_ms = delay
        self.error_rate = rate
        self.set_stall(stall)
        return self.snapshot()


class Slots:
    """Bounded processing slots exposing inflight and queue depth for /health."""

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.concurrency = concurrency
        self._sem = asyncio.Semaphore(concurrency)
        self.inflight = 0
        self.waiting = 0

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._sem.release()
