"""Fuzz target: the packet contract (``parse_packet``), differentially against an independent model.

Two kinds of input: raw bytes (first byte even: the rest is the body as is), or (first byte odd) a
structure-aware packet built with atheris.FuzzedDataProvider: a valid packet whose ids, priority,
levels and timestamps are edited character by character from a palette of troublemakers (other
scripts' digits, separators, signs, lower-case T and Z, control characters).

Invariants, for any body: the compiled scanner returns None or what the orjson path returns; ``parse_packet`` returns a PacketInfo or raises ContractError (400 or 413),
nothing else; its decision (and the field it names) agrees with ``contract_model`` written from the
README; an accepted packet's info is what the JSON says; a refusal renders as the 400/413 answer.
"""

from __future__ import annotations

import atheris
import orjson

from fuzzlib import instrumented, main
import contract_model

with instrumented("distributor"):
    from distributor.ingest import contract
    from distributor.ingest.contract import PRIORITIES, ContractError, PacketInfo, parse_packet, parse_packet_python
    from distributor.ingest.refusal import invalid

LIMITS = (10_000, 3)  # the default max_messages_per_packet, and a small one so 413 is reachable
TIMESTAMPS = ("2025-11-26T12:00:00.123Z", "2016-12-31T23:59:60+05:30", "0000-02-29 00:00:00z",
              "9999-12-31T23:59:59.999999999-23:59")
PALETTE = ("0", "1", "2", "3", "5", "6", "9", "-", ":", "T", "t", " ", "Z", "z", "+", ".", "\n", "\x00",
           "\u0660", "\u0662", "\u0969", "\uff10", "\uff12", "\U0001d7ce", "\u00b2", "\u2028", "\u00a0", "\ufeff")
EXTRAS: tuple[object, ...] = (None, 0, -1, 1.0, 253402300799999, 253402300800000, True, "", [], {})


def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A packet near the contract's edges: valid, then edited."""

    def edited(text: str) -> str:
        chars = list(text)
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            what = fdp.ConsumeIntInRange(0, 2)
            at = fdp.ConsumeIntInRange(0, len(chars))
            char = PALETTE[fdp.ConsumeIntInRange(0, len(PALETTE) - 1)]
            if what == 0 and at < len(chars):
                chars[at] = char
            elif what == 1:
                chars.insert(at, char)
            elif at < len(chars):
                del chars[at]
        return "".join(chars)

    def value(text: str) -> object:
        return EXTRAS[fdp.ConsumeIntInRange(0, len(EXTRAS) - 1)] if fdp.ConsumeIntInRange(0, 15) == 0 else edited(text)

    messages = []
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        timestamp: object = value(TIMESTAMPS[fdp.ConsumeIntInRange(0, len(TIMESTAMPS) - 1)])
        if fdp.ConsumeIntInRange(0, 3) == 0:
            timestamp = fdp.ConsumeIntInRange(-2, 253402300800001)
        message = {"timestamp": timestamp, "level": value("INFO"), "message": value("m")}
        if fdp.ConsumeBool():
            message["metadata"] = {"k": value("v")} if fdp.ConsumeBool() else value("v")
        messages.append(message)
    packet: dict[str, object] = {"emitter_id": value("agent-1"), "packet_id": value("p-1"), "messages": messages}
    if fdp.ConsumeBool():
        packet["priority"] = value("normal")
    return orjson.dumps(packet)


def check(data: bytes) -> None:
    body = structured(atheris.FuzzedDataProvider(data[1:])) if data[:1] and data[0] & 1 else data[1:]
    for max_messages in LIMITS:
        check_one(body, max_messages)


def check_one(data: bytes, max_messages: int) -> None:
    expected = contract_model.verdict(data, max_messages)
    fast = contract._scan(data, max_messages, PacketInfo) if contract._scan is not None else None
    if fast is not None:  # the compiled scanner only ever agrees with the orjson path, or defers to it
        assert fast == parse_packet_python(data, max_messages), f"scanner {fast}"
    try:
        info = parse_packet(data, max_messages)
    except ContractError as exc:
        assert exc.status in (400, 413), exc.status
        assert isinstance(exc.field, str) and exc.field and isinstance(exc.detail, str)
        refusal = invalid(exc)
        orjson.dumps({"error": refusal.error, "detail": refusal.detail, "field": exc.field})  # what _single answers
        assert expected.status, f"refused ({exc}) but the contract accepts it"
        assert (exc.status, exc.field) == (expected.status, expected.field), \
            f"refused as {exc.status} {exc.field!r}, the contract says {expected.status} {expected.field!r}"
        return
    assert not expected.status, f"accepted, but the contract refuses it: {expected.status} {expected.field}"
    assert info.priority in PRIORITIES and 1 <= info.messages <= max_messages
    assert tuple(info) == expected.info, f"{tuple(info)} != {expected.info}"


if __name__ == "__main__":
    main(check, "json")
