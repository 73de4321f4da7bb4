"""Locust emitters for the log distributor: steady, bursty and one abusive emitter.

Steady run (headless, CSV, pass/fail thresholds):
    locust -f loadtest/locustfile.py --headless -u 200 -r 50 -t 60s --host http://127.0.0.1:8080 \
        --csv loadtest/results/steady --max-fail-ratio 0.01 --max-p95-ms 50
Stress run (ramps users until 503s appear, holds, reports the knee):
    locust -f loadtest/locustfile.py --headless --stress --host http://127.0.0.1:8080 --csv loadtest/results/stress

Answers: 202 is a success; 429/503 are *backpressure*, reported under their own
names ("/ingest 429 backpressure", "/ingest 503 backpressure") as successes, and
the well-behaved emitters wait Retry-After and resend the same packet; any
other status or a connection error is a failure. See loadtest/README.md.

Every request carries ``X-Emitter-Id`` (the packet's emitter_id), so the same file
drives a sharded fleet behind HAProxy (deploy/haproxy: ``--host http://LB:8080``),
where each emitter lands on one instance.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

import gevent
import orjson
from locust import FastHttpUser, LoadTestShape, between, constant, events, stats, tag, task
from locust.env import Environment
from locust.runners import WorkerRunner

from distributor.tools.emitter import log_message

INGEST = "/ingest"
BACKPRESSURE = {429: f"{INGEST} 429 backpressure", 503: f"{INGEST} 503 backpressure"}
MAX_ATTEMPTS = 5  # a packet is resent at most this often after 429/503
RETRY_AFTER_CAP = 10.0  # seconds; a well-behaved emitter never waits longer than this
MESSAGES: dict[str, int] = {"accepted_packets": 0, "accepted_messages": 0}  # this process only


def _bucket(response_time: float) -> float:
    """Response times kept to two significant figures (0.43, 4.3, 43, 430 ms; about 500 buckets in all).

    Locust's default rounds everything below 100 ms to whole milliseconds: a sub-millisecond p95 read as 0,
    and ``--max-p95-ms`` could not judge the fast answers this service gives. Every locust process imports
    this file, so master and workers bucket alike (locust documents replacing this function).
    """
    return float(f"{response_time:.2g}") if response_time > 0 else 0.0


stats.bucket_response_time = _bucket  # type: ignore[assignment]  # annotated int; percentiles and CSV take floats

# ------------------------------------------------------------------ realistic packets


def _pool(size: int = 4096) -> list[bytes]:
    """Messages serialized once per process: the built-in emitter's (distributor.tools.emitter.log_message)."""
    now_ms = int(time.time() * 1000)
    return [orjson.dumps(log_message(random.Random(i), now_ms)) for i in range(size)]


_POOL = _pool()


def message_count(rng: random.Random) -> int:
    """Skewed like real agents: mostly 5, some 20, a long tail up to 300."""
    draw = rng.random()
    if draw < 0.70:
        return 5
    if draw < 0.90:
        return 20
    return min(300, 21 + int(rng.paretovariate(1.2) * 15))


def packet(emitter_id: str, packet_id: str, n: int, rng: random.Random) -> bytes:
    start = rng.randrange(len(_POOL) - n)
    return b'{"emitter_id":%s,"packet_id":%s,"messages":[%s]}' % (
        orjson.dumps(emitter_id), orjson.dumps(packet_id), b",".join(_POOL[start:start + n]))


def retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1.0), 0.0), RETRY_AFTER_CAP)
    except ValueError:
        return 1.0  # an HTTP-date: back off one second


# ----------------------------------------------------------------------------- users

_ids = itertools.count()


