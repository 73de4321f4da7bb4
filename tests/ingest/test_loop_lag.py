"""Admission from event-loop lag (distributor.ingest.overload): a real loop, blocked on purpose."""

from __future__ import annotations

import asyncio
import time

import uvloop

from distributor.ingest.overload import PROBE_INTERVAL, LoopLagGuard


async def _block_for(duration: float, step: float) -> None:
    """Keep the loop busy in slices of ``step`` seconds (each slice a callback that does not yield)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        time.sleep(step)
        await asyncio.sleep(0)


async def _until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(PROBE_INTERVAL)
    return False


def test_sustained_lag_sheds_and_a_quiet_loop_admits_again() -> None:
    async def scenario() -> None:
        guard = LoopLagGuard(max_lag=0.01)
        guard.start()
        await _block_for(0.3, step=0.03)  # every probe is ~30 ms late
        assert guard.share == 1.0
        assert sum(guard.refuse() for _ in range(100)) == 100
        assert guard.take_peak() >= 0.02
        assert await _until(lambda: 0 < guard.share < 1, 2.0), "the share falls step by step"
        refused = sum(guard.refuse() for _ in range(1000))
        assert abs(refused - guard.share * 1000) <= 1, "exactly that share is refused"
        assert await _until(lambda: not guard.share, 2.0), "a quiet loop must admit again"

    uvloop.run(scenario())


def test_one_pause_does_not_shed() -> None:
    async def scenario() -> None:
        guard = LoopLagGuard(max_lag=0.01)
        guard.start()
        await asyncio.sleep(PROBE_INTERVAL * 2)
        time.sleep(0.1)  # a single long pause: one late probe, then the loop runs freely
        seen = False
        for _ in range(12):
            await asyncio.sleep(PROBE_INTERVAL)
            seen = seen or bool(guard.share)
        assert not seen
        assert guard.take_peak() >= 0.09  # but it is measured

    uvloop.run(scenario())


def test_off_still_measures() -> None:
    async def scenario() -> None:
        guard = LoopLagGuard(max_lag=0.0)
        guard.start()
        await _block_for(0.2, step=0.03)
        assert not guard.share
        assert guard.take_peak() >= 0.02

    uvloop.run(scenario())
