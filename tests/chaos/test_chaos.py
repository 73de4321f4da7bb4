"""Chaos scenarios on real processes under load; every one ends with the invariant check."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from chaos_support import FALL, FAST, INTERVAL, WEIGHTS, analyzer, check_invariants, report, start_load, wait_state
from distributor.tools.localcluster import LocalCluster, wait_until
from support import Client, packet

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["wal-off", "wal-on"])
def wal(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The scenarios where packets wait in queues run twice: with the write-ahead log off and on (interval
    sync), which must change nothing of what the invariant check sees: no packet lost, none left in a log."""
    if request.param == "wal-on":
        monkeypatch.setenv("DISTRIBUTOR_WAL_DIR", str(tmp_path / "wal"))
    return bool(request.param == "wal-on")


def shares(cluster: LocalCluster, names: tuple[str, ...]) -> dict[str, float]:
    """Epoch share among ``names`` only."""
    view = {a["name"]: a for a in cluster.admin("/admin/analyzers")["analyzers"]}
    total = sum(view[n]["epoch_share"] for n in names) or 1.0
    return {n: view[n]["epoch_share"] / total for n in names}


def test_killed_analyzer_is_detected_traffic_moves_and_it_warms_up_on_return(
    make_cluster: Callable[..., LocalCluster], wal: bool,
) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=2, distributor_args=FAST)
    load = start_load(cluster, 8.0)
    wait_until(lambda: analyzer(cluster, "a2")["delivered_packets"] > 200, 10, "load to reach a2")
    victim = cluster.analyzer("a2")
    victim.signal(signal.SIGKILL)
    victim.process.wait(5)  # type: ignore[union-attr]
    detection = wait_state(cluster, "a2", ("down", "ejected"))
    assert detection <= 5 * (FALL + 1) * INTERVAL, f"detected after {detection:.2f}s"
    before = {a["name"]: a["routed_messages"] for a in cluster.admin("/admin/analyzers")["analyzers"]}
    wait_until(lambda: analyzer(cluster, "a1")["routed_messages"] > before["a1"] + 2000, 10, "traffic on a1")
    others = shares(cluster, ("a1", "a3", "a4"))
    cluster.start_analyzer("a2")
    wait_state(cluster, "a2", ("warming",), timeout=20)
    warming = analyzer(cluster, "a2")
    assert 0 < warming["effective_weight"] < 0.3
    wait_state(cluster, "a2", ("active",), timeout=20)
    stats = load.join()
    figures = check_invariants(cluster, stats, restarted=("a2",))
    assert stats.by_status.get(503, 0) == 0
    for name, weight in (("a1", 0.4), ("a3", 0.2), ("a4", 0.1)):
        assert abs(others[name] - weight / 0.7) < 0.02
    report("kill -9 a2 and restart", {"detection_s": detection, **figures})


def test_stalled_analyzer_fails_over_and_the_others_keep_taking_load(
    make_cluster: Callable[..., LocalCluster], wal: bool,
) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=2, distributor_args=FAST)
    load = start_load(cluster, 6.0)
    wait_until(lambda: analyzer(cluster, "a1")["delivered_packets"] > 200, 10, "load to reach a1")
    cluster.analyzer("a1").control(stall=True)
    detection = wait_state(cluster, "a1", ("down", "ejected"))
    accepted_before = sum(a["routed_packets"] for a in cluster.admin("/admin/analyzers")["analyzers"])
    wait_until(lambda: sum(a["routed_packets"] for a in cluster.admin("/admin/analyzers")["analyzers"])
               > accepted_before + 500, 10, "the others to keep taking load")
    stats = load.join()
    assert stats.by_status.get(503, 0) == 0
    assert analyzer(cluster, "a1")["failover_packets"] > 0
    cluster.analyzer("a1").control(stall=False)
    figures = check_invariants(cluster, stats)
    report("stalled a1", {"detection_s": detection, **figures})


