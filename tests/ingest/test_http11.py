"""Real-socket tests for distributor.ingest.http11: a live HttpServer in a background uvloop thread."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orjson
import pytest
import uvloop

from distributor.ingest.http11 import HttpLimits, HttpServer, HttpStats, Request, Response, json_error

pytestmark = pytest.mark.timeout(30)
T = TypeVar("T")


class EchoApp:
    """202 with body length, path and query; 404 off /ingest (and /boom, /headers), 405 for non-POST.

    /headers answers the request's header names; a query ``pad=N`` adds N bytes to the answer.
    """

    def preflight(self, method: bytes, path: bytes, content_length: int | None) -> Response | None:
        if path not in (b"/ingest", b"/boom", b"/headers"):
            return json_error(404, "not_found", "no such path")
        if method != b"POST":
            return json_error(405, "method_not_allowed", "use POST", retry_after=None)
        return None

    def handle(self, request: Request) -> Response:
        if request.path == b"/boom":
            raise RuntimeError("handler bug (expected by the test)")
        if request.path == b"/headers":
            return Response(202, orjson.dumps([name.decode() for name, _ in request.headers]))
        payload = {"len": len(request.body), "path": request.path.decode(), "query": request.query.decode()}
        if request.query.startswith(b"pad="):
            payload["pad"] = "p" * int(request.query[4:])
        return Response(202, orjson.dumps(payload))


class ServerThread:
    """An HttpServer on 127.0.0.1:0 driven by its own uvloop in a daemon thread."""

    def __init__(self, limits: HttpLimits, sndbuf: int = 0) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        sock = socket.socket()
        if sndbuf:  # accepted sockets inherit it: unsent answers then stay in the server's own buffer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self.addr = sock.getsockname()
        self.stats = HttpStats()
        self.server = HttpServer(EchoApp(), limits, self.stats)
        self.call(self.server.start(sock))

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T]) -> T:
        """Run fn on the server loop (server state is only touched from its own thread)."""

        async def wrapper() -> T:
            return fn()

        return self.call(wrapper())

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.call(self.server.shutdown(1.0))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture
def srv() -> Iterator[ServerThread]:
    s = ServerThread(HttpLimits(max_body_bytes=64 << 10, max_connections=50))
    yield s
    s.stop()


@pytest.fixture
def fast() -> Iterator[ServerThread]:
    s = ServerThread(HttpLimits(header_timeout=0.3, body_timeout=0.3, idle_timeout=0.3))
    yield s
    s.stop()


class Client:
    """Raw socket with a read buffer so pipelined answers can be taken one at a time."""

    def __init__(self, addr: tuple[str, int], timeout: float = 5.0, nodelay: bool = False, rcvbuf: int = 0) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def read_exact_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        head = self.read_exact_head()
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers[b"content-length"])
        while len(self.buf) < size:
            self._fill()
        body, self.buf = self.buf[:size], self.buf[size:]
        return status, headers, body

    def closed(self, within: float = 3.0) -> bool:
        """True if the server closes (EOF or reset) within the deadline, with no unread bytes."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return not self.buf
            if not chunk:
                return not self.buf
            self.buf += chunk
        return False

    def close(self) -> None:
        self.sock.close()


