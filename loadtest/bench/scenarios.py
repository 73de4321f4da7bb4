"""The scenarios on the shared cluster: throughput (the max), latency (open loop at fractions of it),
stress (2x the max, analyzers draining or stalled) and stress-cpu (many connections, closed loop)."""

from __future__ import annotations

import os
import sys
from typing import Any

from loadtest.bare_floor import BareFloor
from loadtest.bench.cluster import MIB, AdminSampler
from loadtest.bench.runner import Bench
from loadtest.cpu import CpuWindow
from loadtest.generators import RunResult, run_emitter, run_wrk
from loadtest.nginx_baseline import INSTALL_HINT, NginxProxy, nginx_binary

STRESS_CPU_P99_MS = 50.0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of a small sample (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def throughput(bench: Bench) -> float:
    """Max accepted packets/s with < 1% 503: halve the connections while 503s are above 1%.

    ``--batch N``: every request carries N packets to POST /ingest/batch (the figure stays packets/s).
    """
    url = bench.cluster.ingest_url
    batch = bench.args.batch
    extra = {"batch": batch} if batch else None

    def load() -> RunResult:
        return bench.closed_loop(url, "fixed", bench.progress, batch=batch)

    record = bench.measure("throughput", "distributor", "fixed", load, extra)
    for _ in range(2):
        if record["ratio_503"] < 0.01:
            break
        bench.args.connections = max(1, bench.args.connections // 2)
        record = bench.measure("throughput", "distributor", "fixed", load, extra)
    record["max"] = True
    return float(record["packets_per_s"])


def latency(bench: Bench, peak: float) -> dict[str, Any] | None:
    """Open loop at 25/50/75% of the max; then, with nginx installed, the generator's floor at 50%."""
    args = bench.args
    for fraction in (0.25, 0.5, 0.75):
        rate = peak * fraction
        extra: dict[str, Any] = {"load_fraction": fraction, "offered_rate": rate}

        def load() -> RunResult:
            result = run_emitter(bench.cluster.ingest_url, args.duration, args.connections, "fixed", rate=rate)
            # below the offered rate, the emitter fell behind its schedule: its lateness is in the latency
            extra["achieved_offered_rate"] = result.sent / max(result.duration_s, 1e-9)
            return result

        bench.measure(f"latency@{fraction:.0%}", "distributor", "fixed", load, extra)
    if nginx_binary() is None:
        return {"skipped": f"nginx not installed: {INSTALL_HINT}"}
    print("[latency floor] the same load at 50% against an nginx that answers 202 at once",
          file=sys.stderr, flush=True)
    with NginxProxy((), args.workers) as stub:
        window = CpuWindow({"stub": stub.pids})
        floor = run_emitter(stub.url, args.duration, args.connections, "fixed", rate=peak / 2)
        cpu = window.stop()
    return {"load_fraction": 0.5, "offered_rate": peak / 2, "latency_ms": floor.latency_ms,
            "service_ms": floor.service_ms, "achieved_offered_rate": floor.sent / max(floor.duration_s, 1e-9),
            "loadavg": {"start": cpu["loadavg_start"], "end": cpu["loadavg_end"]}, "cpu": cpu}


def stress(bench: Bench, peak: float) -> None:
    """2x max offered, open loop: analyzers normal, then stalled; RSS sampled every second."""
    bound = bench.args.queue_max_bytes_total / MIB + 60
    for stalled in (False, True):
        extra: dict[str, Any] = {"offered_rate": 2 * peak, "analyzers_stalled": stalled, "rss_bound_mb": bound}

        def load() -> RunResult:
            sampler = AdminSampler(bench.cluster)
            if stalled:
                bench.sinks.stall(True)
            try:
                with sampler:
                    result = run_emitter(bench.cluster.ingest_url, bench.args.duration, 256, "fixed",
                                         rate=2 * peak, probe_rate=200)
            finally:
                bench.sinks.stall(False)
            extra["achieved_offered_rate"] = result.sent / max(result.duration_s, 1e-9)
            extra["peak_rss_mb"] = sampler.peak_rss_mb
            extra["rss_within_bound"] = all(v <= bound for v in sampler.peak_rss_mb.values())
            return result

        bench.measure("stress-stalled" if stalled else "stress", "distributor", "fixed", load, extra)


def stress_cpu(bench: Bench) -> dict[str, Any]:
    """Several wrk processes, many connections, closed loop, free analyzers: does a worker keep answering?"""
    a = bench.args
    conns = a.stress_wrk * a.stress_connections
    extra: dict[str, Any] = {"wrk_processes": a.stress_wrk, "connections_per_wrk": a.stress_connections}

    def load() -> RunResult:
        with AdminSampler(bench.cluster) as sampler:
            result = run_wrk(bench.cluster.ingest_url, a.duration, a.stress_connections, "fixed",
                             os.urandom(4).hex(), bench.progress, threads=1, processes=a.stress_wrk)
        bounds = {slot: sampler.peak_queued_mb.get(slot, 0.0) + 60 for slot in sampler.peak_rss_mb}
        extra.update({
            "event_loop_lag_ms": {"max": max(sampler.lag_ms, default=0.0), "p99": percentile(sampler.lag_ms, 99),
                                  "p50": percentile(sampler.lag_ms, 50), "samples": len(sampler.lag_ms)},
            "peak_queued_mb": sampler.peak_queued_mb, "peak_rss_mb": sampler.peak_rss_mb,
            "rss_bound_mb": bounds,
            "rss_within_bound": all(sampler.peak_rss_mb[s] <= bounds[s] for s in sampler.peak_rss_mb),
            "admin_samples_failed": sampler.failed_samples, "timeline": sampler.timeline,
        })
        return result

    record = bench.measure("stress-cpu", "distributor", "fixed", load, extra)
    # the same load against the bare floor: what this box and this generator allow at all. In a closed
    # loop the mean latency is connections / answers per second, so no server answers faster than this
    with BareFloor(a.workers) as floor:
        floor_record = bench.measure(
            "stress-cpu", "floor", "fixed",
            lambda: run_wrk(floor.url, a.duration, a.stress_connections, "fixed", os.urandom(4).hex(),
                            lambda: "bare floor", threads=1, processes=a.stress_wrk), sut=floor.pids)
    seconds = record["duration_s"] or 1e-9
    statuses = record["by_status"]
    answered = sum(statuses.values())
    n503 = statuses.get("503", 0)
    return {
        "run": record["run"], "connections": conns, "wrk_processes": a.stress_wrk, "duration_s": seconds,
        "answers_per_s": {"202": statuses.get("202", 0) / seconds, "503": n503 / seconds,
                          "429": statuses.get("429", 0) / seconds,
                          "other": (answered - statuses.get("202", 0) - n503 - statuses.get("429", 0)) / seconds,
                          "all": answered / seconds},
        "errors": record["errors_by_kind"],
        "latency_all_answers_ms": record["latency_ms"],
        "latency_is_raw": record["latency_is_raw"],
        # what wrk itself prints: corrected for coordinated omission (synthetic samples), see wrk_ingest.lua
        "latency_wrk_corrected_ms": record["latency_corrected_ms"],
        # closed loop: connections / answers per second is the mean time an answer takes (Little's law)
        "littles_law_mean_ms": conns / max(answered / seconds, 1e-9) * 1e3,
        "status_503": n503, "status_503_with_retry_after": record["retry_after_503"],
        "event_loop_lag_ms": record["event_loop_lag_ms"], "peak_queued_mb": record["peak_queued_mb"],
        "peak_rss_mb": record["peak_rss_mb"], "rss_bound_mb": record["rss_bound_mb"],
        "rss_within_bound": record["rss_within_bound"], "distributor_outcomes": record["distributor_outcomes"],
        "cpu_us_per_answer": record["cpu_us_per_answer"], "machine_busy_fraction":
            record["cpu"]["machine_busy_fraction"], "loadavg": record["loadavg"],
        "floor": {"run": floor_record["run"], "answers_per_s": floor_record["requests_per_s"],
                  "latency_ms": floor_record["latency_ms"], "cpu_us_per_answer": floor_record["cpu_us_per_answer"],
                  "loadavg": floor_record["loadavg"]},
        # answers/s a server must sustain for the mean alone to stay under the target (Little's law)
        "answers_per_s_needed_for_mean_under_target": conns / (STRESS_CPU_P99_MS / 1e3),
        "p99_target_ms": STRESS_CPU_P99_MS,
        "p99_met": record["latency_ms"].get("p99", 1e9) < STRESS_CPU_P99_MS,
        "check_passed": record["check"]["passed"],
    }
