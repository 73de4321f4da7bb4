"""Lean HTTP/1.1 server protocol (httptools + uvloop) for the ingest port.

Why not aiohttp: per request it builds a web.Request, a StreamReader, a task and a
response object. Here a request costs one ``Request`` plus one bytes object for the
answer, the handler is synchronous (pipelined answers stay in order for free) and
timeouts are deadline floats checked by one sweeper task per server, not timers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
import typing
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple

import httptools
import orjson

__all__ = ["HttpApp", "HttpLimits", "HttpServer", "HttpStats", "Request", "Response", "json_error"]

log = logging.getLogger(__name__)

# connection states
_FRESH, _IDLE, _HEAD, _BODY, _CLOSING = range(5)
_LINGER = 1.0  # after an error answer keep draining input so the client reads it instead of an RST
_FEED_SLICE = 16 << 10  # feed big reads in slices so a write-paused connection stops producing answers
_INF = float("inf")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-worker protection against slow, huge or too many clients."""

    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_connections: int = 10_000


@dataclass(slots=True)
class Request:
    """A complete request; the only per-request object the server allocates."""

    method: bytes
    path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: str


class Response(NamedTuple):
    """An answer; a NamedTuple so handlers can keep prebuilt constants."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"application/json"


def json_error(status: int, error: str, detail: str, retry_after: float | None = None) -> Response:
    """Every error body is JSON {"error": ..., "detail": ...}; Retry-After (integer seconds, at least 1, rounded up) when given."""
    body = orjson.dumps({"error": error, "detail": detail})
    if retry_after is None:
        return Response(status, body)
    return Response(status, body, ((b"retry-after", b"%d" % max(1, math.ceil(retry_after))),))


class HttpApp(typing.Protocol):
    """What the server calls; both methods run on the event loop and must not block."""

    def preflight(self, method: bytes, path: bytes, content_length: int | None) -> Response | None:
        """Called once headers are complete. Non-None rejects the request before its body is read (404/405/413...)."""

    def handle(self, request: Request) -> Response:
        """Synchronous: called with the complete request; its answer is written at once (so pipelined answers stay in order)."""


@dataclass
class HttpStats:
    """Plain int counters, read by the worker at export time (no metric calls per request)."""

    connections_open: int = 0
    connections_total: int = 0
    connections_rejected: int = 0
    requests: int = 0
    responses_by_status: dict[int, int] = field(default_factory=dict)
    bad_requests: int = 0
    header_timeouts: int = 0
    body_timeouts: int = 0
    idle_closed: int = 0
    too_large: int = 0


class _Stop(Exception):
    """Raised inside a parser callback to abandon the rest of the input (the answer is already written)."""


_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in HTTPStatus
}
_RESPONSE_FMT = b"%scontent-type: %s\r\ncontent-length: %d\r\n%s%s%s\r\n%s"
_CONN_CLOSE = b"connection: close\r\n"
_CONN_KEEP = b"connection: keep-alive\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})

_ERR_431 = json_error(431, "headers_too_large", "request line and headers exceed the limit")
_ERR_408_HEAD = json_error(408, "request_timeout", "headers not received in time")
_ERR_408_BODY = json_error(408, "request_timeout", "body not received in time")
_ERR_500 = json_error(500, "internal_error", "the request could not be processed")
_ERR_501_UPGRADE = json_error(501, "upgrade_not_supported", "protocol upgrade and CONNECT are not supported")
_ERR_503_FULL = json_error(503, "too_many_connections", "connection limit reached; retry later", 1)


def _date_line() -> bytes:
    return b"date: %s\r\n" % formatdate(usegmt=True).encode("ascii")


class _Conn(asyncio.Protocol):
    """One client connection: httptools callbacks drive a small state machine."""

    __slots__ = (
        "_srv", "_app", "_stats", "_t", "_parser", "_state", "deadline", "_max_body", "_max_head",
        "_url", "_headers", "_body", "_parts", "_body_len", "_head_len", "_head_raw", "_clen",
        "_chunked", "_expect", "_hosts", "_method", "_path", "_query", "_version", "_keep",
        "_rejected", "_paused", "_pending", "_eof", "_counted",
    )  # fmt: skip

    def __init__(self, srv: HttpServer) -> None:
        self._srv = srv
        self._app = srv._app
        self._stats = srv.stats
        self._max_body = srv.limits.max_body_bytes
        self._max_head = srv.limits.max_header_bytes
        self._t: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._state = _FRESH
        self.deadline = _INF
        self._paused = False
        self._pending: bytes | None = None
        self._eof = False
        self._counted = False
        self._head_raw = 0
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""
        self._parts: list[bytes] | None = None
        self._body_len = self._head_len = self._hosts = 0
        self._clen: int | None = None
        self._chunked = self._expect = False
        self._keep = True
        self._method = b""
        self._path = self._query = b""
        self._version = "1.1"
        self._rejected: Response | None = None

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        srv = self._srv
        self._t = typing.cast(asyncio.Transport, transport)
        srv._conns.add(self)
        if srv._open >= srv.limits.max_connections or srv._closing:
            self._stats.connections_rejected += 1
            self._fail(_ERR_503_FULL)
            return
        self._counted = True
        srv._open += 1
        self._stats.connections_open += 1
        self._stats.connections_total += 1
        self.deadline = srv.now + srv.limits.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self._srv
        srv._conns.discard(self)
        if self._counted:
            self._counted = False
            srv._open -= 1
            self._stats.connections_open -= 1
        self._state = _CLOSING
        self.deadline = _INF
        self._t = None
        self._parser = None  # break the parser <-> protocol reference cycle
        self._pending = None
        if srv._closing and not srv._conns:
            srv._empty.set()

    def data_received(self, data: bytes) -> None:
        if self._state == _CLOSING:
            return  # lingering after an error answer: drain and drop
        if self._paused or self._pending is not None:
            self._pending = data if self._pending is None else self._pending + data
            return
        self._feed(data)

    def eof_received(self) -> bool | None:
        if self._pending is not None and self._state != _CLOSING:
            self._eof = True  # finish the buffered pipeline first, then close
            return True
        self._state = _CLOSING
        return None  # transport closes itself after flushing answers

    def pause_writing(self) -> None:
        self._paused = True
        if self._state != _CLOSING and self._t is not None:
            self._t.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._state == _CLOSING or self._t is None:
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            self._feed(pending)
        if self._state == _CLOSING or self._t is None or self._paused:
            return
        if self._eof and self._pending is None:
            self._state = _CLOSING
            self._t.close()
            return
        self._t.resume_reading()

    # ---- feeding -------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        n = len(data)
        if n <= _FEED_SLICE:
            self._feed_one(data)
            return
        view = memoryview(data)
        pos = 0
        while pos < n:
            if self._paused:
                self._pending = bytes(view[pos:])
                return
            self._feed_one(view[pos : pos + _FEED_SLICE])
            if self._state == _CLOSING:
                return
            pos += _FEED_SLICE

    def _feed_one(self, data: bytes | memoryview) -> None:
        if self._state == _HEAD:
            self._head_raw += len(data)  # catches a header that never ends within one read
        try:
            self._parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade:
            self._fail(_ERR_501_UPGRADE)
        except httptools.HttpParserError as exc:
            if self._state == _CLOSING:
                return  # we stopped the parser on purpose
            cause = exc.__context__
            if cause is not None and not isinstance(cause, _Stop):
                log.error("http11: internal error in a parser callback", exc_info=cause)
                self._fail(_ERR_500)
                return
            self._stats.bad_requests += 1
            self._fail(json_error(400, "bad_request", str(exc) or "malformed request"))
            return
        if self._state == _HEAD and self._head_raw > self._max_head:
            self._stats.too_large += 1
            self._fail(_ERR_431)

    # ---- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state != _FRESH:  # the first request's clock runs from connection open
            self.deadline = self._srv.now + self._srv.limits.header_timeout
        self._state = _HEAD
        self._head_raw = 0
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        self._head_len += len(name) + len(value) + 4
        if name == b"content-length":
            self._clen = int(value)  # llhttp validated digits and duplicates
        elif name == b"host":
            self._hosts += 1
        elif name == b"transfer-encoding":
            self._chunked = True  # llhttp rejects anything but a final "chunked" and TE + CL
        elif name == b"expect":
            self._expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        p = typing.cast(httptools.HttpRequestParser, self._parser)
        srv = self._srv
        self._version = p.get_http_version()
        if self._head_len + len(self._url) > self._max_head:
            self._stats.too_large += 1
            self._stop(_ERR_431)
        if p.should_upgrade():
            self._stop(_ERR_501_UPGRADE)
        if self._hosts != 1 and (self._hosts or self._version == "1.1"):
            self._stats.bad_requests += 1
            self._stop(json_error(400, "bad_request", "exactly one Host header is required"))
        self._method = method = p.get_method()
        self._keep = p.should_keep_alive() and not srv._closing
        url = self._url
        if url[:1] != b"/":
            url = self._absolute_path(url)
        q = url.find(b"?")
        if q < 0:
            self._path = url
        else:
            self._path, self._query = url[:q], url[q + 1 :]
        clen = self._clen
        if clen is not None and clen > self._max_body:
            self._stats.too_large += 1
            self._stop(srv.err_413)
        try:
            rejected = self._app.preflight(method, self._path, clen)
        except Exception:
            log.exception("http11: preflight failed")
            self._stop(_ERR_500)
        has_body = self._chunked or bool(clen)
        if rejected is not None:
            if has_body:
                self._stop(rejected)  # never read a body we refuse; close instead
            self._rejected = rejected  # nothing to skip: answer at message end, keep the connection
        elif self._expect and has_body and self._version == "1.1":
            self._t.write(_CONTINUE)  # type: ignore[union-attr]
        self._state = _BODY
        self.deadline = srv.now + srv.limits.body_timeout

    def on_body(self, data: bytes) -> None:
        n = self._body_len + len(data)
        if n > self._max_body:
            self._stats.too_large += 1
            self._stop(self._srv.err_413)
        self._body_len = n
        if self._parts is not None:
            self._parts.append(data)
        elif self._body:
            self._parts = [self._body, data]
        else:
            self._body = data

    def on_message_complete(self) -> None:
        self._stats.requests += 1
        response = self._rejected
        if response is None:
            body = b"".join(self._parts) if self._parts is not None else self._body
            request = Request(self._method, self._path, self._query, self._headers, body, self._version)
            try:
                response = self._app.handle(request)
            except Exception:
                log.exception("http11: handler failed for %r %r", self._method, self._path)
                response = _ERR_500
                self._keep = False
        srv = self._srv
        if self._keep and not srv._closing:
            self._write(response, True)
            self._state = _IDLE
            self.deadline = srv.now + srv.limits.idle_timeout
        else:
            self._stop(response)

    # ---- writing and closing -------------------------------------------------------------

    def _write(self, response: Response, keep: bool) -> None:
        status, body, extra, ctype = response
        if not keep:
            conn = _CONN_CLOSE
        elif self._version == "1.0":
            conn = _CONN_KEEP
        else:
            conn = b""
        xh = b"".join([b"%s: %s\r\n" % h for h in extra]) if extra else b""
        line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        data = _RESPONSE_FMT % (line, ctype, len(body), self._srv.date, conn, xh, body)
        if self._method == b"HEAD" or status in _NO_BODY_STATUS:  # rare: strip the payload
            data = data[: len(data) - len(body)]
            if status in _NO_BODY_STATUS:
                data = data.replace(b"content-length: %d\r\n" % len(body), b"", 1)
        self._t.write(data)  # type: ignore[union-attr]
        by_status = self._stats.responses_by_status
        by_status[status] = by_status.get(status, 0) + 1

    def _stop(self, response: Response) -> typing.NoReturn:
        """Answer, close, and abort the parser (callbacks only)."""
        self._fail(response)
        raise _Stop

    def _fail(self, response: Response) -> None:
        """Write a final answer with Connection: close, then half-close and linger."""
        if self._state == _CLOSING or self._t is None:
            return
        self._write(response, False)
        self._linger()

    def _linger(self) -> None:
        # Closing with unread input makes the kernel send RST, which can destroy our answer
        # in the client's receive queue; so send FIN and drain input for a short while.
        t = self._t
        assert t is not None
        self._state = _CLOSING
        self._pending = None
        self.deadline = self._srv.now + _LINGER
        if t.can_write_eof():
            t.write_eof()
            if self._paused:
                t.resume_reading()
        else:
            t.close()

    def _close_now(self) -> None:
        """Close without an answer; a client that never reads gets aborted after the linger."""
        if self._t is None or self._state == _CLOSING:
            return
        self._state = _CLOSING
        self.deadline = self._srv.now + _LINGER
        self._t.close()

    def _on_deadline(self) -> None:
        """Called by the sweeper once `deadline` has passed."""
        state, stats = self._state, self._stats
        if state == _IDLE:
            stats.idle_closed += 1
            self._close_now()
        elif state == _HEAD or state == _FRESH:
            stats.header_timeouts += 1
            self._fail(_ERR_408_HEAD)
        elif state == _BODY:
            stats.body_timeouts += 1
            self._fail(_ERR_408_BODY)
        else:
            self.deadline = _INF
            if self._t is not None:
                self._t.abort()

    def _on_shutdown(self) -> None:
        """Idle connections go at once; one mid-request gets its answer with Connection: close."""
        if self._state in (_IDLE, _FRESH) and self._pending is None:
            self._close_now()

    def _absolute_path(self, url: bytes) -> bytes:
        if url == b"*":
            return url
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            self._stats.bad_requests += 1
            self._stop(json_error(400, "bad_request", "invalid request target"))
        path = parsed.path or b"/"
        return path + b"?" + parsed.query if parsed.query else path


class HttpServer:
    """Owns the connections of one worker: protocol factory, timeout sweeper, graceful shutdown."""

    def __init__(self, app: HttpApp, limits: HttpLimits, stats: HttpStats | None = None) -> None:
        self._app = app
        self.limits = limits
        self.stats = stats if stats is not None else HttpStats()
        self._conns: set[_Conn] = set()
        self._open = 0
        self._closing = False
        self._empty = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._second = 0
        self.date = _date_line()
        self.now = time.monotonic()
        self.err_413 = json_error(413, "body_too_large", f"body exceeds {limits.max_body_bytes} bytes")
        shortest = min(limits.header_timeout, limits.body_timeout, limits.idle_timeout)
        self._tick = min(1.0, max(0.05, shortest / 4))

    def _factory(self) -> _Conn:
        return _Conn(self)

    @property
    def connection_count(self) -> int:
        """Open connections admitted under max_connections (rejected ones are not counted)."""
        return self._open

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening socket (SO_REUSEPORT is the caller's business)."""
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        # create_server calls listen() again (default 100); ask for more, the kernel clamps to somaxconn
        self._server = await loop.create_server(self._factory, sock=sock, backlog=65535)
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """One task for all deadlines and the cached Date header: no timers per request."""
        loop = asyncio.get_running_loop()
        while True:
            self.now = now = loop.time()
            second = int(time.time())
            if second != self._second:
                self._second = second
                self.date = _date_line()
            expired = [c for c in self._conns if c.deadline <= now]
            for conn in expired:
                try:
                    conn._on_deadline()
                except Exception:  # a broken transport must not stop the sweeper
                    log.exception("http11: timeout handling failed")
            await asyncio.sleep(self._tick)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish, abort after `timeout`."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn._on_shutdown()
        if self._conns:
            self._empty.clear()
            try:
                await asyncio.wait_for(self._empty.wait(), timeout)
            except TimeoutError:
                pass
        for conn in list(self._conns):
            if conn._t is not None:
                conn._t.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        await asyncio.sleep(0)  # let abort() deliver connection_lost
