"""The memory scenario: every queue of every worker filled (Python analyzers stalled), peak RSS/USS sampled."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from distributor.tools.localcluster import LocalCluster
from loadtest.bench.cluster import MIB, WEIGHTS
from loadtest.cpu import loadavg
from loadtest.generators import run_emitter


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
