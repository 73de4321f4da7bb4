"""The cross-worker rate limiter, with explicit time: two workers share one emitter's budget."""

from __future__ import annotations

from distributor.config import RateLimit, RateLimitConfig
from distributor.ingest.ratelimit import RateLimiter
from distributor.shared_table import SharedTable


def test_limit_holds_across_workers_over_time() -> None:
    table = SharedTable.create(max_workers=2, max_analyzers=1, rate_limit_slots=1024)
    try:
        config = RateLimitConfig(rate=100, burst=100, slots=1024)
        workers = [RateLimiter(table, 0, config), RateLimiter(table, 1, config)]
        admitted = 0
        now = 1000.0
        # 10 s of a flood alternating between two workers: 1000 attempts per second
        for step in range(10_000):
            admitted += workers[step % 2].admit("flooder", now) == 0.0
            now += 0.001
        assert 1000 * 0.9 <= admitted <= 1000 * 1.1 + 100, admitted  # rate x 10 s, within 10% (+ burst)
        assert workers[0].admit("someone-else", now) == 0.0
    finally:
        table.close()


def test_burst_then_retry_after_then_recovery() -> None:
    table = SharedTable.create(max_workers=1, max_analyzers=1, rate_limit_slots=64)
    try:
        limiter = RateLimiter(table, 0, RateLimitConfig(rate=10, burst=20, slots=64))
        results = [limiter.admit("e", 500.0) for _ in range(25)]
        assert results[:20] == [0.0] * 20
        assert all(wait > 0 for wait in results[20:])
        assert limiter.admit("e", 500.0 + 4.1) == 0.0  # two windows (2 s each) later the budget is back
    finally:
        table.close()


def test_overrides_and_disabled() -> None:
    table = SharedTable.create(max_workers=1, max_analyzers=1, rate_limit_slots=64)
    try:
        config = RateLimitConfig(rate=0, slots=64, overrides=(("vip", RateLimit(rate=1, burst=2)),))
        limiter = RateLimiter(table, 0, config)
        assert limiter.enabled
        assert [limiter.admit("vip", 10.0) == 0.0 for _ in range(3)] == [True, True, False]
        assert all(limiter.admit("anyone", 10.0) == 0.0 for _ in range(100))
        assert not RateLimiter(table, 0, RateLimitConfig(slots=64)).enabled
    finally:
        table.close()
