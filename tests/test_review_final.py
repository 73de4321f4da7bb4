"""Regression tests for the final review of the TLS handshake bound, the pinned [tls] files, SIGINT and the
memory limit: each failed on the code before its fix.

* A TLS connection closed by its client before ``start_tls`` took it over (a reset right after connecting, or
  after its ClientHello; a half-close after part of one): the handshake waited forever (its TLS protocol never
  heard of the close) or a dead connection was handed to the HTTP protocol as if its handshake had succeeded.
  Either way it held its ``max_connections`` place for good: a burst of such connections refused every TLS client
  of the worker from then on, and each printed an "Exception in callback" traceback into the worker's log.

Real processes on 127.0.0.1, certificates made with openssl, polls with deadlines.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from distributor.tools.localcluster import ManagedProcess, free_ports, wait_until
from tls_certs import needs_openssl

def _distributor(tmp_path: Path, certs: Path | None, workers: int, *settings: str) -> tuple[ManagedProcess, int, int]:
    data_port, admin_port = free_ports(2)
    argv = [sys.executable, "-m", "distributor", "serve", "--listen", f"127.0.0.1:{data_port}",
            "--admin-listen", f"127.0.0.1:{admin_port}", "--workers", str(workers),
            "--analyzer", "a1=http://127.0.0.1:9@1"]
    if certs is not None:
        settings = (f"tls.cert_file={certs / 'server.pem'}", f"tls.key_file={certs / 'server.key'}", *settings)
    for setting in settings:
        argv += ["--set", setting]
    return ManagedProcess("distributor", argv, tmp_path / "distributor.log"), data_port, admin_port


def _client_context(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.pem"))


def _get_json(url: str, context: ssl.SSLContext | None = None) -> Any:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return json.loads(response.read())


def _ready(admin_url: str, context: ssl.SSLContext | None, workers: int) -> bool:
    return bool(_get_json(f"{admin_url}/ready", context).get("workers_ready") == workers)


def _healthz(port: int, context: ssl.SSLContext) -> int:
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        connection.close()


def _client_hello(context: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@needs_openssl
def test_tls_connections_closed_before_their_handshake_leave_no_place_taken(certs: Path, tmp_path: Path) -> None:
    """1,500 connections, each closed before its handshake: a reset at once, a reset after the ClientHello, a
    half-close after part of one. Before: the worker (max_connections = 40) refused every TLS client for good
    afterwards (40 places held: handshakes waiting forever, dead connections counted as open), with a traceback
    per connection in its log. Now its connection count goes back to 0 and a client is served at once."""
    distributor, data_port, admin_port = _distributor(tmp_path, certs, 1, "ingest.max_connections=40",
                                                      "ingest.header_timeout=30")
    context = _client_context(certs)
    admin = f"https://127.0.0.1:{admin_port}"
    hello = _client_hello(context)
    distributor.start()
    try:
        wait_until(lambda: _ready(admin, context, 1), 30, "the distributor over https")
        worker = psutil.Process(distributor.pid).children()[0]
        fds = worker.num_fds()
        for cycle in range(1500):
            kind = cycle % 3
            try:
                sock = socket.create_connection(("127.0.0.1", data_port), timeout=5)
                if kind == 1:
                    sock.sendall(hello)
                elif kind == 2:
                    sock.sendall(hello[: 1 + cycle % (len(hello) - 1)])
                if kind < 2:  # a reset (SO_LINGER 0), not a FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass  # refused above the limit: what the flood is for
        # well inside ingest.header_timeout (30 s): no handshake timeout frees anything
        wait_until(lambda: _healthz(data_port, context) == 200, 5,
                   f"a TLS client served after the flood (worker: {_get_json(admin + '/admin/workers', context)})")
        wait_until(lambda: _get_json(f"{admin}/admin/workers", context)["workers"][0]["connections"] == 0, 5,
                   "the worker's connection count back to 0")
        wait_until(lambda: worker.num_fds() <= fds, 5, f"the worker's fds back to {fds}")
        assert distributor.alive()
        log = distributor.log_tail(400)
        assert "Traceback" not in log and "Exception in callback" not in log, log[-3000:]
    finally:
        distributor.stop()


@pytest.fixture(autouse=True)
def _no_children_left() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes left behind: {left}"
