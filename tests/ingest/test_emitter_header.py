"""X-Emitter-Id: a load balancer shards on it, so the distributor refuses packets that contradict it."""

from __future__ import annotations

import json
import socket
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


def raw_post(port: int, body: bytes, header_lines: bytes) -> tuple[int, dict[str, str]]:
    """POST /ingest with header lines written as given (repeated names, bytes that are not UTF-8)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n%s\r\n%s"
                     % (len(body), header_lines, body))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(payload)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with LocalCluster(analyzers=(("a1", 1.0),)) as cluster:
        yield cluster.data_port


def test_repeated_header_lines_are_combined_so_the_last_alone_cannot_pass(port: int) -> None:
    """A balancer hashes the first line; a request must not pass on the strength of the last one."""
    status, body = raw_post(port, packet(emitter="me", packet_id="r-1"), b"X-Emitter-Id: decoy\r\nX-Emitter-Id: me\r\n")
    assert (status, body["error"]) == (400, "emitter_mismatch") and "'decoy, me'" in body["detail"]
    status, _ = raw_post(port, packet(emitter="me", packet_id="r-2"), b"X-Emitter-Id: me\r\n")
    assert status == 202


def test_an_empty_header_is_no_claim_and_bytes_that_are_not_utf8_match_no_emitter(port: int) -> None:
    assert raw_post(port, packet(emitter="agent-9", packet_id="e-1"), b"X-Emitter-Id:\r\n")[0] == 202
    # "\ufffd" is what a lenient decoding would make of the byte 0xc3
    status, body = raw_post(port, packet(emitter="\ufffd", packet_id="e-2"), b"X-Emitter-Id: \xc3\r\n")
    assert (status, body["error"]) == (400, "emitter_mismatch")
