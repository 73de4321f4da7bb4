"""Structured logs from real processes, and no log flood when an analyzer fails every send."""

from __future__ import annotations

import json
import time
from typing import Callable

from distributor.tools.localcluster import LocalCluster
from support import Client, packet


def records(cluster: LocalCluster) -> list[dict]:
    assert cluster.distributor is not None
    lines = cluster.distributor.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_json_lines_with_role_event_and_analyzer(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1,
                           distributor_args=["--set", "graceful_timeout=1", "--set", "sender.request_timeout=30"],
                           analyzer_args={"a1": ["--stall"]})
    assert Client(cluster.data_port).post(packet())[0] == 202
    cluster.stop()
    entries = records(cluster)
    assert entries and all({"ts", "level", "role", "worker", "pid", "logger", "event", "msg"} <= set(e) for e in entries)
    assert {e["role"] for e in entries} == {"supervisor", "worker"}
    dropped = [e for e in entries if e["event"] == "dropped_shutdown"]
    assert dropped and dropped[0]["analyzer"] == "a1" and dropped[0]["packets"] == 1 and dropped[0]["worker"] == 0


def test_failing_analyzer_does_not_flood_the_log(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1, analyzer_args={"a1": ["--error-rate", "1.0"]},
        distributor_args=["--set", "outlier.consecutive_failures=1000000", "--set", "outlier.retry_budget=1",
                          "--set", "health.interval=60", "--set", "health.timeout=1"],
    )
    client = Client(cluster.data_port)
    started = time.monotonic()
    i = 0
    while (failed := next(a for a in cluster.admin("/admin/analyzers")["analyzers"]
                          if a["name"] == "a1")["failed_attempts"]) < 100:
        assert client.post(packet(packet_id=f"f-{i}"))[0] == 202
        i += 1
        assert i < 20_000, "the failing analyzer was never tried"
    elapsed = time.monotonic() - started
    lines = [e for e in records(cluster) if e["event"] == "send_failed"]
    assert lines and lines[0]["analyzer"] == "a1"
    assert len(lines) <= elapsed + 2, f"{len(lines)} log lines in {elapsed:.1f}s for {failed} failures"
