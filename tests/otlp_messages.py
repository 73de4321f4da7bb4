"""OTLP log export requests built from opentelemetry-proto messages, for tests and fuzz seeds.

``otlp_json`` is the OTLP JSON encoding (google.protobuf.json_format plus the OTLP rules: hex trace
and span ids, enums as numbers).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

T0 = 1_764_172_800_123_456_789  # nanoseconds


def value(item: Any) -> AnyValue:
    if item is None:
        return AnyValue()
    if isinstance(item, bool):
        return AnyValue(bool_value=item)
    if isinstance(item, int):
        return AnyValue(int_value=item)
    if isinstance(item, float):
        return AnyValue(double_value=item)
    if isinstance(item, bytes):
        return AnyValue(bytes_value=item)
    if isinstance(item, list):
        return AnyValue(array_value=ArrayValue(values=[value(i) for i in item]))
    if isinstance(item, dict):
        return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=value(v)) for k, v in item.items()]))
    return AnyValue(string_value=item)


def record(body: Any = "hello", **fields: Any) -> LogRecord:
    attributes = fields.pop("attributes", {})
    fields.setdefault("time_unix_nano", T0)
    return LogRecord(body=value(body), attributes=[KeyValue(key=k, value=value(v)) for k, v in attributes.items()],
                     **fields)


def resource_logs(records: list[LogRecord], service: str | None = "checkout", instance: str | None = None,
                  scope: str = "app.orders") -> ResourceLogs:
    resource = {"service.name": service, "service.instance.id": instance, "host.name": "web-01"}
    logs = ResourceLogs(scope_logs=[ScopeLogs(log_records=records)])
    logs.scope_logs[0].scope.name = scope
    logs.resource.attributes.extend(KeyValue(key=k, value=value(v)) for k, v in resource.items() if v is not None)
    return logs


def export(*logs: ResourceLogs) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest(resource_logs=list(logs))


def otlp_json(request: ExportLogsServiceRequest) -> bytes:
    """The OTLP JSON encoding: lowerCamelCase, enums as numbers, int64 as strings, trace/span ids in hex."""
    data = json_format.MessageToDict(request, use_integers_for_enums=True)
    for logs in data.get("resourceLogs", []):
        for scope in logs.get("scopeLogs", []):
            for item in scope.get("logRecords", []):
                for key in ("traceId", "spanId"):
                    if key in item:
                        item[key] = base64.b64decode(item[key]).hex()
    return orjson.dumps(data)
