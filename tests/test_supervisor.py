"""The worker pool under its supervisor: respawn, graceful stop, reload, boot failure, no leaks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Callable

import uvloop

from distributor.tools.emitter import LoadSpec, LoadStats, run_load
from distributor.tools.localcluster import LocalCluster, free_port, wait_until
from distributor.shared_table import NAME_PREFIX, SHM_DIR
from cluster_helpers import fill
from support import Client, packet

WEIGHTS = (("a1", 0.4), ("a2", 0.3), ("a3", 0.2), ("a4", 0.1))


def segments_of(pid: int) -> list[Path]:
    return list(SHM_DIR.glob(f"{NAME_PREFIX}{pid}-*"))


def workers(cluster: LocalCluster) -> list[dict]:
    return cluster.admin("/admin/workers")["workers"]


def background_load(cluster: LocalCluster, duration: float, **spec: object) -> tuple[threading.Thread, list[LoadStats]]:
    result: list[LoadStats] = []
    load = LoadSpec(url=cluster.ingest_url, duration=duration, record_accepted=True, **spec)  # type: ignore[arg-type]
    thread = threading.Thread(target=lambda: result.append(uvloop.run(run_load(load))))
    thread.start()
    return thread, result


def test_every_worker_serves_the_shared_port(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=2)
    assert len({w["pid"] for w in workers(cluster)}) == 2
    clients = [Client(cluster.data_port) for _ in range(32)]
    for i, client in enumerate(clients):
        assert client.post(packet(packet_id=f"c-{i}"))[0] == 202
        client.close()
    assert all(w["accepted_packets"] > 0 for w in workers(cluster))


def test_sigkilled_worker_is_replaced_and_traffic_continues(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=2)
    victim = workers(cluster)[0]
    thread, result = background_load(cluster, 4.0, connections=16, rate=1500)
    wait_until(lambda: workers(cluster)[0]["accepted_packets"] > 100, 10, "load on worker 0")
    os.kill(victim["pid"], signal.SIGKILL)
    replaced = wait_until(
        lambda: (w := workers(cluster)[0])["pid"] not in (None, victim["pid"]) and w["state"] == "ready" and w,
        10, "worker 0 to be replaced",
    )
    assert replaced["restarts"] == 1
    thread.join()
    stats = result[0]
    assert stats.accepted_packets > 0
    assert stats.by_status.get(202, 0) == stats.accepted_packets
    view = cluster.admin("/admin/analyzers")["analyzers"]
    routed = sum(a["routed_messages"] for a in view)
    for a, (_, weight) in zip(view, WEIGHTS):
        assert abs(a["routed_messages"] / routed - weight) < 0.01
    with urllib.request.urlopen(cluster.admin_url + "/metrics") as response:
        metrics = response.read().decode()
    assert "distributor_worker_restarts_total 1.0" in metrics


def test_sigterm_under_load_delivers_everything_and_leaves_nothing(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=2, analyzer_args={"a1": ["--delay-ms", "20"]})
    supervisor_pid = cluster.distributor.pid  # type: ignore[union-attr]
    assert segments_of(supervisor_pid)
    thread, result = background_load(cluster, 2.0, connections=16)
    wait_until(lambda: sum(w["accepted_packets"] for w in workers(cluster)) > 500, 10, "load")
    cluster.distributor.signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert cluster.distributor.process.wait(60) == 0  # type: ignore[union-attr]
    thread.join()
    stats = result[0]
    totals = cluster.analyzer_totals()
    assert sum(t["packets"] for t in totals.values()) == stats.accepted_packets
    assert sum(t["messages"] for t in totals.values()) == stats.accepted_messages
    assert not segments_of(supervisor_pid)


def test_sighup_applies_new_weights_and_keeps_counters(make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), start_distributor=False)
    config = tmp_path / "d.toml"

    def write(w1: float, w2: float) -> None:
        config.write_text(
            "".join(f'[[analyzers]]\nname = "{p.name}"\nurl = "{p.url}"\nweight = {w}\n'
                    for p, w in zip(cluster.analyzer_procs, (w1, w2))))

    write(1, 1)
    cluster.analyzer_flags = False
    cluster.distributor_args = ["--config", str(config)]
    cluster.start_distributor_process()
    client = Client(cluster.data_port)
    for i in range(200):
        assert client.post(packet(packet_id=f"before-{i}", messages=10))[0] == 202
    before = {a["name"]: a["routed_messages"] for a in cluster.admin("/admin/analyzers")["analyzers"]}
    assert before == {"a1": 1000, "a2": 1000}
    write(3, 1)
    cluster.distributor.signal(signal.SIGHUP)  # type: ignore[union-attr]
    generation = wait_until(
        lambda: (view := cluster.admin("/admin/analyzers"))["analyzers"][0]["weight"] == 3.0 and view["generation"],
        10, "reload")
    wait_until(lambda: all(w["analyzer_generation"] == generation for w in workers(cluster)), 10,
               "every worker to adopt the reload")
    for i in range(400):
        assert client.post(packet(packet_id=f"after-{i}", messages=10))[0] == 202
    client.close()
    view = {a["name"]: a for a in cluster.admin("/admin/analyzers")["analyzers"]}
    assert view["a1"]["routed_messages"] - before["a1"] == 3000
    assert view["a2"]["routed_messages"] - before["a2"] == 1000
    assert abs(view["a1"]["epoch_share"] - 0.75) < 0.01


def test_worker_that_cannot_boot_stops_the_supervisor(tmp_path: Path) -> None:
    """The workers cannot bind (someone listens without SO_REUSEPORT); the port check is waived to get there."""
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "distributor", "serve", "--listen", f"127.0.0.1:{port}",
             "--admin-listen", f"127.0.0.1:{free_port()}", "--workers", "1",
             "--analyzer", "a=http://127.0.0.1:9@1", "--set", "allow_shared_port=true"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        blocker.close()
    assert result.returncode == 3
    assert "failed to boot 3 times in a row" in result.stderr
    assert "cannot bind" in result.stderr


def test_worker_with_a_stalled_event_loop_is_killed_and_replaced(make_cluster: Callable[..., LocalCluster]) -> None:
    # worker_timeout also bounds a replacement's boot: 5 s, not less, or a loaded test machine fails the boot
    cluster = make_cluster(analyzers=WEIGHTS, workers=2, distributor_args=["--set", "worker_timeout=5"])
    victim = workers(cluster)[1]
    os.kill(victim["pid"], signal.SIGSTOP)  # the loop stops stamping heartbeats, the process stays
    replaced = wait_until(
        lambda: (w := workers(cluster)[1])["pid"] not in (None, victim["pid"]) and w["state"] == "ready" and w,
        30, "the stalled worker to be replaced",
    )
    assert replaced["restarts"] == 1
    assert not psutil_exists(victim["pid"])
    assert "event loop stalled" in cluster.distributor.log_tail(200)  # type: ignore[union-attr]


def psutil_exists(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_worker_above_memory_limit_is_recycled_gracefully(make_cluster: Callable[..., LocalCluster]) -> None:
    """A limit between a fresh worker's RSS (about 40 MB) and what full queues make it.

    A stalled analyzer keeps 20 KB packets in the worker's queue until its RSS passes the limit; the worker is
    then replaced gracefully: it flushes its queue once the analyzer is back, and everything answered 202
    arrives once, nothing lost or dropped. Its replacement, fresh again, is left alone.
    """
    limit_mb = 120
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1, distributor_args=[
        "--set", f"max_worker_memory_mb={limit_mb}", "--set", "graceful_timeout=60",
        # the stalled analyzer stays routable: no health check for a minute, and its sends wait for it
        "--set", "health.interval=60", "--set", "health.timeout=1", "--set", "sender.request_timeout=120",
        # the queue can hold about 200 MB
        "--set", "queue.max_packets=20000", "--set", f"queue.max_bytes={200 << 20}",
    ])
    fresh = workers(cluster)[0]
    assert fresh["rss_bytes"] < limit_mb * (1 << 20) / 2, "a fresh worker is too big for this limit"
    analyzer = cluster.analyzer("a1")
    accepted: list[str] = []
    analyzer.control(stall=True)
    try:
        fill(cluster.data_port, accepted, lambda: workers(cluster)[0]["state"] == "stopping", "m", limit=20_000)
    finally:
        analyzer.control(stall=False)
    replaced = wait_until(lambda: (w := workers(cluster)[0])["state"] == "ready" and w["pid"] != fresh["pid"] and w,
                          60, "the worker to be replaced once its queue is flushed")
    assert replaced["restarts"] == 1
    assert cluster.distributor.alive()  # type: ignore[union-attr]
    log = cluster.distributor.log_tail(200)  # type: ignore[union-attr]
    assert f"above max_worker_memory_mb={limit_mb}; replacing it gracefully" in log
    assert "below a fresh worker's RSS" not in log
    with urllib.request.urlopen(cluster.admin_url + "/metrics") as response:
        metrics = response.read().decode()
    recycles = next(line for line in metrics.splitlines() if line.startswith("distributor_worker_memory_recycles_total"))
    assert float(recycles.split()[1]) == 1
    # the recycled worker flushed its queue: everything answered 202 arrived once, nothing counted lost or dropped
    assert len(accepted) > 2000
    wait_until(lambda: analyzer.stats()["packets"] >= len(accepted), 60, "delivery")
    assert sorted(analyzer.packet_keys()) == sorted(("big", packet_id) for packet_id in accepted)
    view = cluster.admin("/admin/analyzers")["analyzers"][0]
    assert view["lost_packets"] == 0 and view["shutdown_dropped_packets"] == 0
    assert workers(cluster)[0]["restarts"] == 1


def test_global_split_holds_when_workers_see_different_packet_sizes(make_cluster: Callable[..., LocalCluster]) -> None:
    """Worker A only ever sees 20-message packets, worker B only 5-message packets."""
    cluster = make_cluster(analyzers=WEIGHTS, workers=2)
    by_worker: dict[int, list[Client]] = {0: [], 1: []}
    attempts = 0
    while min(len(v) for v in by_worker.values()) < 4:
        client = Client(cluster.data_port)
        before = [w["accepted_packets"] for w in workers(cluster)]
        assert client.post(packet(packet_id=f"probe-{attempts}", messages=1))[0] == 202
        after = [w["accepted_packets"] for w in workers(cluster)]
        slot = next(i for i in (0, 1) if after[i] > before[i])
        by_worker[slot].append(client)  # keep-alive: this connection stays on that worker
        attempts += 1
        assert attempts < 200, "connections never reached both workers"
    sizes = {0: 20, 1: 5}
    sent = {0: 0, 1: 0}
    for round_ in range(250):
        for slot, clients in by_worker.items():
            for k, client in enumerate(clients):
                # equal message volume per worker: 4x more small packets
                for rep in range(1 if sizes[slot] == 20 else 4):
                    status, _, _ = client.post(packet(packet_id=f"w{slot}-{round_}-{k}-{rep}", messages=sizes[slot]))
                    assert status == 202
                    sent[slot] += 1
    per_worker = {w["slot"]: w["accepted_packets"] for w in workers(cluster)}
    assert per_worker[0] >= sent[0] and per_worker[1] >= sent[1]
    cluster.wait_drained()
    totals = cluster.analyzer_totals()
    all_messages = sum(t["messages"] for t in totals.values())
    for name, weight in WEIGHTS:
        assert abs(totals[name]["messages"] / all_messages - weight) < 0.01, (name, totals[name]["messages"] / all_messages)


def test_status_command_and_metrics(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=2)
    client = Client(cluster.data_port)
    for i in range(40):
        assert client.post(packet(packet_id=f"st-{i}", messages=5))[0] == 202
    assert client.post(b"{broken")[0] == 400
    client.close()
    text = subprocess.run([sys.executable, "-m", "distributor", "status", "--admin", cluster.admin_url],
                          capture_output=True, text=True, timeout=30)
    assert text.returncode == 0
    for name, _ in WEIGHTS:
        assert name in text.stdout
    assert "rss MB" in text.stdout and "target" in text.stdout
    raw = subprocess.run([sys.executable, "-m", "distributor", "status", "--admin", cluster.admin_url, "--json"],
                         capture_output=True, text=True, timeout=30)
    view = json.loads(raw.stdout)
    assert sum(a["routed_packets"] for a in view["analyzers"]) == 40
    assert all(w["rss_bytes"] > 0 and w["uss_bytes"] > 0 for w in view["workers"])
    with urllib.request.urlopen(cluster.admin_url + "/metrics") as response:
        metrics = response.read().decode()
    assert 'distributor_packets_total{outcome="accepted"} 40.0' in metrics
    assert 'distributor_packets_total{outcome="invalid"} 1.0' in metrics
    assert 'distributor_messages_total{analyzer="a1",outcome="routed"}' in metrics
    assert "distributor_ingest_latency_seconds_count 41.0" in metrics
    for family in ("distributor_queue_depth", "distributor_worker_memory_bytes", "distributor_worker_cpu_seconds_total",
                   "distributor_event_loop_lag_seconds", "distributor_worker_restarts_total"):
        assert family in metrics
    down = subprocess.run([sys.executable, "-m", "distributor", "status", "--admin", f"http://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "cannot reach" in down.stdout
