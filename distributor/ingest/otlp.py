"""``POST /v1/logs``: OTLP/HTTP logs from OpenTelemetry SDKs and collectors, as packets of the contract.

Decoded with ``opentelemetry-proto`` (binary protobuf, or the OTLP JSON encoding: hex trace and
span ids, lowerCamelCase or original field names, enums as numbers, int64 as strings or numbers).
Each ``ResourceLogs`` becomes one packet (more when it holds more records than a packet may),
serialized with orjson in today's contract and admitted exactly like a line of ``/ingest/batch``:
rate limit, shedding, write-ahead log and routing all apply. The packet id is a hash of the
``ResourceLogs`` content, so an exporter's retry yields the same ids and the analyzers' idempotency
absorbs what had been taken. The README's "OTLP/HTTP logs" section has the mapping.

Answers follow the OTLP specification: 200 with an ``ExportLogsServiceResponse`` (``partial_success``
counts the records refused), 400 for undecodable data, 429/503 with Retry-After when no packet could
be taken for lack of capacity (retryable: nothing was taken), 413, 415; error bodies are a
``google.rpc.Status``; every body is in the request's encoding.
"""

from __future__ import annotations

import base64
import math
import time
from hashlib import blake2b
from typing import Any, NamedTuple, Protocol

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs

from distributor.ingest.contract import EMITTER_HEADER, MAX_ID_LENGTH, PacketInfo, claimed_emitter
from distributor.ingest.http11 import Pending, Request, Response
from distributor.ingest.refusal import Refusal
from distributor.shared_table import W_REJECTED_INVALID
from distributor.tracing import RequestTrace

OTLP_PATH = b"/v1/logs"
PROTOBUF = b"application/x-protobuf"
JSON = b"application/json"
UNKNOWN_SERVICE = "unknown_service"  # what the SDKs name a service without service.name
UNSPECIFIED = "UNSPECIFIED"  # the level of a record with neither severity_text nor a severity_number
# severity_number 1-24 -> the short name of its range (TRACE 1-4 ... FATAL 21-24), as the log data model defines
_LEVELS = ("TRACE",) * 4 + ("DEBUG",) * 4 + ("INFO",) * 4 + ("WARN",) * 4 + ("ERROR",) * 4 + ("FATAL",) * 4
_CAPACITY = (429, 503)
_IDS = ("traceId", "trace_id", "spanId", "span_id")
_SHOWN_PROBLEMS = 3  # reasons quoted in partial_success.error_message


class OtlpAdmitter(Protocol):
    """The ingest app, as an OTLP export sees it."""

    max_messages: int
    max_body_bytes: int
    max_otlp_records: int
    ints: memoryview
    row: int
    trace: RequestTrace | None

    def admit(self, raw: bytes, packet: PacketInfo, claimed: str | None) -> Refusal | None: ...

    def answer(self, request: Request, response: Response, accepted: int) -> Response | Pending: ...


class Packets(NamedTuple):
    """What one ResourceLogs became: packets to admit, and the records that could not become one."""

    packets: list[tuple[bytes, PacketInfo]]
    rejected: int
    problem: str


