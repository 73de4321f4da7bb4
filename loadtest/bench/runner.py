"""One measured run: the load, its CPU window, the drain, the checks, and the record the report keeps."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.request
from typing import Any, Callable

from distributor.tools.localcluster import LocalCluster, wait_until
from loadtest import generators
from loadtest.bench.checks import Totals, check_run, handler_p99_bound_ms
from loadtest.cpu import CpuWindow, PidSource, per_answer_us, process_tree
from loadtest.free_sinks import SinkCount, Sinks
from loadtest.generators import RunResult, run_emitter, run_wrk

LABELS = re.compile(r'(\w+)="([^"]*)"')


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
            "run": len(self.runs), "scenario": scenario, "target": target, "sizes": sizes, "round": round_no,
            "sinks": self.sinks.kind,
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
        return check_run(self.sinks.kind, target, sizes, result, delta, m0, m1, extra)

    def progress(self) -> str:
        """One progress line: the distributor's own accepted counter."""
        m = self.metrics()
        return f"accepted {m['accepted']:.0f}  unavailable/shed {m['unavailable'] + m['shed']:.0f}"

    def sink_progress(self) -> str:
        return f"sink packets {sum(c.packets for c in self.sinks.totals().values())}"

    def closed_loop(self, url: str, sizes: str, progress: Callable[[], str], batch: int = 0) -> RunResult:
        """wrk (when chosen) or the emitter, as fast as answers come; ``batch``: packets per /ingest/batch."""
        a = self.args
        if self.wrk:
            return run_wrk(url, a.duration, a.connections, sizes, os.urandom(4).hex(), progress, a.wrk_threads,
                           batch=batch)
        return run_emitter(url, a.duration, a.connections, sizes, batch=batch)

    def warm_up(self) -> None:
        print("[warm-up] 1s, not recorded", file=sys.stderr, flush=True)
        run_emitter(self.cluster.ingest_url, 1.0, self.args.connections, "fixed")  # connections, allocator, caches
        self.settle("distributor")
