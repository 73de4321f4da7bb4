"""Regression tests of the issue-13 review (batch ingest, compressed bodies, OTLP logs, tracing).

Each test drives a real distributor (and real analyzers or recording servers) on 127.0.0.1 and failed
before its fix:

* a body of thousands of empty gzip members or zstd frames kept a worker's event loop busy for seconds
  (one decompressor per member, and the rest of the body copied after each one): now 400 beyond
  ``encoding.MAX_MEMBERS``, and the input is fed in pieces;
* an OTLP export of empty log records (2 bytes each: 1 KB gzipped for 500,000 of them) held a 4 KB block of
  memory per record while it was converted: a worker grew by gigabytes for one request;
* a line of a sampled ``/ingest/batch`` request that was refused (rate limited, overloaded, ...) got no
  ``admit`` span with its outcome;
* with tracing on, every request with a malformed or over-long ``tracestate``/``traceparent`` wrote a
  warning quoting the header to the worker's log;
* with a collector that does not answer, a stopping worker waited in the span exporter's exit flush (up
  to 30 s) until the supervisor killed it;
* an OTLP export partly refused for capacity got 200 with ``partial_success``, which exporters do not retry:
  the refused records were lost (now the whole export gets 429/503 + ``Retry-After``);
* an export could hold any number of records (``ingest.max_otlp_records`` now, 413 above);
* of repeated ``Content-Encoding`` lines only the last counted (now one list, 415).
"""

from __future__ import annotations

import gzip
import signal
import socket
import threading
from typing import Callable

import pytest
from backports import zstd
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from distributor.ingest import encoding
from distributor.tools.localcluster import LocalCluster, wait_until
from http_sinks import RawServer, RecordingServer, attributes
from support import Client, packet


