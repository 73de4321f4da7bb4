"""The compiled fast path of the packet contract may only agree with the orjson path, or defer to it.

For any body: ``scan`` returns None, or exactly what ``parse_packet_python`` returns (which then
accepts the packet). The usual packets must take the fast path (else it saves nothing).
"""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distributor.ingest import contract
from distributor.ingest.contract import ContractError, PacketInfo, parse_packet, parse_packet_python

MAX = 10_000


def fast(body: bytes, max_messages: int = MAX) -> PacketInfo | None:
    assert contract._scan is not None
    result = contract._scan(body, max_messages, PacketInfo)
    return result


def reference(body: bytes, max_messages: int = MAX) -> PacketInfo | tuple[int, str]:
    return outcome(parse_packet_python, body, max_messages)


def outcome(parse: Any, body: object, max_messages: object) -> PacketInfo | tuple[int, str]:
    try:
        result: PacketInfo = parse(body, max_messages)
        return result
    except ContractError as exc:
        return exc.status, exc.field


def agrees(body: bytes, max_messages: int = MAX) -> PacketInfo | None:
    """The fast path's answer, checked against the reference; parse_packet gives the reference's answer."""
    info = fast(body, max_messages)
    expected = reference(body, max_messages)
    if info is not None:
        assert type(info) is PacketInfo and info == expected, (body[:200], info, expected)
    try:
        assert parse_packet(body, max_messages) == expected
    except ContractError as exc:
        assert (exc.status, exc.field) == expected
    return info


def message(i: int, **extra: object) -> dict[str, object]:
    return {"timestamp": 1764172800123 + i, "level": "INFO", "message": f"line {i}", **extra}


def packet(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"emitter_id": "agent-1", "packet_id": "p-1", "messages": [message(0)]}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def test_the_scanner_is_built() -> None:
    """CI builds the extension (setup.py); without it every packet costs the Python path's CPU."""
    assert contract._scan is not None, "distributor.ingest._packet_scan is not built: is a C compiler installed?"


USUAL = [
    orjson.dumps(packet()),
    orjson.dumps(packet(priority="high", messages=[message(i, metadata={"k": [1, 2.5, None, True, {"x": "y"}]})
                                                   for i in range(10)])),
    orjson.dumps(packet(priority="low", emitter_id="émetteur-ü", packet_id="日本-1")),
    orjson.dumps(packet(messages=[message(0, metadata=None, extra=[{}, []], message='quote " back \\ nl \n é \u2028')])),
    json.dumps(packet(), indent=2).encode(),  # whitespace everywhere
    json.dumps(packet(messages=[message(0, message="é\u0000")]), ensure_ascii=True).encode(),  # \\u escapes
    b' \r\n\t' + orjson.dumps(packet()) + b'\n',
    orjson.dumps(packet(messages=[message(0, timestamp=0), message(1, timestamp=253_402_300_799_999)])),
    orjson.dumps(packet(emitter_id="e" * 256, packet_id="é" * 256)),
    orjson.dumps(packet(level_extra=-0.5, big=123456789012345678, small=1e-05, large=-1.5e+99, e=2E3)),
]


@pytest.mark.parametrize("body", USUAL, ids=range(len(USUAL)))
def test_usual_packets_take_the_fast_path(body: bytes) -> None:
    assert agrees(body) is not None


