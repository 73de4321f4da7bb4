"""The data-port application: the hot path of the distributor.

read request -> (inflate) -> parse with orjson -> validate -> admit (rate limit,
shed, log, route) -> enqueue the raw bytes -> answer. Everything here is
synchronous and allocation-light; the counters it bumps are cells of this
worker's row in the shared table. ``POST /ingest/batch`` (``batch.py``) admits
each line of an NDJSON body the same way, ``POST /v1/logs`` (``otlp.py``) each
OTLP ResourceLogs. With tracing on, a sampled request runs through ``_traced``;
an unsampled one, or any with tracing off, pays one attribute check per request
and one per admitted packet.
"""

from __future__ import annotations

from bisect import bisect_left
from functools import partial
from time import monotonic, perf_counter_ns

import orjson

from distributor.cgroup import release_free_memory
from distributor.config import Config
from distributor.ingest.batch import handle_batch
from distributor.ingest.contract import EMITTER_HEADER, ContractError, PacketInfo, claimed_emitter, parse_packet
from distributor.ingest.encoding import BodyError, decoded_body
from distributor.ingest.http11 import Pending, Request, Response, json_error
from distributor.ingest.otlp import OTLP_PATH, error_response, handle_otlp
from distributor.ingest.overload import LoopLagGuard
from distributor.ingest.ratelimit import RateLimiter
from distributor.ingest.refusal import Refusal, invalid
from distributor.delivery.routing import NO_ANALYZER, Router
from distributor.delivery.queue import NO_REF, PacketQueue, QueueTotals
from distributor.delivery.sender import AnalyzerSender
from distributor.tracing import RequestTrace, configure
from distributor.wal.log import WorkerLog
from distributor.shared_table import (
    C_NET_ROUTED_MESSAGES,
    C_ROUTED_MESSAGES,
    C_ROUTED_PACKETS,
    H_MEMORY_PRESSURE,
    LATENCY_BUCKETS,
    W_ACCEPTED,
    W_LATENCY_BUCKETS,
    W_LAG_SHED,
    W_LATENCY_SUM_NS,
    W_RATE_LIMITED,
    W_REJECTED_INVALID,
    W_REJECTED_UNAVAILABLE,
    W_REQUESTS,
    W_SHED,
    W_WAL_UNAVAILABLE_PACKETS,
    SharedTable,
)

INGEST_PATH = b"/ingest"
BATCH_PATH = b"/ingest/batch"
HEALTH_PATH = b"/healthz"
PACKET_PATHS = (INGEST_PATH, BATCH_PATH, OTLP_PATH)
_ALLOW_POST = ((b"allow", b"POST"),)
_ALLOW_GET = ((b"allow", b"GET, HEAD"),)
# under memory pressure, the heap is handed back to the kernel each time the queues shrank by this much: about
# 1 ms of the event loop per MiB released, so each step stays under ingest.max_loop_lag's default
TRIM_STEP = 16 << 20
_HEALTHY = Response(200, b'{"status":"ok"}')
_BUCKET_BOUNDS_NS = tuple(bound * 1e9 for bound in LATENCY_BUCKETS[:-1])