def _frames(kind: str, count: int, payload: bytes = b"") -> bytes:
    one = zstd.compress(payload) if kind == "zstd" else gzip.compress(payload, mtime=0)
    return one * count


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_body_of_thousands_of_empty_members_is_refused_at_once(make_cluster: Callable[..., LocalCluster],
                                                                 kind: str) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),))
    client = Client(cluster.data_port)
    frame = len(_frames(kind, 1))
    bomb = _frames(kind, (1 << 20) // frame)  # 1 MiB that inflates to nothing: 52,428 gzip members, 116,508 frames
    status, _, body = client.post(bomb, "/ingest", {"Content-Encoding": kind})
    assert status == 400 and body["error"] == "bad_encoding" and "more than" in body["detail"], body
    # a packet in as many pieces as a body may have is still one body
    limit = encoding.MAX_MEMBERS
    raw = packet(emitter="m", packet_id=f"members-{kind}")
    step = -(-len(raw) // limit)
    pieces = [raw[i:i + step] for i in range(0, len(raw), step)]
    assert len(pieces) <= limit
    compress = zstd.compress if kind == "zstd" else gzip.compress
    status, _, body = client.post(b"".join(compress(piece) for piece in pieces), "/ingest", {"Content-Encoding": kind})
    assert status == 202, body
    client.close()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _empty_records_export(records: int) -> bytes:
    """An ExportLogsServiceRequest of one ResourceLogs, one ScopeLogs and ``records`` empty LogRecords."""
    scope_logs = b"\x12\x00" * records  # ScopeLogs.log_records (2), each empty
    resource_logs = b"\x12" + _varint(len(scope_logs)) + scope_logs  # ResourceLogs.scope_logs (2)
    return b"\x0a" + _varint(len(resource_logs)) + resource_logs  # ExportLogsServiceRequest.resource_logs (1)


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_an_otlp_export_of_empty_records_does_not_cost_kilobytes_per_record(
        make_cluster: Callable[..., LocalCluster]) -> None:
    records = 250_000  # an operator may raise ingest.max_otlp_records this far: memory must still hold
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=["--set", f"ingest.max_otlp_records={records}"])
    pid = cluster.admin("/admin/workers")["workers"][0]["pid"]
    before = _peak_rss(pid)
    body = gzip.compress(_empty_records_export(records))
    assert len(body) < 2000
    conn_client = Client(cluster.data_port)
    conn_client.conn.timeout = 300
    conn_client.conn.request("POST", "/v1/logs", body=body, headers={
        "Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"})
    answer = conn_client.conn.getresponse()
    answer.read()
    conn_client.close()
    assert answer.status == 200
    grown = _peak_rss(pid) - before
    # the packets themselves are ~12.5 MB (about 50 bytes per message); before the fix the worker grew by ~1 GB
    assert grown < 300 << 20, f"the worker's peak RSS grew by {grown >> 20} MB for one export of {records} records"
    wait_until(lambda: cluster.analyzer("a1").stats()["messages"] == records, 60, "every record at the analyzer")


def _post_otlp(port: int, body: bytes, **headers: str) -> tuple[int, dict[str, str], bytes]:
    client = Client(port)
    try:
        client.conn.request("POST", "/v1/logs", body=body, headers={"Content-Type": "application/x-protobuf",
                                                                     **headers})
        answer = client.conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        client.close()


def test_an_export_of_more_records_than_max_otlp_records_gets_413_and_nothing_is_sent(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=["--set", "ingest.max_otlp_records=100"])
    status, _, body = _post_otlp(cluster.data_port, _empty_records_export(101))
    assert status == 413 and b"max_otlp_records=100" in Status.FromString(body).message.encode()
    assert cluster.admin("/admin/workers")["workers"][0]["rejected_invalid"] == 1  # the limit's metric
    status, _, _ = _post_otlp(cluster.data_port, _empty_records_export(100))
    assert status == 200
    wait_until(lambda: cluster.analyzer("a1").stats()["messages"] == 100, 10, "the export at the limit")
    assert cluster.analyzer("a1").stats()["messages"] == 100


def test_an_export_partly_refused_for_capacity_gets_429_so_the_exporter_retries_it(
        make_cluster: Callable[..., LocalCluster]) -> None:
    """It got 200 with partial_success, which an exporter must not retry: the refused records were lost."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=[
        "--set", "rate_limit.rate=1", "--set", "rate_limit.burst=1"])
    body = ExportLogsServiceRequest(resource_logs=[
        ResourceLogs(resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="svc"))]),
                     scope_logs=[ScopeLogs(log_records=[LogRecord(body=AnyValue(string_value=f"r{n}"))])])
        for n in range(3)]).SerializeToString()  # three packets of one emitter; its burst takes one
    status, headers, answer = _post_otlp(cluster.data_port, body)
    assert status == 429, (status, answer)
    assert float(headers["retry-after"]) > 0 and "rate" in Status.FromString(answer).message


def test_repeated_content_encoding_lines_are_one_list_and_get_415(make_cluster: Callable[..., LocalCluster]) -> None:
    """Only the last line counted: a body gzipped twice by two proxies was decoded once, as if it were plain."""
    cluster = make_cluster(analyzers=(("a1", 1.0),))
    with socket.create_connection(("127.0.0.1", cluster.data_port), timeout=10) as sock:
        raw = gzip.compress(gzip.compress(packet(emitter="e", packet_id="twice")))
        sock.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Encoding: gzip\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 415 ") and b"gzip, gzip" in answer, answer


def test_a_refused_line_of_a_sampled_batch_has_an_admit_span_with_its_outcome(
        make_cluster: Callable[..., LocalCluster], quick_span_export: None) -> None:
    with RecordingServer() as collector, RecordingServer() as sink:
        cluster = make_cluster(analyzers=(), distributor_args=[
            "--analyzer", f"sink={sink.url}@1", "--set", "tracing.sample_ratio=1.0",
            "--set", f"tracing.endpoint={collector.url}", "--set", "rate_limit.rate=1", "--set", "rate_limit.burst=1"])
        client = Client(cluster.data_port)
        lines = [packet(emitter="rl", packet_id=f"rl-{i}") for i in range(3)]
        status, _, body = client.post(b"\n".join(lines) + b"\n", "/ingest/batch")
        client.close()
        assert status == 200 and body["accepted"] == 1 and [r["line"] for r in body["rejected"]] == [1, 2]

        def outcomes() -> dict[str, str] | None:
            found = {attributes(s)["distributor.packet_id"]: attributes(s)["distributor.outcome"]
                     for s in collector.spans() if s.name == "admit"}
            return found if len(found) == 3 else None

        assert wait_until(outcomes, 15, "an admit span per line") == {
            "rl-0": "accepted", "rl-1": "rate_limited", "rl-2": "rate_limited"}


def test_malformed_trace_headers_do_not_write_a_log_line_per_request(
        make_cluster: Callable[..., LocalCluster]) -> None:
    with RecordingServer() as collector:
        cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=[
            "--set", "tracing.sample_ratio=0.001", "--set", f"tracing.endpoint={collector.url}"])
        assert cluster.distributor is not None
        before = len(cluster.distributor.log_tail(100_000).splitlines())
        client = Client(cluster.data_port)
        parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        hostile = [{"traceparent": parent, "tracestate": "NOT A MEMBER " + "A" * 3000},
                   {"traceparent": parent + "-x" * 300}]
        for n in range(100):
            status, _, _ = client.post(packet(emitter="hdr", packet_id=f"h-{n}"), headers=hostile[n % 2])
            assert status == 202
        client.close()
        written = cluster.distributor.log_tail(100_000).splitlines()[before:]
        quoted = [line for line in written if "opentelemetry.trace" in line]
        assert not quoted, f"{len(quoted)} log lines for 100 requests, e.g. {quoted[0][:200]}"


class _SilentCollector(RawServer):
    """Accepts connections and reads requests, never answers (a collector that hangs)."""

    def __init__(self) -> None:
        self.received = threading.Event()
        super().__init__()

    def serve(self, conn: socket.socket, number: int) -> None:
        try:
            while conn.recv(65536):
                self.received.set()
        except OSError:
            pass


def test_a_worker_stops_in_time_when_the_collector_never_answers(make_cluster: Callable[..., LocalCluster],
                                                                 quick_span_export: None) -> None:
    collector = _SilentCollector()
    try:
        cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=[
            "--set", "tracing.sample_ratio=1.0", "--set", f"tracing.endpoint={collector.url}",
            "--set", "graceful_timeout=5"])
        client = Client(cluster.data_port)
        assert client.post(packet(emitter="sc", packet_id="sc-first"))[0] == 202
        assert collector.received.wait(30), "the first span export never reached the collector"
        for n in range(20):  # spans queued behind the export that hangs
            assert client.post(packet(emitter="sc", packet_id=f"sc-{n}"))[0] == 202
        client.close()
        cluster.wait_drained(30)
        distributor = cluster.distributor
        assert distributor is not None and distributor.process is not None
        distributor.signal(signal.SIGTERM)
        assert distributor.process.wait(120) == 0
        killed = [line for line in distributor.log_tail(200).splitlines() if "did not stop within" in line]
        assert not killed, killed[0]
    finally:
        collector.close()
