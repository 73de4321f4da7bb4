"""Framing limits of distributor.ingest.http11 over real sockets: trailers, HTTP versions, HEAD errors, chunk memory."""

from __future__ import annotations

import select
import tracemalloc
from collections.abc import Iterator

import orjson
import pytest

from distributor.ingest.http11 import HttpLimits
from test_http11 import Client, ServerThread, post

pytestmark = pytest.mark.timeout(30)
CHUNKED_HEAD = b"POST /ingest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture
def srv() -> Iterator[ServerThread]:
    s = ServerThread(HttpLimits(max_body_bytes=64 << 10, max_connections=50))
    yield s
    s.stop()


def send_until_answered(c: Client, piece: bytes, planned: int) -> int:
    """Send `piece` up to `planned` times; stop once the server answers or closes. Returns how many were sent."""
    sent = 0
    for sent in range(1, planned + 1):
        try:
            c.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([c.sock], [], [], 0)[0]:
            break
    return sent


# ---- issue 16 item 1: trailers ---------------------------------------------------------------


def test_endless_trailer_fields_431_before_client_finishes(srv: ServerThread) -> None:
    c = Client(srv.addr, nodelay=True)
    c.send(CHUNKED_HEAD + b"1\r\n{\r\n0\r\n")
    planned = 4000  # 4000 x 1 KB of complete trailer lines: far past the 16 KiB header limit
    assert send_until_answered(c, b"a:b\r\n" * 200, planned) < planned
    status, h, body = c.response()
    assert status == 431 and h[b"connection"] == b"close"
    assert orjson.loads(body)["error"] == "headers_too_large"
    assert c.closed()
    assert srv.run(lambda: srv.stats.too_large) == 1


def test_never_ending_trailer_line_431_before_client_finishes(srv: ServerThread) -> None:
    c = Client(srv.addr, nodelay=True)
    c.send(CHUNKED_HEAD + b"1\r\n{\r\n0\r\nX-Endless: ")
    planned = 1000  # 4 MB of one trailer value, never terminated
    assert send_until_answered(c, b"e" * 4096, planned) < planned
    status, h, _ = c.response()
    assert status == 431 and h[b"connection"] == b"close"
    assert c.closed()


def test_trailers_share_the_header_budget_with_the_head(srv: ServerThread) -> None:
    c = Client(srv.addr)
    big = b"h" * (10 << 10)  # head and trailers are 10 KiB each: together above the 16 KiB limit
    c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"1\r\n{\r\n0\r\nX-Big-Trailer: %s\r\n\r\n" % (big, big))
    status, h, _ = c.response()
    assert status == 431 and h[b"connection"] == b"close"
    assert c.closed()


