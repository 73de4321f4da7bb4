"""Review of the fleet (issue 14): regressions for ``--fleet`` parsing, the fleet view's weight shares,
``admin --fleet`` outcomes that claimed the wrong thing, and the shipped HAProxy configuration letting a
request with two ``X-Emitter-Id`` lines through. Each failed before its fix.

Two tests run real distributors on 127.0.0.1: an ``add`` that met the analyzer on its way out (being
removed, its queue not yet empty) reported "already" and exit 0, and the analyzer then left every
instance; a change the instance applied but whose answer a proxy in front of it lost (502) was
reported "not applied".
"""

from __future__ import annotations

import http.client
import http.server
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from distributor.control.fleet import Change, FleetError, InstanceView, aggregate, apply_fleet, parse_fleet
from distributor.tools.localcluster import LocalCluster, free_ports, wait_until
from support import Client, packet

TOKEN = "review14-token"
HAPROXY_CFG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"


# --------------------------------------------------------------------------- --fleet parsing


def test_an_instance_spelled_twice_is_counted_once() -> None:
    """Before: only exact strings were merged, so one instance given twice had its workers and counters summed twice."""
    urls = parse_fleet("http://127.0.0.1:9091,HTTP://127.0.0.1:9091,http://localhost:9091/,http://127.0.0.1,"
                       "http://127.0.0.1:80,https://127.0.0.1:9091")
    assert urls == ["http://127.0.0.1:9091", "http://127.0.0.1", "https://127.0.0.1:9091"]


def test_a_malformed_url_is_a_fleet_error_not_a_traceback() -> None:
    for bad in ("http://[::1", "http://127.0.0.1:9091?"):
        with pytest.raises(FleetError):
            parse_fleet(bad)


# --------------------------------------------------------------------------- the fleet view's weight shares


def _row(name: str, weight: float, state: str = "active", **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": f"http://10.0.0.9:{9000 + len(name)}", "weight": weight, "mode": "batch",
            "compression": "none", "state": state, "draining": False,
            "effective_weight": 0.0 if state == "removed" else weight, "target_share": 0.0,
            "net_routed_messages": 10, **extra}


def _view(url: str, *rows: dict[str, Any]) -> InstanceView:
    return InstanceView(url, [{"slot": 0, "state": "ready"}], list(rows))


def test_a_removed_analyzer_takes_no_weight_share() -> None:
    """Before: a3, removed on every instance, kept its old weight in the sum: a1 showed 50% where it gets 60%."""
    fleet = aggregate([_view(f"http://10.0.0.{i}:9091", _row("a1", 0.6), _row("a2", 0.4), _row("a3", 0.2, "removed"))
                       for i in (1, 2, 3)])
    shares = {a["name"]: a["weight_share"] for a in fleet["analyzers"]}
    assert shares["a1"] == pytest.approx(0.6) and shares["a2"] == pytest.approx(0.4)
    assert shares["a3"] is None


def test_instances_that_disagree_about_weights_give_no_weight_share() -> None:
    """Before: a2 at 0.9 on one instance (reloaded with another file) made a2 'mixed' and a1 100%."""
    views = [_view("http://10.0.0.1:9091", _row("a1", 0.6), _row("a2", 0.4)),
             _view("http://10.0.0.2:9091", _row("a1", 0.6), _row("a2", 0.4)),
             _view("http://10.0.0.3:9091", _row("a1", 0.6), _row("a2", 0.9))]
    fleet = aggregate(views)
    assert {a["name"]: a["weight_share"] for a in fleet["analyzers"]} == {"a1": None, "a2": None}
    assert any(line.startswith("a2: defined differently") for line in fleet["drift"])


# --------------------------------------------------------------------------- admin --fleet against real instances


@pytest.fixture
def slow_a3() -> Iterator[LocalCluster]:
    """One instance with a1 and a3; a3 answers packets after 20 s, so what is sent to it stays queued a while."""
    cluster = LocalCluster(analyzers=(("a1", 0.5), ("a3", 0.5)), workers=1,
                           analyzer_args={"a3": ["--delay-ms", "20000"]},
                           distributor_args=["--set", f"admin.token={TOKEN}", "--set", "sender.request_timeout=60",
                                             "--set", "graceful_timeout=2"])
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _analyzer(cluster: LocalCluster, name: str) -> dict[str, Any] | None:
    return next((a for a in cluster.admin("/admin/analyzers")["analyzers"]
                 if a["name"] == name and a["state"] != "removed"), None)


def test_add_does_not_count_an_analyzer_being_removed_as_done(slow_a3: LocalCluster) -> None:
    """Before: the add found a3 "defined the same way" (it was, while draining out) and said "already", exit 0;
    a3 then left once its queue emptied, on an instance the fleet command had reported in effect."""
    cluster = slow_a3
    client = Client(cluster.data_port)
    for i in range(20):
        assert client.post(packet("review14", f"p-{time.time_ns()}-{i}"))[0] == 202
    client.close()
    wait_until(lambda: (_analyzer(cluster, "a3") or {}).get("queue_packets", 0) > 0, 20, "packets queued for a3")
    url = cluster.analyzer("a3").url
    (removed,) = apply_fleet([cluster.admin_url], Change("remove", "a3"), TOKEN)
    assert removed.ok, removed
    a3 = _analyzer(cluster, "a3")
    assert a3 is not None and a3["draining"], "a3 left at once: its queue was empty, nothing to test"
    (added,) = apply_fleet([cluster.admin_url], Change("add", "a3", 0.5, url), TOKEN)
    assert not added.ok, added
    assert "draining" in added.detail and "being removed" in added.detail


