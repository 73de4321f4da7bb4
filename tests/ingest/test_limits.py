"""Bounded resources at their limits, seen through a real distributor and its metrics."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from typing import Callable

from distributor.tools.localcluster import LocalCluster, wait_until
from distributor.shared_table import NAME_PREFIX, SHM_DIR
from support import Client, packet


def metric(cluster: LocalCluster, name: str) -> float:
    with urllib.request.urlopen(cluster.admin_url + "/metrics") as response:
        for line in response.read().decode().splitlines():
            if line.split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_connection_limit_answers_503_and_is_counted(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=["--set", "ingest.max_connections=3"])
    held = [Client(cluster.data_port) for _ in range(3)]
    for i, client in enumerate(held):
        assert client.post(packet(packet_id=f"h-{i}"))[0] == 202
    extra = Client(cluster.data_port)
    status, headers, payload = extra.post(packet(packet_id="over"))
    assert status == 503 and headers["retry-after"] == "1" and set(payload) >= {"error", "detail"}
    wait_until(lambda: metric(cluster, 'distributor_http_events_total{event="connections_rejected"}') >= 1, 5,
               "the rejected connection in /metrics")
    held[0].close()
    wait_until(lambda: Client(cluster.data_port).post(packet(packet_id="again"))[0] == 202, 5,
               "a freed slot to be usable")
    for client in held[1:]:
        client.close()


def test_oversized_body_and_trickled_headers_are_counted(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        analyzers=(("a1", 1.0),),
        distributor_args=["--set", "ingest.max_body_bytes=2048", "--set", "ingest.header_timeout=0.5"],
    )
    client = Client(cluster.data_port)
    assert client.post(packet(messages=1) + b" " * 4096)[0] == 413
    with socket.create_connection(("127.0.0.1", cluster.data_port), timeout=10) as sock:
        sock.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\n")
        answer = sock.recv(4096)  # the server gives up on the trickling client
    assert answer.startswith(b"HTTP/1.1 408")
    wait_until(lambda: metric(cluster, 'distributor_http_events_total{event="too_large"}') >= 1
               and metric(cluster, 'distributor_http_events_total{event="header_timeouts"}') >= 1, 5, "metrics")


def test_shutdown_deadline_counts_and_logs_what_it_could_not_flush(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        analyzers=(("a1", 1.0),),
        analyzer_args={"a1": ["--stall"]},
        distributor_args=["--set", "graceful_timeout=1", "--set", "sender.request_timeout=60"],
    )
    client = Client(cluster.data_port)
    for i in range(10):
        assert client.post(packet(packet_id=f"d-{i}", messages=3))[0] == 202
    client.close()
    assert cluster.distributor is not None
    cluster.distributor.signal(signal.SIGTERM)
    assert cluster.distributor.process.wait(30) == 0  # type: ignore[union-attr]
    log = cluster.distributor.log_tail(100)
    assert "10 packets (30 messages) not delivered by the shutdown deadline" in log


def test_killed_supervisor_leaves_no_workers_and_its_segment_is_cleaned_next_start(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    import psutil

    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2)
    assert cluster.distributor is not None
    supervisor = cluster.distributor.pid
    worker_pids = [w["pid"] for w in cluster.admin("/admin/workers")["workers"]]
    segment = next(SHM_DIR.glob(f"{NAME_PREFIX}{supervisor}-*"))
    cluster.distributor.signal(signal.SIGKILL)
    cluster.distributor.process.wait(10)  # type: ignore[union-attr]

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(lambda: all(gone(pid) for pid in worker_pids), 10, "orphaned workers to exit")
    assert segment.exists()
    cluster.data_port = cluster.admin_port = 0
    cluster.start_distributor_process()
    assert not segment.exists()


def test_a_lagging_event_loop_sheds_with_503_and_recovers(make_cluster: Callable[..., LocalCluster]) -> None:
    """ingest.max_loop_lag: the worker's loop is made late on every probe (stopped 30 ms, resumed 3 ms,
    over and over), as a saturated CPU would; new packets then get 503 overloaded + Retry-After."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=["--set", "ingest.max_loop_lag=0.01"])
    worker = cluster.admin("/admin/workers")["workers"][0]["pid"]
    stop = threading.Event()

    def starve() -> None:
        while not stop.is_set():
            os.kill(worker, signal.SIGSTOP)
            time.sleep(0.03)
            os.kill(worker, signal.SIGCONT)
            time.sleep(0.003)

    starver = threading.Thread(target=starve)
    starver.start()
    client = Client(cluster.data_port)
    refused: list[tuple[int, dict[str, str], dict[str, str]]] = []
    try:
        def shed() -> bool:
            status, headers, payload = client.post(packet(packet_id=f"lag-{len(refused)}"))
            refused.append((status, headers, payload))
            return status == 503
        wait_until(shed, 15, "a 503 while the loop lags")
    finally:
        stop.set()
        starver.join()
        os.kill(worker, signal.SIGCONT)
    status, headers, payload = refused[-1]
    assert payload["error"] == "overloaded" and "CPU" in payload["detail"] and headers["retry-after"] == "1"
    wait_until(lambda: client.post(packet(packet_id=f"after-{time.monotonic()}"))[0] == 202, 10,
               "admission once the loop is on time again")
    wait_until(lambda: metric(cluster, 'distributor_packets_total{outcome="loop_lag"}') >= 1, 5, "the metric")
