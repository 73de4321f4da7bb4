"""Deadlines of distributor.ingest.http11 over real sockets: never early, never against a slow reader."""

from __future__ import annotations

import threading
import time

import orjson
import pytest

from distributor.ingest.http11 import HttpLimits
from test_http11 import Client, ServerThread, post, wait_for

pytestmark = pytest.mark.timeout(60)
SNDBUF = 16 << 10  # a small kernel send buffer: unsent answers stay in the server's own write buffer
PAD = 20_000  # answer size for the slow-reader tests: below the 64 KiB high-water mark


def write_buffer(s: ServerThread) -> int:
    """Bytes of answers the server holds unsent for its (single) client."""
    return s.run(lambda: sum(c._t.get_write_buffer_size() for c in s.server._conns if c._t is not None))


def paused(s: ServerThread) -> bool:
    return s.run(lambda: any(c._paused for c in s.server._conns))


# ---- issue 16 item 5: deadlines never fire early ---------------------------------------------


@pytest.mark.parametrize("kind", ["header", "body", "idle"])
def test_deadline_never_fires_before_its_timeout(kind: str) -> None:
    timeout = 0.4  # the sweeper ticks every 0.1 s
    s = ServerThread(HttpLimits(header_timeout=timeout, body_timeout=timeout, idle_timeout=timeout))
    try:
        for attempt in range(3):
            time.sleep(0.02 + 0.03 * attempt)  # not a synchronisation: start at another phase of the 0.1 s tick
            start = time.monotonic()  # before the connection: the first head's clock starts at connect
            c = Client(s.addr)
            if kind == "header":
                c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\n")
                assert c.response()[0] == 408
            elif kind == "body":
                c.send(b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n12345")
                assert c.response()[0] == 408
            else:
                c.send(post())
                assert c.response()[0] == 202
            assert c.closed(within=3.0)
            elapsed = time.monotonic() - start
            assert elapsed >= timeout, f"{kind} deadline fired after {elapsed:.3f} s < {timeout} s (attempt {attempt})"
            c.close()
    finally:
        s.stop()


def test_linger_after_an_error_lasts_its_full_second() -> None:
    s = ServerThread(HttpLimits())  # default timeouts: the sweeper ticks once a second
    try:
        for attempt in range(2):
            time.sleep(0.3 * (attempt + 1))  # not a synchronisation: start at another phase of the 1 s tick
            c = Client(s.addr)
            start = time.monotonic()
            c.send(b"POST /ingest HTTP/1.1\r\nBad Header: x\r\n\r\n")
            assert c.response()[0] == 400
            # the client neither reads further nor closes: the server drains, then drops it after the linger
            assert wait_for(lambda: s.run(lambda: s.server.connection_count) == 0, within=5.0)
            elapsed = time.monotonic() - start
            assert elapsed >= 1.0, f"linger ended after {elapsed:.3f} s (attempt {attempt})"
            c.close()
    finally:
        s.stop()


# ---- issue 16 item 4: a client that only reads slowly keeps every answer ---------------------


def test_pipelining_slow_reader_gets_every_answer_with_a_short_header_timeout() -> None:
    limits = HttpLimits(header_timeout=0.5, body_timeout=0.5, idle_timeout=10.0)
    s = ServerThread(limits, sndbuf=SNDBUF)
    try:
        c = Client(s.addr, timeout=10.0, rcvbuf=16 << 10)
        total = 5000
        data = b"".join(post(b"/ingest?n=%d" % i, b"q" * (i % 50)) for i in range(total))
        sender = threading.Thread(target=c.send, args=(data,), daemon=True)
        sender.start()
        assert wait_for(lambda: paused(s), within=10)
        time.sleep(3 * limits.header_timeout)  # the slow reader: reads nothing for three header timeouts
        for i in range(total):
            status, _, body = c.response()
            assert status == 202, f"answer {i}: {status} {body!r}"
            assert orjson.loads(body)["query"] == f"n={i}"
        sender.join(10)
        c.send(post(b"/ingest?after=1"))  # no FIN came: the connection is still open and in sync
        status, _, body = c.response()
        assert status == 202 and orjson.loads(body)["query"] == "after=1"
        assert s.run(lambda: (s.stats.header_timeouts, s.stats.body_timeouts, s.stats.idle_closed)) == (0, 0, 0)
        c.close()
    finally:
        s.stop()


def fill_write_buffer(s: ServerThread, c: Client, pad: int, held: int = 1) -> int:
    """Send requests with `pad`-byte answers, one at a time, until the server holds `held` bytes of them unsent."""
    sent = 0
    while write_buffer(s) < held:
        assert sent < 1000, "the kernel buffers never filled"
        c.send(post(b"/ingest?pad=%d" % pad))
        sent += 1
        assert wait_for(lambda: s.run(lambda: s.stats.requests) == sent)
    return sent


def read_answers(c: Client, count: int, pad: int) -> None:
    for i in range(count):
        status, _, body = c.response()
        assert status == 202, f"answer {i}: {status} {body!r}"
        assert len(orjson.loads(body)["pad"]) == pad


def test_idle_deadline_waits_while_a_slow_reader_takes_its_answers() -> None:
    limits = HttpLimits(idle_timeout=0.6)
    s = ServerThread(limits, sndbuf=SNDBUF)
    try:
        c = Client(s.addr, rcvbuf=4096)
        sent = fill_write_buffer(s, c, PAD, held=40_000)
        assert not paused(s)  # 40-60 KB held: below the 64 KiB high-water mark
        started = time.monotonic()
        while write_buffer(s):  # the slow reader: 2 KiB every 50 ms while the server still holds answers
            time.sleep(0.05)
            chunk = c.sock.recv(2048)
            assert chunk, "closed while answers were unsent"
            c.buf += chunk
        assert time.monotonic() - started > limits.idle_timeout
        read_answers(c, sent, PAD)
        c.send(post(b"/ingest?after=1"))  # the idle clock restarted once the answers were out
        assert c.response()[0] == 202
        assert s.run(lambda: s.stats.idle_closed) == 0
        c.close()
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("ending", "final"),
    [(b"POST /ingest HTTP/1.1\r\nBad Header: x\r\n\r\n", 400), (post(extra=b"Connection: close\r\n"), 202)],
    ids=["error", "connection-close"],
)
def test_every_answer_is_written_before_a_close(ending: bytes, final: int) -> None:
    s = ServerThread(HttpLimits(), sndbuf=SNDBUF)
    try:
        c = Client(s.addr, rcvbuf=4096)
        sent = fill_write_buffer(s, c, PAD)
        c.send(ending)
        answered = 1 if final == 400 else sent + 1
        assert wait_for(lambda: s.run(lambda: s.stats.responses_by_status.get(final, 0)) == answered)
        time.sleep(1.5)  # the slow reader: reads nothing for longer than the 1 s linger after the final answer
        read_answers(c, sent, PAD)
        status, h, _ = c.response()
        assert status == final and h[b"connection"] == b"close"
        assert c.closed()
    finally:
        s.stop()


