"""Fuzz target: ``POST /ingest/batch``'s per-line logic (``handle_batch``) through a minimal admitter.

The first input byte drives the admitter (which lines it refuses, with 429/503/400), the limits
and the ``X-Emitter-Id`` lines sent (none, one, empty, two, not UTF-8); the rest is the NDJSON body.
Invariants: every line is admitted with the emitter the header claims (repeated lines combined
"a, b", empty is no claim, bytes that are not UTF-8 kept as lone surrogates); never an exception; 200 with one verdict per
non-blank line (accepted ones handed to ``admit`` exactly as the line, a trailing CR removed;
refused ones listed by line index, ascending), 413 for too many lines with nothing admitted, or
429/503 only when nothing was taken and every refusal was for capacity.
"""

from __future__ import annotations

import orjson

from fuzzlib import instrumented, main

with instrumented("distributor"):
    from distributor.ingest.batch import handle_batch
    from distributor.ingest.contract import ContractError, PacketInfo, parse_packet
    from distributor.ingest.http11 import Pending, Request, Response
    from distributor.ingest.refusal import Refusal
    from distributor.shared_table import W_REJECTED_INVALID
    from distributor.tracing import RequestTrace

REFUSALS = (None, Refusal(429, "rate_limited", "over its rate limit", 2.0),
            Refusal(503, "overloaded", "queues are full", 7.5), Refusal(503, "no_capacity", "no analyzer", None))
# X-Emitter-Id lines sent (chosen by two bits of the plan byte), and the claim admit() must then be given
CLAIMS: tuple[tuple[tuple[bytes, ...], str | None], ...] = (
    ((), None),
    ((b"agent-\xff",), "agent-\udcff"),  # not UTF-8: a lone surrogate, which no emitter_id can hold
    ((b"",), None),  # empty: no claim
    ((b"agent-1", b"agent-2"), "agent-1, agent-2"),  # repeated: combined, never the last alone
)


class Admitter:
    """The ingest app as a batch sees it; refuses the n-th packet as ``plan`` says."""

    def __init__(self, plan: int, max_batch_packets: int, max_messages: int) -> None:
        self.plan = plan
        self.max_batch_packets = max_batch_packets
        self.max_messages = max_messages
        self.ints = memoryview(bytearray(8 * 64)).cast("q")
        self.row = 8
        self.trace: RequestTrace | None = None
        self.admitted: list[tuple[bytes, PacketInfo]] = []
        self.refused: list[Refusal] = []
        self.answered = 0
        self.claimed: str | None = None

    def admit(self, raw: bytes, packet: PacketInfo, claimed: str | None = None) -> Refusal | None:
        assert claimed == self.claimed, f"claimed emitter {claimed!r}, the header says {self.claimed!r}"
        n = len(self.admitted) + len(self.refused)
        refusal = REFUSALS[(self.plan >> (2 * (n % 3))) & 3]
        if refusal is None:
            self.admitted.append((raw, packet))
        else:
            self.refused.append(refusal)
        return refusal

    def answer(self, request: Request, response: Response, accepted: int) -> Response | Pending:
        self.answered += 1
        assert accepted == len(self.admitted)
        return response


def _invalid(line: bytes, max_messages: int) -> bool:
    try:
        parse_packet(line, max_messages)
    except ContractError:
        return True
    return False


def check(data: bytes) -> None:
    plan = data[0] if data else 0
    body = data[1:]
    max_batch = 4 if plan & 0x80 else 1000
    max_messages = 3 if plan & 0x40 else 10_000
    app = Admitter(plan & 0x0F, max_batch, max_messages)
    sent, app.claimed = CLAIMS[(plan >> 4) & 3]
    headers = [(b"content-type", b"application/x-ndjson")] + [(b"x-emitter-id", value) for value in sent]
    request = Request(b"POST", b"/ingest/batch", b"", headers, body, "1.1", None)  # type: ignore[arg-type]
    response = handle_batch(app, request, body)
    assert isinstance(response, Response)
    answer = orjson.loads(response.body)
    lines = body.split(b"\n")
    content = [(i, line[:-1] if line.endswith(b"\r") else line) for i, line in enumerate(lines)]
    content = [(i, line) for i, line in content if line.strip()]
    invalid = {i for i, line in content if _invalid(line, max_messages)}
    if response.status == 413:
        assert len(content) > max_batch and answer["error"] == "batch_too_large"
        assert not app.admitted and not app.refused and app.answered == 0
        return
    assert len(content) <= max_batch, "more lines than max_batch_packets were taken"
    if response.status in (429, 503):
        assert not app.admitted and app.refused and not invalid and app.answered == 0
        assert len(app.refused) == len(content)
        assert all(r.status in (429, 503) for r in app.refused)
        assert response.status == (503 if any(r.status == 503 for r in app.refused) else 429)
        wanted = max(r.retry_after or 0.0 for r in app.refused)
        retry = dict(response.headers).get(b"retry-after")
        assert retry is not None and int(retry) >= max(1, wanted)
        return
    assert response.status == 200 and app.answered == 1, response
    assert answer["accepted"] == len(app.admitted)
    rejected = answer["rejected"]
    indices = [item["line"] for item in rejected]
    assert indices == sorted(set(indices)), "rejected lines out of order or repeated"
    by_index = dict(content)
    assert all(i in by_index for i in indices), "a rejected index that is not a non-blank line"
    assert len(app.admitted) + len(rejected) == len(content), "a line with no verdict, or two"
    taken = [line for i, line in content if i not in set(indices)]
    assert [raw for raw, _ in app.admitted] == taken, "admitted bytes differ from the lines"
    for raw, packet in app.admitted:
        assert parse_packet(raw, max_messages) == packet and b"\n" not in raw
    refused_by_app = iter(app.refused)
    for item in rejected:
        if item["line"] in invalid:
            assert item["status"] in (400, 413) and item["error"] in ("invalid_packet", "packet_too_large")
        else:
            assert (item["status"], item["error"]) == next(refused_by_app)[:2]
    assert next(refused_by_app, None) is None
    assert app.ints[app.row + W_REJECTED_INVALID] == len(invalid)


if __name__ == "__main__":
    main(check, "json")
