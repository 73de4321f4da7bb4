"""POST /v1/logs: the OTLP mapping, and a real OpenTelemetry SDK exporting through a real distributor.

The client nobody here wrote is the OpenTelemetry Python SDK (``logging`` -> LoggingHandler ->
BatchLogRecordProcessor -> OTLPLogExporter over HTTP/protobuf). JSON requests are built from the
opentelemetry-proto messages (tests/otlp_messages.py) with google.protobuf.json_format, plus the OTLP
JSON rules (hex ids, enums as numbers). One analyzer slot of the cluster is a recording sink, so the
test sees the packet bytes as forwarded; the other is the real analyzer service.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import orjson
import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.logs.v1.logs_pb2 import ResourceLogs
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from distributor.ingest.contract import parse_packet
from distributor.ingest.otlp import PROTOBUF, decode, to_packets
from distributor.tools.localcluster import LocalCluster, wait_until
from http_sinks import RecordingServer
from otlp_messages import T0, export, otlp_json, record, resource_logs, value

# the SDK's own LoggingHandler still works; it points to opentelemetry-instrumentation-logging's for the future
pytestmark = pytest.mark.filterwarnings("ignore:`LoggingHandler` in `opentelemetry-sdk` is deprecated")
MAX_MESSAGES = 50
MAX_BODY = 64 * 1024
NOW_MS = 1_764_172_800_000


def packets_of(logs: ResourceLogs, max_messages: int = MAX_MESSAGES, max_bytes: int = MAX_BODY
               ) -> list[dict[str, Any]]:
    """The packets a ResourceLogs becomes, each checked against the contract as a /ingest would."""
    result = to_packets(logs, max_messages, max_bytes, NOW_MS)
    for raw, info in result.packets:
        assert parse_packet(raw, max_messages) == info
        assert len(raw) <= max_bytes
    return [orjson.loads(raw) for raw, _ in result.packets]


# --- the mapping, in process ---------------------------------------------------------------------


def test_one_packet_per_resource_logs_with_the_documented_mapping() -> None:
    trace_id, span_id = bytes(range(1, 17)), bytes(range(1, 9))
    records = [
        record("order 42 paid", severity_text="INFO", severity_number=9, trace_id=trace_id, span_id=span_id,
               attributes={"order_id": 42, "customer": "c-9", "vip": True, "amount": 12.5, "tags": ["a", "b"]}),
        record({"event": "refund", "items": [1, 2]}, severity_number=17, time_unix_nano=0,
               observed_time_unix_nano=T0 + 5_000_000, event_name="refund.issued"),
        record(b"\x00\x01", severity_number=0, time_unix_nano=0, attributes={"raw": b"\xff"}),
        record(7, severity_text="notice", severity_number=21),
        record(None, severity_number=2, time_unix_nano=0),  # no body, no times
    ]
    [packet] = packets_of(resource_logs(records, instance="instance-7"))
    assert packet["emitter_id"] == "checkout/instance-7"
    assert len(packet["packet_id"]) == 32 and "priority" not in packet
    first, second, third, fourth, fifth = packet["messages"]
    assert first == {"timestamp": T0 // 1_000_000, "level": "INFO", "message": "order 42 paid", "metadata": {
        "order_id": "42", "customer": "c-9", "vip": "true", "amount": "12.5", "tags": '["a","b"]',
        "trace_id": trace_id.hex(), "span_id": span_id.hex(), "scope_name": "app.orders"}}
    assert second["timestamp"] == (T0 + 5_000_000) // 1_000_000 and second["level"] == "ERROR"
    assert orjson.loads(second["message"]) == {"event": "refund", "items": [1, 2]}
    assert second["metadata"] == {"scope_name": "app.orders", "event_name": "refund.issued"}
    assert third["level"] == "UNSPECIFIED" and third["message"] == '"AAE="' and third["metadata"]["raw"] == '"/w=="'
    assert fourth["level"] == "notice" and fourth["message"] == "7"
    assert fifth == {"timestamp": NOW_MS, "level": "TRACE", "message": "", "metadata": {"scope_name": "app.orders"}}


@pytest.mark.parametrize("number, level", [(1, "TRACE"), (4, "TRACE"), (5, "DEBUG"), (9, "INFO"), (12, "INFO"),
                                           (13, "WARN"), (16, "WARN"), (17, "ERROR"), (21, "FATAL"), (24, "FATAL"),
                                           (0, "UNSPECIFIED"), (25, "UNSPECIFIED")])
def test_severity_number_to_level(number: int, level: str) -> None:
    [packet] = packets_of(resource_logs([record(severity_number=number)]))
    assert packet["messages"][0]["level"] == level


def test_emitter_id_without_service_name_and_when_too_long() -> None:
    assert packets_of(resource_logs([record()], service=None))[0]["emitter_id"] == "unknown_service"
    assert packets_of(resource_logs([record()], service=""))[0]["emitter_id"] == "unknown_service"
    result = to_packets(resource_logs([record(), record()], service="s" * 300), MAX_MESSAGES, MAX_BODY, NOW_MS)
    assert result.packets == [] and result.rejected == 2 and "256" in result.problem
    assert to_packets(resource_logs([]), MAX_MESSAGES, MAX_BODY, NOW_MS) == ([], 0, "")


def test_packet_id_comes_from_the_content_in_either_encoding() -> None:
    logs = resource_logs([record("a"), record("b", trace_id=b"\x07" * 16)])
    request = export(logs)
    from_protobuf = decode(request.SerializeToString(), PROTOBUF)
    from_json = decode(otlp_json(request), b"application/json")
    ids = {packets_of(got.resource_logs[0])[0]["packet_id"] for got in (from_protobuf, from_json)}
    assert len(ids) == 1, "a retried export, in either encoding, yields the same packet id"
    other = packets_of(resource_logs([record("a"), record("c")]))[0]["packet_id"]
    assert other not in ids


def test_a_large_resource_logs_is_split_by_count_and_by_bytes() -> None:
    records = [record(f"event {i}") for i in range(MAX_MESSAGES * 2 + 7)]
    packets = packets_of(resource_logs(records))
    assert [len(p["messages"]) for p in packets] == [MAX_MESSAGES, MAX_MESSAGES, 7]
    digest = packets[0]["packet_id"].rsplit("-", 1)[0]
    assert [p["packet_id"] for p in packets] == [f"{digest}-{n}" for n in range(3)]
    assert [m["message"] for p in packets for m in p["messages"]] == [f"event {i}" for i in range(len(records))]
    big = [record("x" * 5000) for _ in range(30)] + [record("y" * (MAX_BODY + 1))]
    result = to_packets(resource_logs(big), MAX_MESSAGES, MAX_BODY, NOW_MS)
    assert result.rejected == 1 and "larger than ingest.max_body_bytes" in result.problem
    assert sum(info.messages for _, info in result.packets) == 30 and len(result.packets) == 3
    split = packets_of(resource_logs(big))  # each within max_body_bytes, and a valid packet
    assert [len(p["messages"]) for p in split] == [info.messages for _, info in result.packets]


def test_otlp_json_rules() -> None:
    body = orjson.dumps({"resource_logs": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "j"}}]}, "scopeLogs": [{"logRecords": [
            {"timeUnixNano": str(T0), "severityNumber": 13, "traceId": "0102030405060708090A0B0C0D0E0F10",
             "span_id": "0102030405060708", "body": {"intValue": "12"}, "unknownField": 1,
             "attributes": [{"key": "n", "value": {"intValue": 3}}]}]}]}]})
    [packet] = packets_of(decode(body, b"application/json").resource_logs[0])
    assert packet["messages"] == [{"timestamp": T0 // 1_000_000, "level": "WARN", "message": "12", "metadata": {
        "n": "3", "trace_id": "0102030405060708090a0b0c0d0e0f10", "span_id": "0102030405060708"}}]
    for bad in (b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "xyz"}]}]}]}',
                b'{"resourceLogs": 5}', b"[]", b"{not json"):
        with pytest.raises(ValueError):
            decode(bad, b"application/json")
    with pytest.raises(ValueError):
        decode(b"\xff\xff\xff", PROTOBUF)


# --- over a real distributor ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(sink: RecordingServer) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        analyzers=(("a1", 1.0),),
        distributor_args=["--analyzer", f"sink={sink.url}@1", "--set", f"ingest.max_body_bytes={MAX_BODY}",
                          "--set", f"ingest.max_messages_per_packet={MAX_MESSAGES}", "--set", "sender.batch_linger=0"],
    )
    with cluster:
        yield cluster


def post(port: int, body: bytes, content_type: str = "application/x-protobuf", method: str = "POST",
         **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, "/v1/logs", body=body, headers={"Content-Type": content_type, **headers})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@contextmanager
def sdk_logging(port: int, name: str, **resource: str) -> Iterator[tuple[logging.Logger, LoggerProvider]]:
    """A ``logging`` logger whose records the SDK exports to the distributor over OTLP/HTTP (protobuf)."""
    provider = LoggerProvider(resource=Resource.create(resource))
    provider.add_log_record_processor(BatchLogRecordProcessor(
        OTLPLogExporter(endpoint=f"http://127.0.0.1:{port}/v1/logs", timeout=30)))
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = LoggingHandler(level=logging.DEBUG, logger_provider=provider)
    logger.addHandler(handler)
    try:
        yield logger, provider
    finally:
        logger.removeHandler(handler)
        provider.shutdown()


def keys(cluster: LocalCluster, sink: RecordingServer, emitter: str) -> list[str]:
    """Packet ids of ``emitter`` that reached the real analyzer or the sink (a retry may reach both)."""
    found = [pid for e, pid in cluster.analyzer("a1").packet_keys() if e == emitter]
    return found + [p["packet_id"] for _, p in sink.packets() if p["emitter_id"] == emitter]


def test_the_opentelemetry_sdk_logs_reach_the_analyzers(cluster: LocalCluster, sink: RecordingServer) -> None:
    tracer = TracerProvider().get_tracer("test")
    resource = {"service.name": "checkout", "service.instance.id": "instance-7"}
    with sdk_logging(cluster.data_port, "checkout.payments", **resource) as (logger, provider):
        for n in range(6):  # one export, so one packet, per flush
            with tracer.start_as_current_span("pay"):
                logger.info("order %d paid", n, extra={"order_id": n, "customer": "c-9"})
            logger.warning("card %d retried", n)
            logger.error("refund %d failed", n)
            assert provider.force_flush()
    emitter = "checkout/instance-7"
    wait_until(lambda: len(set(keys(cluster, sink, emitter))) == 6, 15, "six packets at the analyzers")
    stats = cluster.analyzer("a1").stats()
    forwarded = [p for _, p in sink.packets() if p["emitter_id"] == emitter]
    assert forwarded and stats["emitters"].get(emitter), "both the analyzer and the sink got packets"
    assert stats["emitters"][emitter] + sum(len(p["messages"]) for p in forwarded) == 18
    for level in ("INFO", "WARN", "ERROR"):  # the SDK writes WARNING as WARN in severity_text
        assert stats["levels"][level] + sum(m["level"] == level for p in forwarded for m in p["messages"]) == 6
    for packet in forwarded:
        info, warning, error = packet["messages"]
        n = int(info["message"].split()[1])
        assert (info["level"], warning["message"], error["message"]) == ("INFO", f"card {n} retried",
                                                                          f"refund {n} failed")
        assert info["metadata"]["order_id"] == str(n) and info["metadata"]["customer"] == "c-9"
        assert info["metadata"]["scope_name"] == "checkout.payments"
        assert len(info["metadata"]["trace_id"]) == 32 and len(info["metadata"]["span_id"]) == 16
        assert "trace_id" not in warning["metadata"]
        assert abs(info["timestamp"] - time.time() * 1000) < 60_000


def test_json_and_gzip_requests_and_a_retry_with_the_same_id(cluster: LocalCluster, sink: RecordingServer) -> None:
    request = export(resource_logs([record("json one", severity_number=9), record("json two", severity_number=13)],
                                   service="json-svc"))
    status, headers, body = post(cluster.data_port, otlp_json(request), "application/json; charset=utf-8")
    assert status == 200 and headers["content-type"] == "application/json" and orjson.loads(body) == {}
    status, headers, body = post(cluster.data_port, gzip.compress(request.SerializeToString()),
                                 **{"Content-Encoding": "gzip"})
    assert status == 200 and headers["content-type"] == "application/x-protobuf"
    assert ExportLogsServiceResponse.FromString(body) == ExportLogsServiceResponse()
    wait_until(lambda: len(keys(cluster, sink, "json-svc")) == 2, 10, "both copies at the analyzers")
    assert len(set(keys(cluster, sink, "json-svc"))) == 1, "the same content is the same packet id, whatever encoding"


def test_a_resource_logs_above_max_messages_arrives_as_several_packets(cluster: LocalCluster,
                                                                         sink: RecordingServer) -> None:
    request = export(resource_logs([record(f"r{i}") for i in range(MAX_MESSAGES * 2 + 1)], service="split-svc"))
    status, _, body = post(cluster.data_port, request.SerializeToString())
    assert status == 200 and body == b""
    wait_until(lambda: len(keys(cluster, sink, "split-svc")) == 3, 10, "three packets")
    assert sorted(pid[-2:] for pid in keys(cluster, sink, "split-svc")) == ["-0", "-1", "-2"]


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_partial_success_counts_the_records_refused(cluster: LocalCluster, encoding: str) -> None:
    request = export(resource_logs([record(), record()], service="s" * 300),
                     resource_logs([record("kept")], service="partial-svc"))
    if encoding == "json":
        status, _, body = post(cluster.data_port, otlp_json(request), "application/json")
        partial = orjson.loads(body)["partialSuccess"]
        assert partial["rejectedLogRecords"] == "2"
        message = partial["errorMessage"]
    else:
        status, _, body = post(cluster.data_port, request.SerializeToString())
        response = ExportLogsServiceResponse.FromString(body)
        assert response.partial_success.rejected_log_records == 2
        message = response.partial_success.error_message
    assert status == 200 and "resource_logs[0]" in message and "256" in message


def test_failures_answer_a_status_in_the_request_encoding(cluster: LocalCluster) -> None:
    status, headers, body = post(cluster.data_port, b"\xff\xff\xff")
    assert status == 400 and headers["content-type"] == "application/x-protobuf"
    assert "undecodable" in Status.FromString(body).message
    status, headers, body = post(cluster.data_port, b'{"resourceLogs": 5}', "application/json")
    assert status == 400 and headers["content-type"] == "application/json" and "undecodable" in orjson.loads(body)[
        "message"]
    status, _, body = post(cluster.data_port, gzip.compress(b"x" * 100)[:-8], **{"Content-Encoding": "gzip"})
    assert status == 400 and "truncated" in Status.FromString(body).message
    status, _, body = post(cluster.data_port, b"{}", "text/plain")
    assert status == 415 and "application/x-protobuf" in orjson.loads(body)["message"]
    assert post(cluster.data_port, b"", method="GET")[:2][0] == 405
    assert post(cluster.data_port, b"x" * (MAX_BODY + 1))[0] == 413


def test_with_the_wal_on_the_answer_waits_for_the_log(make_cluster: Any, tmp_path: Any) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=[
        "--set", f"wal.dir={tmp_path}", "--set", "wal.sync=always"])
    status, _, body = post(cluster.data_port, export(resource_logs([record("durable")], service="wal-svc"))
                           .SerializeToString())
    assert status == 200 and body == b""
    wait_until(lambda: any(e == "wal-svc" for e, _ in cluster.analyzer("a1").packet_keys()), 10, "the packet")


def test_every_analyzer_stalled_the_exporter_gets_503_retries_and_delivers(make_cluster: Any) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), distributor_args=[
        "--set", "health.interval=0.2", "--set", "health.timeout=0.1", "--set", "health.fall=2",
        "--set", "health.rise=1"])
    for name in ("a1", "a2"):
        cluster.analyzer(name).control(stall=True)
    wait_until(lambda: all(a["state"] == "down" for a in cluster.admin("/admin/analyzers")["analyzers"]), 10,
               "every analyzer down")
    retries: list[str] = []

    class Retries(logging.Handler):
        def emit(self, item: logging.LogRecord) -> None:
            retries.append(item.getMessage())

    exporter_log = logging.getLogger("opentelemetry.exporter")
    capture = Retries(logging.WARNING)
    exporter_log.addHandler(capture)
    try:
        with sdk_logging(cluster.data_port, "stall", **{"service.name": "stalled-svc"}) as (logger, provider):
            for n in range(3):
                logger.info("kept %d", n)
            flushed: list[bool] = []
            flusher = threading.Thread(target=lambda: flushed.append(provider.force_flush(60_000)))
            flusher.start()
            wait_until(lambda: any("Service Unavailable" in r and "retrying" in r for r in retries), 15,
                       "the exporter retrying after a 503")
            for name in ("a1", "a2"):
                cluster.analyzer(name).control(stall=False)
            flusher.join(60)
            assert flushed == [True]
    finally:
        exporter_log.removeHandler(capture)

    def arrived() -> int:  # the SDK gives the resource a service.instance.id of its own: "stalled-svc/<uuid>"
        return sum(count for n in ("a1", "a2") for emitter, count in cluster.analyzer(n).stats()["emitters"].items()
                   if emitter.startswith("stalled-svc/"))

    wait_until(lambda: arrived() == 3, 15, "the three records at the analyzers")
