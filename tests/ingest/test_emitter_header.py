"""X-Emitter-Id: a load balancer shards on it, so the distributor refuses packets that contradict it."""

from __future__ import annotations

from typing import Iterator

import pytest

from distributor.tools.localcluster import LocalCluster
from support import Client, packet


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with LocalCluster(analyzers=(("a1", 1.0),)) as cluster:
        client = Client(cluster.data_port)
        yield client
        client.close()


def test_a_matching_header_is_accepted_and_a_contradicting_one_refused(client: Client) -> None:
    assert client.post(packet(emitter="agent-7", packet_id="h-1"), headers={"X-Emitter-Id": "agent-7"})[0] == 202
    status, _, body = client.post(packet(emitter="agent-8", packet_id="h-2"), headers={"X-Emitter-Id": "agent-7"})
    assert status == 400 and body["error"] == "emitter_mismatch"
    assert "agent-8" in body["detail"] and "agent-7" in body["detail"]
    assert client.post(packet(emitter="agent-8", packet_id="h-3"))[0] == 202, "no header: no claim to check"


def test_batch_lines_of_another_emitter_are_refused_one_by_one(client: Client) -> None:
    lines = [packet(emitter="agent-7", packet_id="b-1"), packet(emitter="intruder", packet_id="b-2"),
             packet(emitter="agent-7", packet_id="b-3")]
    status, _, body = client.post(b"\n".join(lines), "/ingest/batch", {"X-Emitter-Id": "agent-7"})
    assert status == 200 and body["accepted"] == 2
    assert [(r["line"], r["status"], r["error"]) for r in body["rejected"]] == [(1, 400, "emitter_mismatch")]
