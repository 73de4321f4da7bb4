"""The system under test: the distributor pool delivering to 4 analyzers, and what samples it while it runs."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Iterator

from distributor.tools.localcluster import LocalCluster
from loadtest.free_sinks import NginxSinks, PythonSinks, Sinks
from loadtest.generators import EverySecond

WEIGHTS = (("a1", 4.0), ("a2", 3.0), ("a3", 2.0), ("a4", 1.0))
MIB = 2**20


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
