"""The worker pool under its supervisor: respawn, graceful stop, reload, boot failure, no leaks."""

from __future__ import annotations

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

from distributor.emitter import LoadSpec, LoadStats, run_load
from distributor.localcluster import LocalCluster, free_port, wait_until
from distributor.shared_table import NAME_PREFIX, SHM_DIR
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
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "distributor", "serve", "--listen", f"127.0.0.1:{port}",
             "--admin-listen", f"127.0.0.1:{free_port()}", "--workers", "1",
             "--analyzer", "a=http://127.0.0.1:9@1"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        blocker.close()
    assert result.returncode == 3
    assert "failed to boot 3 times in a row" in result.stderr
    assert "cannot bind" in result.stderr