DEFERRED = [
    b"", b"   ", b"[]", b"{}", b"null", b"\xef\xbb\xbf" + orjson.dumps(packet()),
    orjson.dumps(packet()) + b"x", orjson.dumps(packet()) + b"\x00", orjson.dumps(packet())[:-1],
    orjson.dumps(packet(emitter_id="")), orjson.dumps(packet(emitter_id=5)), orjson.dumps(packet(emitter_id=DROP)),
    orjson.dumps(packet(packet_id="p" * 257)), orjson.dumps(packet(packet_id="é" * 257)),
    orjson.dumps(packet(priority="urgent")), orjson.dumps(packet(priority=None)), orjson.dumps(packet(priority="High")),
    orjson.dumps(packet(messages=[])), orjson.dumps(packet(messages={})), orjson.dumps(packet(messages=DROP)),
    orjson.dumps(packet(messages=[1])), orjson.dumps(packet(messages=[{}])),
    orjson.dumps(packet(messages=[message(0, timestamp=-1)])),
    orjson.dumps(packet(messages=[message(0, timestamp=253_402_300_800_000)])),
    orjson.dumps(packet(messages=[message(0, timestamp=1.0)])),
    orjson.dumps(packet(messages=[message(0, timestamp="2025-11-26T12:00:00Z")])),  # valid, but the Python path
    orjson.dumps(packet(messages=[message(0, timestamp="2025-02-30T12:00:00Z")])),
    orjson.dumps(packet(messages=[message(0, level="")])), orjson.dumps(packet(messages=[message(0, level=1)])),
    orjson.dumps(packet(messages=[message(0, message=None)])),
    orjson.dumps(packet(messages=[message(0, metadata=[])])), orjson.dumps(packet(messages=[message(0, metadata="")])),
    orjson.dumps(packet(messages=[message(i) for i in range(4)])),  # above max_messages=3 below
    b'{"emitter_id":"a","emitter_id":"b","packet_id":"p","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","messages":[{"timestamp":1,"timestamp":"x","level":"I","message":"m"}]}',
    b'{"emitter\\u005fid":"a","packet_id":"p","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"\\u0061","packet_id":"p","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","messages":[{"timestamp":1,"l\\u0065vel":"","level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","messages":[{"timestamp":01,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","messages":[{"timestamp":-0,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","messages":[{"timestamp":1000000000000000000,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":1' + b"0" * 40 + b',"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","messages":[{"timestamp":1e3,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":1e400,"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":1e100,"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":1e,"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":1e+,"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":1.5E-5,"messages":[{"timestamp":1.5E+1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\\u12","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":1.,"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":[1,],"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":tru,"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\\ud800","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\\x","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\x01","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\xed\xa0\x80","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\xf4\x90\x80\x80","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\xc0\xaf","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\xe0\x80\xaf","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":"\xc3","messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","x":' + b"[" * 70 + b"]" * 70
    + b',"messages":[{"timestamp":1,"level":"I","message":"m"}]}',
    b'{"emitter_id":"a","packet_id":"p","messages":[{"timestamp":1,"level":"I","message":"m"}],}',
    b'{"emitter_id":"a","packet_id":"p","messages":[{"timestamp":1,"level":"I","message":"m"}]\x0c}',
]


@pytest.mark.parametrize("body", DEFERRED, ids=range(len(DEFERRED)))
def test_unusual_or_invalid_packets_go_to_the_python_path(body: bytes) -> None:
    assert agrees(body, 3) is None


def test_deep_metadata_within_the_limit_stays_fast() -> None:
    nested: object = "leaf"
    for _ in range(50):
        nested = {"k": [nested]}
    assert agrees(orjson.dumps(packet(messages=[message(0, metadata={"deep": nested})]))) is None  # past 64 levels
    shallow: object = "leaf"
    for _ in range(20):
        shallow = {"k": shallow}
    assert agrees(orjson.dumps(packet(messages=[message(0, metadata=shallow)]))) is not None


def test_the_scanners_own_limits_hold_at_their_edges() -> None:
    """Past its limits the scanner defers (the reference then accepts): nesting 64 (the packet is 1, messages 2,
    a message 3, its metadata 4), numbers of 40 characters, exponents of 2 digits."""
    def nested(levels: int) -> dict[str, object]:
        value: dict[str, object] = {}
        for _ in range(levels - 1):
            value = {"k": value}
        return value

    assert agrees(orjson.dumps(packet(messages=[message(0, metadata=nested(61))]))) is not None  # depth 64
    assert agrees(orjson.dumps(packet(messages=[message(0, metadata=nested(62))]))) is None  # depth 65
    for number, fast_path in ((b"1" * 40, True), (b"1" * 41, False), (b"-1." + b"5" * 37, True),
                              (b"-1." + b"5" * 38, False), (b"1.5e99", True), (b"1.5E-99", True), (b"1e100", False)):
        body = b'{"emitter_id":"a","packet_id":"p","x":%s,"messages":[{"timestamp":1,"level":"I","message":"m"}]}' % number
        assert (agrees(body) is not None) is fast_path, number


