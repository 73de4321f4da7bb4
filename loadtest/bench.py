"""Benchmark: a real distributor pool and 4 sink analyzers on 127.0.0.1, optionally against nginx.

``python -m loadtest.bench [--scenarios throughput,latency,stress,memory] [--duration 5] [--baseline nginx]``

Scenarios (see loadtest/README.md for what each figure means):
* throughput: closed loop as fast as the distributor answers (wrk when installed,
  else the uvloop emitter): max accepted packets/s with < 1% 503;
* latency: open loop (uvloop emitter) at 25/50/75% of that max: p50/p99/p99.9
  measured from each request's scheduled send time;
* stress: open loop at 2x the max, first with the analyzers draining normally,
  then with them stalled (queues fill, the excess must be answered 503 at once):
  p99 of 503 answers and worker RSS sampled every second;
* memory: every analyzer stalled until every queue is full: peak RSS/USS per worker.
With ``--baseline nginx``, wrk runs alternate this / nginx / this / nginx (fixed,
then skewed 5/20-message packets) against the same analyzers.

Every run is checked after a drain: the analyzers received exactly what the
distributor counted as accepted (``/metrics``), the client's 202 count matches
within the requests in flight when wrk stopped (reported), and the message split
is within 1 point of the weights. A run that fails is reported FAILED; exit 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from distributor.tools.localcluster import LocalCluster, wait_until
from loadtest import generators
from loadtest.generators import EverySecond, RunResult, run_emitter, run_wrk
from loadtest.nginx_baseline import INSTALL_HINT, NginxProxy, nginx_binary, nginx_version

WEIGHTS = (("a1", 4.0), ("a2", 3.0), ("a3", 2.0), ("a4", 1.0))
ALL_SCENARIOS = ("throughput", "latency", "stress", "memory")
Totals = dict[str, tuple[int, int]]


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
    for package in ("uvloop", "aiohttp", "orjson", "httptools"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["nginx"] = nginx_version()
    found["wrk"] = generators.wrk_version()
    return found


def split_error_points(totals: Totals) -> float:
    """Largest |actual - target| message share over the analyzers, in percentage points."""
    messages = sum(m for _, m in totals.values())
    weight_sum = sum(w for _, w in WEIGHTS)
    if messages == 0:
        return 0.0
    return max(abs(totals[name][1] / messages - w / weight_sum) for name, w in WEIGHTS) * 100


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


class Bench:
    """One started cluster plus the bookkeeping that turns each run into a checked record."""

    def __init__(self, args: argparse.Namespace, cluster: LocalCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.runs: list[dict[str, Any]] = []
        self.wrk = args.generator == "wrk" or (args.generator == "auto" and generators.wrk_available())

    # ------------------------------------------------------------------ counters

    def analyzer_totals(self) -> Totals:
        return {name: (int(s["packets"]), int(s["messages"])) for name, s in self.cluster.analyzer_totals().items()}

    def metrics(self) -> dict[str, float]:
        """accepted packets and routed messages as the distributor itself counts them."""
        text = urllib.request.urlopen(self.cluster.admin_url + "/metrics", timeout=10).read().decode()
        out = {"accepted": 0.0, "routed": 0.0, "unavailable": 0.0, "shed": 0.0}
        for line in text.splitlines():
            if line.startswith("distributor_packets_total{"):
                for key in ("accepted", "unavailable", "shed"):
                    if f'outcome="{key}"' in line:
                        out[key] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("distributor_ingest_latency_seconds_bucket{"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                out[f"handler_le_{bound}"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("distributor_messages_total{"):
                for key in ("routed", "delivered", "failed_over"):
                    if f'outcome="{key}"' in line:
                        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def settle(self, target: str) -> None:
        """Drain: the distributor's queues are empty and the analyzers' totals stopped moving."""
        if target == "distributor":
            self.cluster.wait_drained(timeout=120)
        last: list[Totals] = [self.analyzer_totals()]

        def stable() -> bool:
            time.sleep(0.3)
            now = self.analyzer_totals()
            same = now == last[0]
            last[0] = now
            return same

        wait_until(stable, 60, "analyzer totals to settle")

    # ---------------------------------------------------------------------- runs

    def measure(self, scenario: str, target: str, sizes: str, load: Callable[[], RunResult],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run ``load``, drain, and check delivery and split on the analyzers' deltas."""
        print(f"[{scenario}] {target}, {sizes} packets, {self.args.duration:.0f}s ...", file=sys.stderr, flush=True)
        before, metrics_before = self.analyzer_totals(), self.metrics()
        result = load()
        self.settle(target)
        after, metrics_after = self.analyzer_totals(), self.metrics()
        delta = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in after}
        received_packets = sum(p for p, _ in delta.values())
        received_messages = sum(m for _, m in delta.values())
        uncounted = received_packets - result.accepted_packets
        tolerance = result.connections if result.generator == "wrk" else result.errors
        split = split_error_points(delta)
        check: dict[str, Any] = {
            "client_accepted_packets": result.accepted_packets,
            "client_accepted_messages": result.accepted_messages,
            "received_packets": received_packets,
            "received_messages": received_messages,
            "received_by_analyzer": {n: {"packets": p, "messages": m} for n, (p, m) in delta.items()},
            # accepted by the server but never seen answered by the client: requests in flight when
            # wrk stopped (wrk does not wait for them), or connections the emitter lost/aborted
            "uncounted_by_client": uncounted,
            "uncounted_tolerance": tolerance,
            "client_within_tolerance": 0 <= uncounted <= tolerance,
            "split_error_points": split,
            "split_within_1_point": split < 1.0,
        }
        if (extra or {}).get("analyzers_stalled"):
            # every queue full: packets spill to whichever analyzer has room, by design (README,
            # "Full queues spill over"), so the split of this window says nothing about routing
            check["split_within_1_point"] = None
            check["split_not_checked"] = "analyzers stalled: queues full, spill-over by design"
        if target == "distributor":
            accepted = int(metrics_after["accepted"] - metrics_before["accepted"])
            routed = int(metrics_after["routed"] - metrics_before["routed"])
            check["distributor_accepted_packets"] = accepted
            check["distributor_routed_messages"] = routed  # info: a failed-over packet is routed twice
            for key in ("delivered", "failed_over"):
                check[f"distributor_{key}_messages"] = int(metrics_after.get(key, 0) - metrics_before.get(key, 0))
            check["exact_vs_distributor"] = accepted == received_packets
            if result.generator == "emitter" or result.accepted_messages is not None and uncounted == 0:
                check["exact_vs_client_messages"] = result.accepted_messages == received_messages
            check["passed"] = (check["exact_vs_distributor"] and check["client_within_tolerance"]
                               and check["split_within_1_point"] is not False
                               and check.get("exact_vs_client_messages", True))
        else:  # nginx: nothing to compare with but its answers; its split is a finding, not a failure
            check["passed"] = check["client_within_tolerance"]
        seconds = result.duration_s or 1e-9
        extra = {**(extra or {}), "handler_p99_le_ms": handler_p99_bound_ms(metrics_before, metrics_after)}
        record = {
            "scenario": scenario, "target": target, "sizes": sizes, **result.as_dict(),
            "packets_per_s": result.accepted_packets / seconds,
            "messages_per_s": received_messages / seconds,
            "requests_per_s": result.answered / seconds,
            "ratio_503": result.ratio_503,
            "check": check, **(extra or {}),
        }
        self.runs.append(record)
        mark = "ok" if check["passed"] else "FAILED"
        print(f"[{scenario}] {record['packets_per_s']:.0f} packets/s, 503 {record['ratio_503']:.1%}, "
              f"p99 {result.latency_ms.get('p99', 0):.2f} ms, split error {split:.2f} points, "
              f"uncounted {uncounted}/{tolerance} -> {mark}", file=sys.stderr, flush=True)
        return record

    def progress(self) -> str:
        """One progress line: the distributor's own accepted counter."""
        m = self.metrics()
        return f"accepted {m['accepted']:.0f}  unavailable/shed {m['unavailable'] + m['shed']:.0f}"

    def closed_loop(self, url: str, sizes: str, progress: Callable[[], str]) -> RunResult:
        a = self.args
        if self.wrk:
            return run_wrk(url, a.duration, a.connections, sizes, os.urandom(4).hex(), progress, a.wrk_threads)
        return run_emitter(url, a.duration, a.connections, sizes)

    # ----------------------------------------------------------------- scenarios

    def throughput(self) -> float:
        """Max accepted packets/s with < 1% 503: halve the connections while 503s are above 1%."""
        url = self.cluster.ingest_url
        print("[warm-up] 1s, not recorded", file=sys.stderr, flush=True)
        run_emitter(url, 1.0, self.args.connections, "fixed")  # sender connections, allocator, caches
        self.settle("distributor")
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
            self.measure(f"latency@{fraction:.0%}", "distributor", "fixed",
                         lambda: run_emitter(self.cluster.ingest_url, self.args.duration, self.args.connections,
                                             "fixed", rate=rate), {"load_fraction": fraction})
        if nginx_binary() is None:
            return None
        print("[latency floor] the same load at 50% against an nginx that answers 202 at once",
              file=sys.stderr, flush=True)
        with NginxProxy((), self.args.workers) as stub:
            floor = run_emitter(stub.url, self.args.duration, self.args.connections, "fixed", rate=peak / 2)
        return {"load_fraction": 0.5, "offered_rate": peak / 2, "latency_ms": floor.latency_ms,
                "service_ms": floor.service_ms}

    def stress(self, peak: float) -> None:
        """2x max offered, open loop: analyzers normal, then stalled; RSS sampled every second."""
        bound = self.args.queue_max_bytes_total / 2**20 + 60
        for stalled in (False, True):
            extra: dict[str, Any] = {"offered_rate": 2 * peak, "analyzers_stalled": stalled, "rss_bound_mb": bound}

            def load() -> RunResult:
                sampler = RssSampler(self.cluster)
                if stalled:
                    for proc in self.cluster.analyzer_procs:
                        proc.control(stall=True)
                try:
                    with sampler:
                        result = run_emitter(self.cluster.ingest_url, self.args.duration, 256, "fixed",
                                             rate=2 * peak, probe_rate=200)
                finally:
                    for proc in self.cluster.analyzer_procs:
                        proc.control(stall=False)
                extra["achieved_offered_rate"] = result.sent / max(result.duration_s, 1e-9)
                extra["peak_rss_mb"] = sampler.peak_rss_mb
                extra["rss_within_bound"] = all(v <= bound for v in sampler.peak_rss_mb.values())
                return result

            self.measure("stress-stalled" if stalled else "stress", "distributor", "fixed", load, extra)

    def baseline(self) -> dict[str, Any]:
        """wrk alternating this / nginx / this / nginx (fixed, then skewed sizes) on the same analyzers."""
        if not self.wrk:
            return {"skipped": "needs wrk (--generator emitter or wrk missing): " + INSTALL_HINT}
        if nginx_binary() is None:
            print(INSTALL_HINT)
            return {"skipped": f"nginx not installed: {INSTALL_HINT}"}
        upstreams = [(proc.url, int(w)) for (_, w), proc in zip(WEIGHTS, self.cluster.analyzer_procs)]
        pairs: dict[str, dict[str, Any]] = {}
        with NginxProxy(upstreams, self.args.workers) as nginx:
            def nginx_progress() -> str:
                return f"analyzer packets {sum(p for p, _ in self.analyzer_totals().values())}"

            for sizes in ("fixed", "skewed"):
                this = self.measure("baseline", "distributor", sizes,
                                    lambda: self.closed_loop(self.cluster.ingest_url, sizes, self.progress))
                other = self.measure("baseline", "nginx", sizes,
                                     lambda: self.closed_loop(nginx.url, sizes, nginx_progress))
                pairs[sizes] = {
                    "distributor_packets_per_s": this["packets_per_s"], "nginx_packets_per_s": other["packets_per_s"],
                    "packets_per_s_ratio": this["packets_per_s"] / max(other["packets_per_s"], 1e-9),
                    "distributor_p99_ms": this["latency_ms"]["p99"], "nginx_p99_ms": other["latency_ms"]["p99"],
                    "p99_ratio": this["latency_ms"]["p99"] / max(other["latency_ms"]["p99"], 1e-9),
                    "distributor_split_error_points": this["check"]["split_error_points"],
                    "nginx_split_error_points": other["check"]["split_error_points"],
                }
            config = nginx.config.read_text()
        return {"pairs": pairs, "nginx_workers": self.args.workers, "nginx_conf": config}