class IngestApp:
    """HttpApp for ``POST /ingest``, ``POST /ingest/batch``, ``POST /v1/logs`` and ``GET /healthz``."""

    def __init__(self, config: Config, router: Router, table: SharedTable, worker_slot: int) -> None:
        self.max_messages = config.ingest.max_messages_per_packet
        self.max_body_bytes = config.ingest.max_body_bytes
        self.max_batch_packets = config.ingest.max_batch_packets
        self.max_otlp_records = config.ingest.max_otlp_records
        self._retry_after = config.ingest.retry_after
        self._max_retry_after = config.overload.max_retry_after
        capacity = config.queue.worker_max_bytes
        self._capacity = capacity
        self._watermarks = {
            "low": capacity * config.overload.low_priority_watermark,
            "normal": capacity * config.overload.normal_priority_watermark,
            "high": float(capacity),
        }
        self._shed_at = self._watermarks
        self.memory_pressure = False
        self._trimmed_at = 0  # queued bytes at the last release of free memory (under memory pressure)
        self.totals = QueueTotals()
        self.drain_rate = 0.0  # bytes/s leaving this worker's queues, kept current by the worker
        self.limiter = RateLimiter(table, worker_slot, config.rate_limit)
        self.guard = LoopLagGuard(config.ingest.max_loop_lag)
        self._lag_refusal = json_error(503, "overloaded", "the worker's CPU is saturated; retry later",
                                       config.ingest.retry_after)
        self._router = router
        self.ints = table.ints
        self.row = table.worker_base(worker_slot)
        self._counter_base = table.counter_index(worker_slot, 0, 0)
        self._counter_stride = table.counter_index(worker_slot, 1, 0) - self._counter_base
        # indexed by analyzer slot; None for slots this worker does not serve
        self.queues: list[PacketQueue | None] = [None] * table.max_analyzers
        self.senders: list[AnalyzerSender | None] = [None] * table.max_analyzers
        self.wal: WorkerLog | None = None  # set by the worker when the write-ahead log is on
        self._turn_number = -1  # the log turn that self._turn's answers wait for
        self._turn: list[tuple[Pending, Response, int]] = []
        self.tracer = configure(config.tracing.sample_ratio, config.tracing.endpoint, worker_slot)
        self.trace: RequestTrace | None = None  # the sampled request being handled, if any

    def preflight(self, method: bytes, path: bytes, content_length: int | None) -> Response | None:
        if path in PACKET_PATHS:
            if method == b"POST":
                return None
            return _with_headers(json_error(405, "method_not_allowed", f"use POST {path.decode()}"), _ALLOW_POST)
        if path == HEALTH_PATH:
            if method in (b"GET", b"HEAD"):
                return None
            return _with_headers(json_error(405, "method_not_allowed", "use GET /healthz"), _ALLOW_GET)
        return json_error(404, "not_found", f"no route for {path.decode('latin-1')}; packets go to POST /ingest "
                          "or POST /ingest/batch, OTLP logs to POST /v1/logs")

    def handle(self, request: Request) -> Response | Pending:
        path = request.path
        if path == HEALTH_PATH:
            return _HEALTHY
        if self.guard.share and self.guard.refuse():  # the CPU is saturated: the cheapest answer, before parsing
            self.ints[self.row + W_LAG_SHED] += 1
            return self._lag_refusal
        if self.tracer is not None and self.trace is None:  # the one check when tracing is off
            parent = self.tracer.sample(request.header)
            if parent is not None:
                return self._traced(request, self.tracer.trace(path.decode("latin-1"), parent, path == INGEST_PATH))
        started = perf_counter_ns()
        ints, row = self.ints, self.row
        ints[row + W_REQUESTS] += 1
        try:
            body = decoded_body(request.body, request.header(b"content-encoding"), self.max_body_bytes)
        except BodyError as exc:
            response: Response | Pending = error_response(request, exc.response) if path == OTLP_PATH else exc.response
        else:
            if path == INGEST_PATH:
                response = self._single(request, body)
            elif path == BATCH_PATH:
                response = handle_batch(self, request, body)
            else:
                response = handle_otlp(self, request, body)
        elapsed = perf_counter_ns() - started
        ints[row + W_LATENCY_SUM_NS] += elapsed
        ints[row + W_LATENCY_BUCKETS + bisect_left(_BUCKET_BOUNDS_NS, elapsed)] += 1
        return response

    def _traced(self, request: Request, trace: RequestTrace) -> Response | Pending:
        """A sampled request: handled as any other, its packets and answer recorded on its spans."""
        self.trace = trace
        status = 500  # what the server answers if handling raises
        try:
            response = self.handle(request)
            status = response.status if isinstance(response, Response) else 0  # 0: answered once durable
            return response
        finally:
            self.trace = None
            trace.finish(status)

    def _single(self, request: Request, body: bytes) -> Response | Pending:
        """``POST /ingest``: one packet; 202, or the refusal as the answer."""
        try:
            packet = parse_packet(body, self.max_messages)
        except ContractError as exc:
            self.ints[self.row + W_REJECTED_INVALID] += 1
            refusal = invalid(exc)
            return Response(exc.status, orjson.dumps({"error": refusal.error, "detail": refusal.detail,
                                                      "field": exc.field}))
        refused = self.admit(body, packet, claimed_emitter(request.header(EMITTER_HEADER)))
        if refused is not None:
            if self.trace is not None:
                self.trace.packet(None, packet, "", refused.error)
            return refused.response()
        accepted = Response(202, orjson.dumps({"status": "accepted", "packet_id": packet.packet_id}))
        return self.answer(request, accepted, 1)

    def admit(self, raw: bytes, packet: PacketInfo, claimed: str | None) -> Refusal | None:
        """Check the request's X-Emitter-Id claim, rate limit, shed, log and route one valid packet; None once it
        is queued (and in the log)."""
        ints, row = self.ints, self.row
        if claimed is not None and claimed != packet.emitter_id:
            ints[row + W_REJECTED_INVALID] += 1
            return Refusal(400, "emitter_mismatch", f"emitter_id {packet.emitter_id!r} does not match the "
                           f"X-Emitter-Id header {claimed!r}")
        if self.limiter.enabled:
            wait = self.limiter.admit(packet.emitter_id, monotonic())
            if wait:
                ints[row + W_RATE_LIMITED] += 1
                return Refusal(429, "rate_limited", f"emitter {packet.emitter_id!r} is over its rate limit", wait)
        size = len(raw)
        if ints[H_MEMORY_PRESSURE] != self.memory_pressure:  # the supervisor's flag at once, not at the next beat
            self.set_memory_pressure(bool(ints[H_MEMORY_PRESSURE]))
        if self.totals.bytes + size > self._shed_at[packet.priority]:
            ints[row + W_SHED] += 1
            why = "the host's memory is under pressure" if self.memory_pressure else (
                f"queues are full for {packet.priority} priority packets")
            return Refusal(503, "overloaded", f"{why}; retry later", self.overload_retry_after())
        wal = self.wal
        if wal is not None and not wal.available:
            ints[row + W_WAL_UNAVAILABLE_PACKETS] += 1
            return Refusal(503, "wal_unavailable", f"the write-ahead log cannot take packets now "
                           f"({wal.unavailable_reason}); retry later", self._retry_after)
        slot = self._choose(size, packet.messages)
        if slot == NO_ANALYZER:
            ints[row + W_REJECTED_UNAVAILABLE] += 1
            retry_after = self.overload_retry_after() if self._router.slots else self._retry_after
            return Refusal(503, "no_capacity", "no analyzer can take the packet now; retry later", retry_after)
        self.enqueue(slot, raw, packet.messages, NO_REF if wal is None else wal.append(raw, packet.messages))
        if self.trace is not None:
            self.trace.packet(raw, packet, self.senders[slot].name, "accepted")  # type: ignore[union-attr]
        return None

    def answer(self, request: Request, response: Response, accepted: int) -> Response | Pending:
        """Answer a request whose ``accepted`` packets were admitted: now, or once the log holds them.

        With the log on, the answer leaves when the log holds the packets as its sync mode promises
        (one callback per log turn, shared by every answer of the turn). If the log's write or fsync
        fails, the answer is 503 ``wal_unavailable``: nothing is answered 202 that was not written. The
        packets, already queued, are still delivered (the emitter's retry is then a duplicate the
        analyzers' idempotency absorbs).
        """
        wal = self.wal
        if wal is None or not accepted:
            self.ints[self.row + W_ACCEPTED] += accepted
            return response
        pending = request.defer()
        if self._turn_number != wal.turns:
            self._turn_number = wal.turns
            self._turn = []
            wal.when_durable(partial(self._settle, self._turn))
        self._turn.append((pending, response, accepted))
        return pending

    def _settle(self, turn: list[tuple[Pending, Response, int]], ok: bool) -> None:
        ints, row = self.ints, self.row
        if ok:
            for pending, response, accepted in turn:
                ints[row + W_ACCEPTED] += accepted
                pending.answer(response)
            return
        refused = json_error(503, "wal_unavailable", "the write-ahead log could not store the packets; retry later",
                             self._retry_after)
        for pending, _, accepted in turn:
            ints[row + W_WAL_UNAVAILABLE_PACKETS] += accepted
            pending.answer(refused)

    def _choose(self, size: int, messages: int) -> int:
        queues = self.queues
        return self._router.choose(messages, lambda s: queues[s].has_room(size))  # type: ignore[union-attr]

    def place(self, raw: bytes, messages: int, ref: int) -> bool:
        """Route and enqueue an accepted packet (replay); False when no analyzer has room now."""
        slot = self._choose(len(raw), messages)
        if slot == NO_ANALYZER:
            return False
        self.enqueue(slot, raw, messages, ref)
        return True

    @property
    def queued_bytes(self) -> int:
        return self.totals.bytes

    def enqueue(self, slot: int, raw: bytes, messages: int, ref: int) -> None:
        """Put a packet in an analyzer's queue and count it as routed there (ingest, failover, replay)."""
        self.queues[slot].put(raw, messages, ref)  # type: ignore[union-attr]
        self.senders[slot].notify()  # type: ignore[union-attr]
        ints = self.ints
        cell = self._counter_base + slot * self._counter_stride
        ints[cell + C_ROUTED_MESSAGES] += messages
        ints[cell + C_ROUTED_PACKETS] += 1
        ints[cell + C_NET_ROUTED_MESSAGES] += messages

    def set_memory_pressure(self, pressed: bool) -> None:
        """Under the cgroup's memory pressure queues stop growing: low and normal priority packets are shed,
        high priority ones only while the queues are not above what they hold now.

        Called at every heartbeat (and at admission when the flag changed). While pressed, the memory of packets
        that left the queues is given back to the kernel when the pressure starts, then every TRIM_STEP bytes
        the queues shrank, and once they are empty: glibc would keep it, the cgroup's anonymous memory would stay
        above the watermark after the queues drained, and the pressure (503 for all but high priority) would
        never end.
        """
        queued = self.totals.bytes
        if pressed != self.memory_pressure:
            self.memory_pressure = pressed
            self._shed_at = {"low": 0.0, "normal": 0.0, "high": float(queued)} if pressed else self._watermarks
            if pressed:  # what earlier drains left in the heap counts toward the pressure too
                release_free_memory()
                self._trimmed_at = queued
        elif pressed:
            if queued <= self._trimmed_at - TRIM_STEP or queued == 0 < self._trimmed_at:  # a step, or the rest
                release_free_memory()
                self._trimmed_at = queued
            elif queued > self._trimmed_at:
                self._trimmed_at = queued

    def overload_retry_after(self) -> float:
        """Seconds until the queues should be back under the low watermark at the current drain rate."""
        excess = self.totals.bytes - self._watermarks["low"] * 0.9
        if excess <= 0:
            return self._retry_after
        if self.drain_rate <= 0:
            return self._max_retry_after
        return min(max(excess / self.drain_rate, self._retry_after), self._max_retry_after)


def _with_headers(response: Response, headers: tuple[tuple[bytes, bytes], ...]) -> Response:
    return response._replace(headers=response.headers + headers)
