"""Analyzer HTTP service (aiohttp on uvloop) and its CLI.

Endpoints:
  POST /ingest         one JSON packet
  POST /ingest/batch   NDJSON packets, optional ``X-Packet-Count`` header
  GET  /health         liveness + inflight/queue depth/latency (stallable)
  GET  /stats          counters, top entries per table; GET /stats/packets: received keys, paged
  GET|POST /control    runtime fault injection (delay_ms, error_rate, stall)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from analyzer.faults import ControlError, FaultState, Slots
from analyzer.stats import MAX_KEY_CHARS, BoundedCounts, DedupWindow, LatencyRing, PacketLog, Stats

log = logging.getLogger("analyzer")

MAX_BODY = 64 * 1024 * 1024
DEFAULT_CONCURRENCY = 64
DEFAULT_DEDUP_WINDOW = 2_000_000
DEFAULT_MAX_EMITTERS = 10_000
DEFAULT_MAX_LEVELS = 256
# A /stats/packets page: at most 10,000 keys (also the default) and about 1M
# characters of ids, so about 1 MB of JSON whatever the id lengths.
PAGE_MAX = 10_000
PAGE_MAX_CHARS = 1_000_000
SHUTDOWN_TIMEOUT_S = 5.0

Packet = tuple[str, str, list[Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Config:
    name: str = "analyzer"
    delay_ms: float = 0.0
    error_rate: float = 0.0
    stall: bool = False
    concurrency: int = DEFAULT_CONCURRENCY
    dedup_window: int = DEFAULT_DEDUP_WINDOW
    record_packets: int = DEFAULT_DEDUP_WINDOW
    max_tracked_emitters: int = DEFAULT_MAX_EMITTERS
    max_levels: int = DEFAULT_MAX_LEVELS
    sink: bool = False  # benchmark sink: count packets/messages only (see sink_ingest)


class State:
    """Everything a handler needs; one instance per app."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.name
        self.stats = Stats(
            window=DedupWindow(config.dedup_window),
            log=PacketLog(config.record_packets),
            levels=BoundedCounts(config.max_levels),
            emitters=BoundedCounts(config.max_tracked_emitters),
        )
        # In every /stats/packets cursor, so a cursor from an earlier process on
        # the same port is refused instead of silently skipping keys.
        self.run_id = secrets.token_hex(4)
        self.faults = FaultState(config.delay_ms, config.error_rate, config.stall)
        self.slots = Slots(config.concurrency)
        self.latency = LatencyRing(1024)
        self.started = time.monotonic()


STATE: web.AppKey[State] = web.AppKey("analyzer_state", State)


class BadRequest(Exception):
    """Client error; answered 400 (and counted as a rejected request on the ingest endpoints)."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """orjson-encoded response; the stdlib encoder is a hotspot under load."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": error, "detail": detail}, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's text 404/405/413 into the project's JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        detail = f"{request.method} {request.path}: {exc.text or exc.reason}"
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), detail, keep)


# ----------------------------------------------------------------- validation


def validate_packet(obj: Any, where: str) -> Packet:
    """Check the minimum the analyzer relies on; the distributor did the rest."""
    if not isinstance(obj, dict):
        raise BadRequest("invalid_packet", f"{where}: packet must be a JSON object")
    emitter_id = obj.get("emitter_id")
    packet_id = obj.get("packet_id")
    messages = obj.get("messages")
    if not isinstance(emitter_id, str):
        raise BadRequest("invalid_packet", f"{where}: emitter_id must be a string")
    if not isinstance(packet_id, str):
        raise BadRequest("invalid_packet", f"{where}: packet_id must be a string")
    if not isinstance(messages, list):
        raise BadRequest("invalid_packet", f"{where}: messages must be a list")
    check_key_length(emitter_id, packet_id, where)
    return emitter_id, packet_id, messages


def check_key_length(emitter_id: str, packet_id: str, where: str) -> None:
    """The contract's id limit: the dedup window and the packet log keep every key, so its size must be bounded."""
    if len(emitter_id) > MAX_KEY_CHARS or len(packet_id) > MAX_KEY_CHARS:
        raise BadRequest("invalid_packet", f"{where}: emitter_id and packet_id must be <= {MAX_KEY_CHARS} characters")


def parse_single(body: bytes) -> list[Packet]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("invalid_json", f"body: {exc}") from None
    return [validate_packet(obj, "body")]


def batch_lines(body: bytes, declared: str | None) -> list[bytes]:
    """The non-empty NDJSON lines, checked against ``X-Packet-Count`` when the sender declared it."""
    lines = [line for line in body.split(b"\n") if line.strip()]
    if declared is not None:
        try:
            expected = int(declared)
        except ValueError:
            raise BadRequest("invalid_header", f"X-Packet-Count is not an integer: {declared!r}") from None
        if expected != len(lines):
            raise BadRequest(
                "packet_count_mismatch",
                f"X-Packet-Count says {expected}, body has {len(lines)} non-empty lines",
            )
    return lines


