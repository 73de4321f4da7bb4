"""Analyzer lifecycle (issue 16, items 9-15): re-add, url/mode change, reload during a removal, the state
file, consecutive failures after readmission, going down while draining, slot reuse.

Real processes on 127.0.0.1 (LocalCluster), real HTTP, the admin API with a token, and SIGHUP reloads of a
real configuration file where an item is about reloads. Health and outlier detection are tuned to react
within a second (like ``tests/chaos/chaos_support.FAST``); every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pytest
from prometheus_client.parser import text_string_to_metric_families

from distributor.tools.localcluster import AnalyzerProcess, LocalCluster, wait_until
from support import Client, packet

TOKEN = "lifecycle-t0ken"

# health checks and outlier detection that react within a second (as chaos_support.FAST)
FAST: dict[str, object] = {
    "health.interval": 0.2, "health.timeout": 0.15, "health.fall": 3, "health.rise": 2,
    "health.max_latency_ms": 0, "health.max_queue_depth": 0,  # a deliberately slow analyzer is not "saturated"
    "outlier.consecutive_failures": 3, "outlier.base_ejection_time": 1, "outlier.max_ejection_time": 8,
    "outlier.flap_window": 10, "outlier.slow_start": 2,
    "sender.request_timeout": 1, "sender.retry_max_backoff": 0.2,
}

Factory = Callable[..., LocalCluster]


def settings(overrides: Mapping[str, object] | None = None) -> list[str]:
    """``--set`` flags: the admin token, FAST, then ``overrides``."""
    values: dict[str, object] = {"admin.token": TOKEN, **FAST, **(overrides or {})}
    flags: list[str] = []
    for key, value in values.items():
        flags += ["--set", f"{key}={value}"]
    return flags


# --- the admin API and views -----------------------------------------------------------------------


def call(cluster: LocalCluster, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        cluster.admin_url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rows(cluster: LocalCluster) -> list[dict[str, Any]]:
    return list(cluster.admin("/admin/analyzers")["analyzers"])


def view(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """Per name; a live row wins over a removed row of the same name (a re-added analyzer may get another slot)."""
    return {a["name"]: a for a in sorted(rows(cluster), key=lambda a: a["state"] != "removed")}


def one(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return view(cluster)[name]


def gone(cluster: LocalCluster, name: str) -> bool:
    """Not among the analyzers that take or hold traffic (absent, or shown as removed)."""
    row = view(cluster).get(name)
    return row is None or row["state"] == "removed"


def wait_state(cluster: LocalCluster, name: str, states: Sequence[str], timeout: float = 20) -> dict[str, Any]:
    seen: list[str] = []

    def reached() -> bool:
        row = view(cluster).get(name)
        seen.append(row["state"] if row else "absent")
        return seen[-1] in states

    try:
        wait_until(reached, timeout, f"{name} to become {'/'.join(states)}", interval=0.02)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; its states meanwhile: {list(dict.fromkeys(seen))}") from None
    return one(cluster, name)


def wait_applied(cluster: LocalCluster) -> None:
    """Until every running worker has applied the analyzer table the supervisor published last."""
    def applied() -> bool:
        generation = cluster.admin("/admin/analyzers")["generation"]
        workers = cluster.admin("/admin/workers")["workers"]
        return all(w["analyzer_generation"] == generation for w in workers if w["pid"])
    wait_until(applied, 10, "workers to apply the analyzer table")


def worker_pids(cluster: LocalCluster) -> list[int]:
    return sorted(w["pid"] for w in cluster.admin("/admin/workers")["workers"])


# --- traffic ---------------------------------------------------------------------------------------


def send(cluster: LocalCluster, count: int, prefix: str, messages: int = 10, per_connection: int = 20) -> None:
    """``count`` packets, every one answered 202, over a new connection every ``per_connection`` packets
    (so the kernel spreads them over the workers)."""
    client = Client(cluster.data_port)
    for i in range(count):
        if i and i % per_connection == 0:
            client.close()
            client = Client(cluster.data_port)
        status, _, body = client.post(packet(emitter=f"{prefix}-emitter", packet_id=f"{prefix}-{i}", messages=messages))
        assert status == 202, (status, body)
    client.close()


def send_until(cluster: LocalCluster, condition: Callable[[], bool], prefix: str, timeout: float = 20) -> int:
    """Send small rounds of packets until ``condition`` holds; returns the packets sent."""
    sent = 0

    def round_done() -> bool:
        nonlocal sent
        if condition():
            return True
        send(cluster, 4, f"{prefix}-{sent}", messages=5)
        sent += 4
        return condition()

    wait_until(round_done, timeout, f"{prefix}: condition under traffic", interval=0.01)
    return sent


def routed(cluster: LocalCluster) -> dict[str, int]:
    return {name: a["net_routed_messages"] for name, a in view(cluster).items() if a["state"] != "removed"}


def assert_share(before: dict[str, int], after: dict[str, int], name: str, target: float, what: str) -> None:
    delta = {n: after[n] - before.get(n, 0) for n in after}
    total = sum(delta.values())
    assert total > 0, f"{what}: nothing routed ({delta})"
    share = delta[name] / total
    assert abs(share - target) < 0.03, f"{what}: {name} got {share:.3f} of {total} messages, target {target} ({delta})"


# --- a configuration file and SIGHUP ---------------------------------------------------------------


def write_config(path: Path, analyzers: Sequence[tuple[str, str, float, str]]) -> None:
    path.write_text("".join(f'[[analyzers]]\nname = "{name}"\nurl = "{url}"\nweight = {weight}\nmode = "{mode}"\n\n'
                            for name, url, weight, mode in analyzers))


def file_cluster(make_cluster: Factory, config: Path, analyzers: Sequence[tuple[str, float]], workers: int,
                 args: list[str], analyzer_args: dict[str, list[str]] | None = None) -> LocalCluster:
    """Analyzers started first, then a distributor that reads them from ``config`` (and reloads it on SIGHUP)."""
    cluster = make_cluster(analyzers=analyzers, workers=workers, start_distributor=False,
                           analyzer_args=analyzer_args or {})
    write_config(config, [(p.name, p.url, weight, "batch") for p, (_, weight) in zip(cluster.analyzer_procs, analyzers)])
    cluster.analyzer_flags = False
    cluster.distributor_args = ["--config", str(config), *args]
    cluster.start_distributor_process()
    return cluster


def reloads(cluster: LocalCluster) -> int:
    assert cluster.distributor is not None
    try:
        return cluster.distributor.log_path.read_text(errors="replace").count("reloaded: ")
    except OSError:
        return 0


def sighup(cluster: LocalCluster) -> None:
    """SIGHUP, and wait until the supervisor logged the reload as applied."""
    assert cluster.distributor is not None
    before = reloads(cluster)
    cluster.distributor.signal(signal.SIGHUP)
    wait_until(lambda: reloads(cluster) > before, 10, "the reload to be applied")


def start_spare(cluster: LocalCluster, name: str) -> AnalyzerProcess:
    """Another analyzer process (not configured in the distributor)."""
    proc = cluster.start_analyzer(name)
    wait_until(lambda: cluster._analyzer_up(proc), 10, f"analyzer {name} up")
    return proc


def eject(cluster: LocalCluster, name: str, prefix: str) -> None:
    """Make ``name`` answer every send with 500 and offer traffic until the workers eject it."""
    cluster.analyzer(name).control(error_rate=1.0)
    send_until(cluster, lambda: one(cluster, name)["state"] == "ejected", prefix)


# --- item 9: removed while ejected, added back under the same name ----------------------------------

# ejected analyzers stay out for the whole test unless they are removed and added back
LONG_EJECTION = {"outlier.base_ejection_time": 60, "outlier.max_ejection_time": 120}


def test_readded_after_removal_while_ejected_gets_its_share_admin(make_cluster: Factory) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=2, distributor_args=settings(LONG_EJECTION))
    a2 = cluster.analyzer("a2")
    send(cluster, 40, "warmup")
    eject(cluster, "a2", "eject")
    assert call(cluster, "DELETE", "/admin/analyzers/a2")[0] == 202
    wait_until(lambda: gone(cluster, "a2"), 20, "a2 removed")
    a2.control(error_rate=0.0)
    status, body = call(cluster, "POST", "/admin/analyzers", {"name": "a2", "url": a2.url, "weight": 1.0})
    assert status == 201, body
    wait_applied(cluster)
    before = routed(cluster)
    send(cluster, 400, "readded")
    after = routed(cluster)
    row = one(cluster, "a2")
    assert row["state"] == "active", row
    assert abs(row["target_share"] - 0.5) < 1e-9, row
    assert_share(before, after, "a2", 0.5, "after re-adding a2 through the admin API")
    cluster.wait_drained()
    assert one(cluster, "a2")["delivered_packets"] > 0


def test_readded_after_removal_while_ejected_gets_its_share_sighup(make_cluster: Factory, tmp_path: Path) -> None:
    config = tmp_path / "distributor.toml"
    cluster = file_cluster(make_cluster, config, (("a1", 1.0), ("a2", 1.0)), 2, settings(LONG_EJECTION))
    a1, a2 = cluster.analyzer("a1"), cluster.analyzer("a2")
    send(cluster, 40, "warmup")
    eject(cluster, "a2", "eject")
    write_config(config, [("a1", a1.url, 1.0, "batch")])
    sighup(cluster)
    wait_until(lambda: gone(cluster, "a2"), 20, "a2 removed by the reload")
    a2.control(error_rate=0.0)
    write_config(config, [("a1", a1.url, 1.0, "batch"), ("a2", a2.url, 1.0, "batch")])
    sighup(cluster)
    wait_until(lambda: not gone(cluster, "a2"), 10, "a2 back after the reload")
    wait_applied(cluster)
    before = routed(cluster)
    send(cluster, 400, "readded")
    after = routed(cluster)
    assert one(cluster, "a2")["state"] == "active", one(cluster, "a2")
    assert_share(before, after, "a2", 0.5, "after re-adding a2 by SIGHUP")


# --- item 10: a new url (and mode) reaches the running workers ---------------------------------------


def test_url_change_by_admin_remove_and_add_moves_traffic_to_the_new_process(make_cluster: Factory) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=2, distributor_args=settings())
    old = cluster.analyzer("a2")
    new = start_spare(cluster, "a2-new")
    pids = worker_pids(cluster)
    send(cluster, 100, "before")
    cluster.wait_drained()
    assert old.stats()["packets"] > 0
    assert call(cluster, "DELETE", "/admin/analyzers/a2")[0] == 202
    wait_until(lambda: gone(cluster, "a2"), 20, "a2 removed")
    status, body = call(cluster, "POST", "/admin/analyzers", {"name": "a2", "url": new.url, "weight": 1.0})
    assert status == 201, body
    wait_applied(cluster)
    old_before = old.stats()["packets"]
    send(cluster, 400, "after")
    cluster.wait_drained()
    assert old.stats()["packets"] == old_before, "the old a2 process got packets after its url changed"
    messages = new.stats()["messages"]
    assert abs(messages / 4000 - 0.5) < 0.03, f"the new a2 process got {messages} of 4000 messages"
    assert worker_pids(cluster) == pids, "the running workers applied it (none was replaced)"


def test_url_and_mode_change_by_sighup_reach_running_workers(make_cluster: Factory, tmp_path: Path) -> None:
    config = tmp_path / "distributor.toml"
    cluster = file_cluster(make_cluster, config, (("a1", 1.0), ("a2", 1.0)), 2, settings())
    a1, old = cluster.analyzer("a1"), cluster.analyzer("a2")
    new = start_spare(cluster, "a2-new")
    pids = worker_pids(cluster)
    send(cluster, 100, "before")
    cluster.wait_drained()
    assert old.stats()["packets"] > 0
    # the url
    write_config(config, [("a1", a1.url, 1.0, "batch"), ("a2", new.url, 1.0, "batch")])
    sighup(cluster)
    wait_until(lambda: one(cluster, "a2")["url"] == new.url, 10, "the new url in the view")
    wait_applied(cluster)
    cluster.wait_drained()
    old_before = old.stats()["packets"]
    send(cluster, 400, "new-url")
    cluster.wait_drained()
    assert old.stats()["packets"] == old_before, "the old a2 process got packets after the reload changed its url"
    got = new.stats()
    assert abs(got["messages"] / 4000 - 0.5) < 0.03, f"the new a2 process got {got['messages']} of 4000 messages"
    assert got["batches"] > 0 and got["batches"] == got["requests"], got
    # the mode: batch -> packet (POST /ingest, one packet per request)
    write_config(config, [("a1", a1.url, 1.0, "batch"), ("a2", new.url, 1.0, "packet")])
    sighup(cluster)
    wait_until(lambda: one(cluster, "a2")["mode"] == "packet", 10, "the new mode in the view")
    wait_applied(cluster)
    before = new.stats()
    send(cluster, 200, "packet-mode")
    cluster.wait_drained()
    after = new.stats()
    packets, requests = after["packets"] - before["packets"], after["requests"] - before["requests"]
    assert packets > 50, f"a2 got {packets} packets in packet mode"
    assert after["batches"] == before["batches"], "still POST /ingest/batch after the mode changed to packet"
    assert requests == packets, f"{requests} requests for {packets} packets: not one packet per request"
    assert worker_pids(cluster) == pids, "the running workers applied it (none was replaced)"


# --- item 11: a SIGHUP during a pending admin removal -----------------------------------------------


def test_sighup_during_pending_removal_leaves_no_stale_removal(make_cluster: Factory) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1,
                           analyzer_args={"a2": ["--delay-ms", "5000"]},
                           distributor_args=settings({"sender.request_timeout": 30}))
    send(cluster, 40, "queued")
    assert one(cluster, "a2")["queue_packets"] > 0
    assert call(cluster, "DELETE", "/admin/analyzers/a2")[0] == 202
    assert one(cluster, "a2")["state"] == "draining", "the removal is pending while a2's queue is not empty"
    sighup(cluster)  # without a state file the configuration wins: the removal is cancelled
    assert not gone(cluster, "a2")
    cluster.analyzer("a2").control(delay_ms=0)  # what is in flight still takes its 5 s
    cluster.wait_drained()
    assert not gone(cluster, "a2")
    # a later plain drain only drains
    assert call(cluster, "POST", "/admin/analyzers/a2/drain")[0] == 200
    row = wait_state(cluster, "a2", ("drained", "removed"))
    assert row["state"] == "drained", "a plain drain removed the analyzer (a stale removal survived the reload)"
    status, body = call(cluster, "POST", "/admin/analyzers/a2/undrain")
    assert status == 200, body
    wait_state(cluster, "a2", ("warming", "active"))
    before = routed(cluster)
    send(cluster, 40, "after")
    assert routed(cluster)["a2"] > before["a2"]


# --- item 12: added then removed through the API, with a state file ---------------------------------


def test_added_then_removed_analyzer_stays_removed_across_reload_and_restart(
    make_cluster: Factory, tmp_path: Path,
) -> None:
    state = tmp_path / "admin-state.json"
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1,
                           distributor_args=settings({"admin.state_file": state}))
    a3 = start_spare(cluster, "a3")
    status, body = call(cluster, "POST", "/admin/analyzers", {"name": "a3", "url": a3.url, "weight": 1.0})
    assert status == 201, body
    send(cluster, 30, "with-a3")
    assert call(cluster, "DELETE", "/admin/analyzers/a3")[0] == 202
    wait_until(lambda: gone(cluster, "a3"), 20, "a3 removed")
    cluster.wait_drained()
    delivered = a3.stats()["packets"]
    assert delivered > 0
    sighup(cluster)
    assert gone(cluster, "a3"), f"a3 came back at the reload: {view(cluster).get('a3')}"
    send(cluster, 30, "after-reload")
    cluster.wait_drained()
    assert a3.stats()["packets"] == delivered, "a3 got traffic after the reload"
    assert cluster.distributor is not None
    assert cluster.distributor.stop() == 0
    cluster.data_port = cluster.admin_port = 0
    cluster.start_distributor_process()
    assert gone(cluster, "a3"), f"a3 came back at the restart: {view(cluster).get('a3')}"
    assert set(view(cluster)) == {"a1", "a2"}
    send(cluster, 30, "after-restart")
    cluster.wait_drained()
    assert a3.stats()["packets"] == delivered, "a3 got traffic after the restart"


# --- item 13: consecutive failures count afresh after ejection and readmission -----------------------


def failed(cluster: LocalCluster, name: str) -> int:
    return int(one(cluster, name)["failed_attempts"])


def ejection_cost(cluster: LocalCluster, name: str, ejections: int, prefix: str) -> int:
    """Failed sends from now (the analyzer routable, nothing in its queue) until its ``ejections``-th ejection."""
    start = failed(cluster, name)
    send_until(cluster, lambda: one(cluster, name)["ejections"] >= ejections, prefix, timeout=30)
    wait_until(lambda: one(cluster, name)["queue_packets"] == 0, 10, f"{name}'s queue to fail over")
    return failed(cluster, name) - start


def test_consecutive_failures_restart_after_readmission(make_cluster: Factory) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1,
                           distributor_args=settings({"sender.max_inflight": 1}))
    cluster.analyzer("a2").control(error_rate=1.0)  # every send fails; its /health stays good
    costs = [ejection_cost(cluster, "a2", 1, "first")]
    for cycle in (1, 2):
        # readmitted after its backoff by good health checks; nothing is sent to it meanwhile
        wait_until(lambda: one(cluster, "a2")["admissions"] >= cycle, 30, f"readmission {cycle}")
        assert one(cluster, "a2")["state"] in ("warming", "active")
        costs.append(ejection_cost(cluster, "a2", cycle + 1, f"cycle{cycle}"))
    assert all(cost >= 3 for cost in costs), f"failed sends per ejection {costs}; threshold 3"


def test_aborted_inflight_attempts_are_not_failures(make_cluster: Factory) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1,
                           distributor_args=settings({"sender.max_inflight": 1, "sender.request_timeout": 60}))
    a1, a2 = cluster.analyzer("a1"), cluster.analyzer("a2")
    a2.control(delay_ms=30_000)  # its requests hang; its /health still answers
    sent = send_until(cluster, lambda: one(cluster, "a2")["queue_packets"] > 0, "hang")
    a2.control(stall=True)  # now /health hangs too: marked down, the in-flight request is given up
    wait_state(cluster, "a2", ("down",))
    wait_until(lambda: one(cluster, "a2")["queue_packets"] == 0, 20, "a2's packets to fail over")
    wait_until(lambda: a1.stats()["packets"] == sent, 20, "every packet delivered by a1")
    assert failed(cluster, "a2") == 0, "an aborted in-flight request was counted as a failed send"
    # readmitted: an ejection still takes `consecutive_failures` real failures
    a2.control(stall=False, delay_ms=0, error_rate=1.0)
    wait_until(lambda: one(cluster, "a2")["admissions"] >= 1, 20, "a2 readmitted")
    cost = ejection_cost(cluster, "a2", 1, "fail")
    assert cost >= 3, f"ejected after {cost} failed sends (threshold 3): the aborted attempt counted"
    assert a2.process is not None
    a2.process.kill()  # its delayed handlers would hold up its graceful stop


# --- item 14: down while draining or being removed ------------------------------------------------


@pytest.mark.parametrize("action", ["drain", "remove"])
def test_down_while_draining_fails_over_promptly(make_cluster: Factory, action: str) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1,
                           distributor_args=settings({"sender.request_timeout": 60}))
    a1, a2 = cluster.analyzer("a1"), cluster.analyzer("a2")
    a2.control(delay_ms=30_000)  # queued and in-flight packets stay with a2; its /health still answers
    send(cluster, 40, "stuck")
    assert one(cluster, "a2")["queue_packets"] > 0
    if action == "drain":
        assert call(cluster, "POST", "/admin/analyzers/a2/drain")[0] == 200
    else:
        assert call(cluster, "DELETE", "/admin/analyzers/a2")[0] == 202
    assert one(cluster, "a2")["state"] == "draining"
    stalled = time.monotonic()
    a2.control(stall=True)  # now it stops answering anything, /health included
    row = wait_state(cluster, "a2", ("down", "removed"), timeout=10)
    if action == "drain":
        assert row["state"] == "down" and row["health"] == "down" and row["draining"], row
    wait_until(lambda: a1.stats()["packets"] == 40, 20,
               "a2's queued and in-flight packets delivered by a1 (request_timeout is 60 s)")
    took = time.monotonic() - stalled
    assert took < 20, f"a2's packets reached a1 {took:.1f}s after it stalled"
    if action == "remove":
        wait_state(cluster, "a2", ("removed",), timeout=10)
    else:
        assert one(cluster, "a2")["queue_packets"] == 0
        a2.control(stall=False, delay_ms=0)  # healthy again: still drained by the operator
        row = wait_state(cluster, "a2", ("drained",), timeout=10)
        assert row["health"] in ("warming", "active") and row["draining"], row
    assert a2.process is not None
    a2.process.kill()  # its delayed handlers would hold up its graceful stop


# --- item 15: slots are reused ------------------------------------------------------------------


def counter_samples(cluster: LocalCluster) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(cluster.admin_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) if family.type == "counter"
            for sample in family.samples if sample.name.endswith("_total")}


def assert_monotonic(earlier: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                     later: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    decreased = {key: (earlier[key], later[key]) for key in earlier.keys() & later.keys() if later[key] < earlier[key]}
    assert not decreased, f"counter series went down: {decreased}"


def test_slots_are_reused_and_a_reused_slot_starts_at_zero(make_cluster: Factory) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1, distributor_args=settings())
    spare = start_spare(cluster, "spare")
    scrapes = [counter_samples(cluster)]
    for cycle in range(70):
        name = f"x{cycle}"
        status, body = call(cluster, "POST", "/admin/analyzers", {"name": name, "url": spare.url, "weight": 1.0})
        assert status == 201, f"add #{cycle + 1} ({name}): {status} {body}"
        row = one(cluster, name)
        if cycle >= 62:  # every slot has been used once: this one is a reused slot
            nonzero = {k: row[k] for k in ("routed_messages", "routed_packets", "delivered_packets",
                                           "net_routed_messages", "failed_attempts", "failover_packets") if row[k]}
            assert not nonzero, f"{name} in a reused slot starts with counters {nonzero}"
        if cycle in (0, 62):  # some history in the slot that is reused first, and in its reuse
            send(cluster, 30, f"to-{name}")
            cluster.wait_drained()
            assert one(cluster, name)["delivered_packets"] > 0
            scrapes.append(counter_samples(cluster))
        assert call(cluster, "DELETE", f"/admin/analyzers/{name}")[0] == 202
        wait_until(lambda: gone(cluster, name), 10, f"{name} removed")
    scrapes.append(counter_samples(cluster))
    spare_before = spare.stats()["packets"]
    status, body = call(cluster, "POST", "/admin/analyzers", {"name": "last", "url": spare.url, "weight": 1.0})
    assert status == 201, f"the add after 70 cycles: {status} {body}"
    fresh = counter_samples(cluster)
    last = {key: value for key, value in fresh.items() if ("analyzer", "last") in key[1]}
    assert last and not any(last.values()), f"the newcomer's counter series do not start at zero: {last}"
    send(cluster, 60, "to-last")
    cluster.wait_drained()
    row = one(cluster, "last")
    assert row["delivered_packets"] == spare.stats()["packets"] - spare_before > 0, row
    scrapes += [fresh, counter_samples(cluster)]
    for earlier, later in zip(scrapes, scrapes[1:]):
        assert_monotonic(earlier, later)
    assert set(view(cluster)) >= {"a1", "a2", "last"}
    assert all(view(cluster)[n]["state"] != "removed" for n in ("a1", "a2", "last"))


def test_ejection_counter_series_never_decrease_across_removal_and_readd(make_cluster: Factory) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1, distributor_args=settings(LONG_EJECTION))
    a2 = cluster.analyzer("a2")
    eject(cluster, "a2", "eject")
    ejected = counter_samples(cluster)
    assert ejected[("distributor_analyzer_ejections_total", (("analyzer", "a2"),))] == 1
    assert call(cluster, "DELETE", "/admin/analyzers/a2")[0] == 202
    wait_until(lambda: gone(cluster, "a2"), 20, "a2 removed")
    removed = counter_samples(cluster)
    a2.control(error_rate=0.0)
    assert call(cluster, "POST", "/admin/analyzers", {"name": "a2", "url": a2.url, "weight": 1.0})[0] == 201
    readded = counter_samples(cluster)
    assert_monotonic(ejected, removed)
    assert_monotonic(removed, readded)


def test_name_back_before_its_old_slot_is_free_has_one_row_and_continues_its_counters(make_cluster: Factory) -> None:
    """A worker that has not applied the removal yet keeps the old slot busy: the name gets another slot.

    It must still show as one analyzer whose counters go on (no duplicate series, no reset).
    """
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=2, distributor_args=settings())
    a2 = cluster.analyzer("a2")
    send(cluster, 100, "before")
    cluster.wait_drained()
    before = counter_samples(cluster)
    laggard = worker_pids(cluster)[1]
    os.kill(laggard, signal.SIGSTOP)  # its applied generation stays old: a2's slot cannot be reused
    try:
        assert call(cluster, "DELETE", "/admin/analyzers/a2")[0] == 202
        wait_until(lambda: gone(cluster, "a2"), 20, "a2 removed")
        assert call(cluster, "POST", "/admin/analyzers", {"name": "a2", "url": a2.url, "weight": 1.0})[0] == 201
        named = [r for r in rows(cluster) if r["name"] == "a2"]
        assert len(named) == 1 and named[0]["state"] != "removed", named
        back = counter_samples(cluster)
    finally:
        os.kill(laggard, signal.SIGCONT)
    assert_monotonic(before, back)
    key = ("distributor_messages_total", (("analyzer", "a2"), ("outcome", "routed")))
    assert back[key] == before[key] > 0
    send(cluster, 100, "after")
    cluster.wait_drained()
    assert_monotonic(back, counter_samples(cluster))


# --- review of issues 16/17, defect 8: a name whose slot went to another name keeps its counters -------------


def test_name_back_after_another_name_took_its_slot_continues_its_counters(make_cluster: Factory) -> None:
    """x leaves and, the table being full, y gets x's slot (and x's removed row goes); x then comes back in the
    slot b0 freed. x's counters and series must go on from where they were, not start again at 0."""
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1, distributor_args=settings())
    spare = start_spare(cluster, "spare")
    assert call(cluster, "POST", "/admin/analyzers", {"name": "x", "url": spare.url, "weight": 1.0})[0] == 201
    send(cluster, 60, "to-x")
    cluster.wait_drained()
    counted = ("routed_messages", "routed_packets", "delivered_messages", "delivered_packets", "net_routed_messages")
    x_before = {key: one(cluster, "x")[key] for key in counted}
    assert x_before["delivered_packets"] > 0
    before = counter_samples(cluster)
    for i in range(61):  # a1, a2, x and 61 more: every one of the 64 slots is taken
        status, body = call(cluster, "POST", "/admin/analyzers", {"name": f"b{i}", "url": spare.url, "weight": 1.0})
        assert status == 201, f"add b{i}: {status} {body}"
    assert call(cluster, "DELETE", "/admin/analyzers/x")[0] == 202
    wait_until(lambda: gone(cluster, "x"), 10, "x removed")
    status, body = call(cluster, "POST", "/admin/analyzers", {"name": "y", "url": spare.url, "weight": 1.0})
    assert status == 201, f"add y into x's slot: {status} {body}"
    assert "x" not in {r["name"] for r in rows(cluster)}, "x's slot went to y: its removed row is gone"
    assert call(cluster, "DELETE", "/admin/analyzers/b0")[0] == 202
    wait_until(lambda: gone(cluster, "b0"), 10, "b0 removed")
    status, body = call(cluster, "POST", "/admin/analyzers", {"name": "x", "url": spare.url, "weight": 1.0})
    assert status == 201, f"x back into b0's slot: {status} {body}"
    x_back = {key: one(cluster, "x")[key] for key in counted}
    assert x_back == x_before, f"x's counters after it came back: {x_back}, before it left: {x_before}"
    after = counter_samples(cluster)
    assert_monotonic(before, after)
    key = ("distributor_messages_total", (("analyzer", "x"), ("outcome", "delivered")))
    assert after[key] == before[key] > 0
    send(cluster, 60, "x-again")  # and they go on from there
    cluster.wait_drained()
    assert one(cluster, "x")["delivered_packets"] > x_before["delivered_packets"]
    assert_monotonic(after, counter_samples(cluster))
