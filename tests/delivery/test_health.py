"""The analyzer health state machine, driven with explicit time (no sleeping)."""

from __future__ import annotations

import pytest

from distributor.config import HealthConfig, OutlierConfig
from distributor.delivery.health import AnalyzerHealth, CheckResult, judge
from distributor.shared_table import ACTIVE, DOWN, EJECTED, SATURATED, WARMING

HEALTH = HealthConfig(interval=1.0, timeout=0.5, fall=3, rise=2, max_queue_depth=10, max_latency_ms=100,
                      saturated_weight=0.25)
OUTLIER = OutlierConfig(base_ejection_time=5, max_ejection_time=40, flap_window=60, slow_start=10,
                        slow_start_min_weight=0.1)
OK = CheckResult(True, False, "ok")
FAIL = CheckResult(False, False, "timeout")
BUSY = CheckResult(True, True, "queue_depth 50")


def drive(h: AnalyzerHealth, results: list[CheckResult], start: float, step: float = 1.0) -> float:
    now = start
    for result in results:
        h.observe_check(result, now, HEALTH, OUTLIER)
        now += step
    return now


def test_fall_takes_it_down_and_rise_brings_it_back_warming() -> None:
    h = AnalyzerHealth("a", 2.0)
    now = drive(h, [FAIL, FAIL], 0)
    assert h.state == ACTIVE, "two failures are below fall=3"
    now = drive(h, [FAIL], now)
    assert h.state == DOWN and h.backoff == 0 and h.effective_weight(now, HEALTH, OUTLIER) == 0
    now = drive(h, [OK], now)
    assert h.state == DOWN, "one success is below rise=2"
    now = drive(h, [OK], now)
    assert h.state == WARMING and h.admissions == 1


def test_slow_start_ramps_linearly_from_the_minimum() -> None:
    h = AnalyzerHealth("a", 2.0)
    h.admit(100.0, OUTLIER)
    assert h.effective_weight(100.0, HEALTH, OUTLIER) == pytest.approx(0.2)
    assert h.effective_weight(105.0, HEALTH, OUTLIER) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    h.settle(110.0, OUTLIER)
    assert h.state == ACTIVE and h.effective_weight(110.0, HEALTH, OUTLIER) == 2.0


def test_flapping_doubles_the_readmission_backoff_up_to_the_cap() -> None:
    h = AnalyzerHealth("a", 1.0)
    backoffs = []
    now = 0.0
    for _ in range(6):
        h.observe_ejection(now, OUTLIER)
        backoffs.append(h.backoff)
        now += h.backoff
        now = drive(h, [OK, OK], now)
        assert h.state == WARMING
    assert backoffs == [5, 10, 20, 40, 40, 40]


def test_backoff_holds_readmission_even_when_checks_pass() -> None:
    h = AnalyzerHealth("a", 1.0)
    h.observe_ejection(0.0, OUTLIER)
    drive(h, [OK, OK, OK], 1.0)
    assert h.state == EJECTED, "readmitted before its 5 s ejection time"
    drive(h, [OK], 5.0)
    assert h.state == WARMING


def test_a_quiet_period_resets_the_flap_count() -> None:
    h = AnalyzerHealth("a", 1.0)
    h.observe_ejection(0.0, OUTLIER)
    drive(h, [OK, OK], 5.0)
    h.observe_ejection(10.0, OUTLIER)
    assert h.backoff == 10
    drive(h, [OK, OK], 20.0)
    h.observe_ejection(200.0, OUTLIER)  # long after its readmission: not a flap
    assert h.backoff == 5


def test_saturation_reduces_weight_until_a_check_says_it_recovered() -> None:
    h = AnalyzerHealth("a", 4.0)
    drive(h, [BUSY], 0)
    assert h.state == SATURATED and h.effective_weight(1, HEALTH, OUTLIER) == 1.0
    drive(h, [OK], 1)
    assert h.state == ACTIVE and h.effective_weight(2, HEALTH, OUTLIER) == 4.0


@pytest.mark.parametrize(
    "status,body,ok,saturated",
    [
        (200, {"inflight": 1, "queue_depth": 0, "latency_ms": {"p99": 5}}, True, False),
        (200, {"inflight": 1, "queue_depth": 11, "latency_ms": {"p99": 5}}, True, True),
        (200, {"inflight": 1, "queue_depth": 0, "latency_ms": {"p99": 150}}, True, True),
        (429, None, True, True),
        (503, None, True, True),
        (500, None, False, False),
        (404, None, False, False),
    ],
)
def test_judge(status: int, body: dict | None, ok: bool, saturated: bool) -> None:
    result = judge(status, body, HEALTH)
    assert (result.ok, result.saturated) == (ok, saturated)
