"""``POST /ingest/batch``: many packets in one request, one NDJSON line each (Elasticsearch ``_bulk`` style).

The request succeeds and items can fail: each line is validated, rate-limited
and routed whole on its own, exactly like a single ``POST /ingest``, and the
answer says which lines were not taken and why::

    200 {"accepted": n, "rejected": [{"line": i, "status": 400|413|429|503, "error": "...", "detail": "..."}]}

``line`` counts from 0 over the body's lines (blank lines count, and are skipped).
When no line could be taken for lack of capacity (every refusal a 429 or a 503,
none invalid) the whole answer is that 503 (or 429) with the largest
Retry-After, so clients back off as they would for one packet. Each line is
forwarded to its analyzer as received (a trailing CR removed). Retrying a batch
with the same packet ids is safe: the analyzers' idempotency absorbs what had
been accepted.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from distributor.ingest.contract import EMITTER_HEADER, ContractError, PacketInfo, claimed_emitter, parse_packet
from distributor.ingest.http11 import Pending, Request, Response, json_error
from distributor.ingest.refusal import Refusal, invalid
from distributor.shared_table import W_REJECTED_INVALID
from distributor.tracing import RequestTrace

CAPACITY = (429, 503)


class Admitter(Protocol):
    """The ingest app, as a batch sees it."""

    max_batch_packets: int
    max_messages: int
    ints: memoryview
    row: int
    trace: RequestTrace | None  # the sampled request being handled, if any (IngestApp.trace)

    def admit(self, raw: bytes, packet: PacketInfo, claimed: str | None) -> Refusal | None: ...

    def answer(self, request: Request, response: Response, accepted: int) -> Response | Pending: ...


def handle_batch(app: Admitter, request: Request, body: bytes) -> Response | Pending:
    claimed = claimed_emitter(request.header(EMITTER_HEADER))
    trace = app.trace
    lines = body.split(b"\n")
    if len(lines) > app.max_batch_packets and sum(1 for line in lines if _filled(line)) > app.max_batch_packets:
        app.ints[app.row + W_REJECTED_INVALID] += 1  # one request refused whole: counted once
        return json_error(413, "batch_too_large", f"more than max_batch_packets={app.max_batch_packets} packets")
    accepted = 0
    rejected: list[dict[str, Any]] = []
    capacity_only = True
    retry_after = 0.0
    for index, line in enumerate(lines):
        if line[-1:] == b"\r":
            line = line[:-1]
        if not _filled(line):
            continue
        refusal: Refusal | None
        try:
            packet = parse_packet(line, app.max_messages)
        except ContractError as exc:
            app.ints[app.row + W_REJECTED_INVALID] += 1
            refusal = invalid(exc)
        else:
            refusal = app.admit(line, packet, claimed)
            if refusal is None:
                accepted += 1
                continue
            if trace is not None:  # a sampled request: the refused packet's admit span says why
                trace.packet(None, packet, "", refusal.error)
        if refusal.status in CAPACITY:
            retry_after = max(retry_after, refusal.retry_after or 0.0)
        else:
            capacity_only = False
        rejected.append({"line": index, "status": refusal.status, "error": refusal.error, "detail": refusal.detail})
    if not accepted and rejected and capacity_only:
        status = 503 if any(r["status"] == 503 for r in rejected) else 429
        return json_error(status, "no_capacity" if status == 503 else "rate_limited",
                          f"no line of the batch could be taken now ({rejected[0]['detail']}); retry later",
                          retry_after)
    response = Response(200, orjson.dumps({"accepted": accepted, "rejected": rejected}))
    return app.answer(request, response, accepted)


def _filled(line: bytes) -> bool:
    """Not blank; without copying the line as ``strip`` would."""
    return bool(line) and not line.isspace()