class Emitter(FastHttpUser):
    """One agent: its own emitter_id, unique packet ids, honours Retry-After unless told not to."""

    abstract = True
    honour_retry_after = True

    def on_start(self) -> None:
        self.emitter_id = f"locust-{os.getpid()}-{next(_ids)}-{os.urandom(2).hex()}"
        self.rng = random.Random()
        self.seq = 0

    def send(self, n: int | None = None) -> None:
        """POST one packet; on 429/503 count backpressure, wait Retry-After, resend the same packet."""
        n = n or message_count(self.rng)
        self.seq += 1
        body = packet(self.emitter_id, f"{self.emitter_id}-{self.seq}", n, self.rng)
        for _ in range(MAX_ATTEMPTS):
            with self.client.post(INGEST, data=body,  # type: ignore[arg-type]  # bytes work; the hint says str
                                  headers={"Content-Type": "application/json", "X-Emitter-Id": self.emitter_id},
                                  name=INGEST, catch_response=True) as response:
                status = response.status_code
                if status == 202:
                    response.success()
                    MESSAGES["accepted_packets"] += 1
                    MESSAGES["accepted_messages"] += n
                    return
                if status in BACKPRESSURE:
                    response.request_meta["name"] = BACKPRESSURE[status]  # visible, but not a failure
                    response.success()
                    wait = retry_after(response.headers.get("Retry-After"))
                else:
                    response.failure(f"HTTP {status}: {(response.text or '')[:120]}")
                    return
            if self.honour_retry_after:
                gevent.sleep(wait)  # cooperative: locust runs every user on gevent


class SteadyEmitter(Emitter):
    """A typical agent: a packet about every 200 ms."""

    wait_time = between(0.1, 0.3)
    weight = 8

    @tag("steady")
    @task
    def steady(self) -> None:
        self.send()


class BurstyEmitter(Emitter):
    """An agent flushing a buffer: 20-100 packets back to back, then quiet for a few seconds."""

    wait_time = between(2.0, 6.0)
    weight = 2

    @tag("bursty")
    @task
    def burst(self) -> None:
        for _ in range(self.rng.randint(20, 100)):
            self.send()


class AbusiveEmitter(Emitter):
    """Exactly one misbehaving agent: big packets as fast as it can, resends at once after 429/503."""

    wait_time = constant(0)
    fixed_count = 1
    honour_retry_after = False

    @tag("abusive")
    @task
    def flood(self) -> None:
        self.send(self.rng.choice((50, 100, 200)))


# ---------------------------------------------------------------------- options

@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("log distributor")
    group.add_argument("--max-fail-ratio", type=float, default=0.01,
                       help="headless: exit 1 when failures / non-backpressure requests exceed this (default 0.01)")
    group.add_argument("--max-p95-ms", type=float, default=0.0,
                       help="headless: exit 1 when the p95 of /ingest exceeds this many ms (0 = no limit)")
    group.add_argument("--stress", action="store_true", default=False,
                       help="ramp users until 503s appear, hold, report the knee (ignores -u/-r)")
    group.add_argument("--stress-step-users", type=int, default=20, help="users added per step (default 20)")
    group.add_argument("--stress-step-seconds", type=float, default=10.0, help="seconds per step (default 10)")
    group.add_argument("--stress-hold-seconds", type=float, default=30.0, help="hold after the knee (default 30)")
    group.add_argument("--stress-max-users", type=int, default=2000, help="stop ramping here (default 2000)")
    group.add_argument("--summary-json", default="", help="also write the final summary to this JSON file")


# ------------------------------------------------------------------------- shape


def counts(environment: Environment) -> dict[str, int]:
    """accepted / 503 / all answered /ingest requests so far (aggregated over workers on a master)."""
    entries = environment.stats.entries
    main = entries.get((INGEST, "POST"))
    b503, b429 = entries.get((BACKPRESSURE[503], "POST")), entries.get((BACKPRESSURE[429], "POST"))
    accepted = main.num_requests - main.num_failures if main else 0
    failures = main.num_failures if main else 0
    n503, n429 = (b503.num_requests if b503 else 0), (b429.num_requests if b429 else 0)
    return {"accepted": accepted, "503": n503, "429": n429, "failures": failures,
            "requests": accepted + failures + n503 + n429}


