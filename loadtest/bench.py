"""Benchmark: a real distributor pool and 4 analyzers on 127.0.0.1, next to an nginx proxy and a bare floor.

``python -m loadtest.bench [--scenarios throughput,latency,stress,stress-cpu,memory] [--duration 5]
[--sinks python|nginx] [--baseline none|nginx|floor] [--rounds 3]``

Analyzers (``--sinks``): ``python`` = the four analyzer processes in sink mode
(they parse, deduplicate and count, so delivery is checked at the analyzers);
``nginx`` = "free" analyzers, one nginx answering 200 to everything at once
(loadtest/free_sinks.py), so the figures are about the distributor alone.

Scenarios (see loadtest/README.md for what each figure means):
* throughput: closed loop as fast as the distributor answers (wrk when installed,
  else the uvloop emitter): max accepted packets/s with < 1% 503;
* latency: open loop (uvloop emitter) at 25/50/75% of that max: p50/p99/p99.9
  measured from each request's scheduled send time, and the generator's own
  floor at 50% (the same load against an nginx stub), side by side;
* stress: open loop at 2x the max, first with the analyzers draining normally,
  then with them stalled (queues fill, the excess must be answered 503 at once):
  p99 of 503 answers and worker RSS sampled every second;
* stress-cpu: several wrk processes with many connections (closed loop, default
  3 x 256) against free analyzers: answers/s by status, p50/p99 of all answers,
  503s with Retry-After, event-loop lag, queued bytes and RSS per worker;
* memory: every analyzer stalled until every queue is full: peak RSS/USS per worker.
With ``--baseline nginx``, ``--rounds`` rounds of wrk runs alternate distributor /
nginx weighted proxy (in front of the same analyzers) / bare floor (N processes
of uvloop + httptools + orjson, loadtest/bare_floor.py); ``--baseline floor``
leaves nginx out. Each run records the CPU seconds of every party (system under
test, sinks, generator, the rest of the machine) and the load average.

Every run is checked after a drain (which checks apply depends on the sinks,
see the README). A run that fails is reported FAILED; exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from distributor.tools.localcluster import LocalCluster, wait_until
from loadtest import generators
from loadtest.bare_floor import BareFloor
from loadtest.cpu import CpuWindow, PidSource, loadavg, per_answer_us, process_tree
from loadtest.free_sinks import NginxSinks, PythonSinks, SinkCount, Sinks
from loadtest.generators import SIZES, EverySecond, RunResult, run_emitter, run_wrk
from loadtest.nginx_baseline import INSTALL_HINT, NginxProxy, ensure_installed, nginx_binary, nginx_version

WEIGHTS = (("a1", 4.0), ("a2", 3.0), ("a3", 2.0), ("a4", 1.0))
ALL_SCENARIOS = ("throughput", "latency", "stress", "stress-cpu", "memory")
MIB = 2**20
STRESS_CPU_P99_MS = 50.0
Totals = dict[str, SinkCount]
LABELS = re.compile(r'(\w+)="([^"]*)"')


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("uvloop", "aiohttp", "orjson", "httptools", "psutil"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["nginx"] = nginx_version()
    found["wrk"] = generators.wrk_version()
    return found


def git_revision() -> dict[str, Any]:
    """The commit measured and whether the tree had local changes (a before/after note needs both)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"commit": head or None, "modified_files": sorted(line[3:] for line in dirty if line.strip())}
    except (OSError, ValueError):
        return {"commit": None, "modified_files": []}


def split_error_points(messages_by_analyzer: dict[str, int]) -> float:
    """Largest |actual - target| message share over the analyzers, in percentage points."""
    messages = sum(messages_by_analyzer.values())
    weight_sum = sum(w for _, w in WEIGHTS)
    if messages == 0:
        return 0.0
    return max(abs(messages_by_analyzer.get(name, 0) / messages - w / weight_sum) for name, w in WEIGHTS) * 100


def handler_p99_bound_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Upper bucket bound (ms) under which 99% of this run's ingest handler times fell (parse -> enqueue).

    Why: the client's latency includes the kernel, the scheduler and the
    generator; this is the part spent in the distributor's own code.
    """
    buckets = sorted((float(key[len("handler_le_"):]), after[key] - before.get(key, 0.0))
                     for key in after if key.startswith("handler_le_"))
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    return next(bound * 1e3 for bound, count in buckets if count >= 0.99 * total)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of a small sample (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def messages_per_packet(sizes: str) -> int | None:
    """Messages in every packet for a fixed-size load (None when sizes vary)."""
    mix = SIZES[sizes]
    return int(mix[0][0]) if len(mix) == 1 else None


@contextlib.contextmanager
def started_cluster(args: argparse.Namespace, kind: str) -> Iterator[tuple[LocalCluster, Sinks]]:
    """The distributor (``--workers``) delivering to 4 analyzers of ``kind`` (python or nginx)."""
    common = ["--set", f"queue.max_packets={args.queue_max_packets}"]
    if kind == "nginx":
        with NginxSinks(WEIGHTS) as sinks:
            flags = [f for name, url, w in sinks.urls() for f in ("--analyzer", f"{name}={url}@{w}")]
            with LocalCluster(analyzers=(), workers=args.workers, analyzer_flags=False,
                              distributor_args=flags + common) as cluster:
                yield cluster, sinks
        return
    with LocalCluster(analyzers=WEIGHTS, workers=args.workers,
                      analyzer_args={name: ["--sink"] for name, _ in WEIGHTS}, distributor_args=common) as cluster:
        yield cluster, PythonSinks(cluster)


class AdminSampler(EverySecond):
    """Every second, each worker's event-loop lag, queued bytes and RSS from /admin/workers."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__()
        self.cluster = cluster
        self.started = time.monotonic()
        self.timeline: list[dict[str, Any]] = []
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_queued_mb: dict[str, float] = {}
        self.lag_ms: list[float] = []
        self.failed_samples = 0

    def tick(self) -> None:
        try:
            workers = self.cluster.admin("/admin/workers")["workers"]
        except (OSError, ValueError, KeyError, TypeError):
            self.failed_samples += 1  # the control plane did not answer within 5 s: itself a finding
            return
        sample: dict[str, Any] = {"t": round(time.monotonic() - self.started, 2), "workers": {}}
        for w in workers:
            slot = str(w["slot"])
            rss, queued, lag = w.get("rss_bytes", 0) / MIB, w.get("queued_bytes", 0) / MIB, w.get("event_loop_lag_s")
            self.peak_rss_mb[slot] = max(self.peak_rss_mb.get(slot, 0.0), rss)
            self.peak_queued_mb[slot] = max(self.peak_queued_mb.get(slot, 0.0), queued)
            if lag is not None:
                self.lag_ms.append(lag * 1e3)
            sample["workers"][slot] = {
                "event_loop_lag_ms": None if lag is None else round(lag * 1e3, 3), "queued_mb": round(queued, 3),
                "rss_mb": round(rss, 1), "cpu_percent": w.get("cpu_percent"),
                **{k: v for k, v in w.items() if k.endswith("_packets") and isinstance(v, int)},
            }
        self.timeline.append(sample)


