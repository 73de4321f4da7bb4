"""Admin API on the control plane: auth, drain, live weights, add/remove, state file, CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable

from distributor.control.client import http_json
from distributor.tools.localcluster import LocalCluster, wait_until
from support import Client, packet

TOKEN = "t0ps3cret"
AUTH = ["--set", f"admin.token={TOKEN}"]


def call(cluster: LocalCluster, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    request = urllib.request.Request(
        cluster.admin_url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def view(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in cluster.admin("/admin/analyzers")["analyzers"]}


def send(cluster: LocalCluster, count: int, prefix: str, messages: int = 10) -> None:
    client = Client(cluster.data_port)
    for i in range(count):
        assert client.post(packet(packet_id=f"{prefix}-{i}", messages=messages))[0] == 202
    client.close()


def test_mutating_endpoints_need_the_token_and_are_off_without_one(make_cluster: Callable[..., LocalCluster]) -> None:
    closed = make_cluster(analyzers=(("a1", 1.0),))
    status, body = call(closed, "POST", "/admin/analyzers/a1/drain")
    assert status == 403 and body["error"] == "admin_disabled"
    assert http_json(closed.admin_url + "/admin/analyzers")[0] == 200
    assert http_json(closed.admin_url + "/ready")[0] == 200
    guarded = make_cluster(analyzers=(("a1", 1.0),), distributor_args=AUTH)
    assert call(guarded, "POST", "/admin/analyzers/a1/drain", token=None)[0] == 401
    assert call(guarded, "POST", "/admin/analyzers/a1/drain", token="wrong")[0] == 401
    assert call(guarded, "POST", "/admin/analyzers/nope/drain")[0] == 404
    assert call(guarded, "PUT", "/admin/analyzers/a1", {"weight": -1})[0] == 400
    assert call(guarded, "PUT", "/admin/analyzers/a1", {"weight": "heavy"})[0] == 400
    assert call(guarded, "POST", "/admin/analyzers", {"name": "a1", "url": "http://127.0.0.1:1", "weight": 1})[0] == 400
    assert call(guarded, "POST", "/admin/analyzers", {"name": "x", "url": "ftp://x", "weight": 1})[0] == 400
    status, _ = call(guarded, "POST", "/admin/analyzers/a1/drain")
    assert status == 200
    with urllib.request.urlopen(guarded.admin_url + "/metrics") as response:
        assert 'distributor_admin_changes_total{action="drain"} 1.0' in response.read().decode()


def test_drain_flushes_then_stops_routing_and_undrain_ramps_back(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), distributor_args=AUTH,
                           analyzer_args={"a1": ["--delay-ms", "50"]})
    send(cluster, 200, "before")
    status, body = call(cluster, "POST", "/admin/analyzers/a1/drain")
    assert status == 200 and body["analyzer"]["state"] in ("draining", "drained")
    wait_until(lambda: view(cluster)["a1"]["state"] == "drained", 20, "a1 to drain")
    routed = view(cluster)["a1"]["routed_messages"]
    send(cluster, 100, "during")
    assert view(cluster)["a1"]["routed_messages"] == routed
    assert view(cluster)["a1"]["failover_packets"] == 0, "a drain flushes to the analyzer, it does not fail over"
    cluster.wait_drained()
    assert cluster.analyzer("a1").stats()["packets"] == view(cluster)["a1"]["delivered_packets"]
    assert call(cluster, "POST", "/admin/analyzers/a1/undrain")[0] == 200
    wait_until(lambda: view(cluster)["a1"]["state"] in ("warming", "active"), 10, "a1 back")
    send(cluster, 100, "after")
    assert view(cluster)["a1"]["routed_messages"] > routed


def test_live_weight_change_moves_the_split_without_a_burst(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), distributor_args=AUTH)
    send(cluster, 100, "even")
    status, body = call(cluster, "PUT", "/admin/analyzers/a1", {"weight": 3})
    assert status == 200 and body["analyzer"]["weight"] == 3.0
    before = {n: a["net_routed_messages"] for n, a in view(cluster).items()}
    send(cluster, 400, "skewed")
    after = {n: a["net_routed_messages"] for n, a in view(cluster).items()}
    assert after["a1"] - before["a1"] == 3000 and after["a2"] - before["a2"] == 1000


def test_add_then_remove_an_analyzer(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), distributor_args=AUTH)
    extra = cluster.start_analyzer("a3")
    wait_until(lambda: cluster._analyzer_up(extra), 10, "a3 up")
    status, body = call(cluster, "POST", "/admin/analyzers", {"name": "a3", "url": extra.url, "weight": 2})
    assert status == 201
    send(cluster, 400, "with-a3")
    assert abs(view(cluster)["a3"]["epoch_share"] - 0.5) < 0.02
    assert call(cluster, "DELETE", "/admin/analyzers/a3")[0] == 202
    wait_until(lambda: view(cluster)["a3"]["state"] == "removed", 20, "a3 removed after draining")
    cluster.wait_drained()
    assert extra.stats()["packets"] == view(cluster)["a3"]["delivered_packets"] > 0
    send(cluster, 50, "without-a3")
    assert view(cluster)["a3"]["routed_packets"] == extra.stats()["packets"]


def test_changes_survive_reload_and_restart_only_with_a_state_file(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), distributor_args=[*AUTH, "--set",
                           f"admin.state_file={state}"])
    assert call(cluster, "PUT", "/admin/analyzers/a1", {"weight": 5})[0] == 200
    assert call(cluster, "POST", "/admin/analyzers/a2/drain")[0] == 200
    assert cluster.distributor is not None
    cluster.distributor.signal(signal.SIGHUP)
    distributor = cluster.distributor
    wait_until(lambda: "reloaded" in distributor.log_tail(50), 10, "the reload")
    assert view(cluster)["a1"]["weight"] == 5 and view(cluster)["a2"]["draining"]
    cluster.distributor.stop()
    cluster.data_port = cluster.admin_port = 0
    cluster.start_distributor_process()
    assert view(cluster)["a1"]["weight"] == 5 and view(cluster)["a2"]["draining"]
    # without a state file, the configuration wins at the next reload
    plain = make_cluster(analyzers=(("a1", 1.0),), distributor_args=AUTH)
    assert call(plain, "PUT", "/admin/analyzers/a1", {"weight": 5})[0] == 200
    plain.distributor.signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: view(plain)["a1"]["weight"] == 1.0, 10, "the config's weight back")


def test_cli_wraps_the_api(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), distributor_args=AUTH)
    base = [sys.executable, "-m", "distributor", "admin", "--admin", cluster.admin_url, "--token", TOKEN]
    ok = subprocess.run([*base, "weight", "a2", "2.5"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and json.loads(ok.stdout)["analyzer"]["weight"] == 2.5
    assert subprocess.run([*base, "drain", "a1"], capture_output=True, timeout=30).returncode == 0
    assert view(cluster)["a1"]["draining"]
    bad = subprocess.run([sys.executable, "-m", "distributor", "admin", "--admin", cluster.admin_url, "--token", "x",
                          "undrain", "a1"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "401" in bad.stdout
