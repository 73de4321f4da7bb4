"""Lean HTTP/1.1 server protocol (httptools + uvloop) for the ingest port.

Why not aiohttp: per request it builds a web.Request, a StreamReader, a task and a
response object. Here a request costs one ``Request`` plus one bytes object for the
answer, the handler is synchronous (pipelined answers stay in order for free) and
timeouts are deadline floats checked by one sweeper task per server, not timers.

An answer may also be given later (``Request.defer``): the write-ahead log answers 202 only
once the packet is durable. The connection then keeps the answers of later pipelined
requests behind it, in order, and writes whatever is ready in one call.

Deadlines are never early: they are set from a fresh ``time.monotonic()`` (one read per
parser feed, not per callback) and the sweeper compares them with a fresh read. While the
server holds answers the client has not read yet, the client's own clocks (head, body while
paused, idle, linger) stop; a client that then reads nothing for ``idle_timeout`` is dropped.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import socket
import ssl
import sys
import termios
import time
import typing
from collections import deque
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from time import monotonic
from typing import Any, NamedTuple

import httptools
import orjson

__all__ = ["HttpApp", "HttpLimits", "HttpServer", "HttpStats", "Pending", "Request", "Response", "json_error"]

log = logging.getLogger(__name__)

# connection states; _CHUNKED: a chunked body after its first chunk-size line (trailer fields included).
# _HEAD and _CHUNKED come last: their raw input is counted (a line may never end), tested as `>= _HEAD`.
_FRESH, _IDLE, _BODY, _CLOSING, _HEAD, _CHUNKED = range(6)
_LINGER = 1.0  # after an error answer keep draining input so the client reads it instead of an RST
_FEED_SLICE = 16 << 10  # feed big reads in slices so a write-paused connection stops producing answers
_INF = float("inf")
_MAX_EARLY_TLS = 64 << 10  # bytes a TLS client may send before the server speaks: its ClientHello
# body pieces below this size are gathered in a bytearray: with ~60 bytes per object, a body
# costs at most ~6% more than its size however it is chunked
_SMALL_PIECE = 1024
_RESTART = -1.0  # deadline mark set by parser callbacks: the state's clock starts at the end of this feed


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
    _conn: "_Conn"
    _by_name: dict[bytes, bytes] | None = None

    def defer(self) -> "Pending":
        """Answer later: return the Pending from ``handle`` and call ``Pending.answer`` once (from the loop)."""
        return self._conn._defer()

    def header(self, name: bytes) -> bytes | None:
        """A header's value (``name`` in lower case), or None; repeated lines combined as "a, b" (RFC 9110 §5.3).

        Combined, not the last line alone: a proxy in front may have acted on the first (hashed an
        ``X-Emitter-Id``, decoded one ``Content-Encoding``), so the request must not pass on a part of it.
        """
        by_name = self._by_name
        if by_name is None:  # built once, in C, on the first lookup; a repeated name (rare) costs a second pass
            by_name = self._by_name = dict(self.headers)
            if len(by_name) < len(self.headers):
                combined: dict[bytes, list[bytes]] = {}
                for key, value in self.headers:
                    combined.setdefault(key, []).append(value)
                by_name.update((key, b", ".join(values)) for key, values in combined.items() if len(values) > 1)
        return by_name.get(name)


class Pending:
    """An answer still to come; the answers of later requests on the connection wait behind it."""

    __slots__ = ("_conn", "_data", "_close", "_method", "_version")

    def __init__(self, conn: "_Conn", data: bytes | None, close: bool, method: bytes = b"",
                 version: str = "1.1") -> None:
        self._conn = conn
        self._data = data  # the rendered answer; None until ``answer``
        self._close = close  # the connection closes after this answer
        # of the request it answers, rendered later: by then the connection may be parsing another
        # (a pipelined HEAD must not strip this answer's body, nor HTTP/1.1 its HTTP/1.0 keep-alive)
        self._method = method
        self._version = version

    def answer(self, response: "Response") -> None:
        conn = self._conn
        if self._data is not None or conn._t is None:
            return  # answered already, or the client is gone
        self._data = conn._render(response, not self._close, self._method, self._version)
        conn._drain_outbox()


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

    def handle(self, request: Request) -> "Response | Pending":
        """Synchronous: the answer is written at once, or later through ``request.defer()`` (in order either way)."""


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
_ERR_431_TRAILERS = json_error(431, "headers_too_large", "trailer fields or chunk extensions exceed the header limit")
_ERR_400_TE_10 = json_error(400, "bad_request", "Transfer-Encoding is not allowed in an HTTP/1.0 request")
_ERR_505 = json_error(505, "http_version_not_supported", "only HTTP/1.1 and HTTP/1.0 are supported")
_ERR_408_HEAD = json_error(408, "request_timeout", "headers not received in time")
_ERR_408_BODY = json_error(408, "request_timeout", "body not received in time")
_ERR_500 = json_error(500, "internal_error", "the request could not be processed")
_ERR_501_UPGRADE = json_error(501, "upgrade_not_supported", "protocol upgrade and CONNECT are not supported")
_ERR_503_FULL = json_error(503, "too_many_connections", "connection limit reached; retry later", 1)


def _unsent(transport: asyncio.Transport) -> int:
    """Answer bytes the client has not read yet: our write buffer plus the kernel's send queue.

    Only the sum shows a slow reader's progress: while the kernel queue (megabytes on loopback)
    drains, our own buffer does not move at all. Read only for connections held by a slow
    reader, once per sweep.
    """
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            unsent += int.from_bytes(queued, sys.byteorder)
        except OSError:
            pass
    return unsent


def _date_line() -> bytes:
    return b"date: %s\r\n" % formatdate(usegmt=True).encode("ascii")


class _Conn(asyncio.Protocol):
    """One client connection: httptools callbacks drive a small state machine."""

    __slots__ = (
        "_srv", "_app", "_stats", "_timeouts", "_t", "_parser", "_state", "deadline", "_max_body", "_max_head",
        "_url", "_headers", "_body", "_parts", "_body_len", "_head_len", "_head_raw", "_clen",
        "_chunked", "_expect", "_hosts", "_method", "_path", "_query", "_version", "_keep",
        "_rejected", "_paused", "_pending", "_eof", "_counted", "_chunk_mark", "_held", "_check_at", "_read_mark",
        "_read_by", "_outbox", "_written",
    )  # fmt: skip

    def __init__(self, srv: HttpServer) -> None:
        self._srv = srv
        self._app = srv._app
        self._stats = srv.stats
        self._max_body = srv.limits.max_body_bytes
        self._max_head = srv.limits.max_header_bytes
        self._timeouts = srv.timeouts
        self._t: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._state = _FRESH
        self.on_message_begin()  # the fields every request resets
        self._state = _FRESH
        self.deadline = _INF
        # set by on_headers_complete before any use, so not reset per request
        self._path = self._query = b""
        self._version = "1.1"
        self._keep = True
        self._parts: list[bytes | bytearray] | None = None  # a body of several pieces; None once it completes
        self._paused = False
        self._pending: bytes | None = None
        self._eof = False
        self._counted = False
        self._chunk_mark = 0
        # waiting on a slow reader: the client's clock time left, the sweeper look that is due, the
        # answer bytes it had read at the last progress and when it must have read more by
        self._held = 0.0
        self._check_at = -_INF
        self._read_mark = 0
        self._read_by = _INF
        self._outbox: deque[Pending] | None = None  # answers waiting behind a deferred one, oldest first
        self._written = 0  # answer bytes handed to the transport: minus what is unsent, what the client read

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
        self.deadline = monotonic() + srv.limits.header_timeout

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
        self._outbox = None
        if srv._closing and not srv._conns:
            srv._empty.set()

    def data_received(self, data: bytes) -> None:
        if self._state == _CLOSING:
            return  # lingering after an error answer: drain and drop
        if self._paused or self._pending is not None:
            self._pending = data if self._pending is None else self._pending + data
            return
        if len(data) <= _FEED_SLICE:
            self._feed_one(data)  # the usual read: one call less than through _feed
        else:
            self._feed(data)

    def eof_received(self) -> bool | None:
        if self._outbox or (self._pending is not None and self._state != _CLOSING):
            # the client is done sending, not reading (a half-close): finish the buffered pipeline and
            # write the answers still owed (deferred ones too), then close
            self._eof = True
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
        if self.deadline == self._check_at:  # set by _hold
            self.deadline = monotonic() + self._held  # the time paused did not count
        pending, self._pending = self._pending, None
        if pending is not None:
            self._feed(pending)
        if self._state == _CLOSING or self._t is None or self._paused:
            return
        if self._eof and self._pending is None:
            if not self._outbox:  # else the last answer owed closes it (_drain_outbox)
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
        if self._state >= _HEAD:
            self._head_raw += len(data)  # catches a head or trailer line that never ends within one read
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
            parser = typing.cast(httptools.HttpRequestParser, self._parser)
            if isinstance(exc, httptools.HttpParserInvalidURLError):
                self._method = parser.get_method()  # parsed before the URL, which _fail cannot tell
            elif self._url and parser.get_method() == b"PRI":
                self._fail(_ERR_505)  # the HTTP/2 connection preface
                return
            self._fail(json_error(400, "bad_request", str(exc) or "malformed request"))
            return
        state = self._state
        if state >= _HEAD:  # for _CHUNKED: raw bytes since the last chunk-size line that were not chunk data
            raw = self._head_raw if state == _HEAD else self._head_raw - (self._body_len - self._chunk_mark)
            if raw > self._max_head:
                self._stats.too_large += 1
                self._fail(_ERR_431 if state == _HEAD else _ERR_431_TRAILERS)
                return
        if self.deadline < 0.0:  # a callback restarted the clock: one clock read per feed, not per callback
            self.deadline = monotonic() + self._timeouts[state]
        if self._paused and state != _CLOSING:
            self._hold()

    # ---- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        """Start a request's clock and reset what the request has not set yet (inline: runs per request)."""
        if self._state != _FRESH:  # the first request's clock runs from connection open
            self.deadline = _RESTART
        self._state = _HEAD
        self._head_raw = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""
        self._body_len = self._head_len = self._hosts = 0
        self._clen: int | None = None
        self._chunked = self._expect = False
        self._method = b""  # an error answer before the head is complete reads it (HEAD: no body)
        self._rejected: Response | None = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_len += len(name) + len(value) + 4
        if self._state != _HEAD:  # a trailer field after a chunked body: counted toward the limit, not kept
            if self._head_len + len(self._url) > self._max_head:
                self._stats.too_large += 1
                self._stop(_ERR_431_TRAILERS)
            return
        name = name.lower()
        self._headers.append((name, value))
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
        self._method = method = p.get_method()  # first: error answers to HEAD carry no body
        self._version = version = p.get_http_version()
        if (version != "1.1" or self._hosts != 1 or self._head_len + len(self._url) > self._max_head
                or p.should_upgrade()):  # one test for the usual request; what is wrong, in order, below
            self._check_head(p, version)
        self._keep = p.should_keep_alive() and not srv._closing
        url = self._url
        if url[:1] != b"/":
            url = self._absolute_path(url)
        q = url.find(b"?")
        if q < 0:
            self._path, self._query = url, b""
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
        has_body = self._chunked or clen  # truthy: chunked, or a non-zero Content-Length
        if rejected is not None:
            if has_body:
                self._stop(rejected)  # never read a body we refuse; close instead
            self._rejected = rejected  # nothing to skip: answer at message end, keep the connection
        elif self._expect and has_body and self._version == "1.1":
            self._emit(_CONTINUE, False)  # behind any answer still to come
        if self._chunked:  # from the first chunk-size line on, what is not chunk data is limited like a head
            self._state = _CHUNKED
            self._head_raw = self._chunk_mark = 0
        else:
            self._state = _BODY
        self.deadline = _RESTART

    def _check_head(self, p: httptools.HttpRequestParser, version: str) -> None:
        """Refuse a head that is not plain HTTP/1.1 with one Host and within the size limit, if it must be."""
        if version != "1.1" and version != "1.0":  # llhttp also parses 0.9 and 2.0 request lines
            self._stats.bad_requests += 1
            self._stop(_ERR_505)
        if self._head_len + len(self._url) > self._max_head:
            self._stats.too_large += 1
            self._stop(_ERR_431)
        if p.should_upgrade():
            self._stop(_ERR_501_UPGRADE)
        if self._hosts != 1 and (self._hosts or version == "1.1"):
            self._stats.bad_requests += 1
            self._stop(json_error(400, "bad_request", "exactly one Host header is required"))
        if self._chunked and version == "1.0":  # RFC 9112 6.1: a proxy may frame it otherwise (smuggling)
            self._stats.bad_requests += 1
            self._stop(_ERR_400_TE_10)

    def on_chunk_header(self) -> None:
        # from here raw input that is not chunk data (size lines, extensions, trailer fields) is limited like a head
        self._state = _CHUNKED
        self._head_raw = 0
        self._chunk_mark = self._body_len

    def on_body(self, data: bytes) -> None:
        n = self._body_len + len(data)
        if n > self._max_body:
            self._stats.too_large += 1
            self._stop(self._srv.err_413)
        self._body_len = n
        parts = self._parts
        if parts is not None:
            if len(data) >= _SMALL_PIECE:
                parts.append(data)
            else:  # tiny chunks must not cost an object each: they go into one bytearray
                last = parts[-1]
                if type(last) is bytearray:
                    last += data
                else:
                    parts.append(bytearray(data))
        elif self._body:
            self._parts = [self._body, data]
        else:
            self._body = data  # the usual single piece: kept as is, no copy

    def on_message_complete(self) -> None:
        self._stats.requests += 1
        response: Response | Pending | None = self._rejected
        if response is None:
            parts = self._parts
            if parts is None:
                body = self._body
            else:
                body = b"".join(parts)
                self._parts = None  # an idle connection keeps no body pieces
            request = Request(self._method, self._path, self._query, self._headers, body, self._version, self)
            try:
                response = self._app.handle(request)
            except Exception:
                log.exception("http11: handler failed for %r %r", self._method, self._path)
                response = _ERR_500
                self._keep = False
        srv = self._srv
        keep = self._keep and not srv._closing
        if isinstance(response, Pending):  # the app answers later; its Pending already holds the place
            if keep:
                self._state = _IDLE
                self.deadline = _RESTART
                return
            response._close = True  # the request asked to close: nothing after it is read
            self._state = _CLOSING
            self.deadline = _INF
            raise _Stop
        assert response is not None
        if keep:
            self._write(response, True)
            self._state = _IDLE
            self.deadline = _RESTART
        else:
            self._stop(response)

    # ---- writing and closing -------------------------------------------------------------

    def _render(self, response: Response, keep: bool, method: bytes, version: str) -> bytes:
        """The answer's bytes for a request with this method and HTTP version."""
        status, body, extra, ctype = response
        if not keep:
            conn = _CONN_CLOSE
        elif version == "1.0":
            conn = _CONN_KEEP
        else:
            conn = b""
        xh = b"".join([b"%s: %s\r\n" % h for h in extra]) if extra else b""
        try:  # subscript, not .get(): this runs for every answer
            line = _STATUS_LINES[status]
        except KeyError:
            line = b"HTTP/1.1 %d Unknown\r\n" % status
        data = _RESPONSE_FMT % (line, ctype, len(body), self._srv.date, conn, xh, body)
        if method == b"HEAD" or status in _NO_BODY_STATUS:  # rare: strip the payload
            data = data[: len(data) - len(body)]
            if status in _NO_BODY_STATUS:
                data = data.replace(b"content-length: %d\r\n" % len(body), b"", 1)
        by_status = self._stats.responses_by_status
        try:
            by_status[status] += 1
        except KeyError:
            by_status[status] = 1
        return data

    def _write(self, response: Response, keep: bool) -> None:
        data = self._render(response, keep, self._method, self._version)
        if self._outbox:
            self._outbox.append(Pending(self, data, False))
        else:
            self._written += len(data)
            self._t.write(data)  # type: ignore[union-attr]

    def _emit(self, data: bytes, close: bool) -> None:
        """Write now, or queue behind a deferred answer; ``close``: half-close and linger after it."""
        if self._outbox:
            self._outbox.append(Pending(self, data, close))
            if close:
                self._state = _CLOSING
                self.deadline = _INF  # the linger starts once the queue is written
            return
        self._written += len(data)
        self._t.write(data)  # type: ignore[union-attr]
        if close:
            self._linger()

    def _defer(self) -> Pending:
        pending = Pending(self, None, False, self._method, self._version)
        if self._outbox is None:
            self._outbox = deque()
        self._outbox.append(pending)
        return pending

    def _drain_outbox(self) -> None:
        """Write every answer that is ready at the head of the queue, in one call; close if one says so."""
        outbox = self._outbox
        t = self._t
        if outbox is None or t is None:
            return
        ready: list[bytes] = []
        close = False
        while outbox and outbox[0]._data is not None:
            item = outbox.popleft()
            ready.append(item._data)  # type: ignore[arg-type]
            if item._close:
                close = True
                outbox.clear()
                break
        if not outbox:
            self._outbox = None
        if ready:
            data = ready[0] if len(ready) == 1 else b"".join(ready)
            self._written += len(data)
            t.write(data)
        if close:
            self._state = _IDLE  # lets _linger run
            self._linger()
        elif self._eof and self._outbox is None and self._pending is None and self._state != _CLOSING:
            self._state = _CLOSING  # the client half-closed and has every answer now
            t.close()

    def _stop(self, response: Response) -> typing.NoReturn:
        """Answer, close, and abort the parser (callbacks only)."""
        self._fail(response)
        raise _Stop

    def _fail(self, response: Response) -> None:
        """Write a final answer with Connection: close (after any still to come), then half-close and linger."""
        if self._state == _CLOSING or self._t is None:
            return
        if self._state == _HEAD and not self._method and self._url:
            # head incomplete but its method parsed (before on_url the parser holds a stale one):
            # an answer to HEAD carries no body
            self._method = typing.cast(httptools.HttpRequestParser, self._parser).get_method()
        self._emit(self._render(response, False, self._method, self._version), True)

    def _linger(self) -> None:
        # Closing with unread input makes the kernel send RST, which can destroy our answer
        # in the client's receive queue; so send FIN and drain input for a short while.
        t = self._t
        assert t is not None
        self._state = _CLOSING
        self._pending = None
        self.deadline = monotonic() + _LINGER
        if t.can_write_eof() and not self._eof:  # after the client's EOF there is no input left to drain
            t.write_eof()
            # reading may be paused by back-pressure, now or before writing resumed (resume_writing does not
            # resume it once closing): the linger is there to drain the client's input
            t.resume_reading()
        else:
            t.close()

    def _close_now(self) -> None:
        """Close without an answer; a client that never reads gets aborted after the linger."""
        if self._t is None or self._state == _CLOSING:
            return
        self._state = _CLOSING
        self.deadline = monotonic() + _LINGER
        self._t.close()

    def _hold(self) -> None:
        """Paused for a slow reader: stop the client's clock (kept in _held) and watch its reading instead."""
        now = monotonic()
        if self.deadline != self._check_at:  # else already waiting: _held is set
            self._held = self.deadline - now
        self._watch(self._written - _unsent(typing.cast(asyncio.Transport, self._t)), now)

    def _watch(self, read: int, now: float) -> None:
        """Look again next tick; the client has until idle_timeout from now to read more than `read` bytes."""
        self._read_mark = read
        self._read_by = now + self._srv.limits.idle_timeout
        self.deadline = self._check_at = now + self._srv.tick

    def _on_deadline(self, now: float) -> None:
        """Called by the sweeper once `deadline` has passed."""
        t = self._t
        if t is None:
            self.deadline = _INF
            return
        if self._outbox:  # we owe the client an answer: its clocks wait for us
            self.deadline = now + self._srv.tick
            return
        state, stats = self._state, self._stats
        unsent = _unsent(t)
        waiting = self.deadline == self._check_at
        if unsent and (self._paused or (state != _BODY and state != _CHUNKED)):
            # Answers wait for the client to read them, so its own clock stops (a body it is still
            # sending while we read is the exception); it only has to keep reading.
            read = self._written - unsent  # what the client has read, however much more we keep writing
            if not waiting:
                self._held = self._timeouts[state]  # when it started waiting is unknown: full time after
                self._watch(read, now)
            elif read > self._read_mark:
                self._watch(read, now)
            elif now >= self._read_by:  # it read nothing for idle_timeout: nothing more can be delivered
                stats.idle_closed += 1
                self.deadline = _INF
                t.abort()
            else:
                self.deadline = self._check_at = now + self._srv.tick
            return
        if waiting:  # every answer is out: the client's clock runs again
            self.deadline = now + self._held
            return
        if state == _IDLE:
            stats.idle_closed += 1
            self._close_now()
        elif state == _HEAD or state == _FRESH:
            stats.header_timeouts += 1
            self._fail(_ERR_408_HEAD)
        elif state == _BODY or state == _CHUNKED:
            stats.body_timeouts += 1
            self._fail(_ERR_408_BODY)
        else:
            self.deadline = _INF
            t.abort()

    def _on_shutdown(self) -> None:
        """Idle connections go at once; one mid-request gets its answer with Connection: close."""
        if self._state in (_IDLE, _FRESH) and self._pending is None and not self._outbox:
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


