"""Built-in emitter load generator: realistic log packets over raw HTTP/1.1 keep-alive.

Used by ``./run.sh`` (live table), the end-to-end tests and the benchmark, which
must saturate the distributor from a single process. So the hot path does no
per-packet JSON serialization (message arrays are pre-serialized pools, packets
are assembled as bytes) and no HTTP client library (one ``asyncio.Protocol`` per
connection, responses parsed by httptools).

A request carries one packet (``POST /ingest``) or, with ``batch``, that many
NDJSON lines (``POST /ingest/batch``; accepted packets are counted from the
answer's ``accepted`` and ``rejected`` lines), optionally gzip or zstd. With
``emitter_header`` every request carries ``X-Emitter-Id: <its packets'
emitter_id>``, what a load balancer shards on (``deploy/haproxy``); a batch's
lines then all come from one emitter.

Two modes: closed loop (``rate=None``: each connection sends its next request as
soon as the previous is answered) and open loop (``rate``: requests have fixed
scheduled send times and latency is measured from the *scheduled* time, so a
stalled server shows up as latency instead of being hidden by coordinated
omission). Service time, from the actual write, is kept beside it: the
difference is the generator's own lateness (libuv timers tick in whole
milliseconds), which the server did not cause.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop

from distributor.delivery.compression import COMPRESSORS
from distributor.tools.latency import LatencyHistogram

REQUEST_TIMEOUT = 5.0  # seconds; an unanswered request past this is an error
DRAIN_TIMEOUT = 5.0  # seconds to wait for in-flight answers after `duration`
RETRY_AFTER_CAP = 1.0
POOL_PER_SIZE = 64  # distinct pre-serialized message arrays per packet size
CYCLE = 4096  # length of the pre-drawn size/priority sequences

# --------------------------------------------------------------------------- spec and stats


@dataclass(frozen=True)
class LoadSpec:
    """What load to offer; see the module docstring for closed vs. open loop."""

    url: str
    duration: float
    connections: int = 64
    rate: float | None = None
    sizes: tuple[tuple[int, float], ...] = ((5, 0.5), (20, 0.5))
    emitters: int = 1000
    priorities: tuple[tuple[str, float], ...] = ()
    honour_retry_after: bool = False
    record_accepted: bool = False
    emitter_prefix: str = "agent"       # emitter ids are <prefix>-<n>: separate loads, separate emitters
    batch: int = 0                      # packets per request to POST /ingest/batch (0: one packet per POST /ingest)
    encoding: str = ""                  # "gzip" or "zstd" request bodies (empty: plain)
    emitter_header: bool = False        # send X-Emitter-Id (a batch's lines then share one emitter)


@dataclass
class LoadStats:
    """Live counters, mutated by the run on its event loop; readers take ``snapshot()``."""

    sent: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    accepted_packets: int = 0
    accepted_messages: int = 0
    errors: int = 0  # connect failures, connections lost mid-request, timeouts
    timeouts: int = 0  # the subset of errors that were per-request timeouts
    reconnects: int = 0  # connections re-opened after the previous one closed
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # open loop: from the scheduled time
    service: LatencyHistogram = field(default_factory=LatencyHistogram)  # from the write: excludes own timer lag
    accepted: list[tuple[str, str, int]] = field(default_factory=list)
    started: float = 0.0  # time.monotonic() at start of load
    finished: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        """Plain numbers (by_status keyed by int) for printing or JSON."""
        end = self.finished or time.monotonic()
        return {
            "sent": self.sent,
            "by_status": dict(self.by_status),
            "accepted_packets": self.accepted_packets,
            "accepted_messages": self.accepted_messages,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "reconnects": self.reconnects,
            "elapsed": max(0.0, end - self.started) if self.started else 0.0,
            "latency_ms": self.latency.summary_ms(),
            "service_ms": self.service.summary_ms(),
        }


# --------------------------------------------------------------------------- packets

_LEVELS = (("DEBUG", 0.15), ("INFO", 0.70), ("WARN", 0.10), ("ERROR", 0.05))
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "DEBUG": (
        "cache lookup key=session:{hex} hit={bool}",
        "parsed request headers in {us}us",
        "connection pool stats active={n} idle={n2}",
    ),
    "INFO": (
        "user {user} login ok",
        "GET /api/v1/orders/{id} 200 in {ms}ms",
        "POST /api/v1/checkout 201 in {ms}ms",
        "payment {id} authorized amount={amount} EUR",
        "job {hex} finished in {ms}ms, {n} items",
        "user {user} logout",
    ),
    "WARN": (
        "slow query on orders took {ms}ms rows={n}",
        "retrying call to {service} (attempt {attempt})",
        "rate limit at 80% for client {hex}",
    ),
    "ERROR": (
        "upstream {service} timed out after {ms}ms",
        "failed to publish event {hex}: connection reset by peer",
        "payment {id} declined: insufficient funds",
    ),
}
_SERVICES = ("auth", "orders", "payments", "search", "gateway", "inventory", "notifications")


def log_message(rng: random.Random, now_ms: int) -> dict[str, Any]:
    """One realistic log message (level mix, templates, metadata); shared with the locust emitters."""
    level = rng.choices([lv for lv, _ in _LEVELS], [w for _, w in _LEVELS])[0]
    service = rng.choice(_SERVICES)
    text = rng.choice(_TEMPLATES[level]).format(
        hex=f"{rng.getrandbits(32):08x}", bool=rng.random() < 0.8, us=rng.randint(3, 900),
        n=rng.randint(1, 500), n2=rng.randint(0, 64), user=f"u{rng.randint(1, 99999)}",
        id=rng.randint(100000, 999999), ms=int(rng.lognormvariate(3.0, 1.0)) + 1,
        amount=f"{rng.uniform(1, 500):.2f}", service=rng.choice(_SERVICES), attempt=rng.randint(2, 5),
    )
    return {
        "timestamp": now_ms - rng.randint(0, 2000),
        "level": level,
        "message": text,
        "metadata": {"service": service, "host": f"{service}-{rng.randint(1, 12)}",
                     "request_id": f"{rng.getrandbits(64):016x}"},
    }


class PacketFactory:
    """Assembles packet bodies as bytes from pools pre-serialized at start-up.

    packet_id = ``<emitter_id>-<run nonce>-<sequence>``: the nonce keeps ids unique
    across runs against the same (deduplicating) analyzers.
    """

    def __init__(self, sizes: tuple[tuple[int, float], ...], emitters: int,
                 priorities: tuple[tuple[str, float], ...] = (), seed: int | None = None,
                 emitter_prefix: str = "agent") -> None:
        if not sizes or any(n < 1 or p < 0 for n, p in sizes) or sum(p for _, p in sizes) <= 0:
            raise ValueError(f"bad sizes {sizes!r}: need (messages >= 1, probability >= 0) pairs")
        if emitters < 1:
            raise ValueError("emitters must be >= 1")
        rng = random.Random(seed)
        now_ms = int(time.time() * 1000)
        nonce = os.urandom(3).hex().encode()
        self.emitters = emitters
        self.emitter_ids = [f"{emitter_prefix}-{i}" for i in range(emitters)]
        self._prefixes = [b'{"emitter_id":"%s","packet_id":"%s-%s-' % (e.encode(), e.encode(), nonce)
                          for e in self.emitter_ids]
        self.nonce = nonce.decode()
        pools = {n: [b'","messages":' + orjson.dumps([log_message(rng, now_ms) for _ in range(n)])
                     for _ in range(POOL_PER_SIZE)] for n, _ in sizes}
        drawn = rng.choices([n for n, _ in sizes], [p for _, p in sizes], k=CYCLE)
        self._sizes = drawn
        self._arrays = [pools[n][i % POOL_PER_SIZE] for i, n in enumerate(drawn)]
        if priorities:
            names = rng.choices([name for name, _ in priorities], [p for _, p in priorities], k=CYCLE)
            self._tails = [b',"priority":%s}' % orjson.dumps(name) for name in names]
        else:
            self._tails = [b"}"] * CYCLE
        self._counter = 0
        self._emitter_seqs = [0] * emitters
        self._turn = 0

    def next_from(self, emitter: int) -> tuple[bytes, int, int, int]:
        """Like ``next`` for a given emitter (its own sequence); a run uses either this or ``next``, never both."""
        seq = self._emitter_seqs[emitter]
        self._emitter_seqs[emitter] = seq + 1
        j = self._counter % CYCLE
        self._counter += 1
        body = b"".join((self._prefixes[emitter], b"%06d" % seq, self._arrays[j], self._tails[j]))
        return body, emitter, seq, self._sizes[j]

    def next_request(self, packets: int) -> list[tuple[bytes, int, int, int]]:
        """The packets of one request that all come from one emitter (emitters take turns)."""
        emitter = self._turn % self.emitters
        self._turn += 1
        return [self.next_from(emitter) for _ in range(packets)]

    def next(self) -> tuple[bytes, int, int, int]:
        """(body, emitter index, sequence, message count) of the next packet."""
        k = self._counter
        self._counter = k + 1
        emitter, seq = k % self.emitters, k // self.emitters
        j = k % CYCLE
        body = b"".join((self._prefixes[emitter], b"%06d" % seq, self._arrays[j], self._tails[j]))
        return body, emitter, seq, self._sizes[j]

    def packet_id(self, emitter: int, seq: int) -> str:
        return f"{self.emitter_ids[emitter]}-{self.nonce}-{seq:06d}"


# --------------------------------------------------------------------------- HTTP/1.1


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; the answer resolves ``waiter``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.retry_after: bytes | None = None
        self.body: list[bytes] | None = None  # the answer's body, kept only when asked for (batch answers)
        self.sent_at = 0.0
        self._closed = False
        self.timed_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        """Closed by either side. The transport counts too: uvloop closes it when it reads a reset (maybe with
        the last answer, whose waiter then wakes its task first) before ``connection_lost`` runs, and a write
        on it raises RuntimeError instead of failing like a lost connection."""
        return self._closed or self.transport is None or self.transport.is_closing()

    def request(self, data: bytes, keep_body: bool = False) -> asyncio.Future[int]:
        self.retry_after = None
        self.body = [] if keep_body else None
        self.waiter = waiter = self.loop.create_future()
        self.sent_at = time.monotonic()
        self.transport.write(data)  # type: ignore[union-attr]
        return waiter

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 11 and name.lower() == b"retry-after":
            self.retry_after = value

    def on_body(self, data: bytes) -> None:
        if self.body is not None:
            self.body.append(data)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.close()  # the server will close it; never send on it again
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.timed_out:
            self._fail(TimeoutError(f"no answer within {REQUEST_TIMEOUT} s"))
        else:
            self._fail(ConnectionError(f"connection closed by the server: {exc}"))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self, abort: bool = False) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort() if abort else self.transport.close()


def _rejected_lines(body: list[bytes] | None) -> set[int]:
    """The line numbers a batch answer refused (the rest were accepted)."""
    answer = orjson.loads(b"".join(body or ()))
    return {item["line"] for item in answer["rejected"]}


def _retry_after_seconds(value: bytes | None) -> float:
    if not value:
        return 0.0
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_CAP)
    except ValueError:
        return RETRY_AFTER_CAP  # an HTTP-date: just back off the maximum


# --------------------------------------------------------------------------- the run


class _Run:
    """State of one run_load: workers (one per connection) share the factory and the stats."""

    def __init__(self, spec: LoadSpec, stats: LoadStats) -> None:
        url = urlsplit(spec.url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"only http:// URLs are supported, got {spec.url!r}")
        if spec.connections < 1 or spec.duration < 0 or (spec.rate is not None and spec.rate <= 0):
            raise ValueError("need connections >= 1, duration >= 0 and rate > 0 (or None)")
        self.spec = spec
        self.stats = stats
        self.host = url.hostname
        self.port = url.port or 80
        path = url.path or "/"
        if spec.batch and path.rstrip("/").endswith("/ingest"):
            path = path.rstrip("/") + "/batch"
        path += f"?{url.query}" if url.query else ""
        if spec.encoding not in ("", "gzip", "zstd"):
            raise ValueError(f"encoding must be gzip or zstd, got {spec.encoding!r}")
        self.compress = COMPRESSORS[spec.encoding] if spec.encoding else None
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: "
                     + ("application/x-ndjson" if spec.batch else "application/json")
                     + (f"\r\nContent-Encoding: {spec.encoding}" if spec.encoding else "")
                     + "\r\nContent-Length: ").encode()
        self.factory = PacketFactory(spec.sizes, spec.emitters, spec.priorities, emitter_prefix=spec.emitter_prefix)
        # per emitter, the head with its X-Emitter-Id line (ids are ASCII: <prefix>-<n>)
        self.emitter_heads = [self.head.replace(b"\r\nContent-Length: ", b"\r\nX-Emitter-Id: %s\r\nContent-Length: "
                                                % emitter.encode()) for emitter in self.factory.emitter_ids
                              ] if spec.emitter_header else []
        self.loop = asyncio.get_running_loop()
        self.interval = 1.0 / spec.rate if spec.rate else 0.0
        self.next_slot = 0
        self.start = self.end = 0.0
        self.live: set[_Connection] = set()

    async def _connect(self) -> _Connection | None:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self.loop), self.host, self.port),
                REQUEST_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            self.stats.errors += 1
            return None
        self.live.add(conn)
        return conn

    async def worker(self, conn: _Connection | None) -> None:
        stats, spec, factory, head = self.stats, self.spec, self.factory, self.head
        record, honour, open_loop = spec.record_accepted, spec.honour_retry_after, spec.rate is not None
        monotonic, sleep = time.monotonic, asyncio.sleep
        opened = 0 if conn is None else 1
        while True:
            if open_loop:
                slot = self.next_slot
                self.next_slot = slot + 1
                begin = self.start + slot * self.interval
                if begin >= self.end:
                    break
                now = monotonic()
                if now >= self.end:  # backlog of an overloaded run: stop starting requests at duration
                    break
                if begin > now:
                    await sleep(begin - now)
            else:
                begin = monotonic()
                if begin >= self.end:
                    break
            if conn is None or conn.closed:
                if conn is not None:
                    self.live.discard(conn)
                conn = await self._connect()
                if conn is None:
                    if not open_loop:  # don't spin on a refused port
                        await sleep(min(0.01, max(0.0, self.end - monotonic())))
                    continue
                opened += 1
                if opened > 1:
                    stats.reconnects += 1
                if not open_loop:
                    begin = monotonic()
            if spec.emitter_header:
                lines = factory.next_request(spec.batch or 1)
                head = self.emitter_heads[lines[0][1]]
            else:
                lines = [factory.next() for _ in range(spec.batch or 1)]
            body = b"\n".join(line[0] for line in lines) if spec.batch else lines[0][0]
            if self.compress is not None:
                body = self.compress(body)
            if conn.closed:  # reset between the handshake and now (e.g. its server was killed): an error, no write
                stats.errors += 1
                continue
            waiter = conn.request(b"".join((head, b"%d\r\n\r\n" % len(body), body)), keep_body=bool(spec.batch))
            stats.sent += 1
            try:
                status = await waiter
            except TimeoutError:
                stats.errors += 1
                stats.timeouts += 1
                continue
            except ConnectionError:
                stats.errors += 1
                continue
            now = monotonic()
            stats.latency.record(now - begin)
            stats.service.record(now - conn.sent_at)
            by_status = stats.by_status
            by_status[status] = by_status.get(status, 0) + 1
            if status == 202 or (status == 200 and spec.batch):
                rejected = _rejected_lines(conn.body) if spec.batch else set()
                for index, (_, emitter, seq, n) in enumerate(lines):
                    if index in rejected:
                        continue
                    stats.accepted_packets += 1
                    stats.accepted_messages += n
                    if record:
                        stats.accepted.append((factory.emitter_ids[emitter], factory.packet_id(emitter, seq), n))
            elif honour and (status == 429 or status == 503):
                wait = _retry_after_seconds(conn.retry_after)
                if now + wait >= self.end:
                    break  # (timers may fire a hair early: don't sneak in one more request)
                if wait > 0:
                    await sleep(wait)
        if conn is not None:
            conn.close()
            self.live.discard(conn)

    async def watchdog(self) -> None:
        """Abort connections whose request is older than REQUEST_TIMEOUT: no per-request timer cost."""
        while True:
            await asyncio.sleep(0.1)
            deadline = time.monotonic() - REQUEST_TIMEOUT
            for conn in list(self.live):
                if conn.waiter is not None and conn.sent_at < deadline and not conn.closed:
                    conn.timed_out = True
                    conn.close(abort=True)

    async def run(self) -> None:
        # connect first, so that the open-loop schedule does not start with a connect-time backlog
        conns = await asyncio.gather(*(self._connect() for _ in range(self.spec.connections)))
        self.start = self.stats.started = time.monotonic()
        self.end = self.start + self.spec.duration
        watchdog = asyncio.create_task(self.watchdog())
        workers = [asyncio.create_task(self.worker(conn)) for conn in conns]
        try:
            _, pending = await asyncio.wait(workers, timeout=self.spec.duration + DRAIN_TIMEOUT + 0.5)
            for task in pending:  # answers still missing after the drain window: give up on them
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        finally:
            for task in workers:
                task.cancel()
            watchdog.cancel()
            for conn in list(self.live):
                conn.close(abort=True)
            self.live.clear()
            self.stats.finished = time.monotonic()
        for task in workers:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def run_load(spec: LoadSpec, stats: LoadStats | None = None) -> LoadStats:
    """Offer the load described by spec until spec.duration has passed; return the (live) stats."""
    stats = stats if stats is not None else LoadStats()
    await _Run(spec, stats).run()
    return stats


# --------------------------------------------------------------------------- CLI


def _pairs(text: str, cast: type) -> tuple[tuple[Any, float], ...]:
    """'5:0.5,20:0.5' -> ((5, 0.5), (20, 0.5))."""
    try:
        return tuple((cast(k), float(p)) for k, p in (item.split(":") for item in text.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected VALUE:PROBABILITY[,...], got {text!r}") from None


def summary(stats: LoadStats) -> dict[str, Any]:
    """The snapshot plus rates over the elapsed time."""
    snap = stats.snapshot()
    elapsed = snap["elapsed"] or 1e-9
    snap["packets_per_s"] = snap["accepted_packets"] / elapsed
    snap["messages_per_s"] = snap["accepted_messages"] / elapsed
    snap["requests_per_s"] = sum(snap["by_status"].values()) / elapsed
    return snap


def main(argv: list[str] | None = None) -> int:
    """``python -m distributor.tools.emitter --url http://127.0.0.1:8080/ingest --duration 10``."""
    parser = argparse.ArgumentParser(prog="python -m distributor.tools.emitter", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/ingest")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections (default 64)")
    parser.add_argument("--rate", type=float, default=None, help="packets/s in total, open loop (default: closed loop)")
    parser.add_argument("--sizes", type=lambda s: _pairs(s, int), default=((5, 0.5), (20, 0.5)),
                        help="messages:probability list (default 5:0.5,20:0.5)")
    parser.add_argument("--emitters", type=int, default=1000, help="distinct emitter_ids (default 1000)")
    parser.add_argument("--priorities", type=lambda s: _pairs(s, str), default=(),
                        help="e.g. high:0.1,normal:0.8,low:0.1 (default: field omitted)")
    parser.add_argument("--honour-retry-after", action="store_true", help="wait Retry-After (<= 1 s) after 429/503")
    parser.add_argument("--batch", type=int, default=0, help="packets per POST /ingest/batch request (default 0: "
                        "one packet per POST /ingest)")
    parser.add_argument("--encoding", choices=("gzip", "zstd"), default="", help="compress the request bodies")
    parser.add_argument("--emitter-header", action="store_true",
                        help="send X-Emitter-Id (the packets' emitter_id) with every request, for a load balancer "
                             "that shards by emitter (deploy/haproxy); with --batch a request's lines share one emitter")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    spec = LoadSpec(url=args.url, duration=args.duration, connections=args.connections, rate=args.rate or None,
                    sizes=args.sizes, emitters=args.emitters, priorities=args.priorities,
                    honour_retry_after=args.honour_retry_after, batch=args.batch, encoding=args.encoding,
                    emitter_header=args.emitter_header)
    result = summary(uvloop.run(run_load(spec)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        lat = result["latency_ms"]
        statuses = "  ".join(f"{code}: {n}" for code, n in sorted(result["by_status"].items()))
        print(f"{result['elapsed']:.1f} s  {result['packets_per_s']:.0f} packets/s accepted  "
              f"{result['messages_per_s']:.0f} messages/s  ({result['requests_per_s']:.0f} requests/s answered)\n"
              f"status  {statuses or '-'}   errors: {result['errors']} (timeouts {result['timeouts']})  "
              f"reconnects: {result['reconnects']}\n"
              f"latency p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  p99.9 {lat['p99.9']:.2f} ms  "
              f"max {lat['max']:.2f} ms")
    return 0 if result["by_status"] else 1


if __name__ == "__main__":
    sys.exit(main())
