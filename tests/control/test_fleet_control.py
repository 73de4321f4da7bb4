"""``distributor status --fleet`` and ``distributor admin --fleet`` against three real distributors on 127.0.0.1.

The instances share two analyzers (as a fleet does) and a token. Each test leaves the fleet as it found
it; the one that stops an instance starts it again on the same ports.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any, Iterator

import pytest

from distributor.cli import main
from distributor.control.client import http_json
from distributor.control.fleet import Change, FleetError, aggregate, fetch_fleet, parse_fleet
from distributor.tools.localcluster import LocalCluster, free_port, wait_until
from support import Client, packet

TOKEN = "fleet-unit-token"
WEIGHTS = (("a1", 0.6), ("a2", 0.4))


@pytest.fixture(scope="module")
def instances() -> Iterator[list[LocalCluster]]:
    clusters: list[LocalCluster] = []
    try:
        first = LocalCluster(analyzers=WEIGHTS, workers=1, distributor_args=["--set", f"admin.token={TOKEN}"])
        clusters.append(first)
        first.start()
        shared = [arg for name, weight in WEIGHTS
                  for arg in ("--analyzer", f"{name}={first.analyzer(name).url}@{weight}")]
        for _ in range(2):
            other = LocalCluster(analyzers=(), workers=1, distributor_args=[*shared, "--set", f"admin.token={TOKEN}"])
            clusters.append(other)
            other.start()
        yield clusters
    finally:
        for cluster in reversed(clusters):
            cluster.stop()


def urls(clusters: list[LocalCluster]) -> str:
    return ",".join(c.admin_url for c in clusters)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


def admin(capsys: pytest.CaptureFixture[str], clusters: list[LocalCluster], *action: str,
          token: str = TOKEN) -> tuple[int, dict[str, Any]]:
    code, out = cli(capsys, "admin", "--fleet", urls(clusters), "--token", token, "--json", *action)
    return code, json.loads(out)


def delete(cluster: LocalCluster, name: str) -> None:
    """Remove an analyzer on one instance (cleanup), with the token."""
    request = urllib.request.Request(f"{cluster.admin_url}/admin/analyzers/{name}", method="DELETE",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5):
        pass


def results(answer: dict[str, Any]) -> list[str]:
    return [o["result"] for o in answer["outcomes"]]


def analyzer(cluster: LocalCluster, name: str) -> dict[str, Any] | None:
    """The analyzer as the instance defines it; None once removed (a removed one stays listed for its counters)."""
    return next((a for a in cluster.admin("/admin/analyzers")["analyzers"]
                 if a["name"] == name and a["state"] != "removed"), None)


def test_parse_fleet() -> None:
    assert parse_fleet("http://10.0.0.1:9091, http://10.0.0.2:9091/,,http://10.0.0.1:9091") == [
        "http://10.0.0.1:9091", "http://10.0.0.2:9091"]
    for bad in ("", " , ", "10.0.0.1:9091", "ftp://x:1", "http://10.0.0.1:9091/admin", "http://h:port"):
        with pytest.raises(FleetError):
            parse_fleet(bad)


def test_change_requests_quote_the_name() -> None:
    assert Change("drain", "a/1").request() == ("POST", "/admin/analyzers/a%2F1/drain", None)
    assert Change("weight", "a1", 2.0).request() == ("PUT", "/admin/analyzers/a1", {"weight": 2.0})
    assert Change("add", "a3", 1.0, "http://127.0.0.1:1").request()[2] == {
        "name": "a3", "url": "http://127.0.0.1:1", "weight": 1.0, "mode": "batch", "compression": "none"}


def test_status_sums_every_instance_and_names_one_that_does_not_answer(
        instances: list[LocalCluster], capsys: pytest.CaptureFixture[str]) -> None:
    before = aggregate(fetch_fleet([c.admin_url for c in instances]))
    sent = {}
    for count, cluster in zip((3, 5, 7), instances):
        client = Client(cluster.data_port)
        for i in range(count):
            status, _, _ = client.post(packet(f"fleet-{cluster.data_port}", f"p-{time.time_ns()}-{i}", messages=5))
            assert status == 202
        client.close()
        sent[cluster.admin_url] = count
    for cluster in instances:
        cluster.wait_drained()
    code, out = cli(capsys, "status", "--fleet", urls(instances), "--json")
    assert code == 0, out
    view = json.loads(out)
    assert view["unreachable"] == [] and view["drift"] == []
    assert view["totals"]["instances_answered"] == 3 and view["totals"]["workers_ready"] == 3
    assert view["totals"]["accepted_packets"] - before["totals"]["accepted_packets"] == 15
    assert view["totals"]["routed_messages"] - before["totals"]["routed_messages"] == 75
    for entry, old in zip(view["instances"], before["instances"]):
        assert entry["accepted_packets"] - old["accepted_packets"] == sent[entry["url"]]
    # per analyzer: the sum of the instances' own counters, and shares over the fleet
    own = [c.admin("/admin/analyzers")["analyzers"] for c in instances]
    for a in view["analyzers"]:
        assert a["defined_on"] == 3 and a["consistent"] and a["states"] == {"active": 3}
        assert a["delivered_messages"] == sum(next(x for x in rows if x["name"] == a["name"])["delivered_messages"]
                                              for rows in own)
    assert sum(a["share"] for a in view["analyzers"]) == pytest.approx(1.0)
    assert [a["weight_share"] for a in view["analyzers"]] == pytest.approx([0.6, 0.4])
    # an instance that does not answer: named, the rest still summed, exit 1
    dead = f"http://127.0.0.1:{free_port()}"
    code, text = cli(capsys, "status", "--fleet", f"{urls(instances)},{dead}")
    assert code == 1
    assert f"127.0.0.1:{dead.rsplit(':', 1)[1]}" in text and "DID NOT ANSWER" in text and f"NOT ANSWERED {dead}" in text
    assert "fleet: 3 of 4 instances answered" in text
    for cluster in instances:
        assert f"127.0.0.1:{cluster.admin_port}" in text
    code, out = cli(capsys, "status", "--fleet", "not-a-url")
    assert code == 2 and "not an http" in out


def test_weight_drain_undrain_apply_everywhere_and_repeat_safely(
        instances: list[LocalCluster], capsys: pytest.CaptureFixture[str]) -> None:
    code, answer = admin(capsys, instances, "weight", "a1", "0.5")
    assert code == 0 and results(answer) == ["applied"] * 3 and answer["ok"]
    assert all(analyzer(c, "a1")["weight"] == 0.5 for c in instances)  # type: ignore[index]
    code, answer = admin(capsys, instances, "weight", "a1", "0.5")
    assert code == 0 and results(answer) == ["already"] * 3
    code, answer = admin(capsys, instances, "drain", "a2")
    assert code == 0 and results(answer) == ["applied"] * 3
    assert all(analyzer(c, "a2")["draining"] for c in instances)  # type: ignore[index]
    code, answer = admin(capsys, instances, "drain", "a2")
    assert code == 0 and results(answer) == ["already"] * 3
    code, out = cli(capsys, "admin", "--fleet", urls(instances), "--token", TOKEN, "undrain", "a2")
    assert code == 0 and "in effect on all 3 instances" in out and out.count(" applied ") == 3
    code, answer = admin(capsys, instances, "weight", "a1", "0.6")
    assert code == 0 and results(answer) == ["applied"] * 3
    # a wrong token changes nothing anywhere, and says so per instance
    code, answer = admin(capsys, instances, "weight", "a1", "0.9", token="wrong")
    assert code == 1 and results(answer) == ["failed"] * 3
    assert all("HTTP 401" in o["detail"] for o in answer["outcomes"])
    assert all(analyzer(c, "a1")["weight"] == 0.6 for c in instances)  # type: ignore[index]


def test_add_and_remove_count_what_is_already_done(
        instances: list[LocalCluster], capsys: pytest.CaptureFixture[str]) -> None:
    extra = instances[0].start_analyzer("a3")
    wait_until(lambda: http_json(extra.url + "/stats")[0] == 200, 15, "analyzer a3")
    try:
        # half-applied by hand on one instance: the fleet add completes it, counting that one as done
        code, _ = cli(capsys, "admin", "--admin", instances[0].admin_url, "--token", TOKEN, "add", "a3", extra.url, "0.2")
        assert code == 0
        code, answer = admin(capsys, instances, "add", "a3", extra.url, "0.2")
        assert code == 0 and results(answer) == ["already", "applied", "applied"], answer
        code, answer = admin(capsys, instances, "add", "a3", extra.url, "0.2")
        assert code == 0 and results(answer) == ["already"] * 3
        # the same name with another definition is a conflict: reported, nothing changed
        code, answer = admin(capsys, instances, "add", "a3", extra.url, "0.3")
        assert code == 1 and results(answer) == ["failed"] * 3
        assert all("conflict" in o["detail"] and "weight" in o["detail"] for o in answer["outcomes"])
        assert all(analyzer(c, "a3")["weight"] == 0.2 for c in instances)  # type: ignore[index]
        code, answer = admin(capsys, instances, "remove", "a3")
        assert code == 0 and results(answer) == ["applied"] * 3
        for cluster in instances:
            wait_until(lambda c=cluster: analyzer(c, "a3") is None, 15, "a3 removed")
        code, answer = admin(capsys, instances, "remove", "a3")
        assert code == 0 and results(answer) == ["already"] * 3
    finally:
        for cluster in instances:
            if analyzer(cluster, "a3") is not None:
                delete(cluster, "a3")
        extra.stop()
        instances[0].analyzer_procs.remove(extra)


def test_a_change_one_instance_misses_is_reported_and_the_same_command_finishes_it(
        instances: list[LocalCluster], capsys: pytest.CaptureFixture[str]) -> None:
    down = instances[2]
    assert down.distributor is not None
    down.distributor.stop()
    try:
        code, out = cli(capsys, "admin", "--fleet", urls(instances), "--token", TOKEN, "drain", "a2")
        assert code == 1
        assert "NOT in effect on 1 of 3 instances" in out and "safe to repeat" in out
        lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
        assert "FAILED" in lines[down.admin_url] and "cannot reach" in lines[down.admin_url]
        assert all(" applied " in lines[c.admin_url] for c in instances[:2])
    finally:
        down.start_distributor_process()
    code, answer = admin(capsys, instances, "drain", "a2")
    assert code == 0 and results(answer) == ["already", "already", "applied"]
    code, answer = admin(capsys, instances, "undrain", "a2")
    assert code == 0 and results(answer) == ["applied"] * 3


def test_an_analyzer_missing_on_one_instance_is_drift(
        instances: list[LocalCluster], capsys: pytest.CaptureFixture[str]) -> None:
    lonely = instances[0].analyzer("a1").url
    code, _ = cli(capsys, "admin", "--admin", instances[1].admin_url, "--token", TOKEN, "add", "solo", lonely, "0.1")
    assert code == 0
    try:
        code, out = cli(capsys, "status", "--fleet", urls(instances), "--json")
        assert code == 0
        view = json.loads(out)
        solo = next(a for a in view["analyzers"] if a["name"] == "solo")
        assert solo["defined_on"] == 1 and not solo["consistent"]
        assert any(line.startswith("solo: not defined on") for line in view["drift"])
        code, answer = admin(capsys, instances, "drain", "solo")
        assert code == 1 and results(answer) == ["failed", "applied", "failed"]
        assert "no analyzer named 'solo'" in answer["outcomes"][0]["detail"]
    finally:
        delete(instances[1], "solo")
        wait_until(lambda: analyzer(instances[1], "solo") is None, 15, "solo removed")
