"""The command line: flags, which scenarios run on which cluster, the report's frame, the JSON file.

Scenarios on the shared cluster of ``--sinks`` (throughput, latency, stress) and stress-cpu are wired
below; a scenario that brings its own processes is one entry of ``STANDALONE`` (name -> function of
the flags and the shared run list, returning its section of the report), run after them in that order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import loadtest.bench
from loadtest import generators
from loadtest.bench import scenarios
from loadtest.bench.baseline import baseline
from loadtest.bench.cluster import MIB, WEIGHTS, started_cluster
from loadtest.bench.environment import cpu_model, git_revision, versions
from loadtest.bench.ingest import NAMES as INGEST_VARIANTS
from loadtest.bench.ingest import ingest_scenario
from loadtest.bench.memory import memory_scenario
from loadtest.bench.report import print_table, targets
from loadtest.bench.runner import Bench
from loadtest.bench.wal import wal_scenario
from loadtest.cpu import loadavg
from loadtest.free_sinks import NginxSinks
from loadtest.nginx_baseline import INSTALL_HINT, closed_loop_missing, ensure_installed

Section = Callable[[argparse.Namespace, list[dict[str, Any]]], dict[str, Any]]
def soak_scenario(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``--minutes`` of mixed load with lifecycle events; memory, fds and queue slopes (loadtest/soak.py)."""
    from loadtest.soak import run_soak, summary_lines  # late: the soak module imports this package's parts

    out_dir = Path(args.output).parent if args.output else Path("loadtest/results")
    report = run_soak(args.minutes, args.workers, out_dir)
    print("\n".join(summary_lines(report)))
    return report


