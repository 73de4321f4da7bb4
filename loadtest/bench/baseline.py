"""``--baseline nginx|floor``: rounds of distributor / nginx weighted proxy / bare floor, same flags, same run."""

from __future__ import annotations

import contextlib
from typing import Any

from loadtest.bare_floor import BareFloor
from loadtest.bench.runner import Bench
from loadtest.cpu import loadavg
from loadtest.nginx_baseline import INSTALL_HINT, NginxProxy, nginx_binary


def baseline(bench: Bench, with_nginx: bool) -> dict[str, Any]:
    """``--rounds`` rounds of distributor / nginx proxy / bare floor (wrk, closed loop, fixed sizes)."""
    if not bench.wrk:
        return {"skipped": "needs wrk (--generator emitter or wrk missing): " + INSTALL_HINT}
    skipped_nginx = None
    if with_nginx and nginx_binary() is None:
        skipped_nginx = f"nginx not installed: {INSTALL_HINT}"
        with_nginx = False
    upstreams = [(url, int(w)) for _, url, w in bench.sinks.urls()]
    rounds: list[dict[str, Any]] = []
    pairs: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        nginx = stack.enter_context(NginxProxy(upstreams, bench.args.workers)) if with_nginx else None
        floor = stack.enter_context(BareFloor(bench.args.workers))
        ingest = bench.cluster.ingest_url
        for r in range(1, bench.args.rounds + 1):
            start = loadavg()
            entry: dict[str, Any] = {"round": r}
            entry["distributor"] = bench.measure(
                "baseline", "distributor", "fixed", lambda: bench.closed_loop(ingest, "fixed", bench.progress),
                round_no=r)
            if nginx is not None:
                proxy = nginx
                entry["nginx"] = bench.measure(
                    "baseline", "nginx", "fixed", lambda: bench.closed_loop(proxy.url, "fixed", bench.sink_progress),
                    sut=proxy.pids, round_no=r)
            entry["floor"] = bench.measure(
                "baseline", "floor", "fixed", lambda: bench.closed_loop(floor.url, "fixed", lambda: "bare floor"),
                sut=floor.pids, round_no=r)
            entry["loadavg"] = {"start": start, "end": loadavg()}
            rounds.append(entry)
        if nginx is not None:  # one skewed pair: nginx balances requests, the distributor messages
            proxy = nginx
            this = bench.measure("baseline", "distributor", "skewed",
                                 lambda: bench.closed_loop(ingest, "skewed", bench.progress))
            other = bench.measure("baseline", "nginx", "skewed",
                                  lambda: bench.closed_loop(proxy.url, "skewed", bench.sink_progress), sut=proxy.pids)
            pairs["skewed"] = {
                "distributor_packets_per_s": this["packets_per_s"], "nginx_packets_per_s": other["packets_per_s"],
                "packets_per_s_ratio": this["packets_per_s"] / max(other["packets_per_s"], 1e-9),
                "distributor_p99_ms": this["latency_ms"]["p99"], "nginx_p99_ms": other["latency_ms"]["p99"],
                "p99_ratio": this["latency_ms"]["p99"] / max(other["latency_ms"]["p99"], 1e-9),
                "distributor_split_error_points": this["check"]["split_error_points"],
                "nginx_split_error_points": other["check"]["split_error_points"],
            }
        config = nginx.config.read_text() if nginx is not None else None
    out: dict[str, Any] = {"sinks": bench.sinks.kind, "workers": bench.args.workers,
                           "rounds": summarize_rounds(rounds), "comparison": compare(rounds), "pairs": pairs,
                           "nginx_conf": config}
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
