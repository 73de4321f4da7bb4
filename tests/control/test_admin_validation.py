"""Admin input hardening against a real distributor: bodies validated before anything changes, allowed
networks, a non-UTF-8 Authorization header, and no admin token in the workers' environment."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from distributor.tools.localcluster import LocalCluster

TOKEN = "t0ps3cret"
AUTH = ["--set", f"admin.token={TOKEN}"]


def call(cluster: LocalCluster, method: str, path: str, body: Any = None, token: str = TOKEN) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", cluster.admin_port, timeout=10)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body).encode(),
                           headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if response.getheader("Content-Type") == "application/json" \
            else payload.decode(errors="replace")  # a 500 from aiohttp is text
    finally:
        connection.close()


def names(cluster: LocalCluster) -> list[str]:
    return [a["name"] for a in cluster.admin("/admin/analyzers")["analyzers"]]


def metrics(cluster: LocalCluster) -> str:
    with urllib.request.urlopen(cluster.admin_url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_an_invalid_add_answers_400_and_changes_nothing(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=AUTH)
    url = cluster.analyzer("a1").url
    own = f"http://127.0.0.1:{cluster.admin_port}"
    bodies: list[tuple[dict[str, Any], str]] = [
        ({"name": "é" * 33, "url": url, "weight": 1}, "body.name"),  # 33 characters, 66 bytes
        ({"name": "a2", "url": url + "/" + "é" * 150, "weight": 1}, "body.url"),
        ({"name": "a2", "url": url + "/" + "p" * 300, "weight": 1}, "body.url"),
        ({"name": "a2\n\x1b[31m", "url": url, "weight": 1}, "body.name"),
        ({"name": "a2", "url": url.replace("http://", "http://user:secret@"), "weight": 1}, "body.url"),
        ({"name": "a2", "url": url + "/\r\nX-Forged: 1", "weight": 1}, "body.url"),
        ({"name": "a2", "url": own, "weight": 1}, "body.url"),
        ({"name": "a2", "url": f"http://localhost:{cluster.admin_port}", "weight": 1}, "body.url"),
        ({"name": "a2", "url": f"http://127.0.0.1:{cluster.data_port}", "weight": 1}, "body.url"),
        ({"name": "a2", "url": "http://169.254.169.254/latest", "weight": 1}, "body.url"),
        ({"name": "a2", "url": "file:///etc/passwd", "weight": 1}, "body.url"),
        ({"name": "a2", "url": url, "weight": 1e300}, "body.weight"),
        ({"name": "a2", "url": url, "weight": 1, "mode": "bulk"}, "body.mode"),
        ({"name": "a2", "url": url}, "body.weight"),
        ({"name": "a2", "url": url, "weight": 1, "admin": True}, "body"),
    ]
    for body, field in bodies:
        status, answer = call(cluster, "POST", "/admin/analyzers", body)
        assert status == 400 and answer["detail"].startswith(field), (body, status, answer)
    assert names(cluster) == ["a1"]
    text = metrics(cluster)
    assert 'analyzer=""' not in text and "secret" not in text
    assert 'distributor_admin_changes_total{action="add"}' not in text
    assert call(cluster, "PUT", "/admin/analyzers/a1", {"weight": float("inf")})[0] == 400
    assert call(cluster, "PUT", "/admin/analyzers/a1", {"weight": True})[0] == 400
    assert cluster.admin("/admin/analyzers")["analyzers"][0]["weight"] == 1.0
    extra = cluster.start_analyzer("a2")
    status, answer = call(cluster, "POST", "/admin/analyzers", {"name": "a2", "url": extra.url, "weight": 1})
    assert status == 201, answer
    assert names(cluster) == ["a1", "a2"]


def test_allowed_networks_limit_where_the_api_may_point(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=[
        *AUTH, "--set", "admin.allowed_analyzer_networks=127.0.0.0/8,10.0.0.0/8"])
    refused = ["http://192.168.1.5:9000", "http://analyzer.internal:9000", "http://[::1]:9000",
               "http://169.254.169.254:80"]
    for url in refused:
        status, answer = call(cluster, "POST", "/admin/analyzers", {"name": "x", "url": url, "weight": 1})
        assert status == 400 and answer["detail"].startswith("body.url"), (url, answer)
    for i, url in enumerate(["http://10.9.8.7:9000", "http://localhost:9000"]):
        status, answer = call(cluster, "POST", "/admin/analyzers", {"name": f"x{i}", "url": url, "weight": 1})
        assert status == 201, (url, answer)


def test_a_non_utf8_authorization_header_gets_401(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=AUTH)
    request = (b"POST /admin/analyzers/a1/drain HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Authorization: Bearer t0p\xff\xfes3cret\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", cluster.admin_port), timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert cluster.distributor is not None
    assert "Traceback" not in cluster.distributor.log_tail(200)
    assert not cluster.admin("/admin/analyzers")["analyzers"][0]["draining"]


def test_workers_do_not_inherit_the_admin_token(
    make_cluster: Callable[..., LocalCluster], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISTRIBUTOR_ADMIN_TOKEN", TOKEN)
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2)
    assert call(cluster, "POST", "/admin/analyzers/a1/drain")[0] == 200, "the supervisor has the token"
    pids = [w["pid"] for w in cluster.admin("/admin/workers")["workers"]]
    assert len(pids) == 2
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read()
        assert TOKEN.encode() not in environ, f"worker {pid} holds the admin token in its environment"


# --- review of issues 16/17, defect 10: a change that cannot be saved says why, in JSON ----------------------------


def test_an_admin_change_that_cannot_be_saved_answers_a_json_state_not_saved(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path,
) -> None:
    """With admin.state_file's directory gone, every change is refused and not applied; the answer was aiohttp's
    text/plain '500 Internal Server Error' (a traceback in the log), which says nothing of the state file."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), distributor_args=[
        *AUTH, "--set", f"admin.state_file={state_dir / 'state.json'}"])
    shutil.rmtree(state_dir)  # as root, chmod would not stop the writes
    url = cluster.analyzer("a1").url
    changes: list[tuple[str, str, Any]] = [
        ("PUT", "/admin/analyzers/a1", {"weight": 3}),
        ("POST", "/admin/analyzers/a1/drain", None),
        ("DELETE", "/admin/analyzers/a2", None),
        ("POST", "/admin/analyzers", {"name": "a3", "url": url, "weight": 1}),
    ]
    for method, path, body in changes:
        status, answer = call(cluster, method, path, body)
        assert status == 500 and isinstance(answer, dict), f"{method} {path}: {status} {answer!r}"
        assert answer["error"] == "state_not_saved", answer
        assert "admin.state_file" in answer["detail"] and "nothing was changed" in answer["detail"], answer
    view = {a["name"]: a for a in cluster.admin("/admin/analyzers")["analyzers"]}
    assert sorted(view) == ["a1", "a2"]
    assert [(a["weight"], a["draining"], a["state"]) for a in view.values()] == [(1.0, False, "active")] * 2
    assert cluster.distributor is not None
    assert "Traceback" not in cluster.distributor.log_tail(300)