class RssSampler(EverySecond):
    """Samples every worker's RSS from /admin/workers once a second while a run lasts."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__()
        self.cluster = cluster
        self.peak_rss_mb: dict[str, float] = {}

    def tick(self) -> None:
        try:
            for w in self.cluster.admin("/admin/workers")["workers"]:
                slot = str(w["slot"])
                self.peak_rss_mb[slot] = max(self.peak_rss_mb.get(slot, 0.0), w.get("rss_bytes", 0) / 2**20)
        except (OSError, ValueError, KeyError):
            pass


def memory_scenario(args: argparse.Namespace) -> dict[str, Any]:
    """Fill every queue of every worker (analyzers stalled) and sample worker memory."""
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
    with cluster:
        print(f"[memory] filling {len(WEIGHTS)} x {queue_mib} MiB queues per worker ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        deadline = started + 120
        while time.monotonic() < deadline:
            accepted = run_emitter(cluster.ingest_url, 1.0, 32, "fixed").accepted_packets
            workers = cluster.admin("/admin/workers")["workers"]
            for w in workers:
                entry = peak.setdefault(str(w["slot"]), {"rss_mb": 0.0, "uss_mb": 0.0, "queued_mb": 0.0})
                entry["rss_mb"] = max(entry["rss_mb"], w.get("rss_bytes", 0) / 2**20)
                entry["uss_mb"] = max(entry["uss_mb"], w.get("uss_bytes", 0) / 2**20)
                entry["queued_mb"] = max(entry["queued_mb"], w["queued_bytes"] / 2**20)
            queued = " ".join(f"{w['queued_bytes'] / 2**20:.0f}" for w in workers)
            print(f"  [memory] {time.monotonic() - started:5.1f}s queued MiB per worker: {queued} of {cap / 2**20:.0f}",
                  file=sys.stderr, flush=True)
            # full: no worker has room left for another ~2.6 KB packet in any queue
            if all(w["queued_bytes"] > cap - len(WEIGHTS) * 4096 for w in workers):
                break
            if accepted == 0:  # nothing fits any more (or overload shedding answers 503): a plateau
                break
    bound = cap / 2**20 + 60
    return {
        "queue_bytes_per_worker_mb": cap / 2**20,
        "bound_mb": bound,
        "workers": peak,
        "filled": all(p["queued_mb"] > cap / 2**20 - 1 for p in peak.values()),
        "within_bound": all(p["rss_mb"] <= bound for p in peak.values()),
    }


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets (2 cores, 2 workers, 4 sinks): reported as met/missed, never hidden."""
    out: dict[str, Any] = {}
    pairs = report.get("baseline", {}).get("pairs", {})
    if "fixed" in pairs:
        ratio = pairs["fixed"]["packets_per_s_ratio"]
        out["packets_per_s_vs_nginx_ge_1.2x"] = {"value": ratio, "met": ratio >= 1.2}
    if "skewed" in pairs:
        split = pairs["skewed"]["distributor_split_error_points"]
        out["split_error_skewed_le_0.5_points"] = {"value": split, "met": split <= 0.5}
    half = next((r for r in report["runs"] if r["scenario"] == "latency@50%"), None)
    if half:
        out["p99_at_50pct_le_2ms"] = {"value": half["latency_ms"]["p99"], "met": half["latency_ms"]["p99"] <= 2.0,
                                      "service_p99": (half.get("service_ms") or {}).get("p99"),
                                      "handler_p99_le_ms": half.get("handler_p99_le_ms"),
                                      "generator_floor_p99": ((report.get("latency_floor") or {}).get("latency_ms")
                                                              or {}).get("p99")}
    if "memory" in report:
        worst = max((p["rss_mb"] for p in report["memory"]["workers"].values()), default=0.0)
        out["rss_queues_full_le_queue_bytes_plus_60mb"] = {"value": worst, "bound": report["memory"]["bound_mb"],
                                                            "met": report["memory"]["within_bound"]}
    return out


