"""The senders' HTTP/1.1 client: keep-alive connections to analyzers, request bodies written scatter-gather.

Why not aiohttp here: a batch is a few hundred packets that already sit in memory as
``bytes``; aiohttp wants one body, so the sender joined them and aiohttp (on Python
< 3.12.9) joined headers and body again: two copies of every packet, in buffers big
enough that each one is a fresh mmap. This client hands the packets to the transport
as they are (``writelines``: one ``writev`` on a plain socket), parses the answer
with httptools (as the ingest side does), and keeps no per-request objects beyond a
future. The health checks, which are few, stay on aiohttp.

Errors say whether the analyzer may have taken the request (``SendError.ambiguous``):
a connection that could not be opened never carried it; a timeout or a connection
lost once the request was written might have. A kept-alive connection the analyzer
closed before a byte of the answer (its idle timeout or request limit racing our
request) is retried once on a new connection instead of failing the send. An answer's
head is bounded (``MAX_ANSWER_HEAD``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools

IDLE_TIMEOUT = 15.0  # seconds an unused keep-alive connection stays open (aiohttp's default)
MAX_ANSWER_HEAD = 64 * 1024  # bytes of an answer's status line and header fields (httptools would keep any amount)


class SendError(Exception):
    """A request that got no complete answer; ``ambiguous``: the analyzer may have processed it."""

    def __init__(self, message: str, ambiguous: bool) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


class Answer(NamedTuple):
    status: int
    retry_after: str | None


class Target(NamedTuple):
    """Where a URL's requests go: the pool key, the Host header and the path prefix."""

    scheme: str
    host: str
    port: int
    authority: bytes
    path: str


def target(url: str) -> Target:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname or ""
    return Target(parts.scheme, host, port, parts.netloc.encode("ascii"), parts.path.rstrip("/"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request at a time (no pipelining)."""

    __slots__ = ("transport", "parser", "waiter", "status", "retry_after", "closed", "keep", "idle_timer",
                 "in_head", "head_bytes", "received", "used")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.status = 0
        self.retry_after: str | None = None
        self.closed = False
        self.keep = True
        self.idle_timer: asyncio.TimerHandle | None = None
        self.in_head = False  # between an answer's first byte and the end of its header fields
        self.head_bytes = 0
        self.received = False  # a byte of the answer to the current request arrived
        self.used = False  # carried a request before the current one (a kept-alive connection)

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # 101: no protocol switch here
            self._fail(SendError(f"malformed answer: {exc.__class__.__name__}: {exc}", ambiguous=True))
            self.close()
            return
        if self.in_head:  # what is still head was all head: without a bound, a hostile analyzer's endless
            self.head_bytes += len(data)  # header field grows in memory (and is copied at each segment)
            if self.head_bytes > MAX_ANSWER_HEAD:
                self._fail(SendError(f"answer head over {MAX_ANSWER_HEAD} bytes", ambiguous=True))
                self.close()

    def eof_received(self) -> bool | None:
        self._lost("the analyzer closed the connection before answering")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost before the answer ({exc or 'closed'})")

    # ---- httptools callbacks
    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 11 and name.lower() == b"retry-after":
            self.retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.status = self.parser.get_status_code()
        if self.status < 100:  # no such status: it would pass for an interim answer and wait for the timeout
            self._fail(SendError(f"malformed answer: status {self.status}", ambiguous=True))
            self.close()

    def on_message_complete(self) -> None:
        if self.status < 200:  # an interim answer (103 Early Hints): the real one follows
            self.retry_after = None
            return
        self.keep = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(self.status, self.retry_after))

    # ---- the client's side
    def request(self, head: bytes, body: Sequence[bytes]) -> asyncio.Future[Answer]:
        assert self.transport is not None and self.waiter is None
        self.status = 0
        self.retry_after = None
        self.received = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.writelines([head, *body])
        return self.waiter

    def _lost(self, why: str) -> None:
        self.closed = True
        self.keep = False
        if self.status >= 200:  # the head arrived: an answer whose body ends with the connection (no length)
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(Answer(self.status, self.retry_after))
            return
        self._fail(SendError(why, ambiguous=True))

    def _fail(self, error: SendError) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None:
            self.transport.close()


class HttpClient:
    """Keep-alive pools per analyzer address; the sender bounds how many requests run at once."""

    def __init__(self, connect_timeout: float, request_timeout: float, ssl_context: ssl.SSLContext,
                 max_idle_per_host: int) -> None:
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._ssl = ssl_context
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()

    async def post(self, to: Target, path: str, headers: bytes, body: Sequence[bytes]) -> Answer:
        """POST ``body`` (the pieces, in order) to ``to.path + path``; ``headers``: extra header lines, each
        ending in CRLF. Raises SendError."""
        size = 0
        for piece in body:
            size += len(piece)
        head = b"POST %s%s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            to.path.encode("ascii"), path.encode("ascii"), to.authority, size, headers)
        key = (to.scheme, to.host, to.port)
        try:
            async with asyncio.timeout(self._request_timeout):
                connection = await self._acquire(key, to)
                try:
                    answer = await self._exchange(connection, head, body)
                except SendError:
                    if not connection.used or connection.received:
                        raise
                    # a kept-alive connection the analyzer closed (its idle timeout, a limit of requests per
                    # connection) as the request went out: once more on a new connection, not a failed send
                    # counted against the analyzer. Which may have taken the first: so may any retry.
                    try:
                        connection = await self._connect(to)
                        answer = await self._exchange(connection, head, body)
                    except SendError as exc:
                        raise SendError(str(exc), ambiguous=True) from None
        except TimeoutError:
            raise SendError("timed out", ambiguous=True) from None
        self._release(key, connection)
        return answer

    async def _exchange(self, connection: _Connection, head: bytes, body: Sequence[bytes]) -> Answer:
        self._busy.add(connection)
        try:
            return await connection.request(head, body)
        except BaseException:
            connection.close()  # cancelled or failed mid-request: the connection's state is unknown
            raise
        finally:
            self._busy.discard(connection)

    async def _acquire(self, key: tuple[str, str, int], to: Target) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.idle_timer is not None:
                connection.idle_timer.cancel()
                connection.idle_timer = None
            if not connection.closed and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return await self._connect(to)

    async def _connect(self, to: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        secure = to.scheme == "https"
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    _Connection, to.host, to.port,
                    ssl=self._ssl if secure else None, server_hostname=to.host if secure else None)
        except TimeoutError:
            raise SendError("connect timed out", ambiguous=False) from None
        except (OSError, ssl.SSLError) as exc:
            raise SendError(f"cannot connect: {exc.__class__.__name__}: {exc}", ambiguous=False) from None
        return protocol

    def _release(self, key: tuple[str, str, int], connection: _Connection) -> None:
        connection.used = True
        if connection.closed or not connection.keep:
            connection.close()
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._expire, key, connection)
        idle.append(connection)

    def _expire(self, key: tuple[str, str, int], connection: _Connection) -> None:
        connection.idle_timer = None
        idle = self._idle.get(key)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[key]
        connection.close()

    async def close(self) -> None:
        """Close every connection, idle or busy (their requests fail)."""
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()
        self._busy.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost
