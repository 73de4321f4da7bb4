"""``./run.sh``: 4 local analyzers, the distributor and a built-in emitter load, with a live table.

Every second it prints, per analyzer, the target and actual share of messages,
packets and queue depth, and the totals; at the end it drains, checks that the
analyzers received exactly what was answered 202, and stops every process it
started.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvloop

from distributor.tools.emitter import LoadSpec, LoadStats, run_load
from distributor.tools.localcluster import LocalCluster


def add_demo_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="distributor worker processes (default 2)")
    parser.add_argument("--rate", type=float, default=3000.0,
                        help="packets/s offered by the emitters; 0 = as fast as possible (default 3000)")
    parser.add_argument("--connections", type=int, default=32, help="emitter keep-alive connections (default 32)")


def format_table(elapsed: float, analyzers: list[dict[str, Any]], load: dict[str, Any], rate: dict[str, float]) -> str:
    by_status = load["by_status"]
    lines = [
        f"t={elapsed:5.1f}s  packets/s {rate['packets']:8.0f}  messages/s {rate['messages']:9.0f}  "
        f"202: {by_status.get(202, 0)}  429: {by_status.get(429, 0)}  503: {by_status.get(503, 0)}  "
        f"errors: {load['errors']}",
        f"  {'analyzer':<10}{'target':>8}{'actual':>8}{'messages':>11}{'packets':>10}{'queue':>7}",
    ]
    for a in analyzers:
        lines.append(
            f"  {a['name']:<10}{a['target_share'] * 100:7.1f}%{a['share'] * 100:7.1f}%"
            f"{a['routed_messages']:>11}{a['routed_packets']:>10}{a['queue_packets']:>7}"
        )
    return "\n".join(lines)


async def _drive(cluster: LocalCluster, args: argparse.Namespace) -> LoadStats:
    stats = LoadStats()
    spec = LoadSpec(
        url=cluster.ingest_url,
        duration=args.duration,
        connections=args.connections,
        rate=args.rate or None,
        sizes=((5, 0.5), (20, 0.5)),
        honour_retry_after=True,
        record_accepted=False,
    )
    load = asyncio.create_task(run_load(spec, stats))
    started = time.monotonic()
    previous = (started, 0, 0)
    while not load.done():
        await asyncio.wait({load}, timeout=1.0)
        now = time.monotonic()
        snapshot = stats.snapshot()
        interval = max(now - previous[0], 1e-6)
        rate = {
            "packets": (snapshot["accepted_packets"] - previous[1]) / interval,
            "messages": (snapshot["accepted_messages"] - previous[2]) / interval,
        }
        previous = (now, snapshot["accepted_packets"], snapshot["accepted_messages"])
        analyzers = (await asyncio.to_thread(cluster.admin, "/admin/analyzers"))["analyzers"]
        print(format_table(now - started, analyzers, snapshot, rate), flush=True)
    return await load


def run_demo(args: argparse.Namespace) -> int:
    print(f"starting 4 analyzers (weights 0.4/0.3/0.2/0.1) and the distributor ({args.workers} workers)...",
          flush=True)
    cluster = LocalCluster(workers=args.workers)
    wal_dir = cluster.log_dir / "wal"  # the demo runs as users should: every 202 in the write-ahead log
    cluster.distributor_args = ["--set", f"wal.dir={wal_dir}"]
    with cluster:
        print(f"distributor on {cluster.ingest_url}, control plane on {cluster.admin_url}; "
              f"logs in {cluster.log_dir}, write-ahead log in {wal_dir}", flush=True)
        stats = uvloop.run(_drive(cluster, args))
        cluster.wait_drained()
        totals = cluster.analyzer_totals()
        analyzers = cluster.admin("/admin/analyzers")["analyzers"]
    snapshot = stats.snapshot()
    received = sum(t["packets"] for t in totals.values())
    received_messages = sum(t["messages"] for t in totals.values())
    print("\nfinal split (messages received by each analyzer):")
    total_messages = received_messages or 1
    for a in analyzers:
        got = totals[a["name"]]["messages"]
        print(f"  {a['name']:<6} target {a['target_share'] * 100:5.1f}%  actual {got / total_messages * 100:5.1f}%  "
              f"({got} messages, {totals[a['name']]['packets']} packets)")
    exact = received == snapshot["accepted_packets"] and received_messages == snapshot["accepted_messages"]
    print(f"answered 202: {snapshot['accepted_packets']} packets / {snapshot['accepted_messages']} messages; "
          f"analyzers received {received} / {received_messages}: {'exact' if exact else 'MISMATCH'}")
    print("all demo processes stopped")
    return 0 if exact else 1

