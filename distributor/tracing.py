"""Optional OpenTelemetry spans for a sampled fraction of ingest requests (``[tracing]``; off by default).

Two spans tell where a packet's time went: the *ingest* span of a sampled request (parse, route,
enqueue; a child span per packet for ``/ingest/batch`` and ``/v1/logs``), and the *send* span of the
analyzer request that delivered it, linked to the ingest spans of the sampled packets it carried and
announced to the analyzer in a ``traceparent`` header. Spans leave each worker through a
``BatchSpanProcessor`` (a background thread) to an OTLP/HTTP collector.

This sits in the base layer, importing nothing of the distributor, because ingest/ and delivery/
both use it and the senders are built where nothing can be handed to them: the sampled packets wait
for their send in ``sampled``, a process-wide registry (one ingest app per worker process). An
unsampled request runs only the decision (``Tracer.sample``: a header lookup, a random draw); with
tracing off nothing here runs and the SDK is not even imported.
"""

from __future__ import annotations

import atexit
import logging
import random
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer as OtelTracer

SERVICE_NAME = "log-distributor"
TRACES_PATH = "/v1/traces"
# sampled packets still waiting for the send that delivers them; beyond this the oldest lose their link
MAX_PENDING = 4096
MAX_LINKS = 128  # the SDK's default span limit: a send span links at most this many packets
# seconds a worker's exit waits for its last spans to leave: the SDK's own exit hook waits up to 30 s for the
# export thread, whose request to a collector that does not answer lasts its whole timeout (10 s), longer
# than the supervisor gives a stopping worker (graceful_timeout) before it kills it
EXIT_FLUSH_SECONDS = 1.0
# the SDK's loggers that warn, quoting the header, about a malformed traceparent or tracestate
_HEADER_LOGGERS = ("opentelemetry.trace.propagation.tracecontext", "opentelemetry.trace.span")
# the last hex digit of a version-00 traceparent ("00-<32>-<16>-<flags>", 55 bytes) when its sampled flag is off;
# such a header is not sampled without a look at its ids (an all-zero one, invalid, is not ignored then)
_UNSAMPLED_FLAGS = b"02468ace"

# id() of a sampled packet's bytes -> (those bytes, which keep the id unique while listed, the context of
# its ingest span, the tracer); filled by ingest, emptied by the send that delivers or rejects the packet;
# changed in place, never rebound: the sender holds it by name
sampled: dict[int, tuple[bytes, "SpanContext", "Tracer"]] = {}
_propagator = TraceContextTextMapPropagator()


class _Extracting(logging.Filter):
    """Drops the SDK's warnings about a request's trace headers while they are read (``Tracer.sample``).

    A malformed or over-long ``traceparent``/``tracestate`` is ignored, as W3C Trace Context says; the
    SDK would also log a warning quoting it (up to 8 KB) for every such request, a log line per request
    that any emitter can cause. Warnings logged at any other time pass.
    """

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.active


_extracting = _Extracting()


class PacketFacts(Protocol):
    """What a span says about a packet (``contract.PacketInfo`` has it)."""

    @property
    def emitter_id(self) -> str: ...

    @property
    def packet_id(self) -> str: ...

    @property
    def messages(self) -> int: ...


class Tracer:
    """A worker's tracer: decides which requests are sampled and exports their spans."""

    def __init__(self, sample_ratio: float, endpoint: str, worker_slot: int) -> None:
        # imported here: a worker with tracing off loads none of the SDK
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        self.sample_ratio = sample_ratio
        resource = Resource.create({"service.name": SERVICE_NAME,
                                    "service.instance.id": f"{socket.gethostname()}/worker-{worker_slot}"})
        # the decision is taken in sample(), before any span exists: the SDK records whatever it is given
        provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + TRACES_PATH)))
        _shut_down_at_exit(provider, EXIT_FLUSH_SECONDS)
        self.tracer: OtelTracer = provider.get_tracer("distributor")
        self._random = random.random
        for name in _HEADER_LOGGERS:
            logger = logging.getLogger(name)
            if _extracting not in logger.filters:
                logger.addFilter(_extracting)

    def sample(self, header: Callable[[bytes], bytes | None]) -> Context | None:
        """The parent of a request's trace when the request is sampled, else None: run for every request.

        A valid incoming ``traceparent`` decides (its sampled flag, W3C Trace Context) and becomes the
        parent; without one, ``sample_ratio`` of the requests are sampled as new traces. A propagated
        unsampled trace, the common header, is told from its last byte, without the SDK's 3 us parse.
        """
        traceparent = header(b"traceparent")
        if traceparent is None:
            return Context() if self._random() < self.sample_ratio else None
        if len(traceparent) == 55 and traceparent[-1] in _UNSAMPLED_FLAGS and traceparent.startswith(b"00-"):
            return None
        carrier = {"traceparent": traceparent.decode("latin-1")}
        tracestate = header(b"tracestate")
        if tracestate is not None:
            carrier["tracestate"] = tracestate.decode("latin-1")
        _extracting.active = True
        try:
            parent = _propagator.extract(carrier)
        finally:
            _extracting.active = False
        remote = get_current_span(parent).get_span_context()
        if not remote.is_valid:  # a malformed header is ignored, as W3C Trace Context says
            return Context() if self._random() < self.sample_ratio else None
        return parent if remote.trace_flags.sampled else None

    def trace(self, path: str, parent: Context, single: bool) -> RequestTrace:
        """The spans of a sampled request; ``single``: it carries one packet, whose facts go on its own span."""
        return RequestTrace(self, path, parent, single)