def parse_batch(body: bytes, declared: str | None) -> list[Packet]:
    """Parse every NDJSON line before anything is counted (all-or-nothing)."""
    packets: list[Packet] = []
    for i, line in enumerate(batch_lines(body, declared), 1):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise BadRequest("invalid_json", f"line {i}: {exc}") from None
        packets.append(validate_packet(obj, f"line {i}"))
    return packets


def sink_ingest(stats: Stats, body: bytes, batch: bool, declared: str | None) -> tuple[int, int]:
    """Fast benchmark path: dedup and count packets and messages, nothing per level or emitter.

    Why: with 4 analyzers on the same 2 cores as the distributor, the full
    per-message counting would make the analyzers the bottleneck of a benchmark
    that means to measure the distributor. Still all-or-nothing per request.
    """
    lines = batch_lines(body, declared) if batch else [body]
    keys: list[tuple[tuple[str, str], int]] = []
    loads = orjson.loads
    for i, line in enumerate(lines, 1):
        try:
            obj = loads(line)
            key = (obj["emitter_id"], obj["packet_id"])
            messages = obj["messages"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BadRequest("invalid_packet", f"line {i}: {exc!r}") from None
        if not (isinstance(key[0], str) and isinstance(key[1], str) and isinstance(messages, list)):
            raise BadRequest("invalid_packet", f"line {i}: emitter_id, packet_id, messages have wrong types")
        check_key_length(key[0], key[1], f"line {i}")
        keys.append((key, len(messages)))
    accept = stats.accept
    accepted = total = 0
    for key, n in keys:
        if accept(key):
            accepted += 1
            total += n
    stats.packets += accepted
    stats.messages += total
    stats.duplicates += len(keys) - accepted
    return accepted, len(keys) - accepted


# ------------------------------------------------------------------- handlers


async def _ingest(request: web.Request, batch: bool) -> web.Response:
    """Shared ingest path: stall -> slot -> delay -> fault -> validate -> count."""
    state = request.app[STATE]
    start = time.monotonic()
    stats = state.stats
    stats.requests += 1
    if batch:
        stats.batches += 1
    try:
        await state.faults.wait_unstalled()
        if state.faults.closing:
            return error_response(503, "shutting_down", f"analyzer {state.name} is stopping")
        async with state.slots.hold():
            delay = state.faults.delay_ms
            if delay > 0:
                await asyncio.sleep(delay / 1000.0)
            body = await request.read()  # aiohttp inflates gzip, zstd, deflate and br bodies
            stats.bytes_received += len(body)
            stats.wire_bytes += request.content_length or 0
            stats.count_encoding(request.headers.get("Content-Encoding", "identity"))
            if state.faults.should_fail():
                stats.injected_errors += 1
                return error_response(500, "injected", f"analyzer {state.name}: injected failure")
            try:
                if state.config.sink:
                    accepted, dups = sink_ingest(stats, body, batch, request.headers.get("X-Packet-Count"))
                    return json_response({"accepted": accepted, "duplicates": dups})
                if batch:
                    packets = parse_batch(body, request.headers.get("X-Packet-Count"))
                else:
                    packets = parse_single(body)
            except BadRequest as exc:
                stats.rejected_requests += 1
                return error_response(400, exc.error, exc.detail)
            accepted, dups = stats.ingest(packets)
            return json_response({"accepted": accepted, "duplicates": dups})
    finally:
        state.latency.record(time.monotonic() - start)


async def ingest(request: web.Request) -> web.Response:
    return await _ingest(request, batch=False)


async def ingest_batch(request: web.Request) -> web.Response:
    return await _ingest(request, batch=True)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await state.faults.wait_unstalled()
    return json_response(
        {
            "status": "stopping" if state.faults.closing else "ok",
            "name": state.name,
            "inflight": state.slots.inflight,
            "queue_depth": state.slots.waiting,
            "stalled": state.faults.stalled_waiters,
            "latency_ms": state.latency.percentiles_ms(),
            "uptime_s": round(time.monotonic() - state.started, 3),
        }
    )


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(state.stats.snapshot(state.name))


def _page_params(state: State, query: Mapping[str, str]) -> tuple[int, int]:
    """``(start, limit)`` from ``?after=<cursor>&limit=<n>``; BadRequest if either is not one we handed out."""
    log = state.stats.log
    after = query.get("after")
    start = 0
    if after is not None:
        run, _, position = after.partition(".")
        if run != state.run_id or not (position.isascii() and position.isdigit()):
            raise BadRequest("invalid_cursor", f"after={after!r} is not a cursor of this analyzer process")
        start = int(position)
        if start > len(log):
            raise BadRequest("invalid_cursor", f"after={after!r} is beyond the {len(log)} recorded keys")
    text = query.get("limit", str(PAGE_MAX))
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= PAGE_MAX:
        raise BadRequest("invalid_limit", f"limit must be an integer in [1, {PAGE_MAX}], got {text!r}")
    return start, limit


async def stats_packets(request: web.Request) -> web.Response:
    """One page of received packet keys, oldest first, and the cursor of the next page.

    Paged because the whole list reached 100 MB in one body and blocked the
    event loop for a second. ``next`` is always given, so a reader can also come
    back later for keys that arrive after its last page; ``more`` says whether
    there were already more when this page was cut.
    """
    state = request.app[STATE]
    try:
        start, limit = _page_params(state, request.query)
    except BadRequest as exc:
        return error_response(400, exc.error, exc.detail)
    log = state.stats.log
    keys = log.page(start, limit, PAGE_MAX_CHARS)
    end = start + len(keys)
    return json_response({
        "packets": keys,
        "next": f"{state.run_id}.{end}",
        "more": end < len(log),
        "recorded": len(log),
        "not_recorded": log.not_recorded,
        "record_limit": log.limit,
    })


async def control_get(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].faults.snapshot())