STANDALONE: dict[str, Section] = {
    "ingest": ingest_scenario,
    "memory": lambda args, runs: memory_scenario(args),
    "soak": soak_scenario,
    "wal": wal_scenario,
}
DEFAULT_SCENARIOS = ("throughput", "latency", "stress", "stress-cpu", "memory")
ALL_SCENARIOS = (*DEFAULT_SCENARIOS, *(name for name in STANDALONE if name not in DEFAULT_SCENARIOS))
NEEDS = {"nginx": {"latency", "stress-cpu", "ingest", "wal"}, "wrk": {"stress-cpu", "ingest", "wal"}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=loadtest.bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", "--scenario", default=",".join(DEFAULT_SCENARIOS),
                   help="comma list of " + ",".join(ALL_SCENARIOS) + " (default: all but ingest, soak and wal)")
    p.add_argument("--minutes", type=float, default=20.0, help="length of the soak's load (default 20)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--generator", choices=("auto", "wrk", "emitter"), default="auto",
                   help="closed-loop generator; auto: wrk when installed (latency always uses the emitter)")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--sinks", choices=("python", "nginx"), default="python",
                   help="analyzers: python sink processes (default) or free ones answered by nginx")
    p.add_argument("--baseline", choices=("none", "nginx", "floor"), default="none",
                   help="nginx: rounds of distributor / nginx weighted proxy / bare floor; floor: without nginx")
    p.add_argument("--rounds", type=int, default=3, help="baseline, ingest and wal rounds (default 3)")
    p.add_argument("--wal-dir", default="", metavar="DIR",
                   help="where the wal scenario puts its logs (default: the temporary directory; a real disk, "
                        "not a tmpfs, for fsyncs that cost what they cost)")
    p.add_argument("--batch", type=int, default=0, metavar="N",
                   help="throughput in batch mode: N packets per POST /ingest/batch request (default 0: one per "
                        "POST /ingest)")
    p.add_argument("--stress-wrk", type=int, default=3, help="wrk processes in stress-cpu (default 3)")
    p.add_argument("--stress-connections", type=int, default=256, help="connections per wrk in stress-cpu")
    p.add_argument("--queue-max-packets", type=int, default=5000, help="queue.max_packets of the bench cluster")
    p.add_argument("--queue-mib", type=int, default=32, help="queue.max_bytes per analyzer in the memory scenario")
    p.add_argument("--ingest-variants", default=",".join(INGEST_VARIANTS),
                   help="comma list of the ingest variants to run (default all: " + ",".join(INGEST_VARIANTS) + ")")
    p.add_argument("--ingest-batch-connections", type=int, default=0, metavar="N",
                   help="wrk connections for the 100-packet ingest variants (default 2 per worker)")
    p.add_argument("--ingest-warm-up", type=float, default=1.0, metavar="S",
                   help="seconds of unrecorded load on each distributor the ingest scenario starts (default 1; 0: "
                        "none)")
    p.add_argument("--trace-ratio", type=float, default=0.01,
                   help="tracing.sample_ratio of the ingest trace variant (default 0.01)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install nginx-light / wrk")
    p.add_argument("--output", default=None, help="JSON report (default loadtest/results/bench-<timestamp>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    scenario_list = [s for s in args.scenarios.split(",") if s]
    chosen = set(scenario_list)
    unknown = chosen - set(ALL_SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {','.join(ALL_SCENARIOS)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.batch < 0 or (args.batch and {"latency", "stress"} & chosen):
        p.error("--batch N (N >= 1) measures the throughput scenario in batch mode; latency and stress offer "
                "single packets at fractions of a single-packet max: run them without --batch")
    args.ingest_variants = [v for v in args.ingest_variants.split(",") if v]
    if set(args.ingest_variants) - set(INGEST_VARIANTS) or not args.ingest_variants:
        p.error(f"--ingest-variants: choose from {','.join(INGEST_VARIANTS)}")
    if not 0 < args.trace_ratio <= 1:
        p.error("--trace-ratio must be in (0, 1]")
    need_nginx = args.sinks == "nginx" or args.baseline == "nginx" or bool(NEEDS["nginx"] & chosen)
    need_wrk = args.generator != "emitter" or args.baseline != "none" or bool(NEEDS["wrk"] & chosen)
    missing = ensure_installed([t for t, needed in (("nginx", need_nginx), ("wrk", need_wrk)) if needed],
                               allow_install=not args.no_install)
    if args.sinks == "nginx" and "nginx" in missing:
        print(f"--sinks nginx needs nginx, which is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if args.generator == "wrk" and not generators.wrk_available():
        p.error(f"wrk is not installed: {INSTALL_HINT}")
    args.queue_max_bytes_total = len(WEIGHTS) * min(args.queue_max_packets * 4096, 64 << 20)
    started = time.time()
    report = frame(args, scenario_list, argv, started)
    runs: list[dict[str, Any]] = []
    report["runs"] = runs
    shared_cluster_scenarios(args, chosen, report, runs)
    for name, section in STANDALONE.items():
        if name in chosen:
            report[name.replace("-", "_")] = section(args, runs)
    if runs and all(r["generator"] == "wrk" for r in runs):  # e.g. ingest alone: no emitter run at all
        report["generator"] = "wrk " + (generators.wrk_version() or "")
    failed = [f"#{r['run']} {r['scenario']}/{r['target']}/{r['sizes']}" for r in runs if not r["check"]["passed"]]
    memory_ok = report.get("memory", {}).get("within_bound", True)
    soak_failures = report.get("soak", {}).get("checks", {}).get("failures", [])
    report["check"] = {"passed": not failed and memory_ok and not soak_failures, "failed_runs": failed,
                       "memory_within_bound": memory_ok, "soak_failures": soak_failures}
    report["targets"] = targets(report)
    report["loadavg_end"] = loadavg()
    report["elapsed_s"] = time.time() - started
    out = Path(args.output or f"loadtest/results/bench-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))  # first: a closed stdout (| head) must not lose the figures
    print_table(report)
    print(f"report: {out}")
    return 0 if report["check"]["passed"] else 1


def frame(args: argparse.Namespace, scenario_list: list[str], argv: list[str] | None, started: float) -> dict[str, Any]:
    """What every report says before any run: the command, the machine, the versions, the configuration."""
    return {
        "command": shlex.join([sys.executable, "-m", "loadtest.bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"cores": os.cpu_count(), "cpu": cpu_model(), "kernel": platform.release(),
                    "memory_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB)},
        "git": git_revision(),
        "versions": versions(), "workers": args.workers, "scenarios": scenario_list, "sinks": args.sinks,
        "loadavg_start": loadavg(),
        "config": {"duration_s": args.duration, "connections": args.connections, "analyzers": dict(WEIGHTS),
                   "sinks": args.sinks, "analyzer_mode": "--sink" if args.sinks == "python" else "nginx return 200",
                   "queue_max_packets": args.queue_max_packets, "baseline": args.baseline, "rounds": args.rounds,
                   "wrk_threads": args.wrk_threads, "stress_wrk": args.stress_wrk,
                   "stress_connections": args.stress_connections, "batch": args.batch},
        "generator": "distributor.tools.emitter",
    }


def shared_cluster_scenarios(args: argparse.Namespace, chosen: set[str], report: dict[str, Any],
                             runs: list[dict[str, Any]]) -> None:
    """throughput, latency, stress and the baseline rounds on the cluster of ``--sinks``; stress-cpu on free
    analyzers (that cluster when ``--sinks nginx``, else a second one)."""
    wants_stress_cpu = "stress-cpu" in chosen
    missing = closed_loop_missing()
    stress_cpu_ready = missing is None
    if wants_stress_cpu and missing:
        report["stress_cpu"] = {"skipped": missing}
    main_cluster = (bool({"throughput", "latency", "stress"} & chosen) or args.baseline != "none"
                    or (wants_stress_cpu and stress_cpu_ready and args.sinks == "nginx"))
    if main_cluster:
        with started_cluster(args, args.sinks) as (cluster, sinks):
            bench = Bench(args, cluster, sinks, runs)
            if isinstance(sinks, NginxSinks):
                report["sinks_nginx_conf"] = sinks.config.read_text()
            if bench.wrk:
                report["generator"] = "wrk " + (generators.wrk_version() or "")
            bench.warm_up()
            if {"throughput", "latency", "stress"} & chosen:
                peak = scenarios.throughput(bench)
                report["max_packets_per_s"] = peak
                if "latency" in chosen:
                    report["latency_floor"] = scenarios.latency(bench, peak)
            if args.baseline != "none":
                report["baseline"] = baseline(bench, with_nginx=args.baseline == "nginx")
            if "stress" in chosen:
                scenarios.stress(bench, report["max_packets_per_s"])
            if wants_stress_cpu and stress_cpu_ready and args.sinks == "nginx":
                report["stress_cpu"] = scenarios.stress_cpu(bench)
    if wants_stress_cpu and stress_cpu_ready and args.sinks != "nginx":
        print("[stress-cpu] needs free analyzers: a second distributor delivering to nginx sinks",
              file=sys.stderr, flush=True)
        with started_cluster(args, "nginx") as (cluster, sinks):
            bench = Bench(args, cluster, sinks, runs)
            bench.warm_up()
            report["stress_cpu"] = scenarios.stress_cpu(bench)
