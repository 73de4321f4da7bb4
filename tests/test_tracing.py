"""Tracing: ingest and send spans from a real distributor, received by an OTLP/HTTP collector the test starts.

The collector and the analyzer are both recording servers (tests/http_sinks.py): the spans are decoded
with opentelemetry-proto, and the analyzer requests show the ``traceparent`` the distributor sent.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.trace import get_current_span

from distributor.config import ConfigError, resolve
from distributor.tools.localcluster import LocalCluster, wait_until
from distributor.tracing import configure
from http_sinks import RecordingServer, attributes
from support import Client, packet

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
OTLP_JSON = json.dumps({"resourceLogs": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "traced-svc"}}]},
    "scopeLogs": [{"logRecords": [{"timeUnixNano": "1764172800123000000", "severityText": "INFO",
                                   "body": {"stringValue": "hello"}}]}]}]}).encode()


pytestmark = pytest.mark.usefixtures("quick_span_export")  # conftest: spans every 100 ms


def traced_cluster(collector: RecordingServer, sink: RecordingServer, ratio: float) -> LocalCluster:
    return LocalCluster(analyzers=(), distributor_args=[
        "--analyzer", f"sink={sink.url}@1", "--set", "sender.batch_linger=0",
        "--set", "ingest.max_messages_per_packet=100",
        "--set", f"tracing.sample_ratio={ratio}", "--set", f"tracing.endpoint={collector.url}"])


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RecordingServer, RecordingServer]]:
    with RecordingServer() as collector, RecordingServer() as sink:
        yield collector, sink


@pytest.fixture(scope="module")
def cluster(servers: tuple[RecordingServer, RecordingServer], quick_span_export: None) -> Iterator[LocalCluster]:
    with traced_cluster(*servers, ratio=1.0) as cluster:
        yield cluster


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    client = Client(cluster.data_port)
    yield client
    client.close()


def span_where(collector: RecordingServer, name: str, **wanted: Any) -> Span:
    """The first span named ``name`` whose attributes include ``wanted`` (keys without the prefix)."""
    def find() -> Span | None:
        for span in collector.spans():
            found = attributes(span)
            if span.name == name and all(found.get(f"distributor.{k}") == v for k, v in wanted.items()):
                return span
        return None
    span: Span = wait_until(find, 15, f"a {name} span with {wanted}")
    return span


def send_linking(collector: RecordingServer, span: Span) -> Span:
    """The send span linked to ``span`` (the ingest span of a packet it carried)."""
    def find() -> Span | None:
        for send in collector.spans():
            if send.name == "send" and any((link.trace_id, link.span_id) == (span.trace_id, span.span_id)
                                           for link in send.links):
                return send
        return None
    send: Span = wait_until(find, 15, "the send span linked to the packet")
    return send


def traceparent_of(sink: RecordingServer, packet_id: str) -> str:
    for request, forwarded in sink.packets():
        if forwarded["packet_id"] == packet_id:
            return request.headers.get("traceparent", "")
    raise AssertionError(f"{packet_id} never reached the sink")


def test_an_ingest_span_per_request_and_a_linked_send_span(servers: tuple[RecordingServer, RecordingServer],
                                                           client: Client) -> None:
    collector, sink = servers
    assert client.post(packet(emitter="tr-1", packet_id="t-1"))[0] == 202
    ingest = span_where(collector, "POST /ingest", packet_id="t-1")
    assert ingest.kind == Span.SpanKind.SPAN_KIND_SERVER and not ingest.parent_span_id
    assert attributes(ingest) == {
        "http.request.method": "POST", "url.path": "/ingest", "http.response.status_code": 202,
        "distributor.emitter_id": "tr-1", "distributor.packet_id": "t-1", "distributor.messages": 5,
        "distributor.analyzer": "sink", "distributor.outcome": "accepted", "distributor.packets_accepted": 1}
    send = send_linking(collector, ingest)
    assert send.kind == Span.SpanKind.SPAN_KIND_CLIENT and send.trace_id != ingest.trace_id
    sent = attributes(send)
    assert sent["distributor.analyzer"] == "sink" and sent["distributor.outcome"] == "delivered"
    assert sent["http.response.status_code"] == 200 and sent["distributor.sampled_packets"] >= 1
    version, trace_id, span_id, flags = traceparent_of(sink, "t-1").split("-")
    assert (version, trace_id, span_id) == ("00", send.trace_id.hex(), send.span_id.hex())
    assert int(flags, 16) & 1, "sampled"


def test_batch_and_otlp_requests_get_a_child_span_per_packet(servers: tuple[RecordingServer, RecordingServer],
                                                             client: Client) -> None:
    collector, sink = servers
    body = packet(emitter="tr-b", packet_id="b-0") + b"\n" + packet(emitter="tr-b", packet_id="b-1", messages=2)
    assert client.post(body, "/ingest/batch")[0] == 200
    first = span_where(collector, "admit", packet_id="b-0", messages=5, analyzer="sink", outcome="accepted")
    second = span_where(collector, "admit", packet_id="b-1", messages=2)
    request = span_where(collector, "POST /ingest/batch", packets_accepted=2)
    assert first.parent_span_id == second.parent_span_id == request.span_id
    assert attributes(request)["http.response.status_code"] == 200
    assert send_linking(collector, first) and send_linking(collector, second)
    status, _, _ = client.post(OTLP_JSON, "/v1/logs")
    assert status == 200
    logs = span_where(collector, "admit", emitter_id="traced-svc", messages=1, outcome="accepted")
    assert span_where(collector, "POST /v1/logs").span_id == logs.parent_span_id
    assert traceparent_of(sink, attributes(logs)["distributor.packet_id"]).startswith("00-")


def test_a_refused_packet_has_its_outcome(servers: tuple[RecordingServer, RecordingServer], client: Client) -> None:
    collector, _ = servers
    assert client.post(b'{"emitter_id": "tr-bad"}')[0] == 400
    assert client.post(packet(emitter="tr-big", packet_id="big", messages=101))[0] == 413
    wait_until(lambda: {400, 413} <= {attributes(s).get("http.response.status_code") for s in collector.spans()
                                      if s.name == "POST /ingest"}, 15, "the spans of both refusals")


def test_an_incoming_traceparent_is_the_parent_and_its_flag_decides(
        servers: tuple[RecordingServer, RecordingServer], client: Client) -> None:
    collector, _ = servers
    sampled = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1"}
    assert client.post(packet(emitter="tr-p", packet_id="p-1"), headers=sampled)[0] == 202
    child = span_where(collector, "POST /ingest", packet_id="p-1")
    assert (child.trace_id.hex(), child.parent_span_id.hex(), child.trace_state) == (TRACE_ID, PARENT_ID, "vendor=1")
    unsampled_trace = "0af7651916cd43dd8448eb211c80319c"
    unsampled = {"traceparent": f"00-{unsampled_trace}-{PARENT_ID}-00"}
    assert client.post(packet(emitter="tr-p", packet_id="p-2"), headers=unsampled)[0] == 202
    assert client.post(packet(emitter="tr-p", packet_id="p-3"), headers={"traceparent": "garbage"})[0] == 202
    span_where(collector, "POST /ingest", packet_id="p-3")  # a malformed header is ignored: sampled at ratio 1
    time.sleep(0.5)  # p-2's span would have been exported with p-3's or soon after
    assert not [s for s in collector.spans() if s.trace_id.hex() == unsampled_trace]


def test_a_ratio_of_zero_exports_nothing() -> None:
    with RecordingServer() as collector, RecordingServer() as sink:
        with traced_cluster(collector, sink, ratio=0.0) as cluster:
            client = Client(cluster.data_port)
            sampled = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            for n in range(20):
                assert client.post(packet(emitter="tr-off", packet_id=f"o-{n}"), headers=sampled)[0] == 202
            client.close()
            wait_until(lambda: len(sink.packets()) == 20, 10, "every packet at the sink")
            time.sleep(1.0)  # ten export periods
            assert collector.requests == []
            assert all("traceparent" not in request.headers for request, _ in sink.packets())


def test_tracing_configuration_is_validated() -> None:
    analyzers = {"analyzers": [{"name": "a1", "url": "http://127.0.0.1:9001", "weight": 1}]}
    ok = resolve(None, {}, analyzers, {"tracing": {"sample_ratio": 0.01, "endpoint": "http://127.0.0.1:4318"}})
    assert ok.tracing.sample_ratio == 0.01
    assert resolve(None, {}, analyzers, {}).tracing.sample_ratio == 0  # off by default
    env = {"DISTRIBUTOR_TRACING_SAMPLE_RATIO": "0.5", "DISTRIBUTOR_TRACING_ENDPOINT": "http://localhost:4318"}
    assert resolve(None, env, analyzers, {}).tracing.endpoint == "http://localhost:4318"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"sample_ratio": 1.5, "endpoint": "http://127.0.0.1:4318"}, "tracing.sample_ratio"),
        ({"sample_ratio": -0.1, "endpoint": "http://127.0.0.1:4318"}, "tracing.sample_ratio"),
        ({"sample_ratio": 0.1}, "tracing.endpoint: required"),
        ({"endpoint": "ftp://127.0.0.1:4318"}, "tracing.endpoint"),
        ({"endpoint": "http://169.254.169.254/"}, "link-local"),
        ({"endpoint": "http://127.0.0.1:9091"}, "admin_listen")]
    for tracing, message in bad:
        with pytest.raises(ConfigError, match=message):
            resolve(None, {}, analyzers, {"tracing": tracing})
    with pytest.raises(ConfigError, match="outside admin.allowed_analyzer_networks"):
        resolve(None, {}, analyzers, {"tracing": {"endpoint": "http://10.1.2.3:4318"},
                                      "admin": {"allowed_analyzer_networks": ["127.0.0.0/8"]}})


def test_tracing_is_off_without_a_ratio_or_an_endpoint() -> None:
    assert configure(0.0, "http://127.0.0.1:4318", 0) is None
    assert configure(0.5, "", 0) is None


@pytest.mark.parametrize("traceparent, sampled", [
    (None, True), (f"00-{TRACE_ID}-{PARENT_ID}-01", True), (f"00-{TRACE_ID}-{PARENT_ID}-00", False),
    (f"00-{TRACE_ID}-{PARENT_ID}-02", False), (f"00-{TRACE_ID}-{PARENT_ID}-03", True),
    ("garbage", True), (f"00-{'0' * 32}-{PARENT_ID}-01", True), (f"01-{TRACE_ID}-{PARENT_ID}-00-future", False),
    (f"00-{'0' * 32}-{PARENT_ID}-00", False)])  # by its flags alone (the fast path): invalid ids are not looked at
def test_the_sampling_decision(traceparent: str | None, sampled: bool) -> None:
    """At ratio 1: only a valid traceparent with its flag off is not sampled; a malformed one is ignored."""
    tracer = configure(1.0, "http://127.0.0.1:9", 0)
    assert tracer is not None
    headers = {} if traceparent is None else {b"traceparent": traceparent.encode()}
    parent = tracer.sample(headers.get)
    assert (parent is not None) == sampled
    if parent is not None and traceparent is not None and traceparent.startswith(f"00-{TRACE_ID}"):
        assert format(get_current_span(parent).get_span_context().span_id, "016x") == PARENT_ID