async def control_post(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await request.read()
    try:
        update = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        return error_response(400, "invalid_json", str(exc))
    try:
        new_state = state.faults.apply(update)
    except ControlError as exc:
        return error_response(400, "invalid_control", str(exc))
    log.info("analyzer %s control -> %s", state.name, new_state)
    return json_response(new_state)


def create_app(config: Config | None = None) -> web.Application:
    """Build the app; importable so callers can run it in-process too."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
    app[STATE] = State(config or Config())
    app.router.add_post("/ingest", ingest)
    app.router.add_post("/ingest/batch", ingest_batch)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    app.router.add_get("/stats/packets", stats_packets)
    app.router.add_get("/control", control_get)
    app.router.add_post("/control", control_post)
    return app


# ------------------------------------------------------------------------ CLI


def _listen(value: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")  # allow [::1]:9001
    try:
        port = int(port_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host, port


def _bounded(kind: type[int] | type[float], lo: float, hi: float | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if value != value or value < lo or (hi is not None and value > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {rng}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyzer", description="Log analyzer sink for the distributor.")
    p.add_argument("--listen", type=_listen, required=True, metavar="HOST:PORT", help="address to bind")
    p.add_argument("--name", default="analyzer", help="name reported in /health and /stats")
    p.add_argument("--delay-ms", type=_bounded(float, 0.0), default=0.0, help="processing delay per request")
    p.add_argument("--error-rate", type=_bounded(float, 0.0, 1.0), default=0.0, help="fraction answered 500")
    p.add_argument("--stall", action="store_true", help="start stalled (ingest and /health never answer)")
    p.add_argument("--concurrency", type=_bounded(int, 1), default=DEFAULT_CONCURRENCY, help="processing slots")
    p.add_argument(
        "--dedup-window", type=_bounded(int, 1), default=DEFAULT_DEDUP_WINDOW, help="packet keys remembered"
    )
    p.add_argument("--record-packets", type=_bounded(int, 0), default=None,
                   help="accepted packet keys kept for /stats/packets, later ones only counted as not_recorded "
                        "(default: the --dedup-window value)")
    p.add_argument("--max-tracked-emitters", type=_bounded(int, 0), default=DEFAULT_MAX_EMITTERS,
                   help="emitters counted one by one; messages of further emitters go to the overflow count")
    p.add_argument("--max-levels", type=_bounded(int, 0), default=DEFAULT_MAX_LEVELS,
                   help="levels counted one by one; messages of further levels go to the overflow count")
    p.add_argument("--sink", action="store_true",
                   help="benchmark sink: dedup and count packets/messages only, no per-level/emitter counts")
    p.add_argument("--tls-cert", default="", help="serve https with this certificate (PEM; with --tls-key)")
    p.add_argument("--tls-key", default="", help="the certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", default="", help="require client certificates signed by this CA (PEM)")
    return p


async def serve(host: str, port: int, config: Config, tls: ssl.SSLContext | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight requests and return (https with ``tls``)."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, ssl_context=tls)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    addresses = runner.addresses  # reports the real port when --listen used port 0
    actual = int(addresses[0][1]) if addresses else port
    log.info("analyzer %s listening on %s://%s:%d", config.name, "https" if tls else "http", host, actual)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("analyzer %s shutting down", config.name)
        app[STATE].faults.release_for_shutdown()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    config = Config(
        name=args.name,
        delay_ms=args.delay_ms,
        error_rate=args.error_rate,
        stall=args.stall,
        concurrency=args.concurrency,
        dedup_window=args.dedup_window,
        # Default to the window so --dedup-window alone still bounds the keys held.
        record_packets=args.dedup_window if args.record_packets is None else args.record_packets,
        max_tracked_emitters=args.max_tracked_emitters,
        max_levels=args.max_levels,
        sink=args.sink,
    )
    host, port = args.listen
    import uvloop

    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key or None)
        if args.tls_client_ca:
            tls.load_verify_locations(args.tls_client_ca)
            tls.verify_mode = ssl.CERT_REQUIRED
    try:
        uvloop.run(serve(host, port, config, tls))
    except OSError as exc:
        log.error("analyzer %s cannot listen on %s:%d: %s", config.name, host, port, exc)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
