"""Overload: priority shedding at the watermarks, Retry-After from the drain rate."""

from __future__ import annotations

from typing import Callable

from distributor.tools.localcluster import LocalCluster
from support import Client, packet

WORKER_BYTES = 200_000


def test_low_priority_is_shed_first_and_high_last(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        analyzers=(("a1", 1.0), ("a2", 1.0)),
        analyzer_args={"a1": ["--stall"], "a2": ["--stall"]},
        distributor_args=[
            "--set", f"queue.worker_max_bytes={WORKER_BYTES}", "--set", "queue.max_bytes=1048576",
            "--set", "overload.low_priority_watermark=0.5", "--set", "overload.normal_priority_watermark=0.8",
            "--set", "overload.max_retry_after=17", "--set", "sender.request_timeout=60",
            # keep the stalled analyzers routable: this test is about shedding, not health
            "--set", "health.interval=600", "--set", "health.timeout=1", "--set", "graceful_timeout=5",
        ],
    )
    client = Client(cluster.data_port)
    body_size = len(packet(packet_id="x-000000", messages=5, priority="normal"))
    outcomes: dict[str, list[int]] = {"low": [], "normal": [], "high": []}
    queued = 0
    i = 0
    while not all(statuses[-1:] == [503] for statuses in outcomes.values()):
        for priority in ("low", "normal", "high"):
            body = packet(packet_id=f"x-{i:06d}", messages=5, priority=priority)
            status, headers, payload = client.post(body)
            i += 1
            outcomes[priority].append(status)
            if status == 202:
                queued += len(body)
            else:
                assert status == 503 and payload["error"] == "overloaded"
                # nothing drains (analyzers stalled): Retry-After is the configured maximum
                assert headers["retry-after"] == "17"
    assert WORKER_BYTES - 2 * body_size < queued <= WORKER_BYTES  # high priority fills up to the cap
    first_refusal = {p: statuses.index(503) if 503 in statuses else len(statuses) for p, statuses in outcomes.items()}
    assert first_refusal["low"] < first_refusal["normal"] < first_refusal["high"]
    low_limit = first_refusal["low"] * 3 * body_size
    assert abs(low_limit - 0.5 * WORKER_BYTES) <= 3 * body_size
    # once refused, a priority stays refused while nothing drains; higher priorities still got in
    for priority, statuses in outcomes.items():
        assert all(s == 503 for s in statuses[first_refusal[priority]:])
    assert outcomes["high"].count(202) > outcomes["normal"].count(202) > outcomes["low"].count(202)
    shed = cluster.admin("/admin/workers")["workers"][0]["shed_packets"]
    assert shed == sum(statuses.count(503) for statuses in outcomes.values())
    client.close()
    for proc in cluster.analyzer_procs:
        proc.control(stall=False)
    cluster.wait_drained(60)
    assert sum(t["packets"] for t in cluster.analyzer_totals().values()) == sum(
        statuses.count(202) for statuses in outcomes.values())