def test_the_scanner_reads_exact_bytes_and_leaves_the_rest_to_the_reference() -> None:
    """orjson takes bytes, bytearray, memoryview and str, and no subclass: only exact bytes are scanned."""
    body = orjson.dumps(packet())
    assert fast(body) is not None
    for other in (bytearray(body), memoryview(body), body.decode(), type("Sub", (bytes,), {})(body)):
        assert fast(other) is None  # type: ignore[arg-type]
        assert outcome(parse_packet, other, MAX) == outcome(parse_packet_python, other, MAX)
    for limit in (2**63, 2**80, -(2**70), 10.0, True, 0):  # any int (clamped), or the reference decides
        assert outcome(parse_packet, body, limit) == outcome(parse_packet_python, body, limit)
    scan: Any = contract._scan  # called with wrong arguments on purpose
    with pytest.raises(TypeError):
        scan(body, MAX, dict)
    with pytest.raises(TypeError):
        scan(body, MAX, os.stat_result)  # a struct sequence: not a 4-tuple's layout
    with pytest.raises(TypeError):
        scan(body, MAX)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
usual_values = st.recursive(  # numbers of at most 40 characters and 2-digit exponents: what the scanner reads itself
    st.none() | st.booleans() | st.integers(-(10**38), 10**38) | st.text(max_size=8)
    | st.floats(-1e90, 1e90).filter(lambda x: x == 0 or abs(x) > 1e-90),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
plain_text = st.text(st.characters(min_codepoint=0x20, exclude_characters='"\\', exclude_categories=["Cs"]),
                     min_size=1, max_size=6)  # nothing a JSON writer escapes
usual_messages = st.fixed_dictionaries(
    {"timestamp": st.integers(0, 253_402_300_799_999), "level": plain_text, "message": st.text(max_size=10)},
    optional={"metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=4), usual_values, max_size=3)),
              "other": usual_values},
)
usual_packets = st.fixed_dictionaries(
    {"emitter_id": plain_text, "packet_id": plain_text, "messages": st.lists(usual_messages, min_size=1, max_size=3)},
    optional={"priority": st.sampled_from(["high", "normal", "low"]), "extra": usual_values},
)
ids = st.one_of(plain_text, st.sampled_from(["", "é" * 256, "x" * 257]), json_values)
messages = st.fixed_dictionaries(
    {"timestamp": st.one_of(st.integers(-2, 2**64), st.just(253_402_300_800_000), json_values),
     "level": st.one_of(plain_text, st.just(""), json_values),
     "message": st.one_of(st.text(max_size=10), json_values)},
    optional={"metadata": json_values, "other": json_values},
)
packets = st.fixed_dictionaries(
    {"emitter_id": ids, "packet_id": ids,
     "messages": st.one_of(st.lists(st.one_of(usual_messages, messages), max_size=3), json_values)},
    optional={"priority": st.one_of(st.sampled_from(["high", "normal", "low", "HIGH"]), json_values),
              "extra": json_values},
)


def encodings(value: object) -> st.SearchStrategy[bytes]:
    """The same document compact, indented, ASCII-escaped, or with its keys in another order (json.dumps:
    orjson cannot write the integers beyond 64 bits that the strategies draw)."""
    return st.sampled_from([
        json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(),
        json.dumps(value, indent=1).encode(),
        json.dumps(value, ensure_ascii=True, separators=(" ,", ": ")).encode(),
        json.dumps(dict(reversed(list(value.items()))) if isinstance(value, dict) else value).encode(),
    ])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usual_packets, st.booleans())
def test_every_usual_packet_takes_the_fast_path(value: dict[str, object], indent: bool) -> None:
    body = json.dumps(value, ensure_ascii=False, indent=1 if indent else None).encode()
    assert agrees(body) is not None, body


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_fast_path_agrees_with_the_reference_on_generated_packets(data: st.DataObject) -> None:
    body = data.draw(packets.flatmap(encodings))
    agrees(body, data.draw(st.sampled_from([MAX, 3])))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_fast_path_agrees_with_the_reference_on_damaged_bytes(data: st.DataObject) -> None:
    """Valid packets with bytes replaced, inserted or cut: JSON and UTF-8 edge cases at random places."""
    body = bytearray(USUAL[data.draw(st.integers(0, len(USUAL) - 1))])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body)))
        byte = data.draw(st.sampled_from(b'"\\{}[],:0123456789-.eE tfnu\x00\x01\x7f\x80\xbf\xc3\xe0\xed\xf0\xf4\xff'))
        what = data.draw(st.integers(0, 2))
        if what == 0 and at < len(body):
            body[at] = byte
        elif what == 1:
            body.insert(at, byte)
        elif at < len(body):
            del body[at]
    agrees(bytes(body))