class _LossyProxy(http.server.ThreadingHTTPServer):
    """In front of one control plane: GETs pass, a mutating request is forwarded (and applied), its answer replaced
    by a 502, as an ingress or a port-forward that lost the upstream's answer."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        super().__init__(("127.0.0.1", 0), _LossyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _LossyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _LossyProxy

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=10)
        upstream.request(self.command, self.path, body=body,
                         headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
        answer = upstream.getresponse()
        data, status, kind = answer.read(), answer.status, answer.getheader("Content-Type", "application/json")
        upstream.close()
        if self.command != "GET":
            data, status, kind = b"<html>502 Bad Gateway</html>", 502, "text/html"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _forward

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def behind_a_lossy_proxy(make_cluster: Any) -> Iterator[tuple[LocalCluster, str]]:
    cluster = make_cluster(analyzers=(("a1", 0.5), ("a2", 0.5)), workers=1,
                           distributor_args=["--set", f"admin.token={TOKEN}"])
    proxy = _LossyProxy(cluster.admin_port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield cluster, proxy.url
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(10)


def test_a_change_applied_whose_answer_was_lost_is_not_reported_as_not_applied(
        behind_a_lossy_proxy: tuple[LocalCluster, str]) -> None:
    """Before: "FAILED not applied: HTTP 502" while the instance was draining a2; now verified, so in effect."""
    cluster, proxy = behind_a_lossy_proxy
    (outcome,) = apply_fleet([proxy], Change("drain", "a2"), TOKEN)
    assert _analyzer(cluster, "a2")["draining"]  # type: ignore[index]  # the instance did apply it
    assert outcome.ok and outcome.result == "applied" and "502" in outcome.detail, outcome
    (again,) = apply_fleet([proxy], Change("drain", "a2"), TOKEN)
    assert again.result == "already", again
    # a removal whose answer is lost: a2 (drained, nothing queued) leaves at once, which the check sees
    (removal,) = apply_fleet([proxy], Change("remove", "a2"), TOKEN)
    assert removal.ok and _analyzer(cluster, "a2") is None, removal


# --------------------------------------------------------------------------- the shipped HAProxy configuration


def _local_haproxy_config(data_port: int, listen: int, stats: int, socket_path: Path) -> str:
    """deploy/haproxy/haproxy.cfg on 127.0.0.1 without root: no chroot or user switch, private ports and socket,
    one server (the test's distributor). Everything else as shipped."""
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"^\s*(chroot|user|group) .*$", "", text, flags=re.M)
    text = re.sub(r"^(\s*stats socket )\S+", rf"\g<1>{socket_path}", text, flags=re.M)
    text = re.sub(r"^(\s*bind ):8080\b", rf"\g<1>127.0.0.1:{listen}", text, flags=re.M)
    text = re.sub(r"^(\s*bind )127\.0\.0\.1:8404\b", rf"\g<1>127.0.0.1:{stats}", text, flags=re.M)
    lines = text.splitlines()
    servers = [i for i, line in enumerate(lines) if re.match(r"\s*server\s", line)]
    lines[servers[0]:servers[-1] + 1] = [f"    server d1 127.0.0.1:{data_port} id 1"]
    return "\n".join(lines) + "\n"


def test_haproxy_refuses_a_request_with_two_emitter_id_lines(make_cluster: Any, tmp_path: Path) -> None:
    """Before: HAProxy hashed the first X-Emitter-Id line and the distributor checked the last, so
    "X-Emitter-Id: decoy" + "X-Emitter-Id: me" was accepted (202) on the instance "decoy" hashes to."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian package haproxy)")
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1)
    listen, stats = free_ports(2)
    config = tmp_path / "haproxy.cfg"
    config.write_text(_local_haproxy_config(cluster.data_port, listen, stats, tmp_path / "admin.sock"))
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        def post(headers: list[tuple[str, str]], emitter: str = "me") -> tuple[int, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
            connection.putrequest("POST", "/ingest")
            body = packet(emitter, f"p-{time.time_ns()}")
            for name, value in [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers]:
                connection.putheader(name, value)
            connection.endheaders(body)
            answer = connection.getresponse()
            result = answer.status, answer.read()
            connection.close()
            return result

        def served() -> bool:
            assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
            try:
                return post([("X-Emitter-Id", "me")])[0] == 202
            except OSError:
                return False

        wait_until(served, 30, "HAProxy forwarding to the distributor", interval=0.2)
        status, body = post([("X-Emitter-Id", "decoy"), ("X-Emitter-Id", "me")])
        assert status == 400 and b"emitter_mismatch" in body, (status, body)
        assert post([("X-Emitter-Id", "me"), ("X-Emitter-Id", "me")])[0] == 400
        assert post([("X-Emitter-Id", "team,me")], emitter="team,me")[0] == 202  # one line with a comma: fine
        assert post([])[0] == 202  # no header: round robin, as before
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