class RequestTrace:
    """The spans of one sampled ingest request, ended when the request is answered."""

    def __init__(self, tracer: Tracer, path: str, parent: Context, single: bool) -> None:
        self._tracer = tracer
        self._single = single
        self.span: Span = tracer.tracer.start_span(f"POST {path}", context=parent, kind=SpanKind.SERVER,
                                                   attributes={"http.request.method": "POST", "url.path": path})
        self._context = set_span_in_context(self.span)
        self._last = time.time_ns()  # a packet's child span starts where the previous one ended
        self.packets = 0

    def packet(self, raw: bytes | None, facts: PacketFacts, analyzer: str, outcome: str) -> None:
        """One packet admitted (``raw``, routed to ``analyzer``) or refused (``outcome`` says why)."""
        attributes: dict[str, str | int] = {
            "distributor.emitter_id": facts.emitter_id, "distributor.packet_id": facts.packet_id,
            "distributor.messages": facts.messages, "distributor.outcome": outcome}
        if analyzer:
            attributes["distributor.analyzer"] = analyzer
        now = time.time_ns()
        if self._single:
            span = self.span
            span.set_attributes(attributes)
        else:
            span = self._tracer.tracer.start_span("admit", context=self._context, start_time=self._last,
                                                  attributes=attributes)
            span.end(end_time=now)
        self._last = now
        if raw is not None:
            self.packets += 1
            if len(sampled) >= MAX_PENDING:
                del sampled[next(iter(sampled))]
            sampled[id(raw)] = (raw, span.get_span_context(), self._tracer)

    def finish(self, status: int) -> None:
        """End the request span; ``status`` 0: answered later, once the write-ahead log holds the packets."""
        span = self.span
        span.set_attribute("distributor.packets_accepted", self.packets)
        if status:
            span.set_attribute("http.response.status_code", status)
        else:
            span.set_attribute("distributor.answer_deferred", True)
        span.end()


class SendTrace:
    """The send span of one batch that carries sampled packets."""

    def __init__(self, tracer: Tracer, analyzer: str, batch: Sequence[tuple[bytes, int, int]],
                 links: list[Link], sampled_packets: int) -> None:
        self.span: Span = tracer.tracer.start_span(
            "send", context=Context(), kind=SpanKind.CLIENT, links=links,
            attributes={"distributor.analyzer": analyzer, "distributor.packets": len(batch),
                        "distributor.messages": sum(packet[1] for packet in batch),
                        "distributor.sampled_packets": sampled_packets})
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=set_span_in_context(self.span))
        self.traceparent = carrier["traceparent"]
        self.status = 0  # of the last attempt; 0: no answer
        self.attempts = 0

    def attempted(self, status: int) -> None:
        self.attempts += 1
        self.status = status

    def end(self, settled: Sequence[tuple[bytes, int, int]]) -> None:
        """``settled``: the packets delivered or rejected; the others (failed over, abandoned) stay listed."""
        for packet in settled:
            sampled.pop(id(packet[0]), None)
        span = self.span
        status = self.status
        outcome = "delivered" if 200 <= status < 300 else "rejected" if settled else "not_delivered"
        span.set_attributes({"distributor.outcome": outcome, "distributor.attempts": self.attempts})
        if status > 0:
            span.set_attribute("http.response.status_code", status)
        span.end()


def _shut_down_at_exit(provider: "TracerProvider", seconds: float) -> None:
    """At exit, export the spans still queued and stop, but wait at most ``seconds`` for it.

    The shutdown runs in a daemon thread (a request still waiting on the collector then does not keep
    the process alive), started now: some Python versions (3.12.1) refuse to start a thread in an exit
    hook.
    """
    start, done = threading.Event(), threading.Event()

    def shut_down() -> None:
        start.wait()
        try:
            provider.shutdown()
        finally:
            done.set()

    threading.Thread(target=shut_down, name="span-export-exit", daemon=True).start()

    def at_exit() -> None:
        start.set()
        done.wait(seconds)

    atexit.register(at_exit)


def configure(sample_ratio: float, endpoint: str, worker_slot: int) -> Tracer | None:
    """The worker's tracer, or None when tracing is off (no endpoint, or a sample ratio of 0)."""
    if sample_ratio <= 0 or not endpoint:
        return None
    return Tracer(sample_ratio, endpoint, worker_slot)


def start_send(analyzer: str, batch: Sequence[tuple[bytes, int, int]]) -> SendTrace | None:
    """A send span when the batch carries sampled packets (call it only while ``sampled`` is not empty)."""
    entries = [entry for entry in map(sampled.get, [id(packet[0]) for packet in batch]) if entry is not None]
    if not entries:
        return None
    return SendTrace(entries[0][2], analyzer, batch, [Link(entry[1]) for entry in entries[:MAX_LINKS]], len(entries))
