"""TLS end to end: emitters with client certificates, an https control plane, https analyzers with a client
certificate, all with certificates this test makes (openssl) and real processes."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from distributor.tools.localcluster import ManagedProcess, free_ports, wait_until
from support import packet

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _context(certs: Path, client: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client:
        context.load_cert_chain(str(certs / f"{client}.pem"), str(certs / f"{client}.key"))
    return context


def _get_json(url: str, context: ssl.SSLContext) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def cluster(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("logs")
    analyzer_port, data_port, admin_port = free_ports(3)
    analyzer = ManagedProcess("analyzer", [
        sys.executable, "-m", "analyzer.server", "--listen", f"127.0.0.1:{analyzer_port}", "--name", "a1",
        "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
        "--tls-client-ca", str(certs / "ca.pem")], logs / "analyzer.log")
    distributor = ManagedProcess("distributor", [
        sys.executable, "-m", "distributor", "serve", "--listen", f"127.0.0.1:{data_port}",
        "--admin-listen", f"127.0.0.1:{admin_port}", "--workers", "1",
        "--analyzer", f"a1=https://127.0.0.1:{analyzer_port}@1",
        "--set", f"tls.cert_file={certs / 'server.pem'}", "--set", f"tls.key_file={certs / 'server.key'}",
        "--set", f"tls.client_ca_file={certs / 'ca.pem'}", "--set", f"tls.analyzer_ca_file={certs / 'ca.pem'}",
        "--set", f"tls.analyzer_cert_file={certs / 'distributor-client.pem'}",
        "--set", f"tls.analyzer_key_file={certs / 'distributor-client.key'}"], logs / "distributor.log")
    trusted = _context(certs, None)
    analyzer.start()
    try:
        wait_until(lambda: _get_json(f"https://127.0.0.1:{analyzer_port}/stats",
                                     _context(certs, "distributor-client"))[0] == 200, 15, "the https analyzer")
        distributor.start()
        wait_until(lambda: _get_json(f"https://127.0.0.1:{admin_port}/ready", trusted)[0] == 200, 30,
                   "the distributor over https")
        yield {"certs": certs, "data_port": data_port, "admin_port": admin_port, "analyzer_port": analyzer_port,
               "distributor": distributor}
    finally:
        distributor.stop()
        analyzer.stop()
        print(distributor.log_tail(30))


def _post(port: int, context: ssl.SSLContext, body: bytes) -> int:
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("POST", "/ingest", body=body, headers={"Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_an_emitter_with_a_client_certificate_is_accepted_and_delivered_over_https(cluster: dict[str, Any]) -> None:
    certs = cluster["certs"]
    emitter = _context(certs, "emitter")
    for i in range(20):
        assert _post(cluster["data_port"], emitter, packet(emitter="tls", packet_id=f"t-{i}")) == 202
    analyzer = _context(certs, "distributor-client")
    wait_until(lambda: _get_json(f"https://127.0.0.1:{cluster['analyzer_port']}/stats", analyzer)[1]["packets"] >= 20,
               15, "delivery to the https analyzer with the distributor's client certificate")
    status, view = _get_json(f"https://127.0.0.1:{cluster['admin_port']}/admin/analyzers", _context(certs, None))
    assert status == 200 and view["analyzers"][0]["state"] == "active", "health checks pass over https too"


def test_an_emitter_without_a_client_certificate_is_refused(cluster: dict[str, Any]) -> None:
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _post(cluster["data_port"], _context(cluster["certs"], None), packet(packet_id="no-cert"))


def test_plain_http_on_the_tls_port_gets_no_answer_and_the_worker_goes_on(cluster: dict[str, Any]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", cluster["data_port"], timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionResetError, BrokenPipeError)):
        connection.request("POST", "/ingest", body=packet(packet_id="plain"))
        connection.getresponse()
    connection.close()
    assert _post(cluster["data_port"], _context(cluster["certs"], "emitter"), packet(packet_id="after-plain")) == 202


def test_a_bad_certificate_file_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    data_port, admin_port = free_ports(2)
    done = subprocess.run([sys.executable, "-m", "distributor", "serve", "--listen", f"127.0.0.1:{data_port}",
                           "--admin-listen", f"127.0.0.1:{admin_port}", "--workers", "1",
                           "--analyzer", "a1=http://127.0.0.1:9@1", "--set", f"tls.cert_file={tmp_path / 'bad.pem'}",
                           "--set", f"tls.key_file={tmp_path / 'bad.pem'}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "tls" in done.stderr and "Traceback" not in done.stderr