def test_analyzer_marked_down_gives_up_its_inflight_requests_at_once(
    make_cluster: Callable[..., LocalCluster], wal: bool,
) -> None:
    """Stalled with a 120 s request timeout: once a1 is down its hung batches fail over now, not in 120 s."""
    cluster = make_cluster(analyzers=WEIGHTS, workers=2,
                           distributor_args=[*FAST, "--set", "sender.request_timeout=120"])
    load = start_load(cluster, 3.0)
    wait_until(lambda: analyzer(cluster, "a1")["delivered_packets"] > 100, 10, "load to reach a1")
    cluster.analyzer("a1").control(stall=True)
    detection = wait_state(cluster, "a1", ("down", "ejected"))
    stats = load.join()
    cluster.wait_drained(timeout=60)  # while a1 still hangs: nothing may wait for its request timeout
    a1 = analyzer(cluster, "a1")
    assert a1["queue_packets"] == 0 and a1["possible_duplicates"] > 0  # aborted batches failed over as ambiguous
    cluster.analyzer("a1").control(stall=False)
    figures = check_invariants(cluster, stats)
    report("a1 down with requests in flight", {"detection_s": detection, **figures})


def test_slow_analyzer_is_saturated_and_gets_less(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        analyzers=WEIGHTS, workers=1, analyzer_args={"a1": ["--delay-ms", "150"]},
        distributor_args=[*FAST, "--set", "health.max_latency_ms=100", "--set", "health.saturated_weight=0.25",
                          "--set", "sender.request_timeout=5"],
    )
    load = start_load(cluster, 6.0)
    wait_state(cluster, "a1", ("saturated",))
    saturated = analyzer(cluster, "a1")
    assert saturated["effective_weight"] == pytest.approx(0.1)
    mid = {a["name"]: a["net_routed_messages"] for a in cluster.admin("/admin/analyzers")["analyzers"]}
    stats = load.join()
    end = {a["name"]: a["net_routed_messages"] for a in cluster.admin("/admin/analyzers")["analyzers"]}
    gained = {n: end[n] - mid[n] for n in end}
    share_a1 = gained["a1"] / sum(gained.values())
    assert share_a1 < 0.25, f"a1 still took {share_a1:.2%} while saturated"
    offered = stats.sent
    assert stats.accepted_packets >= 0.95 * offered
    figures = check_invariants(cluster, stats)
    report("slow a1 (150 ms)", {"a1_share_while_saturated": share_a1, **figures})


def test_flapping_analyzer_waits_longer_each_time_and_others_keep_their_split(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=1, distributor_args=FAST)
    load = start_load(cluster, 12.0)
    backoffs = []
    flapper = cluster.analyzer("a4")
    for _ in range(3):
        flapper.control(stall=True)
        wait_state(cluster, "a4", ("down", "ejected"))
        backoffs.append(analyzer(cluster, "a4")["backoff_s"])
        flapper.control(stall=False)
        wait_state(cluster, "a4", ("warming", "active"), timeout=30)
    stats = load.join()
    assert backoffs[1] > backoffs[0] and backoffs[2] > backoffs[1], backoffs
    others = shares(cluster, ("a1", "a2", "a3"))
    for name, weight in (("a1", 0.4), ("a2", 0.3), ("a3", 0.2)):
        assert abs(others[name] - weight / 0.9) < 0.02, others
    figures = check_invariants(cluster, stats)
    report("flapping a4", {"backoffs": "/".join(f"{b:g}" for b in backoffs), **figures})


def test_all_analyzers_down_then_back(make_cluster: Callable[..., LocalCluster], wal: bool) -> None:
    """All stall under load: queued and in-flight packets wait (nowhere to fail over), new ones get 503 at once."""
    cluster = make_cluster(analyzers=WEIGHTS, workers=2, distributor_args=FAST)
    load = start_load(cluster, 2.0)
    wait_until(lambda: analyzer(cluster, "a4")["delivered_packets"] > 20, 10, "load to reach every analyzer")
    for proc in cluster.analyzer_procs:
        proc.control(stall=True)
    for name, _ in WEIGHTS:
        wait_state(cluster, name, ("down", "ejected"))
    stats = load.join()
    waiting = [a["queue_packets"] for a in cluster.admin("/admin/analyzers")["analyzers"]]
    assert sum(waiting) > 0 and min(waiting) >= 0, waiting
    client = Client(cluster.data_port)
    latencies = []
    for i in range(300):
        started = time.perf_counter()
        status, headers, payload = client.post(packet(packet_id=f"down-{i}"))
        latencies.append(time.perf_counter() - started)
        assert status == 503 and int(headers["retry-after"]) >= 1 and payload["error"] == "no_capacity"
    assert [a["queue_packets"] for a in cluster.admin("/admin/analyzers")["analyzers"]] == waiting  # none queued
    for proc in cluster.analyzer_procs:
        proc.control(stall=False)
    figures = check_invariants(cluster, stats)  # what waited is delivered once they are back
    wait_until(lambda: client.post(packet(packet_id="back"))[0] == 202, 20, "recovery without a restart")
    client.close()
    latencies.sort()
    report("all down", {"p50_503_ms": latencies[149] * 1e3, "p99_503_ms": latencies[296] * 1e3,
                        "waiting_while_down": sum(waiting), **figures})