def handle_otlp(app: OtlpAdmitter, request: Request, body: bytes) -> Response | Pending:
    """``POST /v1/logs``: each ResourceLogs admitted as packets, one answer for the export as OTLP defines it."""
    encoding = media_type(request.header(b"content-type"))
    if encoding not in (PROTOBUF, JSON):
        return status_response(JSON, 415, "Content-Type must be application/x-protobuf or application/json")
    try:
        export = decode(body, encoding)
    except ValueError as exc:
        app.ints[app.row + W_REJECTED_INVALID] += 1
        return status_response(encoding, 400, f"undecodable ExportLogsServiceRequest: {exc}")
    records = sum(len(scope_logs.log_records) for resource_logs in export.resource_logs
                  for scope_logs in resource_logs.scope_logs)
    if records > app.max_otlp_records:  # one export must not hold the worker's loop for seconds
        app.ints[app.row + W_REJECTED_INVALID] += 1
        return status_response(encoding, 413, f"{records} log records in one export; "
                                              f"ingest.max_otlp_records={app.max_otlp_records}")
    now_ms = time.time_ns() // 1_000_000
    claimed = claimed_emitter(request.header(EMITTER_HEADER))
    accepted = rejected = 0
    problems: list[str] = []
    capacity: list[Refusal] = []
    for index, resource_logs in enumerate(export.resource_logs):
        result = to_packets(resource_logs, app.max_messages, app.max_body_bytes, now_ms)
        if result.rejected:
            app.ints[app.row + W_REJECTED_INVALID] += 1
            rejected += result.rejected
            problems.append(f"resource_logs[{index}]: {result.problem}")
        for raw, packet in result.packets:
            refusal = app.admit(raw, packet, claimed)
            if refusal is None:
                accepted += 1
                continue
            if app.trace is not None:
                app.trace.packet(None, packet, "", refusal.error)
            rejected += packet.messages
            problems.append(f"resource_logs[{index}]: {refusal.error}: {refusal.detail}")
            if refusal.status in _CAPACITY:
                capacity.append(refusal)
    if capacity:  # some packets could not be taken now: the exporter retries the whole request later. The
        # packets taken meanwhile may then arrive twice; partial_success would make the exporter drop the rest
        status = 503 if any(refusal.status == 503 for refusal in capacity) else 429
        refused = status_response(encoding, status, f"{capacity[0].error}: {capacity[0].detail}",
                                  max(refusal.retry_after or 0.0 for refusal in capacity))
        return app.answer(request, refused, accepted)
    result_message = ExportLogsServiceResponse()
    if rejected:
        result_message.partial_success.rejected_log_records = rejected
        more = len(problems) - _SHOWN_PROBLEMS
        result_message.partial_success.error_message = "; ".join(problems[:_SHOWN_PROBLEMS]) + (
            f"; and {more} more" if more > 0 else "")
    return app.answer(request, _encoded(encoding, 200, result_message), accepted)


def media_type(content_type: bytes | None) -> bytes | None:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    if content_type is None:
        return None
    return content_type.split(b";", 1)[0].strip().lower()