class _TlsHandshake(asyncio.Protocol):
    """A TLS connection until its handshake is done, counted toward ``max_connections`` from its accept on.

    With the loop's own TLS (``create_server(ssl=...)``) the protocol hears of a connection only once its
    handshake is done: connections still in it were counted nowhere, and 18,000 that never sent a ClientHello
    grew a worker to 1 GB under ``max_connections`` = 10,000. Here a plain connection is admitted (or closed at
    once above the limit: a 503 would need the handshake the limit is there to spare), upgraded by ``start_tls``
    within ``header_timeout`` and handed to the HTTP protocol once encrypted.
    """

    __slots__ = ("_srv", "_context", "_early", "_eof", "_lost")

    def __init__(self, srv: HttpServer, context: ssl.SSLContext) -> None:
        self._srv = srv
        self._context = context
        self._early: list[bytes] = []  # read before start_tls took the transport over: the ClientHello, or data
        self._eof = self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        srv = self._srv
        plain = typing.cast(asyncio.Transport, transport)
        if srv._open + len(srv._handshakes) >= srv.limits.max_connections or srv._closing:
            srv.stats.connections_rejected += 1
            plain.abort()
            return
        srv._handshakes.add(asyncio.get_running_loop().create_task(self._upgrade(plain)))

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True

    async def _upgrade(self, plain: asyncio.Transport) -> None:
        srv = self._srv
        handshake = asyncio.get_running_loop().create_task(self._start_tls(plain))
        handshake.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved if not awaited
        try:
            await asyncio.sleep(0)  # _start_tls has run: its TLS protocol set on the transport, reading paused
            early, self._early = b"".join(self._early), []
            if early and not handshake.done():  # the bytes read before, ahead of any read after
                tls_protocol = typing.cast(asyncio.BufferedProtocol, plain.get_protocol())
                while early:  # into the TLS protocol's incoming buffer; nothing is read before its connection_made
                    view = memoryview(tls_protocol.get_buffer(len(early)))
                    fed = min(len(early), len(view))
                    view[:fed] = early[:fed]
                    tls_protocol.buffer_updated(fed)
                    early = early[fed:]
            tls = await handshake
        except Exception:  # not TLS, a refused certificate, too slow, or gone: start_tls closed it
            plain.abort()
            return
        finally:
            srv._handshakes.discard(typing.cast("asyncio.Task[None]", asyncio.current_task()))
        if tls is None or self._lost or tls.is_closing():  # closed during its handshake: nothing to serve
            return
        conn = srv._factory()
        tls.set_protocol(conn)
        conn.connection_made(tls)
        if self._early:  # decrypted before this task resumed
            conn.data_received(b"".join(self._early))
        if self._eof and conn._t is not None and not conn.eof_received():
            tls.close()

    async def _start_tls(self, plain: asyncio.Transport) -> asyncio.Transport | None:
        """``start_tls`` on a connection still open, checked in the same loop step as ``start_tls`` takes it over
        (no read between). Started on a connection a reset had closed meanwhile, its TLS protocol's connection_made
        ran anyway (a traceback per connection in the worker's log, the protocol held until the handshake timeout)
        or the handshake waited forever, holding its ``max_connections`` place; one half-closed or sending more
        than a ClientHello before the handshake is no client."""
        if plain.is_closing() or self._lost or self._eof or sum(map(len, self._early)) > _MAX_EARLY_TLS:
            raise ConnectionResetError("closed, or not a TLS client, before its handshake")
        return await asyncio.get_running_loop().start_tls(
            plain, self, self._context, server_side=True, ssl_handshake_timeout=self._srv.limits.header_timeout)


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
        self._handshakes: set[asyncio.Task[None]] = set()  # TLS connections in their handshake (_TlsHandshake)
        self._second = 0
        self.date = _date_line()
        self.err_413 = json_error(413, "body_too_large", f"body exceeds {limits.max_body_bytes} bytes")
        shortest = min(limits.header_timeout, limits.body_timeout, limits.idle_timeout)
        self.tick = min(1.0, max(0.05, shortest / 4))
        # the clock each connection state runs on, indexed by state
        self.timeouts = (limits.header_timeout, limits.idle_timeout, limits.body_timeout, _LINGER,
                         limits.header_timeout, limits.body_timeout)

    def _factory(self) -> _Conn:
        return _Conn(self)

    @property
    def connection_count(self) -> int:
        """Open connections admitted under max_connections (rejected ones are not counted)."""
        return self._open

    async def start(self, sock: socket.socket, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve on an already bound and listening socket (SO_REUSEPORT is the caller's business), over TLS
        with ``ssl_context``."""
        loop = asyncio.get_running_loop()
        # create_server calls listen() again (default 100); ask for more, the kernel clamps to somaxconn
        factory: Any = self._factory
        if ssl_context is not None:  # the handshake under max_connections and header_timeout: _TlsHandshake
            factory = lambda: _TlsHandshake(self, ssl_context)  # noqa: E731
        self._server = await loop.create_server(factory, sock=sock, backlog=65535)
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """One task for all deadlines and the cached Date header: no timers per request."""
        while True:
            second = int(time.time())
            if second != self._second:
                self._second = second
                self.date = _date_line()
            now = monotonic()
            expired = [c for c in self._conns if c.deadline <= now]
            for conn in expired:
                try:
                    conn._on_deadline(now)
                except Exception:  # a broken transport must not stop the sweeper
                    log.exception("http11: timeout handling failed")
            await asyncio.sleep(self.tick)

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
