"""Analyzer health: active checks, passive ejection, readmission backoff and slow start.

The supervisor alone decides an analyzer's state and effective weight and
writes them to the shared table; workers only route by them and report
ejections. Ideas (not code) from HAProxy (``inter``/``rise``/``fall``,
``slowstart``), Envoy (outlier ejection with growing ejection time, slow start)
and NGINX (``max_fails``/``fail_timeout``):

* ``fall`` consecutive failed checks take a routable analyzer DOWN; ``rise``
  consecutive good checks readmit it, no sooner than its backoff allows;
* a worker that sees ``outlier.consecutive_failures`` failed sends in a row
  stops using the analyzer at once and reports it; the supervisor then EJECTS
  it for every worker;
* an analyzer that is taken out again within ``flap_window`` of its last
  readmission is flapping: its readmission backoff doubles each time (capped);
* a readmitted analyzer is WARMING: its effective weight ramps linearly from
  ``slow_start_min_weight`` to its weight over ``slow_start`` seconds, and the
  routing epoch restarts, so it gets no catch-up burst;
* a check that answers 429/503, or reports inflight / queue depth / p99
  latency above the thresholds, marks the analyzer SATURATED: it keeps serving
  at ``saturated_weight`` of its weight until a check says it recovered.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from distributor.config import HealthConfig, OutlierConfig
from distributor.shared_table import ACTIVE, DOWN, EJECTED, ROUTABLE, SATURATED, STATE_NAMES, WARMING

log = logging.getLogger("distributor.health")
MAX_HEALTH_BODY = 64 << 10


@dataclass(slots=True)
class CheckResult:
    ok: bool
    saturated: bool
    detail: str


def judge(status: int, body: object, config: HealthConfig) -> CheckResult:
    """Turn an analyzer's /health answer into alive / saturated.

    The body comes from the network: a field of the wrong type makes the check fail
    (with a detail naming the field), it never raises.
    """
    if status in (429, 503):
        return CheckResult(True, True, f"HTTP {status}")
    if status != 200:
        return CheckResult(False, False, f"HTTP {status}")
    if body is None:
        body = {}
    if not isinstance(body, dict):
        return CheckResult(False, False, "bad /health body: not a JSON object")
    latency = body.get("latency_ms") or {}
    if not isinstance(latency, dict):
        return CheckResult(False, False, "bad /health body: latency_ms is not an object")
    figures = {"inflight": body.get("inflight", 0), "queue_depth": body.get("queue_depth", 0),
               "p99": latency.get("p99", 0.0)}
    for field_name, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return CheckResult(False, False, f"bad /health body: {field_name} is not a number: {value!r:.40}")
    reasons = []
    if config.max_inflight and figures["inflight"] > config.max_inflight:
        reasons.append(f"inflight {figures['inflight']}")
    if config.max_queue_depth and figures["queue_depth"] > config.max_queue_depth:
        reasons.append(f"queue_depth {figures['queue_depth']}")
    if config.max_latency_ms and figures["p99"] > config.max_latency_ms:
        reasons.append(f"p99 {figures['p99']:.0f} ms")
    return CheckResult(True, bool(reasons), ", ".join(reasons) or "ok")


@dataclass(slots=True)
class AnalyzerHealth:
    """One analyzer's state machine, driven by checks, ejection reports and time."""

    name: str
    weight: float
    state: int = ACTIVE
    saturated: bool = False
    consecutive_ok: int = 0
    consecutive_failed: int = 0
    ejections: int = 0
    downs: int = 0
    flaps: int = 0
    backoff: float = 0.0
    readmit_at: float = 0.0
    admitted_at: float = field(default=-1e18)
    admissions: int = 0
    reports_seen: int = 0
    last_check: str = "not checked yet"
    draining: bool = False  # an operator's drain: no new packets, queues flush

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE

    def observe_check(self, result: CheckResult, now: float, health: HealthConfig, outlier: OutlierConfig) -> None:
        self.last_check = result.detail
        if result.ok:
            self.consecutive_ok += 1
            self.consecutive_failed = 0
            self.saturated = result.saturated
        else:
            self.consecutive_failed += 1
            self.consecutive_ok = 0
        if self.routable:
            if self.consecutive_failed >= health.fall:
                self.take_out(DOWN, now, outlier)
        elif self.consecutive_ok >= health.rise and now >= self.readmit_at:
            self.admit(now, outlier)
        self.settle(now, outlier)

    def observe_ejection(self, now: float, outlier: OutlierConfig) -> None:
        if self.routable:
            self.take_out(EJECTED, now, outlier)

    def take_out(self, state: int, now: float, outlier: OutlierConfig) -> None:
        flapping = self.admissions > 0 and now - self.admitted_at < outlier.flap_window
        self.flaps = self.flaps + 1 if flapping else 0
        if state == DOWN and not flapping:
            self.backoff = 0.0  # a plain outage: readmit as soon as `rise` checks pass
        else:
            self.backoff = min(outlier.base_ejection_time * 2 ** self.flaps, outlier.max_ejection_time)
        self.readmit_at = now + self.backoff
        self.state = state
        self.consecutive_ok = 0
        if state == EJECTED:
            self.ejections += 1
        else:
            self.downs += 1
        log.warning("analyzer %s: %s%s (%s); readmission backoff %.1fs", self.name, STATE_NAMES[state],
                    " (flapping)" if flapping else "", self.last_check, self.backoff,
                    extra={"event": "analyzer_" + STATE_NAMES[state], "analyzer": self.name,
                           "backoff_s": self.backoff, "flapping": flapping})

    def admit(self, now: float, outlier: OutlierConfig) -> None:
        log.info("analyzer %s: readmitted after %d good checks; warming up over %.0fs",
                 self.name, self.consecutive_ok, outlier.slow_start,
                 extra={"event": "analyzer_readmitted", "analyzer": self.name})
        self.state = WARMING if outlier.slow_start > 0 else ACTIVE
        self.admitted_at = now
        self.admissions += 1
        self.consecutive_failed = 0

    def settle(self, now: float, outlier: OutlierConfig) -> None:
        """Time-driven moves: WARMING ends after slow_start; ACTIVE <-> SATURATED follows the last check."""
        if self.state == WARMING and now - self.admitted_at >= outlier.slow_start:
            self.state = ACTIVE
        if self.state in (ACTIVE, SATURATED):
            self.state = SATURATED if self.saturated else ACTIVE

    def effective_weight(self, now: float, health: HealthConfig, outlier: OutlierConfig) -> float:
        if not self.routable or self.draining:
            return 0.0
        factor = 1.0
        if self.state == WARMING:
            progress = min(1.0, (now - self.admitted_at) / outlier.slow_start)
            minimum = outlier.slow_start_min_weight
            factor = minimum + (1.0 - minimum) * progress
        if self.saturated:
            factor *= health.saturated_weight
        return self.weight * factor

    def view(self, now: float) -> dict[str, Any]:
        return {
            "draining": self.draining,
            "ejections": self.ejections,
            "downs": self.downs,
            "flaps": self.flaps,
            "backoff_s": self.backoff,
            "readmit_in_s": max(0.0, self.readmit_at - now) if not self.routable else 0.0,
            "admissions": self.admissions,
            "last_check": self.last_check,
        }


async def check(session: aiohttp.ClientSession, url: str, config: HealthConfig) -> CheckResult:
    """One active check: GET {url}/health within health.timeout; never raises."""
    try:
        async with session.get(url.rstrip("/") + "/health", timeout=aiohttp.ClientTimeout(total=config.timeout)) as r:
            body = None
            if r.status == 200:
                raw = b""
                while len(raw) <= MAX_HEALTH_BODY:  # a huge body must not cost the supervisor memory
                    chunk = await r.content.read(MAX_HEALTH_BODY + 1 - len(raw))
                    if not chunk:
                        break
                    raw += chunk
                if len(raw) > MAX_HEALTH_BODY:
                    return CheckResult(False, False, f"bad /health body: more than {MAX_HEALTH_BODY} bytes")
                body = orjson.loads(raw) if raw.strip() else None
            return judge(r.status, body, config)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        return CheckResult(False, False, exc.__class__.__name__)
    except Exception as exc:  # a surprise from the client library fails this check only
        log.exception("health check of %s failed unexpectedly", url)
        return CheckResult(False, False, f"unexpected {exc.__class__.__name__}")
