"""The senders' HTTP/1.1 client against real sockets: scripted servers on 127.0.0.1 that answer, stall, close
early, or speak HTTP/1.0, and count the connections they were given."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import pytest

from distributor.delivery import http_client
from distributor.delivery.http_client import HttpClient, SendError, target

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A TCP server whose every connection runs ``script``; records what it read and how many connections came."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/base"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and Content-Length body); None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed_by_client += 1
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def answer(status: int = 200, headers: bytes = b"", body: bytes = b'{"accepted":1}') -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), headers, body)


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    while await server.read_request(reader) is not None:
        writer.write(answer())
        await writer.drain()


def client(request_timeout: float = 5.0) -> HttpClient:
    return HttpClient(1.0, request_timeout, ssl.create_default_context(), 4)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_pieces_arrive_in_order_as_one_body_over_one_kept_alive_connection() -> None:
    async def scenario() -> None:
        async with Server(keep_answering) as server:
            c = client()
            pieces = [b'{"a":1}', b"\n", b"x" * 70_000, b"\n", b'{"b":2}']
            for _ in range(3):
                got = await c.post(target(server.url), "/ingest/batch", b"X-Packet-Count: 3\r\n", pieces)
                assert got.status == 200 and got.retry_after is None
            await c.close()
        assert server.connections == 1, "keep-alive: three requests, one connection"
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        assert body == b"".join(pieces)
        assert head.startswith(b"POST /base/ingest/batch HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:%d\r\n" % server.port in head + b"\r\n"
        assert b"\r\nX-Packet-Count: 3" in head
        assert b"\r\nContent-Length: %d" % len(body) in head

    asyncio.run(scenario())


def test_retry_after_and_an_interim_answer_before_the_final_one() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + answer(503, b"Retry-After: 7\r\n"))
        await writer.drain()
        await reader.read()

    async def scenario() -> None:
        async with Server(script) as server:
            c = client()
            got = await c.post(target(server.url), "/ingest", b"", [b"{}"])
            await c.close()
        assert got == (503, "7")

    asyncio.run(scenario())


def test_connection_close_answers_and_http10_answers_without_a_length_are_not_reused() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            writer.write(answer(200, b"Connection: close\r\n"))
        else:  # the body runs until the connection closes
            writer.write(b"HTTP/1.0 202 Accepted\r\n\r\nno length here")
        await writer.drain()

    async def scenario() -> None:
        async with Server(script) as server:
            c = client()
            first = await c.post(target(server.url), "/ingest", b"", [b"{}"])
            second = await c.post(target(server.url), "/ingest", b"", [b"{}"])
            await c.close()
        assert (first.status, second.status) == (200, 202)
        assert server.connections == 2

    asyncio.run(scenario())


def test_a_connection_closed_after_the_request_without_an_answer_is_ambiguous() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)  # read it, then drop the connection without answering

    async def scenario() -> None:
        async with Server(script) as server:
            c = client()
            with pytest.raises(SendError) as caught:
                await c.post(target(server.url), "/ingest", b"", [b"{}"])
            await c.close()
        assert caught.value.ambiguous, "the analyzer had the whole request: it may have taken it"

    asyncio.run(scenario())


def test_a_refused_connection_is_not_ambiguous() -> None:
    async def scenario() -> None:
        async with Server(keep_answering) as server:
            url = server.url
        c = client()  # the server is gone: its port refuses
        with pytest.raises(SendError) as caught:
            await c.post(target(url), "/ingest", b"", [b"{}"])
        await c.close()
        assert not caught.value.ambiguous

    asyncio.run(scenario())


def test_a_stalled_analyzer_times_out_ambiguously_and_its_connection_is_closed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        await server.read_request(reader)  # never answers; returns when the client closes

    async def scenario() -> None:
        async with Server(script) as server:
            c = client(request_timeout=0.3)
            with pytest.raises(SendError) as caught:
                await c.post(target(server.url), "/ingest", b"", [b"{}"])
            assert caught.value.ambiguous
            await wait_for(lambda: server.closed_by_client == 1, "the client to close the timed-out connection")
            await c.close()

    asyncio.run(scenario())


def test_a_cancelled_request_closes_its_connection_instead_of_reusing_it() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            await server.read_request(reader)  # stall the first; EOF when the client gives up
            return
        writer.write(answer())
        await writer.drain()
        await keep_answering(reader, writer, server)

    async def scenario() -> None:
        async with Server(script) as server:
            c = client()
            post = asyncio.ensure_future(c.post(target(server.url), "/ingest", b"", [b"{}"]))
            await wait_for(lambda: len(server.requests) == 1, "the first request to arrive")
            post.cancel()
            with pytest.raises(asyncio.CancelledError):
                await post
            await wait_for(lambda: server.closed_by_client == 1, "the cancelled request's connection to close")
            got = await c.post(target(server.url), "/ingest", b"", [b"{}"])
            await c.close()
        assert got.status == 200 and server.connections == 2

    asyncio.run(scenario())


def test_idle_connections_expire_and_a_closed_idle_one_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_client, "IDLE_TIMEOUT", 0.2)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(answer())
        await writer.drain()
        if server.connections == 2:
            return  # the analyzer closes this idle keep-alive connection itself
        await server.read_request(reader)  # the client's idle expiry closes the first one

    async def scenario() -> None:
        async with Server(script) as server:
            c = client()
            await c.post(target(server.url), "/ingest", b"", [b"{}"])
            await wait_for(lambda: server.closed_by_client == 1, "the idle connection to expire")
            await c.post(target(server.url), "/ingest", b"", [b"{}"])
            # the server closed connection 2 after answering: once the client saw the FIN, the next request
            # opens a third connection instead of failing on the dead one
            await wait_for(lambda: all(conn.closed for idle in c._idle.values() for conn in idle),
                           "the client to see the analyzer close its idle connection")
            got = await c.post(target(server.url), "/ingest", b"", [b"{}"])
            await c.close()
        assert got.status == 200 and server.connections == 3

    asyncio.run(scenario())