class EmitterShape(LoadTestShape):
    """Plain -u/-r/-t by default; with --stress ramps users step by step until 503s pass 1%, then holds.

    The knee is the highest step whose 503 share stayed below 1%: the load an
    SRE can offer before the distributor starts pushing back.
    """

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self.users = 0
        self.phase = "ramp"
        self.step_started = 0.0
        self.hold_until = 0.0
        self.mark: dict[str, int] = {}
        self.steps: list[dict[str, Any]] = []
        self.knee: dict[str, Any] | None = None

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        env = self.runner.environment
        opts = env.parsed_options
        now = self.get_run_time()
        if opts is not None and opts.run_time and now >= opts.run_time:
            return None  # with a shape, locust leaves -t to the shape
        if opts is None or not opts.stress:
            users = (opts.num_users if opts else None) or 1
            return users, float((opts.spawn_rate if opts else None) or users)
        if self.users == 0:
            self.users, self.step_started, self.mark = opts.stress_step_users, now, counts(env)
        elif now - self.step_started >= opts.stress_step_seconds:
            self._close_step(env, now)
        if self.phase == "hold" and now >= self.hold_until:
            return None
        return self.users, float(max(1, opts.stress_step_users))

    def _close_step(self, env: Environment, now: float) -> None:
        opts = env.parsed_options
        assert opts is not None  # only called with --stress
        current = counts(env)
        delta = {k: current[k] - self.mark.get(k, 0) for k in current}
        elapsed = max(now - self.step_started, 1e-9)
        step: dict[str, Any] = {"users": self.users, "phase": self.phase, "seconds": round(elapsed, 1),
                "accepted_per_s": delta["accepted"] / elapsed, "requests_per_s": delta["requests"] / elapsed,
                "ratio_503": delta["503"] / max(delta["requests"], 1)}
        self.steps.append(step)
        print(f"[stress] {self.users} users: {step['accepted_per_s']:.0f} accepted/s, "
              f"503 {step['ratio_503']:.2%} ({self.phase})", flush=True)
        if self.phase == "ramp":
            if step["ratio_503"] < 0.01 and delta["requests"] > 0:
                self.knee = step
            if step["ratio_503"] >= 0.01 or self.users + opts.stress_step_users > opts.stress_max_users:
                self.phase, self.hold_until = "hold", now + opts.stress_hold_seconds
            else:
                self.users += opts.stress_step_users
        self.mark, self.step_started = current, now


# ---------------------------------------------------------------------- verdict


@events.quitting.add_listener
def _verdict(environment: Environment, **_: Any) -> None:
    """Summary and pass/fail: failure ratio without backpressure, p95 of /ingest, the stress knee."""
    if isinstance(environment.runner, WorkerRunner):
        return
    opts = environment.parsed_options
    c = counts(environment)
    main = environment.stats.entries.get((INGEST, "POST"))
    p95 = main.get_response_time_percentile(0.95) if main and main.num_requests else 0.0
    non_backpressure = c["accepted"] + c["failures"]
    fail_ratio = c["failures"] / max(non_backpressure, 1)
    summary: dict[str, Any] = {**c, "fail_ratio": fail_ratio, "p95_ms": p95,
                               "accepted_messages_this_process": MESSAGES["accepted_messages"]}
    problems = []
    if opts is not None and fail_ratio > opts.max_fail_ratio:
        problems.append(f"failure ratio {fail_ratio:.2%} > {opts.max_fail_ratio:.2%}")
    if opts is not None and opts.max_p95_ms > 0 and p95 > opts.max_p95_ms:
        problems.append(f"p95 {p95:.3f} ms > {opts.max_p95_ms} ms")
    if non_backpressure == 0:
        problems.append("no request was answered")
    shape = environment.shape_class
    if isinstance(shape, EmitterShape) and shape.steps:
        summary["stress_steps"] = shape.steps
        summary["knee"] = shape.knee
        summary["knee_reached"] = any(step["ratio_503"] >= 0.01 for step in shape.steps)
    summary["passed"] = not problems
    summary["problems"] = problems
    print(f"\nlog distributor: accepted {c['accepted']}, backpressure 503 {c['503']} / 429 {c['429']}, "
          f"failures {c['failures']} ({fail_ratio:.2%} of non-backpressure), p95 {p95:.1f} ms", flush=True)
    if "knee" in summary:
        knee = summary["knee"]
        if not knee:
            print("knee: none (503s from the first step)", flush=True)
        elif summary["knee_reached"]:
            print(f"knee: {knee['users']} users, {knee['accepted_per_s']:.0f} accepted packets/s, "
                  f"503 {knee['ratio_503']:.2%}", flush=True)
        else:
            print(f"knee: not reached; no step passed 1% 503s up to {knee['users']} users "
                  f"({knee['accepted_per_s']:.0f} accepted packets/s). The load generator may be the limit: "
                  "more locust processes (--processes -1), or python -m loadtest.bench (wrk)", flush=True)
    print("verdict: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)), flush=True)
    if opts is not None and opts.summary_json:
        with open(opts.summary_json, "w") as out:
            json.dump(summary, out, indent=2)
    if opts is not None and opts.headless:
        environment.process_exit_code = 1 if problems else 0