def test_client_that_never_reads_is_dropped_after_the_idle_timeout() -> None:
    limits = HttpLimits(idle_timeout=0.5)
    s = ServerThread(limits)
    try:
        c = Client(s.addr, timeout=1.0, rcvbuf=16 << 10)
        batch = b"".join(post(b"/ingest?f=%d" % i, b"f" * 10) for i in range(500))
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                try:
                    c.send(batch)
                except TimeoutError:
                    continue  # the server stopped reading: keep pushing until it drops us
                except OSError:
                    return

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        assert wait_for(lambda: paused(s), within=10)
        assert wait_for(lambda: s.run(lambda: s.server.connection_count) == 0, within=10)
        assert s.run(lambda: s.stats.idle_closed) == 1
        stop.set()
        thread.join(5)
        c.close()
    finally:
        s.stop()


# ---- review of issues 16/17, defect 5: a steady slow reader with the kernel's buffers in between --------


def test_steady_slow_reader_keeps_every_answer_while_the_kernel_buffers_drain() -> None:
    """With default socket buffers, megabytes of answers wait in the kernel (the server's send queue and the
    client's receive queue) before any waits in the server's own buffer. While a slow reader drains the
    kernel's part, the server's own buffer does not shrink for seconds; judged by that buffer alone, a reader
    taking 1 MiB/s without a pause was cut off after idle_timeout with answers lost."""
    limits = HttpLimits(idle_timeout=0.5)
    s = ServerThread(limits)  # default kernel buffers (the other slow-reader tests shrink them)
    try:
        c = Client(s.addr, timeout=10.0)
        total = 400  # 20 KB answers: 8 MB, more than the kernel buffers hold (observed below)
        sender = threading.Thread(target=c.send, args=(b"".join(post(b"/ingest?pad=%d" % PAD) for _ in range(total)),),
                                  daemon=True)
        sender.start()
        rate = 1 << 20  # bytes per second, taken in 16 KiB reads at an even pace
        started = time.monotonic()
        received = answers = reads = 0
        held = False  # seen the server hold answers in its own buffer: the kernel's were full
        while answers < total:
            due = started + received / rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())  # the reader's pace, not a synchronisation
            chunk = c.sock.recv(16 << 10)
            assert chunk, (f"the server closed the connection of a steady reader after {answers} of {total} answers "
                           f"({received} bytes in {time.monotonic() - started:.1f} s; idle_timeout "
                           f"{limits.idle_timeout} s)")
            tail = c.buf[-16:]
            c.buf += chunk
            answers += (tail + chunk).count(b"HTTP/1.1 ") - tail.count(b"HTTP/1.1 ")
            received += len(chunk)
            reads += 1
            if not held and reads % 16 == 0:
                held = write_buffer(s) > 0
        assert held, "the kernel buffers took every answer: this test did not test a slow reader"
        read_answers(c, total, PAD)
        sender.join(10)
        c.send(post(b"/ingest?after=1"))  # the connection is still open and in sync
        status, _, body = c.response()
        assert status == 202 and orjson.loads(body)["query"] == "after=1"
        assert s.run(lambda: s.stats.idle_closed) == 0
        c.close()
    finally:
        s.stop()
