"""End to end with real processes: the split, exact delivery, and full-queue behaviour."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import uvloop

from distributor.tools.emitter import LoadSpec, LoadStats, run_load
from distributor.tools.localcluster import LocalCluster, wait_until
from support import Client, packet

WEIGHTS = (("a1", 0.4), ("a2", 0.3), ("a3", 0.2), ("a4", 0.1))


def emit(cluster: LocalCluster, duration: float, **spec: object) -> LoadStats:
    load = LoadSpec(url=cluster.ingest_url, duration=duration, record_accepted=True, **spec)  # type: ignore[arg-type]
    return uvloop.run(run_load(load))


def check_exact_delivery(cluster: LocalCluster, stats: LoadStats) -> dict[str, dict]:
    """Every packet answered 202 reached exactly one analyzer exactly once; nothing else arrived."""
    cluster.wait_drained()
    totals = cluster.analyzer_totals()
    keys: Counter[tuple[str, str]] = Counter()
    for proc in cluster.analyzer_procs:
        keys.update(proc.packet_keys())
    accepted = Counter((emitter, pid) for emitter, pid, _ in stats.accepted)
    assert keys == accepted
    assert sum(t["packets"] for t in totals.values()) == stats.accepted_packets
    assert sum(t["messages"] for t in totals.values()) == stats.accepted_messages
    assert sum(t["duplicates"] for t in totals.values()) == 0
    return totals


@pytest.mark.parametrize("workers", [1, 2])
def test_weighted_split_of_messages_and_exact_delivery(make_cluster: Callable[..., LocalCluster], workers: int) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, workers=workers)
    stats = LoadStats()
    while stats.accepted_messages < 20_000:
        more = emit(cluster, 2.0, connections=16, sizes=((5, 0.5), (20, 0.5)))
        stats.accepted.extend(more.accepted)
        stats.accepted_packets += more.accepted_packets
        stats.accepted_messages += more.accepted_messages
    totals = check_exact_delivery(cluster, stats)
    all_messages = sum(t["messages"] for t in totals.values())
    for name, weight in WEIGHTS:
        share = totals[name]["messages"] / all_messages
        assert abs(share - weight) < 0.01, f"{name}: {share:.4f} vs {weight}"
    # packets are NOT split by weight when sizes are skewed: the router balances messages
    view = {a["name"]: a for a in cluster.admin("/admin/analyzers")["analyzers"]}
    assert sum(a["delivered_messages"] for a in view.values()) == all_messages


def test_packet_mode_and_batch_mode_analyzers_side_by_side(make_cluster: Callable[..., LocalCluster],
                                                           tmp_path: Path) -> None:
    cluster = make_cluster(analyzers=WEIGHTS, start_distributor=False)
    config = tmp_path / "mixed.toml"
    config.write_text("".join(
        f'[[analyzers]]\nname = "{proc.name}"\nurl = "{proc.url}"\nweight = {weight}\nmode = "{mode}"\n'
        for proc, (_, weight), mode in zip(cluster.analyzer_procs, WEIGHTS, ("batch", "packet", "batch", "packet"))
    ))
    cluster.analyzer_flags = False
    cluster.distributor_args = ["--config", str(config)]
    cluster.start_distributor_process()
    stats = emit(cluster, 2.0, connections=8, sizes=((5, 0.5), (20, 0.5)))
    totals = check_exact_delivery(cluster, stats)
    assert totals["a2"]["batches"] == 0 and totals["a4"]["batches"] == 0
    assert totals["a2"]["requests"] == totals["a2"]["packets"]
    assert totals["a1"]["batches"] > 0
    all_messages = sum(t["messages"] for t in totals.values())
    for name, weight in WEIGHTS:
        assert abs(totals[name]["messages"] / all_messages - weight) < 0.01


def test_stalled_analyzer_fills_its_queue_while_others_keep_accepting(make_cluster: Callable[..., LocalCluster]) -> None:
    queue_limit = 40
    cluster = make_cluster(
        analyzers=WEIGHTS,
        analyzer_args={"a1": ["--stall"]},
        distributor_args=["--set", f"queue.max_packets={queue_limit}", "--set", "sender.request_timeout=120"],
    )
    client = Client(cluster.data_port)
    accepted = 0
    for i in range(400):
        status, _, _ = client.post(packet(packet_id=f"s-{i}", messages=5))
        assert status == 202, f"packet {i} refused while three analyzers are healthy"
        accepted += 1
    a1 = next(a for a in cluster.admin("/admin/analyzers")["analyzers"] if a["name"] == "a1")
    assert a1["queue_packets"] == queue_limit
    # now stall the others too: exactly the remaining queue room is accepted, then 503 + Retry-After
    wait_until(lambda: all(a["queue_packets"] == 0 for a in cluster.admin("/admin/analyzers")["analyzers"]
                           if a["name"] != "a1"), 10, "healthy queues to empty before stalling")
    for name in ("a2", "a3", "a4"):
        cluster.analyzer(name).control(stall=True)
    extra = 0
    while True:
        status, headers, payload = client.post(packet(packet_id=f"t-{extra}", messages=5))
        if status != 202:
            break
        extra += 1
        assert extra <= 3 * queue_limit
    assert extra == 3 * queue_limit
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    assert payload["error"] == "no_capacity"
    client.close()
    for proc in cluster.analyzer_procs:
        proc.control(stall=False)
    cluster.wait_drained(timeout=60)
    totals = cluster.analyzer_totals()
    assert sum(t["packets"] for t in totals.values()) == accepted + extra


def test_batch_linger_full_batches_leave_at_once_the_rest_waits_until_shutdown(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """A 60 s linger: full batches go as they fill, a partial one waits, and SIGTERM flushes it at once."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=[
        "--set", "sender.batch_linger=60", "--set", "sender.batch_max_packets=10", "--set", "graceful_timeout=120"])
    analyzer = cluster.analyzer("a1")
    client = Client(cluster.data_port)
    for i in range(35):
        assert client.post(packet(packet_id=f"l-{i}", messages=2))[0] == 202
    client.close()
    wait_until(lambda: analyzer.stats()["packets"] == 30, 30, "the three full batches (far sooner than the linger)")
    assert cluster.admin("/admin/analyzers")["analyzers"][0]["queue_packets"] == 5  # lingering
    assert analyzer.stats()["packets"] == 30
    assert cluster.distributor is not None
    cluster.distributor.signal(signal.SIGTERM)
    assert cluster.distributor.process.wait(60) == 0  # type: ignore[union-attr]  # < graceful_timeout
    stats = analyzer.stats()
    assert (stats["packets"], stats["messages"], stats["batches"]) == (35, 70, 4), stats


def test_batch_linger_zero_sends_each_packet_as_it_comes(make_cluster: Callable[..., LocalCluster]) -> None:
    """0 turns lingering off: a lone packet leaves on its own (a misread 0, e.g. as "forever", holds it)."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=["--set", "sender.batch_linger=0"])
    client = Client(cluster.data_port)
    for i in range(20):
        assert client.post(packet(packet_id=f"z-{i}", messages=2))[0] == 202
        wait_until(lambda: cluster.analyzer("a1").stats()["packets"] == i + 1, 10, f"packet {i} delivered")
    client.close()
    assert cluster.analyzer("a1").stats()["batches"] == 20
