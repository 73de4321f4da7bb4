"""A defect of the built-in emitter that the kill -9 scenarios of this folder run into now and then.

When a worker is SIGKILLed, connections the kernel had already completed in its accept backlog are reset. The
emitter (``distributor/tools/emitter.py``, ``_Run.worker``) does not look at ``conn.closed`` after
``await self._connect()``: if the reset was processed while it waited (``connection_lost`` ran before the
worker task resumed), ``conn.request`` writes on a transport uvloop has already closed and raises
``RuntimeError: unable to perform operation on <TCPTransport closed=True ...>; the handler is closed``. That
connection's task dies, and ``run_load`` re-raises the error at its end, so ``./run.sh``, ``distributor bench``
or the emitter CLI crash where a lost connection should only count as an error. This test forces that window
open (the reset is read before ``_connect`` returns) to make the race deterministic.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import uvloop

from distributor.tools import emitter
from distributor.tools.emitter import LoadSpec, LoadStats, run_load


def test_emitter_survives_a_connection_reset_right_after_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    connect = emitter._Run._connect

    async def connect_then_reset(self: emitter._Run) -> emitter._Connection | None:
        conn = await connect(self)
        if conn is None:
            return None
        while True:  # what a SIGKILLed worker's backlog gets: the accepted connection is reset
            try:
                accepted, _ = listener.accept()
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()
        for _ in range(5000):  # the reset is processed before the worker resumes (the race, made certain)
            if conn.closed:
                break
            await asyncio.sleep(0.001)
        assert conn.closed
        return conn

    monkeypatch.setattr(emitter._Run, "_connect", connect_then_reset)
    stats = LoadStats()
    try:
        uvloop.run(run_load(LoadSpec(url=f"http://127.0.0.1:{port}/ingest", duration=0.3, connections=1), stats))
    finally:
        listener.close()
    assert stats.by_status == {}  # nothing was ever answered; the run ended without raising


def test_emitter_survives_a_transport_closed_under_it_with_the_last_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same reset, later in a connection's life: the server's answer and its reset are read in one go; uvloop
    closes the transport, the answer wakes the task before ``connection_lost`` runs, and the next request was
    written on the closed transport (RuntimeError out of ``run_load``). Here each answer leaves the connection with
    a transport in that state (closing, and a write raises as uvloop's does), to make that order certain."""
    answer = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    class ClosedHandle(asyncio.Transport):
        """What uvloop's transport is once it closed its handle on a reset, before ``connection_lost`` runs."""

        def is_closing(self) -> bool:
            return True

        def write(self, data: bytes | bytearray | memoryview) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

        def close(self) -> None:
            pass

        def abort(self) -> None:
            pass

    complete = emitter._Connection.on_message_complete

    def complete_then_closed(self: emitter._Connection) -> None:
        complete(self)
        assert self.transport is not None
        self.transport.close()
        self.transport = ClosedHandle()

    monkeypatch.setattr(emitter._Connection, "on_message_complete", complete_then_closed)

    async def scenario() -> LoadStats:
        listener = await asyncio.start_server(server, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        stats = LoadStats()
        try:
            await run_load(LoadSpec(url=f"http://127.0.0.1:{port}/ingest", duration=0.3, connections=2), stats)
        finally:
            listener.close()
        return stats

    stats = uvloop.run(scenario())
    assert stats.by_status.get(202, 0) > 1 and stats.reconnects > 0  # answered, reconnected, never raised
