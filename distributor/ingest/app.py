"""The data-port application: the hot path of the distributor.

read request -> parse with orjson -> validate -> pick analyzer -> enqueue the
raw bytes -> answer. Everything here is synchronous and allocation-light; the
counters it bumps are cells of this worker's row in the shared table.
"""

from __future__ import annotations

from bisect import bisect_left
from functools import partial
from time import monotonic, perf_counter_ns

import orjson

from distributor.config import Config
from distributor.ingest.contract import ContractError, parse_packet
from distributor.ingest.http11 import Pending, Request, Response, json_error
from distributor.ingest.overload import LoopLagGuard
from distributor.ingest.ratelimit import RateLimiter
from distributor.delivery.routing import NO_ANALYZER, Router
from distributor.delivery.queue import NO_REF, PacketQueue, QueueTotals
from distributor.delivery.sender import AnalyzerSender
from distributor.wal.log import WorkerLog
from distributor.shared_table import (
    C_NET_ROUTED_MESSAGES,
    C_ROUTED_MESSAGES,
    C_ROUTED_PACKETS,
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
HEALTH_PATH = b"/healthz"
_ALLOW_POST = ((b"allow", b"POST"),)
_ALLOW_GET = ((b"allow", b"GET, HEAD"),)
_HEALTHY = Response(200, b'{"status":"ok"}')
_BUCKET_BOUNDS_NS = tuple(bound * 1e9 for bound in LATENCY_BUCKETS[:-1])


class IngestApp:
    """HttpApp for ``POST /ingest`` and ``GET /healthz``."""

    def __init__(self, config: Config, router: Router, table: SharedTable, worker_slot: int) -> None:
        self._max_messages = config.ingest.max_messages_per_packet
        self._retry_after = config.ingest.retry_after
        self._max_retry_after = config.overload.max_retry_after
        capacity = config.queue.worker_max_bytes
        self._capacity = capacity
        self._shed_at = {
            "low": capacity * config.overload.low_priority_watermark,
            "normal": capacity * config.overload.normal_priority_watermark,
            "high": float(capacity),
        }
        self.totals = QueueTotals()
        self.drain_rate = 0.0  # bytes/s leaving this worker's queues, kept current by the worker
        self.limiter = RateLimiter(table, worker_slot, config.rate_limit)
        self.guard = LoopLagGuard(config.ingest.max_loop_lag)
        self._lag_refusal = json_error(503, "overloaded", "the worker's CPU is saturated; retry later",
                                       config.ingest.retry_after)
        self._router = router
        self._ints = table.ints
        self._row = table.worker_base(worker_slot)
        self._counter_base = table.counter_index(worker_slot, 0, 0)
        self._counter_stride = table.counter_index(worker_slot, 1, 0) - self._counter_base
        # indexed by analyzer slot; None for slots this worker does not serve
        self.queues: list[PacketQueue | None] = [None] * table.max_analyzers
        self.senders: list[AnalyzerSender | None] = [None] * table.max_analyzers
        self.wal: WorkerLog | None = None  # set by the worker when the write-ahead log is on
        self._turn_number = -1  # the log turn that self._turn's answers wait for
        self._turn: list[tuple[Pending, str]] = []

    def preflight(self, method: bytes, path: bytes, content_length: int | None) -> Response | None:
        if path == INGEST_PATH:
            if method == b"POST":
                return None
            return _with_headers(json_error(405, "method_not_allowed", "use POST /ingest"), _ALLOW_POST)
        if path == HEALTH_PATH:
            if method in (b"GET", b"HEAD"):
                return None
            return _with_headers(json_error(405, "method_not_allowed", "use GET /healthz"), _ALLOW_GET)
        return json_error(404, "not_found", f"no route for {path.decode('latin-1')}; packets go to POST /ingest")

    def handle(self, request: Request) -> Response | Pending:
        if request.path == HEALTH_PATH:
            return _HEALTHY
        if self.guard.shedding:  # the CPU is saturated: the cheapest possible answer, before any parsing
            self._ints[self._row + W_LAG_SHED] += 1
            return self._lag_refusal
        started = perf_counter_ns()
        response = self._ingest(request)
        elapsed = perf_counter_ns() - started
        ints, row = self._ints, self._row
        ints[row + W_LATENCY_SUM_NS] += elapsed
        ints[row + W_LATENCY_BUCKETS + bisect_left(_BUCKET_BOUNDS_NS, elapsed)] += 1
        return response

    def _ingest(self, request: Request) -> Response | Pending:
        """Parse, validate, route, enqueue (and log): the part the latency histogram measures."""
        ints, row = self._ints, self._row
        ints[row + W_REQUESTS] += 1
        body = request.body
        try:
            packet = parse_packet(body, self._max_messages)
        except ContractError as exc:
            ints[row + W_REJECTED_INVALID] += 1
            error = "packet_too_large" if exc.status == 413 else "invalid_packet"
            payload = {"error": error, "detail": str(exc), "field": exc.field}
            return Response(exc.status, orjson.dumps(payload))
        if self.limiter.enabled:
            wait = self.limiter.admit(packet.emitter_id, monotonic())
            if wait:
                ints[row + W_RATE_LIMITED] += 1
                return json_error(429, "rate_limited", f"emitter {packet.emitter_id!r} is over its rate limit", wait)
        size = len(body)
        if self.totals.bytes + size > self._shed_at[packet.priority]:
            ints[row + W_SHED] += 1
            return json_error(503, "overloaded", f"queues are full for {packet.priority} priority packets; "
                              "retry later", self.overload_retry_after())
        wal = self.wal
        if wal is not None and not wal.available:
            ints[row + W_WAL_UNAVAILABLE_PACKETS] += 1
            return json_error(503, "wal_unavailable", f"the write-ahead log cannot take packets now "
                              f"({wal.unavailable_reason}); retry later", self._retry_after)
        slot = self._choose(size, packet.messages)
        if slot == NO_ANALYZER:
            ints[row + W_REJECTED_UNAVAILABLE] += 1
            retry_after = self.overload_retry_after() if self._router.slots else self._retry_after
            return json_error(503, "no_capacity", "no analyzer can take the packet now; retry later", retry_after)
        if wal is None:
            self.enqueue(slot, body, packet.messages, NO_REF)
            ints[row + W_ACCEPTED] += 1
            return Response(202, orjson.dumps({"status": "accepted", "packet_id": packet.packet_id}))
        self.enqueue(slot, body, packet.messages, wal.append(body, packet.messages))
        return self._answer_when_durable(request, wal, packet.packet_id)

    def _answer_when_durable(self, request: Request, wal: WorkerLog, packet_id: str) -> Pending:
        """The 202 leaves once the log holds the packet as its sync mode promises (one callback per log turn).

        If the log's write or fsync fails, the answer is 503 ``wal_unavailable``: nothing is answered 202
        that was not written. The packet, already queued, is still delivered (its emitter's retry is then
        a duplicate the analyzers' idempotency absorbs).
        """
        pending = request.defer()
        if self._turn_number != wal.turns:
            self._turn_number = wal.turns
            self._turn = []
            wal.when_durable(partial(self._settle, self._turn))
        self._turn.append((pending, packet_id))
        return pending

    def _settle(self, turn: list[tuple[Pending, str]], ok: bool) -> None:
        ints, row = self._ints, self._row
        if ok:
            ints[row + W_ACCEPTED] += len(turn)
            for pending, packet_id in turn:
                pending.answer(Response(202, orjson.dumps({"status": "accepted", "packet_id": packet_id})))
            return
        ints[row + W_WAL_UNAVAILABLE_PACKETS] += len(turn)
        refused = json_error(503, "wal_unavailable", "the write-ahead log could not store the packet; retry later",
                             self._retry_after)
        for pending, _ in turn:
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
        ints = self._ints
        cell = self._counter_base + slot * self._counter_stride
        ints[cell + C_ROUTED_MESSAGES] += messages
        ints[cell + C_ROUTED_PACKETS] += 1
        ints[cell + C_NET_ROUTED_MESSAGES] += messages

    def overload_retry_after(self) -> float:
        """Seconds until the queues should be back under the low watermark at the current drain rate."""
        excess = self.totals.bytes - self._shed_at["low"] * 0.9
        if excess <= 0:
            return self._retry_after
        if self.drain_rate <= 0:
            return self._max_retry_after
        return min(max(excess / self.drain_rate, self._retry_after), self._max_retry_after)


def _with_headers(response: Response, headers: tuple[tuple[bytes, bytes], ...]) -> Response:
    return response._replace(headers=response.headers + headers)
