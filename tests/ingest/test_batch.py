"""POST /ingest/batch and compressed bodies over a real distributor and real analyzers."""

from __future__ import annotations

import gzip

from typing import Callable, Iterator

import pytest
from backports import zstd

from distributor.tools.localcluster import LocalCluster, wait_until
from support import Client, packet

MAX_BODY = 256 * 1024
MAX_BATCH = 50
MAX_MESSAGES = 100


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        analyzers=(("a1", 1.0), ("a2", 1.0)),
        distributor_args=["--set", f"ingest.max_body_bytes={MAX_BODY}", "--set", f"ingest.max_batch_packets={MAX_BATCH}",
                          "--set", f"ingest.max_messages_per_packet={MAX_MESSAGES}"],
    )
    with cluster:
        yield cluster


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    client = Client(cluster.data_port)
    yield client
    client.close()


def received(cluster: LocalCluster) -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    for proc in cluster.analyzer_procs:
        keys |= set(proc.packet_keys())
    return keys


def batch(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


def test_every_line_is_routed_on_its_own_and_delivered(cluster: LocalCluster, client: Client) -> None:
    lines = [packet(emitter="b-ok", packet_id=f"ok-{i}", messages=1 + i % 7) for i in range(40)]
    status, _, body = client.post(batch(*lines), "/ingest/batch", {"Content-Type": "application/x-ndjson"})
    assert status == 200 and body == {"accepted": 40, "rejected": []}
    wanted = {("b-ok", f"ok-{i}") for i in range(40)}
    wait_until(lambda: wanted <= received(cluster), 10, "every line at an analyzer")
    split = {proc.name: proc.stats()["packets"] for proc in cluster.analyzer_procs}
    assert all(count > 0 for count in split.values()), f"lines are routed one by one: {split}"


def test_bad_lines_are_rejected_by_index_and_the_rest_accepted(cluster: LocalCluster, client: Client) -> None:
    too_many = packet(emitter="b-mix", packet_id="big", messages=MAX_MESSAGES + 1)
    lines = [packet(emitter="b-mix", packet_id="m-0"), b"{not json", b"", packet(emitter="b-mix", packet_id="m-3"),
             b'{"emitter_id": "b-mix", "packet_id": "m-4"}', too_many, packet(emitter="b-mix", packet_id="m-6") + b"\r"]
    status, _, body = client.post(batch(*lines), "/ingest/batch")
    assert status == 200 and body["accepted"] == 3, body
    rejected = {item["line"]: item for item in body["rejected"]}
    assert set(rejected) == {1, 4, 5}
    assert rejected[1]["status"] == 400 and rejected[1]["error"] == "invalid_packet" and "JSON" in rejected[1]["detail"]
    assert rejected[4]["status"] == 400 and "messages" in rejected[4]["detail"]
    assert rejected[5]["status"] == 413 and rejected[5]["error"] == "packet_too_large"
    wanted = {("b-mix", "m-0"), ("b-mix", "m-3"), ("b-mix", "m-6")}
    wait_until(lambda: wanted <= received(cluster), 10, "the good lines at an analyzer")
    assert ("b-mix", "big") not in received(cluster)


def invalid_count(cluster: LocalCluster) -> int:
    return sum(w["rejected_invalid"] for w in cluster.admin("/admin/workers")["workers"])


def test_more_lines_than_max_batch_packets_is_413(cluster: LocalCluster, client: Client) -> None:
    lines = [packet(emitter="b-big", packet_id=f"x-{i}", messages=1) for i in range(MAX_BATCH + 1)]
    before = invalid_count(cluster)
    status, _, body = client.post(batch(*lines), "/ingest/batch")
    assert status == 413 and body["error"] == "batch_too_large"
    assert invalid_count(cluster) == before + 1  # the limit's metric: distributor_packets_total{outcome="invalid"}
    status, _, body = client.post(batch(*lines[:MAX_BATCH]), "/ingest/batch")
    assert status == 200 and body["accepted"] == MAX_BATCH


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("zstd", zstd.compress)])
def test_compressed_bodies_on_both_endpoints(cluster: LocalCluster, client: Client, encoding: str,
                                             compress: Callable[[bytes], bytes]) -> None:
    single = packet(emitter=f"z-{encoding}", packet_id="single")
    assert client.post(compress(single), "/ingest", {"Content-Encoding": encoding})[0] == 202
    lines = [packet(emitter=f"z-{encoding}", packet_id=f"b-{i}") for i in range(10)]
    status, _, body = client.post(compress(batch(*lines)), "/ingest/batch", {"Content-Encoding": encoding})
    assert status == 200 and body["accepted"] == 10
    wanted = {(f"z-{encoding}", "single")} | {(f"z-{encoding}", f"b-{i}") for i in range(10)}
    wait_until(lambda: wanted <= received(cluster), 10, f"{encoding} packets at an analyzer")


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("zstd", zstd.compress)])
def test_a_decompression_bomb_is_413_without_inflating_it(client: Client, encoding: str,
                                                          compress: Callable[[bytes], bytes]) -> None:
    bomb = compress(b" " * (64 << 20))  # 64 MiB of blanks in a few KB
    assert len(bomb) < MAX_BODY
    status, _, body = client.post(bomb, "/ingest/batch", {"Content-Encoding": encoding})
    assert status == 413 and str(MAX_BODY) in body["detail"]


def test_unknown_and_broken_encodings(client: Client) -> None:
    status, _, body = client.post(packet(), "/ingest", {"Content-Encoding": "br"})
    assert status == 415 and body["error"] == "unsupported_encoding"
    status, _, body = client.post(gzip.compress(packet())[:-8], "/ingest", {"Content-Encoding": "gzip"})
    assert status == 400 and body["error"] == "bad_encoding"
    status, _, body = client.post(b"not zstd at all", "/ingest", {"Content-Encoding": "zstd"})
    assert status == 400 and body["error"] == "bad_encoding"


def test_rate_limited_lines_and_a_batch_with_no_room_at_all(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=[
        "--set", "rate_limit.rate=5", "--set", "rate_limit.burst=5"])
    client = Client(cluster.data_port)
    lines = [packet(emitter="hot", packet_id=f"r-{i}", messages=1) for i in range(8)]
    status, _, body = client.post(batch(*lines), "/ingest/batch")
    assert status == 200 and body["accepted"] == 5
    assert [item["status"] for item in body["rejected"]] == [429, 429, 429]
    status, headers, body = client.post(batch(*lines[:3]), "/ingest/batch")  # nothing left in the burst
    assert status == 429 and int(headers["retry-after"]) >= 1 and body["error"] == "rate_limited"


def test_a_batch_is_answered_once_the_write_ahead_log_holds_it(make_cluster: Callable[..., LocalCluster],
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    wal = tmp_path_factory.mktemp("wal")
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=[
        "--set", f"wal.dir={wal}", "--set", "wal.sync=always"])
    client = Client(cluster.data_port)
    lines = [packet(emitter="w", packet_id=f"w-{i}") for i in range(20)]
    status, _, body = client.post(batch(*lines), "/ingest/batch")
    assert status == 200 and body["accepted"] == 20
    wait_until(lambda: {("w", f"w-{i}") for i in range(20)} <= received(cluster), 10, "delivery")
    wait_until(lambda: (logged := cluster.admin("/admin/workers")["workers"][0]["wal"])["appended_packets"] >= 20
               and logged["fsyncs"] >= 1, 5, "the log's figures")

