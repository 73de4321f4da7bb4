"""Small real HTTP servers a test starts on 127.0.0.1 in a thread of its own.

``RecordingServer`` stands in where the test must see whole requests: as an analyzer slot of a
LocalCluster (the forwarded packet bytes and headers, e.g. ``traceparent``), and as the OTLP/HTTP
collector that receives the distributor's spans (``POST /v1/traces``, decoded with opentelemetry-proto).
``ThreadedServer`` runs a scripted ``BaseHTTPRequestHandler`` (a fake analyzer's answers); ``RawServer`` is
the base of servers written on raw sockets (answers no HTTP library would send, or none at all).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import orjson
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from distributor.tools.localcluster import free_port


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


class ThreadedServer:
    """``handler`` served by a ThreadingHTTPServer on 127.0.0.1 (a free port) until ``close``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RawServer:
    """A listening socket on 127.0.0.1: each accepted connection goes to ``serve(conn, number)`` (numbered from 1)
    in a thread of its own, until ``close``. A subclass sets its own state before calling ``__init__``: the
    accept loop starts there."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, conn: socket.socket, number: int) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self.serve, args=(conn, len(self.connections)), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


class RecordingServer:
    """aiohttp on 127.0.0.1 in its own thread; answers like an analyzer and like a trace collector."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "RecordingServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self._health)
        app.router.add_post("/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _record(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.requests.append(Recorded(request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        if request.path == "/v1/traces":
            return web.Response(body=b"", content_type="application/x-protobuf")
        return web.json_response({"accepted": body.count(b"\n") + 1})

    def recorded(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def packets(self) -> list[tuple[Recorded, dict[str, Any]]]:
        """Every packet posted to /ingest/batch or /ingest, with the request that carried it."""
        found = []
        for request in self.recorded("/ingest/batch") + self.recorded("/ingest"):
            found += [(request, orjson.loads(line)) for line in request.body.split(b"\n") if line.strip()]
        return found

    def spans(self) -> list[Span]:
        """Every span received on /v1/traces."""
        return list(_spans(self.recorded("/v1/traces")))


def _spans(requests: list[Recorded]) -> Iterator[Span]:
    for request in requests:
        export = ExportTraceServiceRequest.FromString(request.body)
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                yield from scope_spans.spans


def attributes(span: Span) -> dict[str, Any]:
    """A span's attributes as plain values."""
    found: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        kind = value.WhichOneof("value")
        found[attribute.key] = getattr(value, kind) if kind else None
    return found
