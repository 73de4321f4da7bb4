"""Shared pieces of the chaos scenarios: fast-reacting settings, background load, the invariant check."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvloop

from distributor.tools.emitter import LoadSpec, LoadStats, run_load
from distributor.tools.localcluster import LocalCluster, wait_until

WEIGHTS = (("a1", 0.4), ("a2", 0.3), ("a3", 0.2), ("a4", 0.1))
INTERVAL = 0.2
FALL = 3
# health checks and outlier detection tuned to react within a second, so scenarios stay short
FAST = [
    "--set", f"health.interval={INTERVAL}", "--set", "health.timeout=0.15", "--set", f"health.fall={FALL}",
    "--set", "health.rise=2", "--set", "outlier.consecutive_failures=3", "--set", "outlier.base_ejection_time=1",
    "--set", "outlier.max_ejection_time=8", "--set", "outlier.flap_window=10", "--set", "outlier.slow_start=2",
    "--set", "sender.request_timeout=1", "--set", "sender.retry_max_backoff=0.2",
]


@dataclass
class Load:
    """A load generator running in a thread until it stops by itself."""

    thread: threading.Thread
    result: list[LoadStats] = field(default_factory=list)

    def join(self) -> LoadStats:
        self.thread.join()
        return self.result[0]


def start_load(cluster: LocalCluster, duration: float, **spec: Any) -> Load:
    spec.setdefault("connections", 16)
    spec.setdefault("rate", 1000)
    spec.setdefault("sizes", ((5, 0.5), (20, 0.5)))
    load_spec = LoadSpec(url=cluster.ingest_url, duration=duration, record_accepted=True, **spec)
    load = Load(threading.Thread(target=lambda: load.result.append(uvloop.run(run_load(load_spec)))))
    load.thread.start()
    return load


def analyzer(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return next(a for a in cluster.admin("/admin/analyzers")["analyzers"] if a["name"] == name)


def wait_state(cluster: LocalCluster, name: str, states: tuple[str, ...], timeout: float = 15) -> float:
    """Seconds until the analyzer is in one of ``states``."""
    started = time.monotonic()
    wait_until(lambda: analyzer(cluster, name)["state"] in states, timeout, f"{name} to become {'/'.join(states)}",
               interval=0.02)
    return time.monotonic() - started


def check_invariants(cluster: LocalCluster, *loads: LoadStats, restarted: tuple[str, ...] = ()) -> dict[str, int]:
    """Every packet answered 202 was delivered (acknowledged 2xx by an analyzer) and nothing was dropped.

    Checked twice: with the distributor's own counters, and with the analyzers' packet keys (except
    analyzers restarted during the scenario, whose in-memory stats were lost with the process).
    Duplicates may only come from sends that timed out and then failed over, or from packets the log
    replayed after a crash that had been handed to an analyzer before it (the workers' log counts them).
    """
    cluster.wait_drained(timeout=60)
    view = cluster.admin("/admin/analyzers")["analyzers"]
    accepted = [key for stats in loads for key in stats.accepted]
    accepted_keys = Counter((emitter, pid) for emitter, pid, _ in accepted)
    unanswered = sum(stats.errors for stats in loads)  # requests whose answer the emitter never saw
    delivered = sum(a["delivered_packets"] for a in view)
    possible_duplicates = sum(a["possible_duplicates"] for a in view)
    if wal_on(cluster):
        possible_duplicates += sum(w["wal"]["possible_duplicates"] for w in cluster.admin("/admin/workers")["workers"])
    dropped = sum(a["rejected_packets"] + a["shutdown_dropped_packets"] + a["lost_packets"] for a in view)
    assert dropped == 0, f"{dropped} packets dropped while analyzers were up"
    assert len(accepted) <= delivered <= len(accepted) + possible_duplicates + unanswered
    seen: Counter[tuple[str, str]] = Counter()
    for proc in cluster.analyzer_procs:
        seen.update(proc.packet_keys())
    duplicates = sum(count - 1 for count in seen.values() if count > 1)
    if not restarted:
        missing = [key for key in accepted_keys if key not in seen]
        assert not missing, f"{len(missing)} packets answered 202 never reached an analyzer"
        assert duplicates <= possible_duplicates, f"{duplicates} duplicates seen, {possible_duplicates} possible"
    if wal_on(cluster):  # every packet delivered has left the log: nothing stays unacknowledged
        wait_until(lambda: all(w["wal"]["unacked_packets"] == 0 for w in cluster.admin("/admin/workers")["workers"]),
                   15, "every worker's log to hold no unacknowledged packet")
    return {
        "answered_202": len(accepted),
        "delivered": delivered,
        "duplicates_seen": duplicates,
        "possible_duplicates": possible_duplicates,
        "dropped": dropped,
        "failovers": sum(a["failover_packets"] for a in view),
    }


def wal_on(cluster: LocalCluster) -> bool:
    """Whether the cluster's workers write a write-ahead log (``DISTRIBUTOR_WAL_DIR`` set by the test)."""
    return any((w.get("wal") or {}).get("available") for w in cluster.admin("/admin/workers")["workers"])


def report(name: str, figures: dict[str, Any]) -> None:
    """Figures for the closing note; shown with pytest -s (and in the log on failure)."""
    print(f"\n[chaos] {name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in figures.items()))
