"""The packet contract over a real distributor: every bad packet gets its status and names its field."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

from distributor.tools.localcluster import LocalCluster
from support import Client, packet

MAX_MESSAGES = 100
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        analyzers=(("a1", 1.0),),
        distributor_args=["--set", f"ingest.max_messages_per_packet={MAX_MESSAGES}",
                          "--set", f"ingest.max_body_bytes={MAX_BODY}"],
    )
    with cluster:
        yield cluster


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    client = Client(cluster.data_port)
    yield client
    client.close()


def message(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"timestamp": 1764172800123, "level": "INFO", "message": "ok"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"emitter_id": "e1", "packet_id": "p1", "messages": [message()]}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


BAD_PACKETS = [
    ("not json", b"{not json", 400, "body"),
    ("array", b"[1, 2]", 400, "body"),
    ("empty body", b"", 400, "body"),
    ("missing emitter_id", body(emitter_id=...), 400, "emitter_id"),
    ("empty emitter_id", body(emitter_id=""), 400, "emitter_id"),
    ("numeric emitter_id", body(emitter_id=17), 400, "emitter_id"),
    ("missing packet_id", body(packet_id=...), 400, "packet_id"),
    ("empty packet_id", body(packet_id=""), 400, "packet_id"),
    ("huge packet_id", body(packet_id="x" * 300), 400, "packet_id"),
    ("missing messages", body(messages=...), 400, "messages"),
    ("empty messages", body(messages=[]), 400, "messages"),
    ("messages object", body(messages={"a": 1}), 400, "messages"),
    ("message not object", body(messages=["text"]), 400, "messages[0]"),
    ("message without text", body(messages=[message(message=...)]), 400, "messages[0].message"),
    ("message text not string", body(messages=[message(message=5)]), 400, "messages[0].message"),
    ("message without level", body(messages=[message(), message(level=...)]), 400, "messages[1].level"),
    ("level not string", body(messages=[message(level=3)]), 400, "messages[0].level"),
    ("missing timestamp", body(messages=[message(timestamp=...)]), 400, "messages[0].timestamp"),
    ("float timestamp", body(messages=[message(timestamp=1.5)]), 400, "messages[0].timestamp"),
    ("negative timestamp", body(messages=[message(timestamp=-1)]), 400, "messages[0].timestamp"),
    ("bool timestamp", body(messages=[message(timestamp=True)]), 400, "messages[0].timestamp"),
    ("bad date string", body(messages=[message(timestamp="yesterday")]), 400, "messages[0].timestamp"),
    ("date without offset", body(messages=[message(timestamp="2025-11-26T12:00:00")]), 400, "messages[0].timestamp"),
    ("impossible date", body(messages=[message(timestamp="2025-02-30T12:00:00Z")]), 400, "messages[0].timestamp"),
    ("metadata list", body(messages=[message(metadata=[1])]), 400, "messages[0].metadata"),
    ("unknown priority", body(priority="urgent"), 400, "priority"),
    ("too many messages", body(messages=[message()] * (MAX_MESSAGES + 1)), 413, "messages"),
]


@pytest.mark.parametrize("raw,status,field", [c[1:] for c in BAD_PACKETS], ids=[c[0] for c in BAD_PACKETS])
def test_bad_packet_is_rejected_naming_the_field(client: Client, raw: bytes, status: int, field: str) -> None:
    got_status, _, payload = client.post(raw)
    assert got_status == status
    assert payload["field"] == field
    assert payload["error"] in ("invalid_packet", "packet_too_large")
    assert field.split("[")[0] in payload["detail"]


GOOD_PACKETS = [
    ("integer timestamp", body()),
    ("rfc3339 timestamp", body(messages=[message(timestamp="2025-11-26T12:00:00.123+01:00")])),
    ("rfc3339 Z", body(messages=[message(timestamp="2025-11-26T12:00:00Z")])),
    ("with metadata", body(messages=[message(metadata={"service": "auth"})])),
    ("priority high", body(priority="high")),
    ("priority low", body(priority="low")),
    ("max messages", body(messages=[message()] * MAX_MESSAGES)),
    ("pretty printed", json.dumps(json.loads(body()), indent=2).encode()),
    ("leap second", body(messages=[message(timestamp="2016-12-31T23:59:60Z")])),
    ("leap second with offset", body(messages=[message(timestamp="2016-12-31T15:59:60.5-08:00")])),
    ("year 0000", body(messages=[message(timestamp="0000-02-29T00:00:00Z")])),
    ("year 9999", body(messages=[message(timestamp="9999-12-31T23:59:59.999Z")])),
    ("epoch integer", body(messages=[message(timestamp=0)])),
    ("largest integer", body(messages=[message(timestamp=253402300799999)])),
]


@pytest.mark.parametrize("raw", [c[1] for c in GOOD_PACKETS], ids=[c[0] for c in GOOD_PACKETS])
def test_valid_packet_is_accepted(client: Client, raw: bytes) -> None:
    status, _, payload = client.post(raw)
    assert status == 202
    assert payload == {"status": "accepted", "packet_id": json.loads(raw)["packet_id"]}


def test_body_over_limit_is_413_json(client: Client) -> None:
    status, _, payload = client.post(packet(messages=1) + b" " * MAX_BODY)
    assert status == 413
    assert set(payload) >= {"error", "detail"}


def test_wrong_method_and_path(cluster: LocalCluster) -> None:
    client = Client(cluster.data_port)
    client.conn.request("GET", "/ingest")
    response = client.conn.getresponse()
    assert response.status == 405
    assert response.getheader("Allow") == "POST"
    assert set(json.loads(response.read())) >= {"error", "detail"}
    client.conn.request("POST", "/nowhere", body=b"{}")
    response = client.conn.getresponse()
    assert response.status == 404
    assert json.loads(response.read())["error"] == "not_found"
    client.conn.request("GET", "/healthz")
    response = client.conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    client.close()


def test_forwarded_bytes_are_the_received_bytes(cluster: LocalCluster, client: Client) -> None:
    """Non-canonical JSON (odd spacing, key order, unicode escapes) reaches the analyzer unchanged in content."""
    raw = b'{ "messages":[{"message":"caf\\u00e9 \\"q\\"","level":"WARN","timestamp":"2025-11-26T12:00:00Z"}],' \
          b'"packet_id":"bytes-1",   "emitter_id":"bytes-e"}'
    status, _, _ = client.post(raw)
    assert status == 202
    analyzer = cluster.analyzer("a1")
    from distributor.tools.localcluster import wait_until

    wait_until(lambda: ["bytes-e", "bytes-1"] in [list(k) for k in analyzer.packet_keys()], 10, "packet delivery")
    assert analyzer.stats()["levels"].get("WARN", 0) >= 1


OUT_OF_RANGE = "integer milliseconds out of range 0..253402300799999"
TIMESTAMP_ERRORS = [
    ("2^64", b"18446744073709551616", OUT_OF_RANGE),
    ("2^64 - 1", b"18446744073709551615", OUT_OF_RANGE),
    ("year 10000", b"253402300800000", OUT_OF_RANGE),
    ("negative", b"-1", OUT_OF_RANGE),
    ("below -2^63", b"-9223372036854775809", OUT_OF_RANGE),
    ("fraction", b"1764172800123.5", "milliseconds must be an integer, not a fraction"),
    ("exponent", b"1.764172800123e12", "integer milliseconds must be written without a fraction or an exponent"),
    ("second 61", b'"2016-12-31T23:59:61Z"', "second 61 out of range 00-60"),
    ("february 30", b'"2025-02-30T12:00:00Z"', "day 30 out of range 01-28 for 2025-02"),
    ("month 13", b'"2025-13-01T12:00:00Z"', "month 13 out of range 01-12"),
    ("hour 24", b'"2025-11-26T24:00:00Z"', "hour 24 out of range 00-23"),
    ("offset minute 60", b'"2025-11-26T12:00:00+00:60"', "offset +00:60 out of range -23:59..+23:59"),
    ("no offset", b'"2025-11-26T12:00:00"',
     "not an RFC 3339 date-time such as 2025-11-26T12:00:00.123Z (Z or a +hh:mm offset is required)"),
]


@pytest.mark.parametrize("literal,detail", [c[1:] for c in TIMESTAMP_ERRORS], ids=[c[0] for c in TIMESTAMP_ERRORS])
def test_timestamp_error_says_exactly_what_is_wrong(client: Client, literal: bytes, detail: str) -> None:
    raw = body(messages=[message(), message(timestamp="TS")]).replace(b'"TS"', literal)
    status, _, payload = client.post(raw)
    assert status == 400
    assert payload == {"error": "invalid_packet", "field": "messages[1].timestamp",
                       "detail": f"messages[1].timestamp: {detail}"}