def test_trailer_fields_are_not_request_headers(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"POST /headers HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"2\r\n{}\r\n0\r\nX-Trailer: 1\r\nX-Checksum: 99\r\n\r\n")
    status, _, body = c.response()
    assert status == 202 and orjson.loads(body) == ["host", "transfer-encoding"]
    c.send(post())  # the connection is still in sync and usable
    assert c.response()[0] == 202
    c.close()


def test_big_chunks_split_across_reads_are_body_not_trailers(srv: ServerThread) -> None:
    c = Client(srv.addr, nodelay=True)
    chunk = b"%x\r\n%s\r\n" % (20_000, b"c" * 20_000)  # each chunk is larger than the 16 KiB header limit
    data = CHUNKED_HEAD + chunk * 3 + b"0\r\nX-Trailer: 1\r\n\r\n"
    for i in range(0, len(data), 1000):
        c.send(data[i : i + 1000])
    status, _, body = c.response()
    assert status == 202 and orjson.loads(body)["len"] == 60_000
    c.close()

# ---- issue 16 item 2: HTTP/1.0 with chunked --------------------------------------------------


def test_http10_chunked_is_400_and_closes_before_a_pipelined_request(srv: ServerThread) -> None:
    c = Client(srv.addr)
    c.send(b"POST /ingest HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"1\r\nx\r\n0\r\n\r\n" + post(b"/ingest?smuggled=1"))
    status, h, body = c.response()
    assert status == 400 and h[b"connection"] == b"close"
    assert orjson.loads(body)["error"] == "bad_request"
    assert c.closed()  # and the pipelined request was never answered
    assert srv.run(lambda: srv.stats.requests) == 0


# ---- issue 16 item 3: many small chunks ------------------------------------------------------


def test_many_small_chunks_cost_about_the_body_size() -> None:
    s = ServerThread(HttpLimits(max_body_bytes=1 << 20))
    try:
        size = 512 << 10  # sent as 2-byte chunks: 262,144 pieces
        payload = CHUNKED_HEAD + b"2\r\nab\r\n" * (size // 2) + b"0\r\n\r\n"
        c = Client(s.addr, timeout=20)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            c.send(payload)
            status, _, body = c.response()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert status == 202 and orjson.loads(body)["len"] == size
        # the body buffer and its final copy, plus read buffers: a few times the body, not 20x
        assert peak - base < 4 * size, f"peak {peak - base} bytes for a {size}-byte body"
        c.close()
    finally:
        s.stop()


# ---- issue 16 item 6: error answers to HEAD carry no body ------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HEAD /ingest HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n", 400),
        (b"HEAD /ingest HTTP/1.1\r\n\r\n", 400),
        (b"HEAD /ingest\x01 HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"HEAD /ingest HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n" % (b"h" * (20 << 10)), 431),
        (b"HEAD /ingest HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
        (b"HEAD /ingest HTTP/2.0\r\n\r\n", 505),
    ],
    ids=["bad-header", "no-host", "bad-url", "431", "upgrade-501", "http2-505"],
)
def test_head_error_answers_have_no_body(srv: ServerThread, raw: bytes, expected: int) -> None:
    c = Client(srv.addr)
    c.send(raw)
    head = c.read_exact_head()
    assert head.startswith(b"HTTP/1.1 %d " % expected)
    length = [line for line in head.split(b"\r\n") if line.startswith(b"content-length: ")]
    assert length and int(length[0].split(b": ")[1]) > 0  # the length a GET would get, per RFC 9110
    assert c.closed()  # nothing after the head: no body bytes


def test_head_408_has_no_body() -> None:
    s = ServerThread(HttpLimits(header_timeout=0.3))
    try:
        c = Client(s.addr)
        c.send(b"HEAD /ingest HTTP/1.1\r\nHost: t\r\n")  # the head never ends
        head = c.read_exact_head()
        assert head.startswith(b"HTTP/1.1 408 ") and b"content-length: " in head
        assert c.closed()
    finally:
        s.stop()

# ---- issue 16 item 7: HTTP versions other than 1.0 and 1.1 -----------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /ingest HTTP/2.0\r\n\r\n",
        b"POST /ingest HTTP/2.0\r\nHost: t\r\nContent-Length: 1\r\n\r\nx",
        b"GET /ingest HTTP/0.9\r\n\r\n",
        b"GET /ingest\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ],
    ids=["http2", "http2-with-host", "http09", "http09-no-version", "h2-preface"],
)
def test_other_http_versions_505_and_close(srv: ServerThread, raw: bytes) -> None:
    c = Client(srv.addr)
    c.send(raw)
    status, h, body = c.response()
    assert status == 505 and h[b"connection"] == b"close"
    assert orjson.loads(body)["error"] == "http_version_not_supported"
    assert c.closed()
    assert srv.run(lambda: srv.stats.requests) == 0



# ---- review of issues 16/17, defect 12: the first chunk-size line counts toward max_header_bytes ----------


def test_never_ending_extension_on_the_first_chunk_size_line_431_before_client_finishes(srv: ServerThread) -> None:
    """Chunk extensions are not chunk data: like a head, the first chunk-size line is limited by max_header_bytes
    (16 KiB). It was not counted at all (only later chunk-size lines were), so 8 MB of one extension were read."""
    c = Client(srv.addr, nodelay=True)
    c.send(CHUNKED_HEAD + b"1;ext=")
    planned = 2000  # 8 MB of one chunk extension, never terminated
    sent = send_until_answered(c, b"e" * 4096, planned)
    assert sent < planned, f"{sent * 4096} bytes of one chunk-size line were sent and the server never answered"
    status, h, body = c.response()
    assert status == 431 and h[b"connection"] == b"close"
    assert orjson.loads(body)["error"] == "headers_too_large"
    assert c.closed()
    assert srv.run(lambda: srv.stats.too_large) == 1
