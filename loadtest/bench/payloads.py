"""The request bodies of the ingest scenario, built once per invocation and sent by wrk in turn.

Every packet holds ``MESSAGES`` realistic messages (the built-in emitter's level mix, templates and
metadata: distributor/tools/emitter.py), so batches and compression see text like a shipper's, not one
message repeated; ids repeat once a pool has been sent (the free sinks do not deduplicate).

* ``single``: one packet per body (POST /ingest);
* ``batch``: ``BATCH`` packets per body, one NDJSON line each (POST /ingest/batch);
* ``gzip``: the same batches, gzip level 6 (the level ``gzip`` and most shippers default to);
* ``otlp``: an ExportLogsServiceRequest (protobuf, built with opentelemetry-proto) of ``BATCH``
  ResourceLogs of ``MESSAGES`` log records each: one packet of ``MESSAGES`` messages per ResourceLogs,
  as the distributor maps them (README, "OTLP/HTTP logs"), so a request carries as many records as a batch.
"""

from __future__ import annotations

import gzip
import random
import time
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs

from distributor.tools.emitter import PacketFactory, log_message
from loadtest.generators import WrkPool

MESSAGES = 10  # per packet (the bench's "fixed" size)
BATCH = 100  # packets per batch request, and ResourceLogs per OTLP export
SINGLE_BODIES = 512
BATCH_BODIES = 16
EMITTERS = 1000
SEVERITY = {"DEBUG": 5, "INFO": 9, "WARN": 13, "ERROR": 17}  # the first number of each range (log data model)


def write_pool(path: Path, bodies: list[bytes]) -> Path:
    """``<length>\\n<bytes>`` per body: what wrk_ingest.lua's pool mode reads."""
    path.write_bytes(b"".join(b"%d\n%s" % (len(body), body) for body in bodies))
    return path


def packets(count: int) -> list[bytes]:
    factory = PacketFactory(((MESSAGES, 1.0),), EMITTERS, emitter_prefix="ingest")
    return [factory.next()[0] for _ in range(count)]


def otlp_export(rng: random.Random, first_emitter: int) -> bytes:
    """One ExportLogsServiceRequest of BATCH ResourceLogs (one emitter each) of MESSAGES records."""
    now_ms = int(time.time() * 1000)
    export = ExportLogsServiceRequest()
    for k in range(BATCH):
        emitter = (first_emitter + k) % EMITTERS
        resource_logs: ResourceLogs = export.resource_logs.add()
        for key, value in (("service.name", f"otlp-{emitter % 50}"), ("service.instance.id", f"i-{emitter}")):
            resource_logs.resource.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
        scope_logs = resource_logs.scope_logs.add()
        scope_logs.scope.name = "bench"
        for _ in range(MESSAGES):
            message: dict[str, Any] = log_message(rng, now_ms)
            scope_logs.log_records.append(LogRecord(
                time_unix_nano=message["timestamp"] * 1_000_000, severity_text=message["level"],
                severity_number=SEVERITY[message["level"]],  # type: ignore[arg-type]
                body=AnyValue(string_value=message["message"]), trace_id=rng.randbytes(16), span_id=rng.randbytes(8),
                attributes=[KeyValue(key=key, value=AnyValue(string_value=value))
                            for key, value in message["metadata"].items()]))
    return export.SerializeToString()


def build_pools(directory: Path) -> dict[str, WrkPool]:
    """The four pools, written under ``directory``, by name."""
    singles = packets(SINGLE_BODIES)
    lines = packets(BATCH * BATCH_BODIES)
    batches = [b"\n".join(lines[i:i + BATCH]) for i in range(0, len(lines), BATCH)]
    rng = random.Random(7)
    exports = [otlp_export(rng, i * BATCH) for i in range(BATCH_BODIES)]
    return {
        "single": WrkPool(write_pool(directory / "single.pool", singles), 1, MESSAGES),
        "batch": WrkPool(write_pool(directory / "batch.pool", batches), BATCH, MESSAGES, "application/x-ndjson",
                         answer="batch"),
        "gzip": WrkPool(write_pool(directory / "gzip.pool", [gzip.compress(b, compresslevel=6) for b in batches]),
                        BATCH, MESSAGES, "application/x-ndjson", "gzip", answer="batch"),
        "otlp": WrkPool(write_pool(directory / "otlp.pool", exports), BATCH, MESSAGES, "application/x-protobuf",
                        answer="otlp"),
    }


def pool_sizes(pool: WrkPool) -> dict[str, float]:
    """Mean body bytes per request and per message of a pool (what the emitters put on the wire)."""
    data = pool.path.read_bytes()
    sizes: list[int] = []
    at = 0
    while at < len(data):
        newline = data.index(b"\n", at)
        length = int(data[at:newline])
        sizes.append(length)
        at = newline + 1 + length
    mean = sum(sizes) / max(len(sizes), 1)
    return {"bodies": len(sizes), "body_bytes_per_request": mean,
            "body_bytes_per_message": mean / (pool.packets * pool.messages)}