def test_killed_worker_under_load_loses_nothing_with_the_log_and_counts_every_loss_without(
    make_cluster: Callable[..., LocalCluster], wal: bool,
) -> None:
    """kill -9 of a worker holding queued and in-flight packets (slow analyzers): with the log its successor
    replays them and every 202 arrives (lost_worker_crash 0); without it, every packet answered 202 that
    never arrived is counted lost by the successor."""
    cluster = make_cluster(analyzers=WEIGHTS, workers=2, distributor_args=FAST)
    for proc in cluster.analyzer_procs:
        proc.control(delay_ms=150)  # answers take a while: each worker holds packets at any moment
    load = start_load(cluster, 4.0, rate=600)
    wait_until(lambda: sum(w["queued_packets"] for w in cluster.admin("/admin/workers")["workers"]) > 20, 10,
               "packets queued in the workers")
    victim = cluster.admin("/admin/workers")["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: (w := cluster.admin("/admin/workers")["workers"][0])["pid"] not in (None, victim["pid"])
               and w["state"] == "ready", 30, "the successor of worker 0")
    stats = load.join()
    for proc in cluster.analyzer_procs:
        proc.control(delay_ms=0)
    if wal:
        figures = check_invariants(cluster, stats)
        successor = cluster.admin("/admin/workers")["workers"][0]
        assert successor["wal"]["replayed_packets"] > 0, "the kill came with packets in the log"
        report("kill -9 worker 0, log on", {"replayed": successor["wal"]["replayed_packets"], **figures})
        return
    cluster.wait_drained(timeout=60)
    view = cluster.admin("/admin/analyzers")["analyzers"]
    lost = sum(a["lost_packets"] for a in view)
    seen: Counter[tuple[str, str]] = Counter()
    for proc in cluster.analyzer_procs:
        seen.update(proc.packet_keys())
    missing = [(e, pid) for e, pid, _ in stats.accepted if (e, pid) not in seen]
    assert 0 < len(missing) <= lost, f"{len(missing)} answered 202 never arrived, {lost} counted lost"
    report("kill -9 worker 0, log off", {"answered_202": len(stats.accepted), "missing": len(missing), "lost": lost})


def test_flooding_emitter_is_rate_limited_alone(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        analyzers=WEIGHTS, workers=2,
        distributor_args=["--set", "rate_limit.rate=50", "--set", "rate_limit.burst=50"],
    )
    flood = start_load(cluster, 4.0, emitters=1, connections=8, rate=None, emitter_prefix="flooder")
    polite = start_load(cluster, 4.0, emitters=400, connections=8, rate=400)
    flood_stats, polite_stats = flood.join(), polite.join()
    assert flood_stats.by_status.get(429, 0) > 0
    assert polite_stats.by_status.get(429, 0) == 0
    assert polite_stats.accepted_packets >= 0.9 * polite_stats.sent
    elapsed = flood_stats.snapshot()["elapsed"]
    flood_rate = flood_stats.accepted_packets / elapsed
    assert flood_rate <= 50 * 1.1 + 50 / elapsed, f"flooder got {flood_rate:.0f}/s over a 50/s limit"
    figures = check_invariants(cluster, flood_stats, polite_stats)
    report("flooding emitter", {"flooder_accepted_per_s": flood_rate, "flooder_429": flood_stats.by_status[429],
                                "polite_accepted": polite_stats.accepted_packets, **figures})


def test_slow_header_connections_do_not_starve_active_emitters(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=2, distributor_args=["--set", "ingest.header_timeout=2"])
    slow = []
    for _ in range(500):
        sock = socket.create_connection(("127.0.0.1", cluster.data_port))
        sock.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        slow.append(sock)
    load = start_load(cluster, 3.0, rate=500)
    stats = load.join()
    for sock in slow:
        sock.close()
    assert stats.accepted_packets >= 0.95 * stats.sent
    figures = check_invariants(cluster, stats)
    report("500 slowloris connections", {"p99_ms": stats.latency.percentile(99) * 1e3, **figures})
