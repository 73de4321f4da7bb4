"""The write-ahead log's cost (issue 11): one closed-loop load, in one invocation, on the same free (nginx)
sinks, against a distributor with the log off and with ``wal.sync`` = none, interval and always, and against
an nginx weighted proxy in front of the same sinks.

Each mode gets a distributor of its own (``[wal]`` is read at start), its log in a fresh directory under
``--wal-dir`` (default: the system's temporary directory; put it on the disk whose fsync you want to
measure, not a tmpfs), warmed up for a second, stopped after its run, its log deleted and the page cache
written back (``sync``) before the next run starts, outside the measured window: on ext4 an fsync waits
for the journal to write back every dirty page, and a run must not pay for the previous one's gigabyte;
rounds alternate the modes
(``--rounds``). Per run: packets/s, p50/p99, CPU per 2xx, and from the workers' own counters the fsyncs
per second and the bytes written to the log per packet (record headers included). Targets: ``interval``
keeps at least 85 % of the throughput without the log, ``always`` at least 50 %.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from distributor.tools.localcluster import LocalCluster
from loadtest.bench.cluster import WEIGHTS
from loadtest.bench.runner import Bench
from loadtest.free_sinks import NginxSinks
from loadtest.generators import RunResult
from loadtest.nginx_baseline import NginxProxy, closed_loop_missing

MODES = ("off", "none", "interval", "always")
TARGETS = {"interval": 0.85, "always": 0.5}  # of the throughput without the log


def _wal_counters(cluster: LocalCluster) -> dict[str, int]:
    """appended packets, bytes written and fsync rounds, summed over the workers (their shared-table rows)."""
    totals = {"appended_packets": 0, "bytes_written": 0, "fsyncs": 0}
    for worker in cluster.admin("/admin/workers")["workers"]:
        wal = worker.get("wal") or {}
        for key in totals:
            totals[key] += int(wal.get(key, 0))
    return totals


def _measure_mode(args: argparse.Namespace, sinks: NginxSinks, runs: list[dict[str, Any]], mode: str,
                  directory: Path, round_no: int) -> dict[str, Any]:
    settings = [f for name, url, w in sinks.urls() for f in ("--analyzer", f"{name}={url}@{w}")]
    settings += ["--set", f"queue.max_packets={args.queue_max_packets}"]
    if mode != "off":
        settings += ["--set", f"wal.dir={directory / f'{mode}-{round_no}'}", "--set", f"wal.sync={mode}"]
    os.sync()  # what earlier runs (or anything else) left dirty is written back before this one starts
    with LocalCluster(analyzers=(), workers=args.workers, analyzer_flags=False, distributor_args=settings) as cluster:
        bench = Bench(args, cluster, sinks, runs)
        bench.warm_up()
        before = _wal_counters(cluster)

        def load() -> RunResult:
            return bench.closed_loop(cluster.ingest_url, "fixed", bench.progress)

        record = bench.measure(f"wal:{mode}", "distributor", "fixed", load, {"wal_sync": mode}, round_no=round_no)
        after = _wal_counters(cluster)
    # the next run must not pay for this one: its log gone and the page cache written back (an fsync of
    # the next mode would otherwise wait for ext4's journal to flush this run's gigabyte of dirty pages)
    shutil.rmtree(directory / f"{mode}-{round_no}", ignore_errors=True)
    os.sync()
    seconds = record["duration_s"] or 1e-9
    appended = after["appended_packets"] - before["appended_packets"]
    record["wal"] = {
        "sync": mode, "appended_packets": appended,
        "fsyncs_per_s": (after["fsyncs"] - before["fsyncs"]) / seconds,
        "bytes_written_per_packet": (after["bytes_written"] - before["bytes_written"]) / appended if appended else None,
    }
    return record


def _nginx_run(args: argparse.Namespace, sinks: NginxSinks, runs: list[dict[str, Any]], round_no: int) -> dict[str, Any]:
    """The same load through an nginx weighted proxy; a distributor without the log stays idle beside it (the
    bench's counters come from a distributor)."""
    upstreams = [(url, int(w)) for _, url, w in sinks.urls()]
    flags = [f for name, url, w in sinks.urls() for f in ("--analyzer", f"{name}={url}@{w}")]
    with NginxProxy(upstreams, args.workers) as proxy, \
            LocalCluster(analyzers=(), workers=1, analyzer_flags=False, distributor_args=flags) as idle:
        bench = Bench(args, idle, sinks, runs)
        return bench.measure("wal:nginx", "nginx", "fixed",
                             lambda: bench.closed_loop(proxy.url, "fixed", bench.sink_progress),
                             sut=proxy.pids, round_no=round_no)


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: the runs' figures and their spread; ratios to ``off`` taken round by round."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_round.setdefault(record["round"], {})[record["wal_sync"] if "wal_sync" in record else "nginx"] = record
    modes: dict[str, Any] = {}
    for mode in (*MODES, "nginx"):
        rows = [r[mode] for r in by_round.values() if mode in r]
        if not rows:
            continue
        ratios = [r[mode]["packets_per_s"] / max(r["off"]["packets_per_s"], 1e-9)
                  for r in by_round.values() if mode in r and "off" in r]
        entry: dict[str, Any] = {
            "runs": [row["run"] for row in rows],
            "packets_per_s": _spread([row["packets_per_s"] for row in rows]),
            "p50_ms": _spread([row["latency_ms"].get("p50", 0.0) for row in rows]),
            "p99_ms": _spread([row["latency_ms"].get("p99", 0.0) for row in rows]),
            "cpu_us_per_2xx": _spread([row["cpu_us_per_2xx"].get("sut") or 0.0 for row in rows]),
            "over_off": _spread(ratios),
            "passed": all(row["check"]["passed"] for row in rows),
        }
        if mode not in ("off", "nginx"):
            entry["fsyncs_per_s"] = _spread([row["wal"]["fsyncs_per_s"] for row in rows])
            entry["bytes_written_per_packet"] = _spread([row["wal"]["bytes_written_per_packet"] or 0.0 for row in rows])
        if mode in TARGETS:
            entry["target_over_off"] = TARGETS[mode]
            entry["target_met_every_round"] = bool(ratios) and min(ratios) >= TARGETS[mode]
        modes[mode] = entry
    return modes


def wal_scenario(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every mode and nginx, ``--rounds`` times alternating; the summary of report["wal"]."""
    missing = closed_loop_missing()
    if missing:
        return {"skipped": missing}
    print(f"[wal] off, none, interval, always and nginx: {args.rounds} rounds, wrk, free analyzers",
          file=sys.stderr, flush=True)
    records: list[dict[str, Any]] = []
    parent = args.wal_dir or None
    with tempfile.TemporaryDirectory(prefix="bench-wal-", dir=parent) as tmp, NginxSinks(WEIGHTS) as sinks:
        for round_no in range(1, args.rounds + 1):
            for mode in MODES:
                records.append(_measure_mode(args, sinks, runs, mode, Path(tmp), round_no))
            records.append(_nginx_run(args, sinks, runs, round_no))
        filesystem = os.statvfs(tmp)
    return {"workers": args.workers, "rounds": args.rounds, "duration_s": args.duration,
            "connections": args.connections, "sinks": "nginx", "wal_parent_dir": parent or tempfile.gettempdir(),
            "wal_filesystem_block_size": filesystem.f_bsize, "modes": summarize(records)}


def print_wal(section: dict[str, Any] | None) -> None:
    """The table of report["wal"]: one line per mode."""
    if not section:
        return
    if "skipped" in section:
        print(f"\nwal: skipped: {section['skipped']}")
        return
    print(f"\nwrite-ahead log ({section['rounds']} rounds, {section['workers']} workers, free nginx sinks; "
          "min-max over rounds)")
    print(f"{'mode':<10}{'2xx/s':>18}{'x off':>13}{'p50 ms':>14}{'p99 ms':>14}{'fsync/s':>14}{'B/packet':>10}"
          f"{'CPU µs/2xx':>14}")

    def span(entry: dict[str, Any], key: str, digits: int = 0) -> str:
        values = entry.get(key) or {}
        return f"{values['min']:.{digits}f}-{values['max']:.{digits}f}" if values else "-"

    for mode, entry in section["modes"].items():
        print(f"{mode:<10}{span(entry, 'packets_per_s'):>18}{span(entry, 'over_off', 2):>13}"
              f"{span(entry, 'p50_ms', 2):>14}{span(entry, 'p99_ms', 2):>14}{span(entry, 'fsyncs_per_s'):>14}"
              f"{span(entry, 'bytes_written_per_packet'):>10}{span(entry, 'cpu_us_per_2xx', 1):>14}"
              + ("" if "target_over_off" not in entry else
                 f"  target x{entry['target_over_off']:.2f}: {'met' if entry['target_met_every_round'] else 'MISSED'}"))
