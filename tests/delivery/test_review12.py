"""Regression tests for the review of issue 12's hot path (the senders' own HTTP/1.1 client), each failing before
its fix, all against real sockets on 127.0.0.1:

1. An analyzer's answer head had no size bound: httptools keeps a header field being received and copies it at
   every segment, so an endless ``X-Big: aaaa...`` grew a worker by the megabytes it was sent (235 MB peak, loop
   stalls of 90 ms, for 10 s of one connection) until the request timeout.
2. A kept-alive connection the analyzer closed without ``Connection: close`` (a limit of requests per connection,
   an idle timeout racing the next request) failed the next request sent on it: a failed attempt counted against
   a healthy analyzer, a retry token and a backoff spent, and, once the budget ran out, a failover counted as
   possible duplicates of packets the analyzer never read.
3. A ``101`` answer escaped the parser's error handling (``HttpParserUpgrade`` is no ``HttpParserError``: asyncio
   logged a fatal-error traceback per request), and a status below 100 passed for an interim answer: the request
   waited for the whole timeout.
4. A batch taken in batch mode and retried after its analyzer was turned to one packet per request (a reload,
   an admin change) went out as its first packet alone and was counted delivered whole: the others were lost.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from distributor.config import OutlierConfig, SenderConfig
from distributor.delivery.http_client import HttpClient, SendError, target
from distributor.delivery.queue import NO_REF, Packet, PacketQueue, QueueTotals
from distributor.delivery.sender import AnalyzerSender
from distributor.shared_table import C_DELIVERED_PACKETS, C_FAILED_ATTEMPTS, COUNTER_CELLS
from distributor.tools.localcluster import LocalCluster, wait_until
from http_sinks import RawServer
from support import Client, packet

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"accepted": 1}'

# (connection number, request number on it, request head, body) -> bytes to send; None closes without an answer
Policy = Callable[[int, int, bytes, bytes], "bytes | None"]


class RawAnalyzer(RawServer):
    """An analyzer written on raw sockets, one thread per connection: ``GET`` answers 200 ``{}`` (health checks);
    a ``POST`` is answered as ``policy`` says and its packet ids recorded when that is a 2xx; ``close_after`` POSTs on one
    connection, it closes it without saying so (no ``Connection: close``)."""

    def __init__(self, policy: Policy, close_after: int = 0) -> None:
        self.policy = policy
        self.close_after = close_after
        self.lock = threading.Lock()
        self.packet_ids: list[str] = []
        self.posts = 0
        super().__init__()

    def taken(self) -> list[str]:
        with self.lock:
            return list(self.packet_ids)

    def serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        posts = 0
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                if head.startswith(b"GET "):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                    continue
                posts += 1
                out = self.policy(number, posts, head, body)
                with self.lock:
                    self.posts += 1
                    if out is not None and out.startswith(b"HTTP/1.1 2"):
                        self.packet_ids += [json.loads(line)["packet_id"] for line in body.splitlines() if line.strip()]
                if out is None:
                    return
                conn.sendall(out)
                if self.close_after and posts >= self.close_after:
                    return
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture
def raw_analyzer() -> Iterator[Callable[..., RawAnalyzer]]:
    started: list[RawAnalyzer] = []

    def factory(policy: Policy, close_after: int = 0) -> RawAnalyzer:
        started.append(RawAnalyzer(policy, close_after))
        return started[-1]

    yield factory
    for analyzer in started:
        analyzer.close()


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def failed_post(analyzer: Handler, request_timeout: float) -> tuple[SendError, float]:
    """One POST through a fresh client to a scripted analyzer that must make it fail: the error, seconds taken."""
    server = await asyncio.start_server(analyzer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HttpClient(1.0, request_timeout, ssl.create_default_context(), 4)
    started = time.monotonic()
    try:
        with pytest.raises(SendError) as failure:
            await client.post(target(f"http://127.0.0.1:{port}"), "/ingest", b"", [b"{}"])
        return failure.value, time.monotonic() - started
    finally:
        await client.close()
        server.close()


# ---- 1. the answer head is bounded


@pytest.mark.timeout(60)
def test_an_endless_answer_head_is_refused_at_its_bound_not_kept_until_the_timeout() -> None:
    """The analyzer answers ``200`` and then one header field that never ends, as fast as the client reads."""
    written = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        try:
            while True:
                writer.write(b"a" * 65536)
                await writer.drain()
                written += 65536
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def scenario() -> None:
        error, took = await failed_post(endless, 20.0)
        assert error.ambiguous, "the analyzer had the whole request"
        assert "timed out" not in str(error), (
            f"an endless answer head was read for {took:.1f} s ({written >> 20} MiB) until the request timeout")
        assert took < 5.0
        assert written < 4 << 20, f"{written >> 20} MiB read before giving up"

    asyncio.run(scenario())


def test_a_large_head_within_the_bound_split_over_many_segments_is_still_an_answer() -> None:
    """The bound counts head bytes only: a head of 40 KiB sent a byte at a time (slowly split lines), then a
    body of 1 MiB, is one good answer with its Retry-After."""

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        body = b"x" * (1 << 20)
        head = (b"HTTP/1.1 503 Busy\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 400) for i in range(100))
                + b"Retry-After: 7\r\nContent-Length: %d\r\n\r\n" % len(body))
        for index in range(0, 200):  # the start, a byte per segment
            writer.write(head[index:index + 1])
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(head[200:] + body)
        await writer.drain()
        await reader.read()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(dribble, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = HttpClient(1.0, 20.0, ssl.create_default_context(), 4)
        got = await client.post(target(f"http://127.0.0.1:{port}"), "/ingest", b"", [b"{}"])
        await client.close()
        server.close()
        assert got.status == 503 and got.retry_after == "7"

    asyncio.run(scenario())


# ---- 2. a kept-alive connection closed by the analyzer


def test_a_keep_alive_connection_closed_after_each_answer_costs_no_failed_request(
    raw_analyzer: Callable[..., RawAnalyzer],
) -> None:
    """The analyzer answers each request with a plain keep-alive 200 and then closes the connection (as a server
    does at its requests-per-connection limit). Back-to-back requests reuse the connection before its close is
    read: each must still be answered, and the analyzer must read each request once."""
    analyzer = raw_analyzer(lambda *_: OK, close_after=1)

    async def scenario() -> list[str]:
        client = HttpClient(1.0, 10.0, ssl.create_default_context(), 4)
        failures = []
        for i in range(60):
            try:
                got = await client.post(target(analyzer.url), "/ingest/batch", b"",
                                        [b'{"packet_id":"k-%d"}' % i])
                assert got.status == 200
            except SendError as exc:
                failures.append(f"k-{i}: {exc}")
        await client.close()
        return failures

    failures = asyncio.run(scenario())
    assert not failures, f"{len(failures)} of 60 requests failed on a closed kept-alive connection: {failures[:3]}"
    assert analyzer.taken() == [f"k-{i}" for i in range(60)], "each request read once, in order"


def test_the_stale_connection_retry_is_once_and_only_for_a_reused_connection_without_an_answer(
    raw_analyzer: Callable[..., RawAnalyzer],
) -> None:
    """Only the first connection answers. The second request goes out on the kept-alive first one (closed: one
    retry on a new connection, which closes unanswered) or, if its close was seen, on a new one: either way it
    fails as ambiguous and the analyzer reads it once. A third request on a new connection closed unanswered is
    not retried: three requests read, three connections."""
    analyzer = raw_analyzer(lambda number, *_: OK if number == 1 else None, close_after=1)

    async def scenario() -> None:
        client = HttpClient(1.0, 10.0, ssl.create_default_context(), 4)
        assert (await client.post(target(analyzer.url), "/ingest/batch", b"", [b'{"packet_id":"a"}'])).status == 200
        for packet_id in (b"b", b"c"):
            with pytest.raises(SendError) as failure:
                await client.post(target(analyzer.url), "/ingest/batch", b"", [b'{"packet_id":"%s"}' % packet_id])
            assert failure.value.ambiguous
        await client.close()

    asyncio.run(scenario())
    assert analyzer.taken() == ["a"]
    assert (analyzer.posts, len(analyzer.connections)) == (3, 3)


@pytest.mark.timeout(90)
def test_a_distributor_counts_no_failures_against_an_analyzer_that_closes_each_connection(
    make_cluster: Callable[..., LocalCluster], raw_analyzer: Callable[..., RawAnalyzer],
) -> None:
    """End to end: 300 packets through a real distributor to an analyzer that closes each connection after its
    answer: all delivered once, no failed attempt, retry or possible duplicate counted against it."""
    analyzer = raw_analyzer(lambda *_: OK, close_after=1)
    cluster = make_cluster(analyzers=(), workers=1, distributor_args=[
        "--analyzer", f"closer={analyzer.url}@1", "--set", "sender.batch_linger=0"])
    client = Client(cluster.data_port)
    sent = [f"c-{i}" for i in range(300)]
    for packet_id in sent:
        status, _, body = client.post(packet(packet_id=packet_id))
        assert status == 202, body
    client.close()

    def row() -> dict[str, int]:
        return dict(cluster.admin("/admin/analyzers")["analyzers"][0])

    wait_until(lambda: row()["queue_packets"] == 0 and row()["delivered_packets"] == len(sent), 30,
               "every packet delivered")
    view = row()
    assert sorted(analyzer.taken()) == sorted(sent)
    assert (view["failed_attempts"], view["retries"], view["possible_duplicates"]) == (0, 0, 0), (
        f"{view['failed_attempts']} failed attempts and {view['retries']} retries over {analyzer.posts} requests "
        f"to a healthy analyzer")


# ---- 3. answers the client cannot take


def test_a_101_answer_and_a_status_below_100_fail_at_once_without_a_loop_error() -> None:
    answers = [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 000 Nothing\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 Below\r\nContent-Length: 0\r\n\r\n",
    ]

    async def scenario() -> None:
        loop_errors: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: loop_errors.append(context["message"]))
        for answer in answers:
            async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes = answer) -> None:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                writer.write(answer)
                await writer.drain()
                await reader.read()
                writer.close()

            error, took = await failed_post(script, 10.0)
            first_line = answer.split(b"\r\n")[0].decode()
            assert "timed out" not in str(error) and took < 5.0, f"{first_line}: {error} after {took:.1f} s"
            assert error.ambiguous
        assert not loop_errors, f"the event loop reported: {loop_errors}"

    asyncio.run(scenario())


# ---- 4. a batch in flight when its analyzer turns to one packet per request


class NoFailover:
    def fail_over(self, slot: int, packets: list[Packet], ambiguous: bool) -> list[Packet]:
        return packets

    def eject(self, slot: int) -> None:
        pass


@pytest.mark.timeout(60)
def test_a_batch_retried_after_a_switch_to_single_mode_delivers_every_packet(
    raw_analyzer: Callable[..., RawAnalyzer],
) -> None:
    """A batch of 5 is refused once (503, Retry-After: 1); meanwhile the slot is retargeted to mode single (what a
    reload or an admin change does). Every packet must reach the analyzer, and no more be counted delivered than
    it took."""
    busy = b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
    analyzer = raw_analyzer(lambda number, posts, *_: busy if (number, posts) == (1, 1) else OK)
    sent = [f"m-{i}" for i in range(5)]

    async def scenario() -> list[int]:
        counters = [0] * COUNTER_CELLS
        queue = PacketQueue(100, 1 << 20, counters, 0, QueueTotals())
        client = HttpClient(2.0, 10.0, ssl.create_default_context(), 4)
        sender = AnalyzerSender(0, "switch", analyzer.url, "batch", queue, SenderConfig(batch_linger=0.0),
                                OutlierConfig(), client, counters, 0, NoFailover())
        for packet_id in sent:
            queue.put(packet(packet_id=packet_id), 5, NO_REF)
        sender.start()
        sender.notify()
        await wait_for(lambda: analyzer.posts >= 1, "the batch refused once")
        sender.retarget("switch", analyzer.url, "single", "none")
        try:
            await sender.drain(15.0)
        finally:
            await client.close()
        return counters

    counters = asyncio.run(scenario())
    taken = analyzer.taken()
    delivered = counters[C_DELIVERED_PACKETS]
    assert set(taken) == set(sent), (
        f"the analyzer took {sorted(set(taken))} but {delivered} packets were counted delivered")
    assert delivered == len(sent) and counters[C_FAILED_ATTEMPTS] == 1