def print_table(report: dict[str, Any]) -> None:
    print(f"\ngenerator: {report['generator']}   machine: {report['machine']['cores']} cores, "
          f"{report['machine']['cpu']}   workers: {report['workers']}")
    print(f"{'scenario':<16}{'target':<12}{'sizes':<7}{'packets/s':>10}{'msgs/s':>10}{'503':>7}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'p99.9':>8}{'split':>7}{'uncnt':>7}  check")
    for r in report["runs"]:
        c, lat = r["check"], r["latency_ms"]
        print(f"{r['scenario']:<16}{r['target']:<12}{r['sizes']:<7}{r['packets_per_s']:>10.0f}"
              f"{r['messages_per_s']:>10.0f}{r['ratio_503']:>7.1%}{lat.get('p50', 0):>8.2f}{lat.get('p99', 0):>8.2f}"
              f"{lat.get('p99.9', 0):>8.2f}{c['split_error_points']:>7.2f}{c['uncounted_by_client']:>7}  "
              f"{'ok' if c['passed'] else 'FAILED'}")
        if r.get("service_ms") and r.get("offered_rate"):
            sv = r["service_ms"]
            print(f"{'':<16}service time (from the write, no generator timer lag): p50 {sv['p50']:.2f} ms  "
                  f"p99 {sv['p99']:.2f} ms  p99.9 {sv['p99.9']:.2f} ms; handler p99 <= {r['handler_p99_le_ms']} ms")
        if r.get("achieved_offered_rate"):
            short = r["achieved_offered_rate"] < 0.9 * r["offered_rate"]
            print(f"{'':<16}offered {r['offered_rate']:.0f}/s, generator reached {r['achieved_offered_rate']:.0f}/s"
                  + (" (generator-bound: latency from schedule is the generator's backlog; see service time)"
                     if short else ""))
        if r.get("latency_503_ms"):
            l5 = r["latency_503_ms"]
            print(f"{'':<16}503 answers (probe): p50 {l5['p50']:.2f} ms  p99 {l5['p99']:.2f} ms  "
                  f"max {l5['max']:.2f} ms; peak RSS MiB {r['peak_rss_mb']} (bound {r['rss_bound_mb']:.0f})")
    if report.get("latency_floor"):
        fl, sv = report["latency_floor"]["latency_ms"], report["latency_floor"]["service_ms"]
        print(f"generator floor at 50% (nginx stub answering 202, nothing behind it): p50 {fl['p50']:.2f} ms  "
              f"p99 {fl['p99']:.2f} ms  p99.9 {fl['p99.9']:.2f} ms; service p99 {sv['p99']:.2f} ms")
    for sizes, pair in report.get("baseline", {}).get("pairs", {}).items():
        print(f"vs nginx ({sizes}): packets/s x{pair['packets_per_s_ratio']:.2f}, p99 x{pair['p99_ratio']:.2f}, "
              f"split error {pair['distributor_split_error_points']:.2f} vs {pair['nginx_split_error_points']:.2f} points")
    if "skipped" in report.get("baseline", {}):
        print(f"baseline skipped: {report['baseline']['skipped']}")
    if "memory" in report:
        memory = report["memory"]
        for slot, f in sorted(memory["workers"].items()):
            print(f"memory worker {slot}: queues {f['queued_mb']:.0f} MiB -> peak RSS {f['rss_mb']:.0f} MiB, "
                  f"USS {f['uss_mb']:.0f} MiB (bound {memory['bound_mb']:.0f} MiB)")
    for name, t in report["targets"].items():
        print(f"target {name}: {t['value']:.2f} -> {'met' if t['met'] else 'MISSED'}")
    print(f"check: {'PASSED' if report['check']['passed'] else 'FAILED'}")


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
    parser.add_argument("--baseline", choices=("none", "nginx"), default="none")
    parser.add_argument("--queue-max-packets", type=int, default=5000, help="queue.max_packets of the bench cluster")
    parser.add_argument("--queue-mib", type=int, default=32, help="queue.max_bytes per analyzer in the memory scenario")
    parser.add_argument("--output", default=None, help="JSON report (default loadtest/results/bench-<timestamp>.json)")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {','.join(ALL_SCENARIOS)}")
    if args.generator == "wrk" and not generators.wrk_available():
        parser.error(f"wrk is not installed: {INSTALL_HINT}")
    args.queue_max_bytes_total = len(WEIGHTS) * min(args.queue_max_packets * 4096, 64 << 20)
    started = time.time()
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, "-m", "loadtest.bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"cores": os.cpu_count(), "cpu": cpu_model(), "kernel": platform.release()},
        "versions": versions(), "workers": args.workers, "scenarios": scenarios,
        "config": {"duration_s": args.duration, "connections": args.connections, "analyzers": dict(WEIGHTS),
                   "analyzer_mode": "--sink", "queue_max_packets": args.queue_max_packets},
    }
    needs_cluster = bool({"throughput", "latency", "stress"} & set(scenarios)) or args.baseline == "nginx"
    runs: list[dict[str, Any]] = []
    if needs_cluster:
        cluster = LocalCluster(analyzers=WEIGHTS, workers=args.workers,
                               analyzer_args={name: ["--sink"] for name, _ in WEIGHTS},
                               distributor_args=["--set", f"queue.max_packets={args.queue_max_packets}"])
        with cluster:
            bench = Bench(args, cluster)
            report["generator"] = ("wrk " + (generators.wrk_version() or "")) if bench.wrk else "distributor.tools.emitter"
            peak = bench.throughput()
            report["max_packets_per_s"] = peak
            if "latency" in scenarios:
                report["latency_floor"] = bench.latency(peak)
            if args.baseline == "nginx":
                report["baseline"] = bench.baseline()
            if "stress" in scenarios:
                bench.stress(peak)
            runs = bench.runs
    report.setdefault("generator", "distributor.tools.emitter")
    report["runs"] = runs
    if "memory" in scenarios:
        report["memory"] = memory_scenario(args)
    failed = [f"{r['scenario']}/{r['target']}/{r['sizes']}" for r in runs if not r["check"]["passed"]]
    memory_ok = report.get("memory", {}).get("within_bound", True)
    report["check"] = {"passed": not failed and memory_ok, "failed_runs": failed, "memory_within_bound": memory_ok}
    report["targets"] = targets(report)
    report["elapsed_s"] = time.time() - started
    print_table(report)
    out = Path(args.output or f"loadtest/results/bench-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"report: {out}")
    return 0 if report["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