def decode(body: bytes, encoding: bytes) -> ExportLogsServiceRequest:
    """The export request; raises ValueError saying what does not decode."""
    if encoding == PROTOBUF:
        try:
            return ExportLogsServiceRequest.FromString(body)
        except DecodeError as exc:
            raise ValueError(str(exc)) from None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if type(data) is not dict:
        raise ValueError("the body must be a JSON object")
    for resource_logs in _objects(data, "resourceLogs", "resource_logs"):
        for scope_logs in _objects(resource_logs, "scopeLogs", "scope_logs"):
            for record in _objects(scope_logs, "logRecords", "log_records"):
                _hex_ids_to_base64(record)
    try:
        return json_format.ParseDict(data, ExportLogsServiceRequest(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None


def _objects(parent: dict[str, Any], name: str, original: str) -> list[dict[str, Any]]:
    """The objects of a JSON array field; anything else is left for ParseDict to refuse by name."""
    items = parent.get(name, parent.get(original))
    return [item for item in items if type(item) is dict] if type(items) is list else []


def _hex_ids_to_base64(record: dict[str, Any]) -> None:
    """OTLP JSON writes trace and span ids in hex, where the protobuf JSON mapping expects base64."""
    for key in _IDS:
        value = record.get(key)
        if type(value) is str:
            try:
                record[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise ValueError(f"{key} {value[:40]!r} is not hexadecimal") from None


def to_packets(resource_logs: ResourceLogs, max_messages: int, max_bytes: int, now_ms: int) -> Packets:
    """One ResourceLogs as packets of at most ``max_messages`` messages and ``max_bytes`` bytes each."""
    records = sum(len(scope_logs.log_records) for scope_logs in resource_logs.scope_logs)
    if not records:
        return Packets([], 0, "")
    emitter_id = emitter_of(resource_logs)
    if len(emitter_id) > MAX_ID_LENGTH:
        return Packets([], records, f"emitter id (service.name/service.instance.id) longer than {MAX_ID_LENGTH} "
                                    "characters")
    digest = blake2b(resource_logs.SerializeToString(deterministic=True), digest_size=16).hexdigest()
    head = b'{"emitter_id":' + orjson.dumps(emitter_id) + b',"packet_id":'
    # room for the messages once the envelope and the longest id ("<digest>-<n>") are counted
    budget = max_bytes - len(head) - len(digest) - len(str(records)) - 32
    # each packet's messages, comma-joined as they come: a message is not kept as its own bytes object, whose
    # allocation (orjson's, about 4 KB per object once shrunk) would pin that much memory per record until the
    # export is answered: 2 GB for the 500,000 empty records a 1 MB body can hold
    chunks: list[tuple[bytearray, int]] = []
    chunk = bytearray()
    count = size = too_large = 0
    for scope_logs in resource_logs.scope_logs:
        scope = scope_logs.scope.name
        for record in scope_logs.log_records:
            message = orjson.dumps(to_message(record, scope, now_ms))
            if len(message) + 1 > budget:
                too_large += 1
                continue
            if count and (count == max_messages or size + len(message) + 1 > budget):
                chunks.append((chunk, count))
                chunk = bytearray()
                count = size = 0
            if count:
                chunk += b","
            chunk += message
            count += 1
            size += len(message) + 1
    if count:
        chunks.append((chunk, count))
    packets = []
    for n, (chunk, count) in enumerate(chunks):
        packet_id = digest if len(chunks) == 1 else f"{digest}-{n}"
        raw = b"".join((head, orjson.dumps(packet_id), b',"messages":[', chunk, b"]}"))
        packets.append((raw, PacketInfo(emitter_id, packet_id, count, "normal")))
    problem = f"{too_large} log records larger than ingest.max_body_bytes={max_bytes}" if too_large else ""
    return Packets(packets, too_large, problem)


def emitter_of(resource_logs: ResourceLogs) -> str:
    """``service.name``, with ``/service.instance.id`` when the resource has one."""
    name = instance = ""
    for attribute in resource_logs.resource.attributes:
        if attribute.key == "service.name":
            name = text_of(attribute.value)
        elif attribute.key == "service.instance.id":
            instance = text_of(attribute.value)
    name = name or UNKNOWN_SERVICE
    return f"{name}/{instance}" if instance else name


def to_message(record: LogRecord, scope: str, now_ms: int) -> dict[str, Any]:
    """One log record as a message of the contract."""
    nanos = record.time_unix_nano or record.observed_time_unix_nano
    number = record.severity_number
    level = record.severity_text or (_LEVELS[number - 1] if 0 < number <= len(_LEVELS) else UNSPECIFIED)
    metadata = {attribute.key: text_of(attribute.value) for attribute in record.attributes}
    if record.trace_id:
        metadata["trace_id"] = record.trace_id.hex()
    if record.span_id:
        metadata["span_id"] = record.span_id.hex()
    if scope:
        metadata["scope_name"] = scope
    if record.event_name:
        metadata["event_name"] = record.event_name
    message: dict[str, Any] = {"timestamp": nanos // 1_000_000 if nanos else now_ms, "level": level,
                               "message": text_of(record.body)}
    if metadata:
        message["metadata"] = metadata
    return message


def text_of(value: AnyValue) -> str:
    """A string as it is, any other value as JSON (bytes in base64), no value as an empty string."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind is None:
        return ""
    return orjson.dumps(plain(value)).decode()


def plain(value: AnyValue) -> Any:
    """An AnyValue as the JSON value it denotes."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: plain(item.value) for item in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None if kind is None else getattr(value, kind)


def status_response(encoding: bytes, status: int, message: str, retry_after: float | None = None) -> Response:
    """An OTLP failure: a ``google.rpc.Status`` saying why, with Retry-After when the exporter should wait."""
    response = _encoded(encoding, status, Status(message=message))
    if retry_after is None:
        return response
    return response._replace(headers=((b"retry-after", b"%d" % max(1, math.ceil(retry_after))),))


def error_response(request: Request, response: Response) -> Response:
    """A refusal made before the body reached this module (an encoding error) as an OTLP failure."""
    encoding = media_type(request.header(b"content-type"))
    detail = orjson.loads(response.body).get("detail", "")
    return status_response(encoding if encoding == PROTOBUF else JSON, response.status, detail)


def _encoded(encoding: bytes, status: int, message: Any) -> Response:
    if encoding == PROTOBUF:
        return Response(status, message.SerializeToString(), content_type=PROTOBUF)
    return Response(status, orjson.dumps(json_format.MessageToDict(message)), content_type=JSON)
