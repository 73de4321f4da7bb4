"""Fuzz target: ``POST /v1/logs`` (``otlp.handle_otlp``), protobuf or JSON, through a minimal admitter.

Input: a selector byte (Content-Type, small limits, which packets the admitter refuses), then the
body. Invariants: no exception; an OTLP answer (200 ExportLogsServiceResponse, 400/413/415 Status,
429/503 with Retry-After exactly when a packet was refused for capacity: the exporter retries the
whole export) in the request's encoding; the admitter told how many packets were taken; every packet
handed to ``admit`` passes the packet contract with the same info, within max_body_bytes and
max_messages_per_packet; and log records are conserved: those in packets taken plus
``partial_success.rejected_log_records`` are all the records of the export.
"""

from __future__ import annotations

import orjson
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse

from fuzzlib import instrumented, main

with instrumented("distributor"):
    from distributor.ingest.contract import PacketInfo, parse_packet
    from distributor.ingest.http11 import Pending, Request, Response
    from distributor.ingest.otlp import JSON, PROTOBUF, decode, handle_otlp
    from distributor.ingest.refusal import Refusal
    from distributor.tracing import RequestTrace

CONTENT_TYPES = (b"application/x-protobuf", b"application/json", b"Application/JSON; charset=utf-8", b"text/plain")
REFUSALS = (None, None, Refusal(429, "rate_limited", "over its rate limit", 2.0),
            Refusal(503, "overloaded", "queues are full", 3.0))


class Admitter:
    def __init__(self, plan: int, max_messages: int, max_body_bytes: int, max_otlp_records: int) -> None:
        self.plan = plan
        self.max_messages = max_messages
        self.max_body_bytes = max_body_bytes
        self.max_otlp_records = max_otlp_records
        self.ints = memoryview(bytearray(8 * 64)).cast("q")
        self.row = 8
        self.trace: RequestTrace | None = None
        self.admitted: list[tuple[bytes, PacketInfo]] = []
        self.refused: list[tuple[PacketInfo, Refusal]] = []
        self.answered = 0

    def admit(self, raw: bytes, packet: PacketInfo, claimed: str | None = None) -> Refusal | None:
        assert claimed is None
        assert len(raw) <= self.max_body_bytes, f"a {len(raw)}-byte packet, above max_body_bytes"
        assert parse_packet(raw, self.max_messages) == packet, "an OTLP packet that breaks the contract"
        refusal = REFUSALS[(self.plan >> (len(self.admitted) + len(self.refused)) % 4) & 3]
        if refusal is None:
            self.admitted.append((raw, packet))
        else:
            self.refused.append((packet, refusal))
        return refusal

    def answer(self, request: Request, response: Response, accepted: int) -> Response | Pending:
        assert accepted == len(self.admitted)
        self.answered += 1
        return response


def check(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    content_type = CONTENT_TYPES[selector & 3]
    max_messages, max_body, max_records = (3, 600, 8) if selector & 4 else (10_000, 1 << 20, 10_000)
    app = Admitter(selector >> 3, max_messages, max_body, max_records)
    request = Request(b"POST", b"/v1/logs", b"", [(b"content-type", content_type)], body, "1.1",
                      None)  # type: ignore[arg-type]
    response = handle_otlp(app, request, body)
    assert isinstance(response, Response)
    if selector & 3 == 3:
        assert response.status == 415 and response.content_type == JSON and not app.admitted
        return
    encoding = PROTOBUF if selector & 3 == 0 else JSON
    assert response.content_type == encoding
    if response.status != 200:
        status = Status.FromString(response.body) if encoding == PROTOBUF else \
            json_format.ParseDict(orjson.loads(response.body), Status())
        assert status.message
        assert response.status in (400, 413, 429, 503), response.status
        capacity = [refusal for _, refusal in app.refused if refusal.status in (429, 503)]
        if response.status == 413:
            assert _records(decode(body, encoding)) > max_records, "413 for an export within max_otlp_records"
        if response.status in (400, 413):
            assert not app.admitted and not app.refused and not app.answered
        else:
            assert capacity and app.answered == 1, "429/503 without a packet refused for capacity"
            assert response.status == (503 if any(r.status == 503 for r in capacity) else 429)
            retry = dict(response.headers).get(b"retry-after")
            assert retry is not None and int(retry) >= max(1, max(r.retry_after or 0.0 for r in capacity))
        return
    assert app.answered == 1 and not any(r.status in (429, 503) for _, r in app.refused), \
        "200 though a packet was refused for capacity (the exporter would drop it)"
    answer = ExportLogsServiceResponse.FromString(response.body) if encoding == PROTOBUF else \
        json_format.ParseDict(orjson.loads(response.body), ExportLogsServiceResponse())
    records = _records(decode(body, encoding))
    assert records <= max_records, "an export above max_otlp_records was taken"
    taken = sum(packet.messages for _, packet in app.admitted)
    assert taken + answer.partial_success.rejected_log_records == records, \
        f"{records} records: {taken} taken, {answer.partial_success.rejected_log_records} said rejected"



def _records(export: ExportLogsServiceRequest) -> int:
    return sum(len(scope.log_records) for logs in export.resource_logs for scope in logs.scope_logs)


if __name__ == "__main__":
    main(check, "json")
