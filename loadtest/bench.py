"""Benchmark: throughput and latency of a real distributor pool against 4 analyzers on 127.0.0.1.

``python -m loadtest.bench --workers 1 --duration 10``

Scenarios, in one invocation:
* throughput: closed loop, many keep-alive connections, as fast as the distributor answers;
* latency: open loop at 50% of that throughput (latency measured from each request's
  scheduled send time, so stalls are not hidden by coordinated omission);
* memory (``--memory``): every analyzer stalled, load until every queue is full, then
  peak RSS / USS per worker against the configured queue bytes.

The load generator is the built-in uvloop emitter (``distributor.emitter``) in
this process. After the runs the queues drain and the run is checked: the
analyzers must have received exactly what was answered 202 and the message
split must be within 1 point of the weights; a run that fails either is
reported as FAILED whatever its speed. Prints a table and writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from distributor.emitter import LoadSpec, LoadStats, run_load
from distributor.localcluster import LocalCluster

WEIGHTS = (("a1", 4.0), ("a2", 3.0), ("a3", 2.0), ("a4", 1.0))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarize(name: str, stats: LoadStats, duration: float) -> dict[str, Any]:
    snapshot = stats.snapshot()
    answered = sum(snapshot["by_status"].values()) or 1
    return {
        "scenario": name,
        "packets_per_s": snapshot["accepted_packets"] / duration,
        "messages_per_s": snapshot["accepted_messages"] / duration,
        "ratio_503": snapshot["by_status"].get(503, 0) / answered,
        "p50_ms": stats.latency.percentile(50) * 1e3,
        "p99_ms": stats.latency.percentile(99) * 1e3,
        "p999_ms": stats.latency.percentile(99.9) * 1e3,
        "by_status": snapshot["by_status"],
        "errors": snapshot["errors"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = ((10, 1.0),) if args.sizes == "fixed" else ((5, 0.5), (20, 0.5))
    cluster = LocalCluster(
        analyzers=WEIGHTS,
        workers=args.workers,
        distributor_args=["--set", "queue.max_packets=50000", "--set", "queue.max_bytes=268435456"],
    )
    results: list[dict[str, Any]] = []
    accepted_packets = accepted_messages = 0
    with cluster:
        def load(name: str, **spec: Any) -> dict[str, Any]:
            nonlocal accepted_packets, accepted_messages
            print(f"[{name}] {args.duration:.0f}s ...", file=sys.stderr, flush=True)
            stats = uvloop.run(run_load(LoadSpec(url=cluster.ingest_url, duration=args.duration, sizes=sizes,
                                                 **spec)))
            accepted_packets += stats.accepted_packets
            accepted_messages += stats.accepted_messages
            summary = summarize(name, stats, args.duration)
            results.append(summary)
            return summary

        peak = load("throughput", connections=args.connections)
        load("latency@50%", connections=args.connections, rate=peak["packets_per_s"] * 0.5)
        cluster.wait_drained(timeout=120)
        totals = cluster.analyzer_totals()
    received = sum(t["packets"] for t in totals.values())
    received_messages = sum(t["messages"] for t in totals.values())
    weight_sum = sum(w for _, w in WEIGHTS)
    split_error = max(abs(totals[n]["messages"] / max(received_messages, 1) - w / weight_sum) for n, w in WEIGHTS)
    exact = received == accepted_packets and received_messages == accepted_messages
    return {
        "command": " ".join([sys.executable, "-m", "loadtest.bench", *sys.argv[1:]]),
        "machine": {"cores": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
        "generator": "distributor.emitter (uvloop, keep-alive, one process)",
        "workers": args.workers,
        "packet_sizes": args.sizes,
        "scenarios": results,
        "check": {
            "answered_202_packets": accepted_packets,
            "received_packets": received,
            "exact_delivery": exact,
            "split_error_points": split_error * 100,
            "passed": exact and split_error < 0.01,
        },
    }


def memory_scenario(args: argparse.Namespace) -> dict[str, Any]:
    """Fill every queue of every worker (analyzers stalled) and sample worker memory."""
    queue_mib = args.queue_mib
    cluster = LocalCluster(
        analyzers=WEIGHTS,
        workers=args.workers,
        analyzer_args={name: ["--stall"] for name, _ in WEIGHTS},
        distributor_args=["--set", "queue.max_packets=1000000", "--set", f"queue.max_bytes={queue_mib << 20}",
                          "--set", "graceful_timeout=2"],
    )
    cap = len(WEIGHTS) * (queue_mib << 20)
    peak: dict[int, dict[str, float]] = {}
    with cluster:
        print(f"[memory] filling {len(WEIGHTS)} x {queue_mib} MiB queues per worker ...", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            uvloop.run(run_load(LoadSpec(url=cluster.ingest_url, duration=1.0, connections=32, sizes=((10, 1.0),))))
            workers = cluster.admin("/admin/workers")["workers"]
            for w in workers:
                entry = peak.setdefault(w["slot"], {"rss_mb": 0.0, "uss_mb": 0.0, "queued_mb": 0.0})
                entry["rss_mb"] = max(entry["rss_mb"], w.get("rss_bytes", 0) / 2**20)
                entry["uss_mb"] = max(entry["uss_mb"], w.get("uss_bytes", 0) / 2**20)
                entry["queued_mb"] = max(entry["queued_mb"], w["queued_bytes"] / 2**20)
            # full: no worker has room left for another ~2.6 KB packet in any queue
            if all(w["queued_bytes"] > cap - len(WEIGHTS) * 4096 for w in workers):
                break
    bound = cap / 2**20 + 60
    return {
        "queue_bytes_per_worker_mb": cap / 2**20,
        "bound_mb": bound,
        "workers": peak,
        "within_bound": all(p["rss_mb"] <= bound for p in peak.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sizes", choices=("fixed", "skewed"), default="fixed",
                        help="fixed: 10 messages per packet (~1.8 KB); skewed: 5 and 20")
    parser.add_argument("--memory", action="store_true", help="also run the queues-full memory scenario")
    parser.add_argument("--queue-mib", type=int, default=64, help="queue.max_bytes per analyzer in --memory")
    parser.add_argument("--output", default="loadtest/results/bench.json")
    args = parser.parse_args(argv)
    report = run(args)
    if args.memory:
        report["memory"] = memory_scenario(args)
    print(f"\n{'scenario':<14}{'packets/s':>11}{'messages/s':>12}{'503':>7}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}")
    for r in report["scenarios"]:
        print(f"{r['scenario']:<14}{r['packets_per_s']:>11.0f}{r['messages_per_s']:>12.0f}{r['ratio_503']:>7.1%}"
              f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['p999_ms']:>10.2f}")
    check = report["check"]
    print(f"delivery exact: {check['exact_delivery']} ({check['received_packets']}/{check['answered_202_packets']}), "
          f"split error {check['split_error_points']:.2f} points -> {'PASSED' if check['passed'] else 'FAILED'}")
    if "memory" in report:
        memory = report["memory"]
        for slot, figures in sorted(memory["workers"].items()):
            print(f"worker {slot}: queues full at {figures['queued_mb']:.0f} MiB -> peak RSS {figures['rss_mb']:.0f} MiB, "
                  f"USS {figures['uss_mb']:.0f} MiB (bound {memory['bound_mb']:.0f} MiB)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"report: {out}")
    return 0 if check["passed"] and report.get("memory", {}).get("within_bound", True) else 1


if __name__ == "__main__":
    sys.exit(main())