class Bench:
    """One started cluster plus the bookkeeping that turns each run into a checked record."""

    def __init__(self, args: argparse.Namespace, cluster: LocalCluster, sinks: Sinks,
                 runs: list[dict[str, Any]]) -> None:
        self.args = args
        self.cluster = cluster
        self.sinks = sinks
        self.runs = runs  # the report's list, shared by every cluster of the invocation: ``run`` is the index
        self.wrk = args.generator == "wrk" or (args.generator == "auto" and generators.wrk_available())

    # ------------------------------------------------------------------ counters

    def metrics(self) -> dict[str, float]:
        """The distributor's own counters: packets by outcome, per-analyzer delivery, handler histogram."""
        text = urllib.request.urlopen(self.cluster.admin_url + "/metrics", timeout=10).read().decode()
        out: dict[str, float] = {"accepted": 0.0, "routed": 0.0, "unavailable": 0.0, "shed": 0.0}
        for line in text.splitlines():
            if line.startswith("#") or "{" not in line:
                continue
            name, rest = line.split("{", 1)
            labels = dict(LABELS.findall(rest.rsplit("}", 1)[0]))
            value = float(line.rsplit(" ", 1)[1])
            outcome = labels.get("outcome", "")
            if name == "distributor_packets_total":
                out[f"packets.{outcome}"] = value
                if outcome in ("accepted", "unavailable", "shed"):
                    out[outcome] = value
            elif name == "distributor_ingest_latency_seconds_bucket":
                out[f"handler_le_{labels['le']}"] = value
            elif name == "distributor_messages_total":
                out[f"messages.{outcome}.{labels['analyzer']}"] = value
                out[outcome] = out.get(outcome, 0.0) + value
            elif name == "distributor_analyzer_packets_total":
                out[f"apackets.{outcome}.{labels['analyzer']}"] = value
                out[f"packets_{outcome}"] = out.get(f"packets_{outcome}", 0.0) + value
            elif name in ("distributor_send_retries_total", "distributor_send_failures_total",
                          "distributor_failover_packets_total", "distributor_possible_duplicate_packets_total"):
                key = name.removeprefix("distributor_").removesuffix("_total")
                out[key] = out.get(key, 0.0) + value
        return out

    def settle(self, target: str) -> None:
        """Drain: the distributor's queues are empty and the sinks' totals stopped moving."""
        if target == "floor":
            return
        if target == "distributor":
            self.cluster.wait_drained(timeout=120)
        # nginx sinks write their access log every 250 ms: compare reads further apart than that
        pause = 0.6 if self.sinks.kind == "nginx" else 0.3
        last: list[Totals] = [self.sinks.totals()]

        def stable() -> bool:
            time.sleep(pause)
            now = self.sinks.totals()
            same = now == last[0]
            last[0] = now
            return same

        wait_until(stable, 60, "analyzer totals to settle")

    # ---------------------------------------------------------------------- runs

    def distributor_pids(self) -> list[int]:
        return process_tree(self.cluster.distributor.pid if self.cluster.distributor else None)

    def measure(self, scenario: str, target: str, sizes: str, load: Callable[[], RunResult],
                extra: dict[str, Any] | None = None, sut: PidSource | None = None,
                round_no: int | None = None) -> dict[str, Any]:
        """Run ``load`` with its CPU window, drain, and check delivery and split."""
        print(f"[{scenario}] {target}, {sizes} packets, {self.args.duration:.0f}s"
              + (f", round {round_no}" if round_no else "") + " ...", file=sys.stderr, flush=True)
        uses_sinks = target != "floor"
        groups: dict[str, PidSource] = {"sut": sut or self.distributor_pids}
        if uses_sinks:
            groups["sinks"] = self.sinks.pids
        before: Totals = self.sinks.totals() if uses_sinks else {}
        metrics_before = self.metrics()
        window = CpuWindow(groups)
        result = load()
        cpu = window.stop()
        self.settle(target)
        after: Totals = self.sinks.totals() if uses_sinks else {}
        metrics_after = self.metrics()
        delta = {n: after[n].minus(before.get(n, SinkCount())) for n in after}
        check = self.check(target, sizes, result, delta, metrics_before, metrics_after, extra or {})
        seconds = result.duration_s or 1e-9
        in_harness = result.generator == "emitter"
        extra = dict(extra or {})
        if target == "distributor":
            extra["handler_p99_le_ms"] = handler_p99_bound_ms(metrics_before, metrics_after)
            extra["distributor_outcomes"] = {
                key.removeprefix("packets."): int(metrics_after[key] - metrics_before.get(key, 0.0))
                for key in metrics_after if key.startswith("packets.")
                and metrics_after[key] != metrics_before.get(key, 0.0)}
        record = {
            "run": len(self.runs), "scenario": scenario, "target": target, "sizes": sizes, "round": round_no, "sinks": self.sinks.kind,
            **result.as_dict(),
            "packets_per_s": result.accepted_packets / seconds,
            "messages_per_s": (check.get("received_messages") or 0) / seconds,
            "requests_per_s": result.answered / seconds,
            "ratio_503": result.ratio_503,
            "cpu": cpu,
            "cpu_us_per_2xx": per_answer_us(cpu, result.accepted_packets, in_harness),
            "cpu_us_per_answer": per_answer_us(cpu, result.answered, in_harness),
            "loadavg": {"start": cpu["loadavg_start"], "end": cpu["loadavg_end"]},
            "check": check, **extra,
        }
        self.runs.append(record)
        mark = "ok" if check["passed"] else "FAILED"
        sut_us = record["cpu_us_per_2xx"].get("sut")
        print(f"[{scenario}] {target}: {record['packets_per_s']:.0f} 2xx/s, 503 {record['ratio_503']:.1%}, "
              f"p99 {result.latency_ms.get('p99', 0):.2f} ms, CPU {sut_us or 0:.1f} µs/2xx, "
              f"split error {check.get('split_error_points') or 0:.2f} points, "
              f"uncounted {check.get('uncounted_by_client')}/{check.get('uncounted_tolerance')}, "
              f"load {cpu['loadavg_start'][0]:.2f}->{cpu['loadavg_end'][0]:.2f} -> {mark}",
              file=sys.stderr, flush=True)
        return record

    def check(self, target: str, sizes: str, result: RunResult, delta: Totals, m0: dict[str, float],
              m1: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
        """Which checks apply depends on the target and the sinks (README, "checks")."""
        check: dict[str, Any] = {"client_accepted_packets": result.accepted_packets,
                                 "client_accepted_messages": result.accepted_messages}
        if target == "floor":  # nothing behind it: only the client's view
            check["applied"] = ["client: 2xx answers > 0 and no unexpected status"]
            check["passed"] = result.accepted_packets > 0 and not result.by_status.get("other")
            return check
        tolerance = result.connections if result.generator == "wrk" else result.errors
        received_packets = sum(c.packets for c in delta.values())
        per_packet = messages_per_packet(sizes)
        delivered = {name: int(m1.get(f"messages.delivered.{name}", 0) - m0.get(f"messages.delivered.{name}", 0))
                     for name, _ in WEIGHTS}
        delivered_packets = int(m1.get("packets_delivered", 0) - m0.get("packets_delivered", 0))
        resends = sum(int(m1.get(k, 0) - m0.get(k, 0)) for k in ("send_retries", "send_failures", "failover_packets"))
        # nginx sinks log a resent batch (timeout, retry, failover) once per attempt and cannot deduplicate:
        # then the distributor's delivered counters are the only duplicate-free count of what arrived
        sink_has_resends = self.sinks.kind == "nginx" and target == "distributor" and resends > 0
        arrived_packets = delivered_packets if sink_has_resends else received_packets
        uncounted = arrived_packets - result.accepted_packets
        # messages per analyzer, from the best source available for this sink kind and load
        by_analyzer: dict[str, int] | None = None
        source = ""
        if sink_has_resends:
            by_analyzer, source = delivered, "distributor counters (delivered messages; the sink log has resends)"
        elif all(c.known_messages is not None for c in delta.values()):
            by_analyzer = {name: c.messages for name, c in delta.items()}
            source = ("analyzers (parsed, deduplicated)" if self.sinks.kind == "python"
                      else "sink access log (X-Messages)")
        elif per_packet is not None:
            by_analyzer = {name: c.packets * per_packet for name, c in delta.items()}
            source = f"sink access log (declared packets x {per_packet} messages)"
        elif target == "distributor":
            by_analyzer, source = delivered, "distributor counters (delivered messages)"
        received_messages = sum(by_analyzer.values()) if by_analyzer is not None else None
        split = split_error_points(by_analyzer) if by_analyzer is not None else None
        check.update({
            "sinks": self.sinks.kind,
            "received_packets": received_packets,
            "received_messages": received_messages,
            "messages_source": source or None,
            "received_by_analyzer": {n: {"packets": c.packets, "messages": (by_analyzer or {}).get(n),
                                         "requests": c.requests} for n, c in delta.items()},
            # accepted by the server but never seen answered by the client: requests in flight when
            # wrk stopped (wrk does not wait for them), or connections the emitter lost/aborted
            "uncounted_by_client": uncounted,
            "uncounted_tolerance": tolerance,
            "client_within_tolerance": 0 <= uncounted <= tolerance,
            "split_error_points": split,
            "split_within_1_point": None if split is None else split < 1.0,
        })
        if extra.get("analyzers_stalled"):
            # every queue full: packets spill to whichever analyzer has room, by design (README,
            # "Full queues spill over"), so the split of this window says nothing about routing
            check["split_within_1_point"] = None
            check["split_not_checked"] = "analyzers stalled: queues full, spill-over by design"
        if target != "distributor":  # the nginx proxy: nothing to compare with but its answers; its split is a finding
            check["applied"] = ["client 2xx vs sinks' count within the requests in flight"]
            check["passed"] = check["client_within_tolerance"]
            return check
        accepted = int(m1.get("accepted", 0) - m0.get("accepted", 0))
        check.update({
            "distributor_accepted_packets": accepted,
            "distributor_delivered_packets": delivered_packets,
            "distributor_delivered_messages": sum(delivered.values()),
            "distributor_routed_messages": int(m1.get("routed", 0) - m0.get("routed", 0)),  # info: a failed-over packet counts twice
            "distributor_failed_over_messages": int(m1.get("failed_over", 0) - m0.get("failed_over", 0)),
            "distributor_resends": resends,
            "delivered_eq_accepted": delivered_packets == accepted,
        })
        if self.sinks.kind == "python":
            check["exact_vs_distributor"] = accepted == received_packets and check["delivered_eq_accepted"]
            check["applied"] = ["analyzers' packets == distributor accepted (exact)",
                                "distributor delivered == accepted", "client 202 within requests in flight",
                                "client messages == analyzers' messages (when the client saw every answer)",
                                "split < 1 point (analyzers' messages)"]
        else:
            # nginx cannot count NDJSON lines: its log holds what the distributor declared per batch
            # (X-Packet-Count). A resent batch (timeout, retry, failover) may be logged twice.
            check["sink_log_packets"] = received_packets
            check["sink_log_eq_delivered"] = received_packets == delivered_packets
            sink_ok = received_packets == delivered_packets or (resends > 0 and received_packets > delivered_packets)
            if not check["sink_log_eq_delivered"] and sink_ok:
                check["sink_log_extra_packets"] = received_packets - delivered_packets  # resent batches
            check["exact_vs_distributor"] = check["delivered_eq_accepted"] and sink_ok
            check["applied"] = ["distributor delivered == accepted (its own counters)",
                                "sink log's declared packets == distributor delivered (>= when batches were resent)",
                                "client 202 within requests in flight",
                                "client messages == distributor delivered messages (when the client saw every "
                                "answer)", f"split < 1 point ({source})"]
        client_messages_comparable = (result.generator == "emitter"
                                      or (result.accepted_messages is not None and uncounted == 0))
        if client_messages_comparable and received_messages is not None:
            check["exact_vs_client_messages"] = result.accepted_messages == received_messages
        check["passed"] = bool(check["exact_vs_distributor"] and check["client_within_tolerance"]
                               and check["split_within_1_point"] is not False
                               and check.get("exact_vs_client_messages", True))
        return check

    def progress(self) -> str:
        """One progress line: the distributor's own accepted counter."""
        m = self.metrics()
        return f"accepted {m['accepted']:.0f}  unavailable/shed {m['unavailable'] + m['shed']:.0f}"

    def sink_progress(self) -> str:
        return f"sink packets {sum(c.packets for c in self.sinks.totals().values())}"

    def closed_loop(self, url: str, sizes: str, progress: Callable[[], str]) -> RunResult:
        a = self.args
        if self.wrk:
            return run_wrk(url, a.duration, a.connections, sizes, os.urandom(4).hex(), progress, a.wrk_threads)
        return run_emitter(url, a.duration, a.connections, sizes)

    # ----------------------------------------------------------------- scenarios

    def warm_up(self) -> None:
        print("[warm-up] 1s, not recorded", file=sys.stderr, flush=True)
        run_emitter(self.cluster.ingest_url, 1.0, self.args.connections, "fixed")  # connections, allocator, caches
        self.settle("distributor")

    def throughput(self) -> float:
        """Max accepted packets/s with < 1% 503: halve the connections while 503s are above 1%."""
        url = self.cluster.ingest_url
        record = self.measure("throughput", "distributor", "fixed", lambda: self.closed_loop(url, "fixed", self.progress))
        for _ in range(2):
            if record["ratio_503"] < 0.01:
                break
            self.args.connections = max(1, self.args.connections // 2)
            record = self.measure("throughput", "distributor", "fixed",
                                  lambda: self.closed_loop(url, "fixed", self.progress))
        record["max"] = True
        return float(record["packets_per_s"])

    def latency(self, peak: float) -> dict[str, Any] | None:
        """Open loop at 25/50/75% of the max; then, with nginx installed, the generator's floor at 50%."""
        for fraction in (0.25, 0.5, 0.75):
            rate = peak * fraction
            extra: dict[str, Any] = {"load_fraction": fraction, "offered_rate": rate}

            def load() -> RunResult:
                result = run_emitter(self.cluster.ingest_url, self.args.duration, self.args.connections, "fixed",
                                     rate=rate)
                # below the offered rate, the emitter fell behind its schedule: its lateness is in the latency
                extra["achieved_offered_rate"] = result.sent / max(result.duration_s, 1e-9)
                return result

            self.measure(f"latency@{fraction:.0%}", "distributor", "fixed", load, extra)
        if nginx_binary() is None:
            return {"skipped": f"nginx not installed: {INSTALL_HINT}"}
        print("[latency floor] the same load at 50% against an nginx that answers 202 at once",
              file=sys.stderr, flush=True)
        with NginxProxy((), self.args.workers) as stub:
            window = CpuWindow({"stub": stub.pids})
            floor = run_emitter(stub.url, self.args.duration, self.args.connections, "fixed", rate=peak / 2)
            cpu = window.stop()
        return {"load_fraction": 0.5, "offered_rate": peak / 2, "latency_ms": floor.latency_ms,
                "service_ms": floor.service_ms, "achieved_offered_rate": floor.sent / max(floor.duration_s, 1e-9),
                "loadavg": {"start": cpu["loadavg_start"], "end": cpu["loadavg_end"]}, "cpu": cpu}

    def stress(self, peak: float) -> None:
        """2x max offered, open loop: analyzers normal, then stalled; RSS sampled every second."""
        bound = self.args.queue_max_bytes_total / MIB + 60
        for stalled in (False, True):
            extra: dict[str, Any] = {"offered_rate": 2 * peak, "analyzers_stalled": stalled, "rss_bound_mb": bound}

            def load() -> RunResult:
                sampler = AdminSampler(self.cluster)
                if stalled:
                    self.sinks.stall(True)
                try:
                    with sampler:
                        result = run_emitter(self.cluster.ingest_url, self.args.duration, 256, "fixed",
                                             rate=2 * peak, probe_rate=200)
                finally:
                    self.sinks.stall(False)
                extra["achieved_offered_rate"] = result.sent / max(result.duration_s, 1e-9)
                extra["peak_rss_mb"] = sampler.peak_rss_mb
                extra["rss_within_bound"] = all(v <= bound for v in sampler.peak_rss_mb.values())
                return result

            self.measure("stress-stalled" if stalled else "stress", "distributor", "fixed", load, extra)

    def stress_cpu(self) -> dict[str, Any]:
        """Several wrk processes, many connections, closed loop, free analyzers: does a worker keep answering?"""
        a = self.args
        conns = a.stress_wrk * a.stress_connections
        extra: dict[str, Any] = {"wrk_processes": a.stress_wrk, "connections_per_wrk": a.stress_connections}

        def load() -> RunResult:
            with AdminSampler(self.cluster) as sampler:
                result = run_wrk(self.cluster.ingest_url, a.duration, a.stress_connections, "fixed",
                                 os.urandom(4).hex(), self.progress, threads=1, processes=a.stress_wrk)
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

        record = self.measure("stress-cpu", "distributor", "fixed", load, extra)
        # the same load against the bare floor: what this box and this generator allow at all. In a closed
        # loop the mean latency is connections / answers per second, so no server answers faster than this
        with BareFloor(a.workers) as floor:
            floor_record = self.measure(
                "stress-cpu", "floor", "fixed",
                lambda: run_wrk(floor.url, a.duration, a.stress_connections, "fixed", os.urandom(4).hex(),
                                lambda: "bare floor", threads=1, processes=a.stress_wrk), sut=floor.pids)
        seconds = record["duration_s"] or 1e-9
        statuses = record["by_status"]
        answered = sum(statuses.values())
        n503 = statuses.get("503", 0)
        summary = {
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
        return summary

    def baseline(self, with_nginx: bool) -> dict[str, Any]:
        """``--rounds`` rounds of distributor / nginx proxy / bare floor (wrk, closed loop, fixed sizes)."""
        if not self.wrk:
            return {"skipped": "needs wrk (--generator emitter or wrk missing): " + INSTALL_HINT}
        skipped_nginx = None
        if with_nginx and nginx_binary() is None:
            skipped_nginx = f"nginx not installed: {INSTALL_HINT}"
            with_nginx = False
        upstreams = [(url, int(w)) for _, url, w in self.sinks.urls()]
        rounds: list[dict[str, Any]] = []
        pairs: dict[str, dict[str, Any]] = {}
        with contextlib.ExitStack() as stack:
            nginx = stack.enter_context(NginxProxy(upstreams, self.args.workers)) if with_nginx else None
            floor = stack.enter_context(BareFloor(self.args.workers))
            ingest = self.cluster.ingest_url
            for r in range(1, self.args.rounds + 1):
                start = loadavg()
                entry: dict[str, Any] = {"round": r}
                entry["distributor"] = self.measure(
                    "baseline", "distributor", "fixed", lambda: self.closed_loop(ingest, "fixed", self.progress),
                    round_no=r)
                if nginx is not None:
                    proxy = nginx
                    entry["nginx"] = self.measure(
                        "baseline", "nginx", "fixed", lambda: self.closed_loop(proxy.url, "fixed", self.sink_progress),
                        sut=proxy.pids, round_no=r)
                entry["floor"] = self.measure(
                    "baseline", "floor", "fixed", lambda: self.closed_loop(floor.url, "fixed", lambda: "bare floor"),
                    sut=floor.pids, round_no=r)
                entry["loadavg"] = {"start": start, "end": loadavg()}
                rounds.append(entry)
            if nginx is not None:  # one skewed pair: nginx balances requests, the distributor messages
                proxy = nginx
                this = self.measure("baseline", "distributor", "skewed",
                                    lambda: self.closed_loop(ingest, "skewed", self.progress))
                other = self.measure("baseline", "nginx", "skewed",
                                     lambda: self.closed_loop(proxy.url, "skewed", self.sink_progress), sut=proxy.pids)
                pairs["skewed"] = {
                    "distributor_packets_per_s": this["packets_per_s"], "nginx_packets_per_s": other["packets_per_s"],
                    "packets_per_s_ratio": this["packets_per_s"] / max(other["packets_per_s"], 1e-9),
                    "distributor_p99_ms": this["latency_ms"]["p99"], "nginx_p99_ms": other["latency_ms"]["p99"],
                    "p99_ratio": this["latency_ms"]["p99"] / max(other["latency_ms"]["p99"], 1e-9),
                    "distributor_split_error_points": this["check"]["split_error_points"],
                    "nginx_split_error_points": other["check"]["split_error_points"],
                }
            config = nginx.config.read_text() if nginx is not None else None
        out: dict[str, Any] = {"sinks": self.sinks.kind, "workers": self.args.workers, "rounds": summarize_rounds(rounds),
                               "comparison": compare(rounds), "pairs": pairs, "nginx_conf": config}
        if skipped_nginx:
            out["nginx_skipped"] = skipped_nginx
        return out


def summarize_rounds(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: 2xx/s, p99 and CPU µs per 2xx of each system, the load average at both ends."""
    out = []
    for entry in rounds:
        row: dict[str, Any] = {"round": entry["round"], "loadavg": entry["loadavg"]}
        for system in ("distributor", "nginx", "floor"):
            record = entry.get(system)
            if record is None:
                continue
            per = record["cpu_us_per_2xx"]
            row[system] = {
                "packets_per_s": record["packets_per_s"], "p99_ms": record["latency_ms"].get("p99"),
                "cpu_us_per_2xx": per.get("sut"), "sinks_cpu_us_per_2xx": per.get("sinks"),
                "generator_cpu_us_per_2xx": per.get("generator"),
                "machine_busy_fraction": record["cpu"]["machine_busy_fraction"],
                "other_cpu_s": record["cpu"]["other_s"], "passed": record["check"]["passed"],
                "run": record["run"],
            }
        out.append(row)
    return out


def compare(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """distributor / baseline per round, and over the rounds the least and the most flattering ratio."""
    out: dict[str, Any] = {}
    for other in ("nginx", "floor"):
        ratios = [e["distributor"]["packets_per_s"] / max(e[other]["packets_per_s"], 1e-9)
                  for e in rounds if other in e]
        cpu = [(e[other]["cpu_us_per_2xx"].get("sut") or 0) / max(e["distributor"]["cpu_us_per_2xx"].get("sut") or 0,
                                                                   1e-9) for e in rounds if other in e]
        if ratios:
            out[f"distributor_over_{other}"] = {"per_round": ratios, "min": min(ratios), "max": max(ratios)}
            # > 1: the distributor spends less CPU per 2xx than the other system's own processes
            out[f"cpu_per_2xx_{other}_over_distributor"] = {"per_round": cpu, "min": min(cpu), "max": max(cpu)}
    return out


def memory_scenario(args: argparse.Namespace) -> dict[str, Any]:
    """Fill every queue of every worker (Python analyzers stalled) and sample worker memory."""
    queue_mib = args.queue_mib
    cluster = LocalCluster(
        analyzers=WEIGHTS,
        workers=args.workers,
        analyzer_args={name: ["--stall", "--sink"] for name, _ in WEIGHTS},
        # stalled analyzers must stay "up", or health checks / send timeouts take them out and
        # the distributor answers 503 before the queues are full
        distributor_args=["--set", "queue.max_packets=1000000", "--set", f"queue.max_bytes={queue_mib << 20}",
                          "--set", "graceful_timeout=2", "--set", "health.fall=1000000",
                          "--set", "sender.request_timeout=600", "--set", "outlier.consecutive_failures=1000000"],
    )
    cap = len(WEIGHTS) * (queue_mib << 20)
    peak: dict[str, dict[str, float]] = {}
    start = loadavg()
    with cluster:
        print(f"[memory] filling {len(WEIGHTS)} x {queue_mib} MiB queues per worker ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        deadline = started + 120
        while time.monotonic() < deadline:
            accepted = run_emitter(cluster.ingest_url, 1.0, 32, "fixed").accepted_packets
            workers = cluster.admin("/admin/workers")["workers"]
            for w in workers:
                entry = peak.setdefault(str(w["slot"]), {"rss_mb": 0.0, "uss_mb": 0.0, "queued_mb": 0.0})
                entry["rss_mb"] = max(entry["rss_mb"], w.get("rss_bytes", 0) / MIB)
                entry["uss_mb"] = max(entry["uss_mb"], w.get("uss_bytes", 0) / MIB)
                entry["queued_mb"] = max(entry["queued_mb"], w["queued_bytes"] / MIB)
            queued = " ".join(f"{w['queued_bytes'] / MIB:.0f}" for w in workers)
            print(f"  [memory] {time.monotonic() - started:5.1f}s queued MiB per worker: {queued} of {cap / MIB:.0f}",
                  file=sys.stderr, flush=True)
            # full: no worker has room left for another ~2.6 KB packet in any queue
            if all(w["queued_bytes"] > cap - len(WEIGHTS) * 4096 for w in workers):
                break
            if accepted == 0:  # nothing fits any more (or overload shedding answers 503): a plateau
                break
    bound = cap / MIB + 60
    return {
        "analyzers": "python, stalled (whatever --sinks says)",
        "queue_bytes_per_worker_mb": cap / MIB,
        "bound_mb": bound,
        "workers": peak,
        "filled": all(p["queued_mb"] > cap / MIB - 1 for p in peak.values()),
        "within_bound": all(p["rss_mb"] <= bound for p in peak.values()),
        "loadavg": {"start": start, "end": loadavg()},
    }


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets (2 cores, 2 workers, 4 analyzers): reported as met/missed, never hidden."""
    out: dict[str, Any] = {}
    baseline = report.get("baseline") or {}
    comparison = baseline.get("comparison", {})
    sinks = baseline.get("sinks", report.get("sinks"))
    if "distributor_over_nginx" in comparison:
        ratio = comparison["distributor_over_nginx"]
        out[f"2xx_per_s_vs_nginx_proxy_{sinks}_sinks_ge_1.2x"] = {
            "value": ratio["min"], "max": ratio["max"], "met": ratio["min"] >= 1.2, "judged_on": "least flattering round"}
        out[f"2xx_per_s_vs_nginx_proxy_{sinks}_sinks_ge_1.0x_must"] = {
            "value": ratio["min"], "max": ratio["max"], "met": ratio["min"] >= 1.0, "judged_on": "least flattering round"}
    if "distributor_over_floor" in comparison:
        ratio = comparison["distributor_over_floor"]
        out["2xx_per_s_vs_bare_floor_ge_0.7x"] = {"value": ratio["min"], "max": ratio["max"],
                                                  "met": ratio["min"] >= 0.7, "judged_on": "least flattering round"}
    skewed = baseline.get("pairs", {}).get("skewed")
    if skewed and skewed["distributor_split_error_points"] is not None:
        split = skewed["distributor_split_error_points"]
        out["split_error_skewed_le_0.5_points"] = {"value": split, "met": split <= 0.5}
    half = next((r for r in report["runs"] if r["scenario"] == "latency@50%"), None)
    floor = (report.get("latency_floor") or {}).get("latency_ms") or {}
    if half:
        p99 = half["latency_ms"]["p99"]
        out["p99_at_50pct_le_2ms"] = {"value": p99, "met": p99 <= 2.0,
                                      "service_p99": (half.get("service_ms") or {}).get("p99"),
                                      "handler_p99_le_ms": half.get("handler_p99_le_ms"),
                                      "generator_floor_p99": floor.get("p99")}
        if floor.get("p99") is not None:
            excess = p99 - floor["p99"]
            service = (half.get("service_ms") or {}).get("p99")
            floor_service = ((report.get("latency_floor") or {}).get("service_ms") or {}).get("p99")
            out["p99_at_50pct_minus_generator_floor_le_1ms"] = {
                "value": excess, "met": excess <= 1.0, "p99": p99, "generator_floor_p99": floor["p99"],
                "service_p99_minus_floor_service_p99": (None if service is None or floor_service is None
                                                        else service - floor_service),
                "generator_kept_schedule": (half.get("achieved_offered_rate") or 0) >= 0.95 * half["offered_rate"]}
    stress = report.get("stress_cpu") or {}
    if "p99_met" in stress:
        p99 = stress["latency_all_answers_ms"]["p99"]
        out["stress_cpu_p99_all_answers_lt_50ms"] = {"value": p99, "met": stress["p99_met"]}
        n503, with_ra = stress["status_503"], stress["status_503_with_retry_after"] or 0
        out["stress_cpu_503s_with_retry_after"] = {"value": float(n503), "with_retry_after": with_ra,
                                                   "met": n503 > 0 and with_ra == n503}
        out["stress_cpu_rss_le_queued_plus_60mb"] = {
            "value": max(stress["peak_rss_mb"].values(), default=0.0), "met": stress["rss_within_bound"]}
    if "memory" in report:
        worst = max((p["rss_mb"] for p in report["memory"]["workers"].values()), default=0.0)
        out["rss_queues_full_le_queue_bytes_plus_60mb"] = {"value": worst, "bound": report["memory"]["bound_mb"],
                                                            "met": report["memory"]["within_bound"]}
    return out


def fmt_load(la: dict[str, list[float]] | None) -> str:
    if not la:
        return ""
    return f"{la['start'][0]:.2f}>{la['end'][0]:.2f}"


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\ngenerator: {report['generator']}   machine: {m['cores']} cores, {m['cpu']}   workers: "
          f"{report['workers']}   sinks: {report['sinks']}   commit: {(report['git']['commit'] or '?')[:10]}"
          + (f" + {len(report['git']['modified_files'])} modified files" if report["git"]["modified_files"] else ""))
    print(f"loadavg at start {report['loadavg_start']}  at end {report.get('loadavg_end')}")
    print(f"{'#':>3} {'scenario':<15}{'target':<12}{'sizes':<7}{'rnd':>3}{'2xx/s':>9}{'msgs/s':>10}{'503':>7}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'p99.9':>8}{'split':>7}{'uncnt':>7}{'load1':>12}  check")
    for r in report["runs"]:
        c, lat = r["check"], r["latency_ms"]
        split = c.get("split_error_points")
        print(f"{r['run']:>3} {r['scenario']:<15}{r['target']:<12}{r['sizes']:<7}{r['round'] or '':>3}"
              f"{r['packets_per_s']:>9.0f}{r['messages_per_s']:>10.0f}{r['ratio_503']:>7.1%}{lat.get('p50', 0):>8.2f}"
              f"{lat.get('p99', 0):>8.2f}{lat.get('p99.9', 0):>8.2f}{'-' if split is None else f'{split:.2f}':>7}"
              f"{c.get('uncounted_by_client', '-'):>7}{fmt_load(r['loadavg']):>12}  {'ok' if c['passed'] else 'FAILED'}")
        if r.get("service_ms") and r.get("offered_rate") and r["scenario"].startswith("latency"):
            sv = r["service_ms"]
            print(f"{'':<19}service time (from the write, no generator timer lag): p50 {sv['p50']:.2f} ms  "
                  f"p99 {sv['p99']:.2f} ms  p99.9 {sv['p99.9']:.2f} ms; handler p99 <= {r.get('handler_p99_le_ms')} ms")
        if r.get("achieved_offered_rate"):
            short = r["achieved_offered_rate"] < 0.9 * r["offered_rate"]
            print(f"{'':<19}offered {r['offered_rate']:.0f}/s, generator reached {r['achieved_offered_rate']:.0f}/s"
                  + (" (generator-bound: latency from schedule is the generator's backlog; see service time)"
                     if short else ""))
        if r.get("latency_503_ms"):
            l5 = r["latency_503_ms"]
            print(f"{'':<19}503 answers (probe): p50 {l5['p50']:.2f} ms  p99 {l5['p99']:.2f} ms  "
                  f"max {l5['max']:.2f} ms; peak RSS MiB {r['peak_rss_mb']} (bound {r['rss_bound_mb']:.0f})")

    print("\nCPU per 2xx answer (µs; sut = the system's own processes; sinks = the analyzers; generator = wrk or "
          "the emitter; other = the rest of the machine, e.g. other engineers' tests)")
    print(f"{'#':>3} {'scenario':<15}{'target':<12}{'sut':>8}{'sinks':>8}{'gen':>8}{'machine':>9}"
          f"{'cores busy':>11}{'sut cores':>10}{'gen cores':>10}{'other s':>9}{'steal s':>9}")
    for r in report["runs"]:
        per, cpu = r["cpu_us_per_2xx"], r["cpu"]
        wall = max(cpu["wall_s"], 1e-9)
        gen_s = cpu["generator_s"] + (cpu["harness_s"] if r["generator"] == "emitter" else 0.0)

        def us(key: str) -> str:
            value = per.get(key)
            return "-" if value is None else f"{value:.1f}"

        print(f"{r['run']:>3} {r['scenario']:<15}{r['target']:<12}{us('sut'):>8}{us('sinks'):>8}{us('generator'):>8}"
              f"{us('machine'):>9}{cpu['machine_busy_fraction'] * (report['machine']['cores'] or 1):>11.2f}"
              f"{cpu['groups_s'].get('sut', 0.0) / wall:>10.2f}{gen_s / wall:>10.2f}{cpu['other_s']:>9.2f}"
              f"{cpu['machine_steal_s']:>9.2f}")

    floor = report.get("latency_floor") or {}
    half = next((r for r in report["runs"] if r["scenario"] == "latency@50%"), None)
    if half and floor.get("latency_ms"):
        fl, fs, hs = floor["latency_ms"], floor["service_ms"], half.get("service_ms") or {}
        excess = half["latency_ms"]["p99"] - fl["p99"]
        print(f"\nlatency at 50% (open loop, {half['offered_rate']:.0f}/s), same run:")
        print(f"  {'':<34}{'p50 ms':>9}{'p99 ms':>9}{'p99.9':>9}{'service p99':>13}{'reached/s':>11}{'load1':>13}")
        for label, lat, sv, reached, la in (
                ("distributor", half["latency_ms"], hs, half.get("achieved_offered_rate"), half["loadavg"]),
                ("generator floor (nginx stub, 202)", fl, fs, floor.get("achieved_offered_rate"), floor["loadavg"])):
            print(f"  {label:<34}{lat['p50']:>9.2f}{lat['p99']:>9.2f}{lat['p99.9']:>9.2f}{sv.get('p99', 0):>13.2f}"
                  f"{reached or 0:>11.0f}{fmt_load(la):>13}")
        print(f"  p99 at 50% minus the generator floor's p99: {excess:+.2f} ms (target <= 1 ms: "
              f"{'met' if excess <= 1.0 else 'MISSED'}); the same from the write (service time): "
              f"{hs.get('p99', 0) - fs['p99']:+.2f} ms")
    elif floor.get("skipped"):
        print(f"\ngenerator floor skipped: {floor['skipped']}")

    baseline = report.get("baseline") or {}
    if baseline.get("rounds"):
        print(f"\nsame run, alternating rounds (wrk closed loop, {report['config']['connections']} connections, "
              f"fixed packets; sinks: {baseline['sinks']}; CPU µs per 2xx of the system's own processes, "
              f"+ sinks in brackets)")
        print(f"{'round':>5}{'distributor':>13}{'nginx proxy':>13}{'bare floor':>12}{'d/nginx':>9}{'d/floor':>9}"
              f"{'µs dist':>14}{'µs nginx':>15}{'µs floor':>10}{'load1':>13}")
        for row in baseline["rounds"]:
            d, n, f = row["distributor"], row.get("nginx"), row["floor"]

            def cpu_cell(x: dict[str, Any] | None) -> str:
                if x is None:
                    return "-"
                own = x["cpu_us_per_2xx"] or 0.0
                sinks = x.get("sinks_cpu_us_per_2xx")
                return f"{own:.1f}" + (f" (+{sinks:.1f})" if sinks is not None else "")

            print(f"{row['round']:>5}{d['packets_per_s']:>13.0f}{(n['packets_per_s'] if n else 0):>13.0f}"
                  f"{f['packets_per_s']:>12.0f}"
                  f"{(d['packets_per_s'] / n['packets_per_s'] if n and n['packets_per_s'] else 0):>9.2f}"
                  f"{d['packets_per_s'] / max(f['packets_per_s'], 1e-9):>9.2f}"
                  f"{cpu_cell(d):>14}{cpu_cell(n):>15}{cpu_cell(f):>10}{fmt_load(row['loadavg']):>13}")
        for key, label in (("distributor_over_nginx", "distributor / nginx proxy"),
                           ("distributor_over_floor", "distributor / bare floor"),
                           ("cpu_per_2xx_nginx_over_distributor", "CPU/2xx nginx / distributor (>1: distributor "
                                                                  "cheaper)"),
                           ("cpu_per_2xx_floor_over_distributor", "CPU/2xx floor / distributor")):
            if key in baseline["comparison"]:
                ratio = baseline["comparison"][key]
                print(f"  {label}: least flattering {ratio['min']:.2f}, most flattering {ratio['max']:.2f}")
    if baseline.get("nginx_skipped"):
        print(f"nginx proxy skipped: {baseline['nginx_skipped']}")
    for sizes, pair in baseline.get("pairs", {}).items():
        split_d, split_n = pair["distributor_split_error_points"], pair["nginx_split_error_points"]
        print(f"vs nginx ({sizes}): packets/s x{pair['packets_per_s_ratio']:.2f}, p99 x{pair['p99_ratio']:.2f}, "
              f"message split error {'-' if split_d is None else f'{split_d:.2f}'} vs "
              f"{'-' if split_n is None else f'{split_n:.2f}'} points")
    if "skipped" in baseline:
        print(f"baseline skipped: {baseline['skipped']}")

    stress = report.get("stress_cpu") or {}
    if stress.get("skipped"):
        print(f"\nstress-cpu skipped: {stress['skipped']}")
    elif stress:
        per_s, lat, lag = stress["answers_per_s"], stress["latency_all_answers_ms"], stress["event_loop_lag_ms"]
        print(f"\nstress-cpu (run {stress['run']}): {stress['wrk_processes']} wrk x "
              f"{stress['connections'] // stress['wrk_processes']} connections, closed loop, free analyzers, "
              f"{stress['duration_s']:.1f} s, load {fmt_load(stress['loadavg'])}")
        print(f"  answers/s: 202 {per_s['202']:.0f}  503 {per_s['503']:.0f}  429 {per_s['429']:.0f}  "
              f"other {per_s['other']:.0f}  (all {per_s['all']:.0f}); socket errors {stress['errors']}")
        print(f"  latency of ALL answers: p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  p99.9 {lat['p99.9']:.2f} ms"
              f"  max {lat['max']:.2f} ms -> p99 < {stress['p99_target_ms']:.0f} ms: "
              f"{'met' if stress['p99_met'] else 'MISSED'}" + ("" if stress["latency_is_raw"] else
                                                                 " (wrk's corrected figures: raw ones unreadable)"))
        corr = stress["latency_wrk_corrected_ms"] or {}
        print(f"  mean {lat.get('mean', 0):.1f} ms vs Little's law {stress['connections']} connections / answers/s = "
              f"{stress['littles_law_mean_ms']:.1f} ms; wrk's coordinated-omission-corrected figures: "
              f"p50 {corr.get('p50', 0):.2f} ms  p99 {corr.get('p99', 0):.2f} ms  p99.9 {corr.get('p99.9', 0):.2f} ms")
        fl = stress["floor"]
        print(f"  same load on the bare floor (run {fl['run']}): {fl['answers_per_s']:.0f} answers/s, p50 "
              f"{fl['latency_ms']['p50']:.2f} ms  p99 {fl['latency_ms']['p99']:.2f} ms  max {fl['latency_ms']['max']:.2f} "
              f"ms; a mean under {stress['p99_target_ms']:.0f} ms needs >= "
              f"{stress['answers_per_s_needed_for_mean_under_target']:.0f} answers/s")
        with_ra = stress["status_503_with_retry_after"]
        print(f"  503: {stress['status_503']} answers, {with_ra} with Retry-After; distributor's own counts "
              f"{stress['distributor_outcomes']}")
        print(f"  event-loop lag (/admin/workers, 1 sample/s/worker, {lag['samples']} samples): max {lag['max']:.1f} ms"
              f"  p99 {lag['p99']:.1f} ms  p50 {lag['p50']:.1f} ms")
        print(f"  peak queued MiB {fmt_mb(stress['peak_queued_mb'])}; peak RSS MiB {fmt_mb(stress['peak_rss_mb'])} "
              f"(bound queued + 60: {'ok' if stress['rss_within_bound'] else 'EXCEEDED'})")
        per = stress["cpu_us_per_answer"]
        print(f"  CPU µs per answer: distributor {per.get('sut', 0):.1f}, sinks {per.get('sinks', 0):.1f}, "
              f"wrk {per.get('generator', 0):.1f}; machine busy {stress['machine_busy_fraction']:.0%}")
    if "memory" in report:
        memory = report["memory"]
        for slot, f in sorted(memory["workers"].items()):
            print(f"memory worker {slot}: queues {f['queued_mb']:.0f} MiB -> peak RSS {f['rss_mb']:.0f} MiB, "
                  f"USS {f['uss_mb']:.0f} MiB (bound {memory['bound_mb']:.0f} MiB)")
    print()
    for name, t in report["targets"].items():
        more = f" (most flattering {t['max']:.2f})" if "max" in t else ""
        print(f"target {name}: {t['value']:.2f}{more} -> {'met' if t['met'] else 'MISSED'}")
    print(f"check: {'PASSED' if report['check']['passed'] else 'FAILED'}"
          + (f" (failed runs: {', '.join(report['check']['failed_runs'])})" if report["check"]["failed_runs"] else ""))


def fmt_mb(values: dict[str, float]) -> str:
    return "{" + ", ".join(f"w{k}: {v:.1f}" for k, v in sorted(values.items())) + "}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help="comma list of " + ",".join(ALL_SCENARIOS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--generator", choices=("auto", "wrk", "emitter"), default="auto",
                        help="closed-loop generator; auto: wrk when installed (latency always uses the emitter)")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--sinks", choices=("python", "nginx"), default="python",
                        help="analyzers: python sink processes (default) or free ones answered by nginx")
    parser.add_argument("--baseline", choices=("none", "nginx", "floor"), default="none",
                        help="nginx: rounds of distributor / nginx weighted proxy / bare floor; floor: without nginx")
    parser.add_argument("--rounds", type=int, default=3, help="baseline rounds (default 3)")
    parser.add_argument("--stress-wrk", type=int, default=3, help="wrk processes in stress-cpu (default 3)")
    parser.add_argument("--stress-connections", type=int, default=256, help="connections per wrk in stress-cpu")
    parser.add_argument("--queue-max-packets", type=int, default=5000, help="queue.max_packets of the bench cluster")
    parser.add_argument("--queue-mib", type=int, default=32, help="queue.max_bytes per analyzer in the memory scenario")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install nginx-light / wrk")
    parser.add_argument("--output", default=None, help="JSON report (default loadtest/results/bench-<timestamp>.json)")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {','.join(ALL_SCENARIOS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    need_nginx = args.sinks == "nginx" or args.baseline == "nginx" or bool({"latency", "stress-cpu"} & set(scenarios))
    need_wrk = (args.generator != "emitter" or args.baseline != "none" or "stress-cpu" in scenarios)
    missing = ensure_installed([t for t, needed in (("nginx", need_nginx), ("wrk", need_wrk)) if needed],
                               allow_install=not args.no_install)
    if args.sinks == "nginx" and "nginx" in missing:
        print(f"--sinks nginx needs nginx, which is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if args.generator == "wrk" and not generators.wrk_available():
        parser.error(f"wrk is not installed: {INSTALL_HINT}")
    args.queue_max_bytes_total = len(WEIGHTS) * min(args.queue_max_packets * 4096, 64 << 20)
    started = time.time()
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, "-m", "loadtest.bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"cores": os.cpu_count(), "cpu": cpu_model(), "kernel": platform.release(),
                    "memory_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB)},
        "git": git_revision(),
        "versions": versions(), "workers": args.workers, "scenarios": scenarios, "sinks": args.sinks,
        "loadavg_start": loadavg(),
        "config": {"duration_s": args.duration, "connections": args.connections, "analyzers": dict(WEIGHTS),
                   "sinks": args.sinks, "analyzer_mode": "--sink" if args.sinks == "python" else "nginx return 200",
                   "queue_max_packets": args.queue_max_packets, "baseline": args.baseline, "rounds": args.rounds,
                   "wrk_threads": args.wrk_threads, "stress_wrk": args.stress_wrk,
                   "stress_connections": args.stress_connections},
    }
    wants_stress_cpu = "stress-cpu" in scenarios
    stress_cpu_ready = generators.wrk_available() and nginx_binary() is not None
    if wants_stress_cpu and not stress_cpu_ready:
        report["stress_cpu"] = {"skipped": f"needs wrk and nginx (free analyzers): {INSTALL_HINT}"}
    main_cluster = (bool({"throughput", "latency", "stress"} & set(scenarios)) or args.baseline != "none"
                    or (wants_stress_cpu and stress_cpu_ready and args.sinks == "nginx"))
    runs: list[dict[str, Any]] = []
    report["generator"] = "distributor.tools.emitter"
    if main_cluster:
        with started_cluster(args, args.sinks) as (cluster, sinks):
            bench = Bench(args, cluster, sinks, runs)
            if isinstance(sinks, NginxSinks):
                report["sinks_nginx_conf"] = sinks.config.read_text()
            if bench.wrk:
                report["generator"] = "wrk " + (generators.wrk_version() or "")
            bench.warm_up()
            if {"throughput", "latency", "stress"} & set(scenarios):
                peak = bench.throughput()
                report["max_packets_per_s"] = peak
                if "latency" in scenarios:
                    report["latency_floor"] = bench.latency(peak)
            if args.baseline != "none":
                report["baseline"] = bench.baseline(with_nginx=args.baseline == "nginx")
            if "stress" in scenarios:
                bench.stress(report["max_packets_per_s"])
            if wants_stress_cpu and stress_cpu_ready and args.sinks == "nginx":
                report["stress_cpu"] = bench.stress_cpu()
    if wants_stress_cpu and stress_cpu_ready and args.sinks != "nginx":
        print("[stress-cpu] needs free analyzers: a second distributor delivering to nginx sinks",
              file=sys.stderr, flush=True)
        with started_cluster(args, "nginx") as (cluster, sinks):
            bench = Bench(args, cluster, sinks, runs)
            bench.warm_up()
            report["stress_cpu"] = bench.stress_cpu()
    report["runs"] = runs
    if "memory" in scenarios:
        report["memory"] = memory_scenario(args)
    failed = [f"#{r['run']} {r['scenario']}/{r['target']}/{r['sizes']}" for r in runs if not r["check"]["passed"]]
    memory_ok = report.get("memory", {}).get("within_bound", True)
    report["check"] = {"passed": not failed and memory_ok, "failed_runs": failed, "memory_within_bound": memory_ok}
    report["targets"] = targets(report)
    report["loadavg_end"] = loadavg()
    report["elapsed_s"] = time.time() - started
    print_table(report)
    out = Path(args.output or f"loadtest/results/bench-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"report: {out}")
    return 0 if report["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