def post(path: bytes = b"/ingest", body: bytes = b"x", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (
        b"POST %s HTTP/%s\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (path, version, len(body), extra, body)
    )


def wait_for(pred: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# ---- keep-alive and framing ---------------------------------------------------------------


def test_keepalive_http11_and_headers(srv: ServerThread) -> None:
    c = Client(srv.addr)
    for i in range(3):
        c.send(post(b"/ingest?i=%d" % i, b"a" * 100))
        status, h, body = c.response()
        assert status == 202
        assert orjson.loads(body) == {"len": 100, "path": "/ingest", "query": f"i={i}"}
        assert h[b"content-type"] == b"application/json"
        assert h[b"content-length"] == b"%d" % len(body)
        assert h[b"date"].endswith(b"GMT")
        assert b"connection" not in h
    c.send(post(extra=b"Connection: close\r\n"))
    status, h, _ = c.response()
    assert status == 202 and h[b"connection"] == b"close"
    assert c.closed()
    assert srv.run(lambda: srv.stats.requests) == 4
    assert srv.run(lambda: srv.stats.responses_by_status[202]) == 4


def test_http10_closes_by_default(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(post(version=b"1.0"))
    status, h, _ = c.response()
    assert status == 202 and h[b"connection"] == b"close"
    assert c.closed()


def test_http10_keepalive_when_asked(srv: ServerThread) -> None:
    c = Client(srv.addr)
    for _ in range(2):
        c.send(post(version=b"1.0", extra=b"Connection: keep-alive\r\n"))
        status, h, _ = c.response()
        assert status == 202 and h[b"connection"] == b"keep-alive"
    c.close()


def test_preflight_404_405_keep_connection_without_body(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\nGET /ingest HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.response()[0] == 404
    status, h, body = c.response()
    assert status == 405 and orjson.loads(body)["error"] == "method_not_allowed"
    c.send(b"HEAD /ingest HTTP/1.1\r\nHost: t\r\n\r\n")
    head = c.read_exact_head()
    assert head.startswith(b"HTTP/1.1 405") and b"content-length: " in head
    c.send(post())
    assert c.response()[0] == 202  # HEAD answer carried no body: the stream is still in sync
    c.close()


def test_pipelined_in_one_segment(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"".join(post(b"/ingest?n=%d" % i, b"b" * i) for i in range(1, 4)))
    for i in range(1, 4):
        status, _, body = c.response()
        assert status == 202 and orjson.loads(body) == {"len": i, "path": "/ingest", "query": f"n={i}"}
    c.close()


def test_pipelined_split_byte_by_byte(srv: ServerThread) -> None:
    c = Client(srv.addr, nodelay=True)
    data = b"".join(post(b"/ingest?n=%d" % i, b"c" * (i * 7)) for i in range(3))
    data += b"POST /ingest?n=3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    for i in range(len(data)):
        c.send(data[i : i + 1])
    for i in range(4):
        status, _, body = c.response()
        assert status == 202 and orjson.loads(body)["query"] == f"n={i}"
    assert orjson.loads(body)["len"] == 3
    c.close()


def test_chunked_body_decoded(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(
        b"POST /ingest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    status, _, body = c.response()
    assert status == 202 and orjson.loads(body)["len"] == 11
    c.close()


def test_chunked_over_limit_413_before_client_finishes(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (16384, b"z" * 16384)
    planned = 2000  # ~32 MB, far past the 64 KiB limit
    sent = 0
    for sent in range(1, planned + 1):
        try:
            c.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([c.sock], [], [], 0)[0]:
            break
    assert sent < planned
    status, h, body = c.response()
    assert status == 413 and h[b"connection"] == b"close"
    assert orjson.loads(body)["error"] == "body_too_large"
    assert c.closed()
    assert srv.run(lambda: srv.stats.too_large) == 1


def test_content_length_over_limit_413_without_body(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
    status, h, _ = c.response()
    assert status == 413 and h[b"connection"] == b"close"
    assert c.closed()


def test_expect_100_continue_accepted(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert c.read_exact_head() == b"HTTP/1.1 100 Continue"
    c.send(b"abcd")
    status, _, body = c.response()
    assert status == 202 and orjson.loads(body)["len"] == 4
    c.close()


@pytest.mark.parametrize(("path", "length", "expected"), [(b"/nope", 10, 404), (b"/ingest", 10 << 20, 413)])
def test_expect_100_continue_rejected(srv: ServerThread, path: bytes, length: int, expected: int) -> None:
    c = Client(srv.addr)
    c.send(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (path, length))
    status, h, _ = c.response()
    assert status == expected and h[b"connection"] == b"close"
    assert c.closed()  # and no "100 Continue" came before the final answer


# ---- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"POST /ingest HTTP/1.1 extra\r\nHost: t\r\n\r\n",
        b"POST /ingest HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
        b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /ingest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST /ingest HTTP/1.1\r\nContent-Length: 1\r\n\r\na",
    ],
    ids=["garbage", "request-line", "header-name", "cl-and-te", "te-gzip", "double-cl", "no-host"],
)
def test_malformed_400_and_close(srv: ServerThread, raw: bytes) -> None:
    c = Client(srv.addr)
    c.send(raw)
    status, h, body = c.response()
    assert status == 400 and h[b"connection"] == b"close"
    assert orjson.loads(body)["error"] == "bad_request"
    assert c.closed()
    assert srv.run(lambda: srv.stats.bad_requests) == 1


def test_upgrade_501(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"GET /ingest HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    status, _, body = c.response()
    assert status == 501 and orjson.loads(body)["error"] == "upgrade_not_supported"
    assert c.closed()


def test_headers_too_large_431(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\nContent-Length: 0\r\n\r\n" % (b"h" * (20 << 10)))
    status, h, _ = c.response()
    assert status == 431 and h[b"connection"] == b"close"
    assert c.closed()


def test_never_ending_header_431_before_client_finishes(srv: ServerThread) -> None:
    c = Client(srv.addr, nodelay=True)
    c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nX-Endless: ")
    planned = 1000  # 4 MB of one header value, never terminated
    sent = 0
    for sent in range(1, planned + 1):
        try:
            c.send(b"e" * 4096)
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([c.sock], [], [], 0.005)[0]:
            break
    assert sent < planned
    status, _, _ = c.response()
    assert status == 431
    assert c.closed()


def test_handler_exception_500_and_server_keeps_serving(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(post(b"/boom"))
    status, h, body = c.response()
    assert status == 500 and h[b"connection"] == b"close"
    assert orjson.loads(body)["error"] == "internal_error"
    assert c.closed()
    c2 = Client(srv.addr)
    c2.send(post())
    assert c2.response()[0] == 202
    c2.close()


# ---- timeouts -------------------------------------------------------------------------------


def test_header_trickle_gets_408(fast: ServerThread) -> None:
    c = Client(fast.addr)
    start = time.monotonic()
    trickle = b"POST /ingest HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 1000
    got = False
    for byte in trickle:  # one byte every 20 ms: each byte arrives well within any per-read timeout
        try:
            c.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([c.sock], [], [], 0.02)[0]:
            got = True
            break
    assert got
    status, h, body = c.response()
    elapsed = time.monotonic() - start
    assert status == 408 and h[b"connection"] == b"close"
    assert 0.2 < elapsed < 2.0
    assert c.closed()
    assert fast.run(lambda: fast.stats.header_timeouts) == 1


def test_body_timeout_408(fast: ServerThread) -> None:
    c = Client(fast.addr)
    c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly-part")
    status, h, _ = c.response()
    assert status == 408 and h[b"connection"] == b"close"
    assert c.closed()
    assert fast.run(lambda: fast.stats.body_timeouts) == 1


def test_idle_keepalive_timeout_closes_silently(fast: ServerThread) -> None:
    c = Client(fast.addr)
    c.send(post())
    assert c.response()[0] == 202
    start = time.monotonic()
    assert c.closed(within=3.0)
    assert time.monotonic() - start > 0.15
    assert wait_for(lambda: fast.run(lambda: fast.stats.idle_closed) == 1)


# ---- capacity, flow control, shutdown ---------------------------------------------------------


def test_max_connections_503() -> None:
    s = ServerThread(HttpLimits(max_connections=2))
    try:
        held = [Client(s.addr), Client(s.addr)]
        for c in held:
            c.send(post())
            assert c.response()[0] == 202
        extra = Client(s.addr)
        status, h, body = extra.response()
        assert status == 503 and h[b"retry-after"] == b"1" and h[b"connection"] == b"close"
        assert orjson.loads(body)["error"] == "too_many_connections"
        assert extra.closed()
        assert s.run(lambda: s.stats.connections_rejected) == 1
        held[0].close()
        assert wait_for(lambda: s.run(lambda: s.server.connection_count) == 1)
        again = Client(s.addr)
        again.send(post())
        assert again.response()[0] == 202
    finally:
        s.stop()


def test_flood_without_reading_stays_bounded(srv: ServerThread) -> None:
    flooder = Client(srv.addr, timeout=1.0, rcvbuf=32 << 10)
    batch = b"".join(post(b"/ingest?f=%d" % i, b"f" * 10) for i in range(500))
    sent = 0
    stop = threading.Event()

    def flood() -> None:
        nonlocal sent
        while not stop.is_set() and sent < (200 << 20):
            try:
                flooder.send(batch)  # blocks once the server stops reading
            except (TimeoutError, OSError):
                stop.set()
                return
            sent += len(batch)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    assert stop.wait(20), "the server kept reading from a client that never reads"
    buffered = srv.run(lambda: max(c._t.get_write_buffer_size() for c in srv.server._conns if c._t))
    assert buffered < 4 << 20
    assert srv.run(lambda: any(c._paused for c in srv.server._conns))  # flow control kicked in
    other = Client(srv.addr)
    other.send(post(b"/ingest?other=1"))
    status, _, body = other.response()
    assert status == 202 and orjson.loads(body)["query"] == "other=1"
    other.close()
    flooder.close()
    thread.join(5)


def test_slow_reader_gets_every_pipelined_answer_in_order(srv: ServerThread) -> None:
    # Exercises pause_writing -> buffered input -> resume_writing and the sliced feeding of big reads.
    c = Client(srv.addr, timeout=10.0, rcvbuf=16 << 10)
    total = 30_000
    data = b"".join(post(b"/ingest?n=%d" % i, b"q" * (i % 50)) for i in range(total))
    sender = threading.Thread(target=c.send, args=(data,), daemon=True)
    sender.start()
    assert wait_for(lambda: srv.run(lambda: any(c._paused for c in srv.server._conns)), within=10)
    for i in range(total):
        status, _, body = c.response()
        assert status == 202
        got = orjson.loads(body)
        assert got["query"] == f"n={i}" and got["len"] == i % 50
    sender.join(10)
    c.close()


def test_shutdown_closes_idle_and_finishes_inflight(srv: ServerThread) -> None:
    idle = Client(srv.addr)
    idle.send(post())
    assert idle.response()[0] == 202
    busy = Client(srv.addr)
    busy.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n12345")
    assert wait_for(lambda: srv.run(lambda: srv.stats.connections_total) == 2)
    # the 5 body bytes must be parsed before shutdown starts; wait on the connection state
    assert wait_for(lambda: srv.run(lambda: any(c._body_len == 5 for c in srv.server._conns)))
    done = asyncio.run_coroutine_threadsafe(srv.server.shutdown(5.0), srv.loop)
    assert idle.closed()
    assert not done.done()
    busy.send(b"67890")
    status, h, body = busy.response()
    assert status == 202 and h[b"connection"] == b"close" and orjson.loads(body)["len"] == 10
    assert busy.closed()
    done.result(5)
    refused = socket.socket()
    refused.settimeout(2)
    with pytest.raises(OSError):
        refused.connect(srv.addr)
        refused.sendall(post())
        if not refused.recv(1):
            raise ConnectionResetError
    refused.close()
    assert srv.run(lambda: srv.server.connection_count) == 0
