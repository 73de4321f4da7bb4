"""Regression tests for the issue 15 review (TLS, memory pressure): each failed on the code before its fix.

* TLS handshakes count toward ``ingest.max_connections``: connections that never sent a ClientHello were
  counted nowhere until their handshake ended (18,000 of them grew a worker to 1 GB under a limit of 10,000).
* The ``[tls]`` files a worker loads are those the supervisor read at start: a certificate rotated in place
  (mismatching its key) made a worker replaced later fail to boot, three times, and the whole distributor stop.
* The cgroup memory limit of a parent cgroup is found: a distributor in a child cgroup of its own ("max") under
  a limited one (a systemd slice, a pod) saw no limit, so no memory-pressure shedding, only the OOM killer.

Real processes on 127.0.0.1, certificates made with openssl, polls with deadlines.
"""

from __future__ import annotations

import http.client
import select
import shutil
import signal
import socket
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from cgroup_support import MemoryCgroup, MiB, _make_child, memory_cgroup
from distributor.cgroup import under_pressure
from distributor.tools.localcluster import ManagedProcess, free_ports, wait_until
from tls_certs import needs_openssl

__all__ = ["memory_cgroup"]  # the fixture, imported for pytest

def _distributor(tmp_path: Path, cert: Path, key: Path, workers: int, *settings: str,
                 wrap: MemoryCgroup | None = None) -> tuple[ManagedProcess, int, int]:
    data_port, admin_port = free_ports(2)
    argv = [sys.executable, "-m", "distributor", "serve", "--listen", f"127.0.0.1:{data_port}",
            "--admin-listen", f"127.0.0.1:{admin_port}", "--workers", str(workers),
            "--analyzer", "a1=http://127.0.0.1:9@1", "--set", f"tls.cert_file={cert}", "--set", f"tls.key_file={key}",
            *(arg for setting in settings for arg in ("--set", setting))]
    process = ManagedProcess("distributor", wrap.wrap(argv) if wrap else argv, tmp_path / "distributor.log")
    return process, data_port, admin_port


def _client_context(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.pem"))


def _get(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return str(response.read().decode())


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _ready(admin_port: int, context: ssl.SSLContext | None, workers: int) -> bool:
    return f'"workers_ready":{workers}' in _get(f"https://127.0.0.1:{admin_port}/ready", context).replace(" ", "")


def _healthz(port: int, context: ssl.SSLContext) -> int:
    """GET /healthz on the data port over TLS (no packet: the analyzer is unreachable, a 202 would wait in a queue
    and make the shutdown wait for it)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    finally:
        connection.close()


@needs_openssl
def test_connections_in_their_tls_handshake_count_toward_max_connections(certs: Path, tmp_path: Path) -> None:
    """300 TCP connections that never send a ClientHello against max_connections = 40: all but ~40 are closed at
    once (before: all 300 held until the 10 s handshake timeout, ~55 KB and an fd each, unbounded), and the worker
    serves TLS clients again as soon as they are gone."""
    limit, flood = 40, 300
    distributor, data_port, admin_port = _distributor(tmp_path, certs / "server.pem", certs / "server.key", 1,
                                                      f"ingest.max_connections={limit}")
    context = _client_context(certs)
    sockets: list[socket.socket] = []
    distributor.start()
    try:
        wait_until(lambda: _ready(admin_port, context, 1), 30, "the distributor over https")
        worker = psutil.Process(distributor.pid).children()[0]
        for _ in range(flood):
            sockets.append(socket.create_connection(("127.0.0.1", data_port), timeout=5))
        open_ones = set(sockets)
        deadline = time.monotonic() + 4.0  # well inside ingest.header_timeout (10 s): the handshake timeout
        while open_ones and len(open_ones) > limit and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_ones), [], [], 0.2)
            for sock in readable:
                try:
                    if not sock.recv(1):
                        open_ones.discard(sock)
                except OSError:
                    open_ones.discard(sock)
        assert len(open_ones) <= limit, (
            f"{len(open_ones)} of {flood} connections without a ClientHello still held after 4 s "
            f"(max_connections={limit}); worker fds {worker.num_fds()}")
        wait_until(lambda: _metric(_get(f"https://127.0.0.1:{admin_port}/metrics", context),
                                   'distributor_http_events_total{event="connections_rejected"}') >= flood - limit,
                   10, "the refused handshakes counted as rejected connections")
        for sock in sockets:
            sock.close()
        sockets.clear()
        wait_until(lambda: _healthz(data_port, context) == 200, 10,
                   "a TLS client served after the flood")
    finally:
        for sock in sockets:
            sock.close()
        distributor.stop()


@needs_openssl
def test_a_worker_replaced_after_a_certificate_rotated_in_place_loads_what_the_others_serve(
        certs: Path, tmp_path: Path) -> None:
    """The certificate file is overwritten by one whose key does not match (a rotation half done); a worker then
    dies. Before: its replacement failed to boot on the file (traceback, exit 1) three times and the supervisor
    stopped the whole distributor. Now every worker loads the files as the supervisor read them at start."""
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    shutil.copy(certs / "server.pem", cert)
    shutil.copy(certs / "server.key", key)
    distributor, data_port, admin_port = _distributor(tmp_path, cert, key, 2)
    context = _client_context(certs)
    distributor.start()
    try:
        wait_until(lambda: _ready(admin_port, context, 2), 30, "the distributor over https")
        shutil.copy(certs / "other.pem", cert)  # the new certificate, its key not yet written
        victim = psutil.Process(distributor.pid).children()[0]
        victim.send_signal(signal.SIGKILL)
        wait_until(lambda: victim.pid not in [c.pid for c in psutil.Process(distributor.pid).children()]
                   and _ready(admin_port, context, 2), 30,
                   f"a replacement worker ready\n{distributor.log_tail(20)}")
        assert distributor.alive()
        for _ in range(8):  # new connections land on both workers (SO_REUSEPORT): all serve the old pair
            assert _healthz(data_port, context) == 200
        assert "Traceback" not in distributor.log_tail(200)
    finally:
        distributor.stop()


def test_a_memory_limit_on_a_parent_cgroup_is_found(memory_cgroup: MemoryCgroup, certs: Path,
                                                    tmp_path: Path) -> None:
    """The distributor runs in a child cgroup without a limit of its own under one limited to 512 MiB: its
    limit gauge shows 512 MiB (before: no limit, so no shedding under memory pressure, only OOM kills)."""
    child = _make_child(memory_cgroup.path, memory_cgroup.version, memory_cgroup.mount_point)
    if isinstance(child, str):
        pytest.skip(child)
    memory_cgroup.set_limit(512 * MiB)
    distributor, _, admin_port = _distributor(tmp_path, certs / "server.pem", certs / "server.key", 1, wrap=child)
    context = _client_context(certs)
    distributor.start()
    try:
        wait_until(lambda: _ready(admin_port, context, 1), 30, "the distributor")
        text = _get(f"https://127.0.0.1:{admin_port}/metrics", context)
        assert _metric(text, "distributor_cgroup_memory_limit_bytes") == 512 * MiB, \
            [line for line in text.splitlines() if "cgroup" in line]
    finally:
        distributor.stop()
        assert not child.remove(), "processes left in the child cgroup"


@pytest.fixture(autouse=True)
def _no_children_left() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize("watermark", [0.85, 0.3, 0.05, 0.03, 0.01])
def test_memory_pressure_starts_above_the_watermark_and_ends_under_it_at_any_watermark(watermark: float) -> None:
    """A watermark below 0.05 never ended the pressure: it ended only 0.05 under the watermark, a negative ratio."""
    assert under_pressure(watermark * 1.01, watermark, False)
    assert under_pressure(watermark * 0.99, watermark, True)  # hysteresis: no flapping at the watermark
    assert not under_pressure(watermark * 0.99, watermark, False)
    assert not under_pressure(watermark * 0.4, watermark, True)  # ends once clearly under it, whatever the watermark
