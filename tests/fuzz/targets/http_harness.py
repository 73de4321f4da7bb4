"""A real ``http11._Conn`` on a fake transport, fed byte streams in pieces, with the answers parsed back.

The transport behaves like uvloop's where the protocol can tell: writes after ``write_eof`` or
``close`` are violations (a real transport raises or drops them), ``pause_reading`` stops input
until ``resume_reading``, a write buffer above ``high_water`` calls ``pause_writing`` and a drain
calls ``resume_writing``; ``close`` is followed by ``connection_lost``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from fuzzlib import fuzzing, instrumented

with instrumented("distributor"):
    from distributor.ingest.http11 import _CLOSING, HttpLimits, HttpServer, Pending, Request, Response, _Conn, json_error

_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [A-Za-z' -]+\r\n")
_HEADER = re.compile(rb"([a-z-]+): ([ -~]*)\r\n")
ALLOWED_HEADERS = {b"content-type", b"content-length", b"date", b"connection", b"retry-after", b"allow"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Violation(AssertionError):
    pass


class _Errors(logging.Handler):
    """The server's error logs: an exception in its own parser callbacks is a bug it hides behind a 500."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.internal: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "handler failed" not in message and "preflight failed" not in message:  # the App's own bugs
            self.internal.append(message + (f": {record.exc_info[1]!r}" if record.exc_info else ""))


ERRORS = _Errors()
_log = logging.getLogger("distributor.ingest.http11")
_log.addHandler(ERRORS)
if fuzzing():
    _log.propagate = False  # the App's expected tracebacks stay off the fuzzer's output


class FakeTransport(asyncio.Transport):
    def __init__(self, high_water: int, eof_capable: bool) -> None:
        super().__init__()
        self.protocol: _Conn | None = None
        self.out = bytearray()
        self.unsent = 0  # bytes "in the socket buffer": drained by the harness
        self.high_water = high_water
        self.eof_capable = eof_capable
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.reading = True
        self.write_paused = False
        self.violations: list[str] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self.eof_written:
            self.violations.append(f"write after {'close' if self.closed else 'write_eof'}: {bytes(data)[:80]!r}")
            return
        self.out += data
        self.unsent += len(data)
        if self.high_water and not self.write_paused and self.unsent > self.high_water:
            self.write_paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def write_eof(self) -> None:
        if self.closed:
            self.violations.append("write_eof after close")
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return self.eof_capable

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def drain(self) -> None:
        """The client read everything: the buffer empties and writing resumes."""
        self.unsent = 0
        if self.write_paused and not self.closed:
            self.write_paused = False
            assert self.protocol is not None
            self.protocol.resume_writing()


class App:
    """202 {"n", "len", "crc"} for POST /ingest (answered now or deferred), 200 for GET/HEAD /healthz,
    404/405 otherwise; /boom raises in handle, /pf in preflight."""

    def __init__(self, defer: bool) -> None:
        self.defer = defer
        self.handled: list[int] = []  # n of each request handle() saw that got an answer from the app
        self.pending: list[tuple[Pending, Response]] = []

    def preflight(self, method: bytes, path: bytes, content_length: int | None) -> Response | None:
        if path in (b"/ingest", b"/boom"):
            return None if method == b"POST" else json_error(405, "method_not_allowed", "use POST")
        if path == b"/healthz":
            return None if method in (b"GET", b"HEAD") else json_error(405, "method_not_allowed", "use GET")
        if path == b"/pf":
            raise RuntimeError("preflight bug (expected by the fuzz target)")
        return json_error(404, "not_found", "no route")

    def handle(self, request: Request) -> Response | Pending:
        if request.path == b"/boom":
            raise RuntimeError("handler bug (expected by the fuzz target)")
        if request.path == b"/healthz":
            return Response(200, b'{"status":"ok"}')
        n = len(self.handled)
        self.handled.append(n)
        body = b'{"n":%d,"len":%d,"crc":%d}' % (n, len(request.body), zlib.crc32(request.body))
        response = Response(202, body)
        if not self.defer:
            return response
        pending = request.defer()
        self.pending.append((pending, response))
        return pending


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes | None  # None: no body (HEAD, 100 Continue)
    json: Any = None


def parse_answers(out: bytes) -> list[Answer]:
    """Every answer in ``out``, checked for form; raises Violation on anything malformed or cut."""
    answers: list[Answer] = []
    pos = 0
    while pos < len(out):
        if out.startswith(CONTINUE, pos):
            answers.append(Answer(100, {}, None))
            pos += len(CONTINUE)
            continue
        line = _STATUS_LINE.match(out, pos)
        if line is None:
            raise Violation(f"not a status line at {pos}: {out[pos:pos + 60]!r}")
        status = int(line[1])
        pos = line.end()
        headers: dict[bytes, bytes] = {}
        while not out.startswith(b"\r\n", pos):
            header = _HEADER.match(out, pos)
            if header is None:
                raise Violation(f"malformed header at {pos}: {out[pos:pos + 60]!r}")
            name, value = header[1], header[2]
            if name not in ALLOWED_HEADERS or name in headers:
                raise Violation(f"unexpected or repeated header {name!r}")
            headers[name] = value
            pos = header.end()
        pos += 2
        for required in (b"content-type", b"content-length", b"date"):
            if required not in headers:
                raise Violation(f"{status} answer without {required!r}")
        if headers.get(b"connection", b"close") not in (b"close", b"keep-alive"):
            raise Violation(f"connection: {headers[b'connection']!r}")
        if not headers[b"content-length"].isdigit() or (b"retry-after" in headers
                                                          and not headers[b"retry-after"].isdigit()):
            raise Violation("non-numeric content-length or retry-after")
        size = int(headers[b"content-length"])
        if out.startswith(b"{", pos):  # every body here is a JSON object; a HEAD answer has none
            body = bytes(out[pos:pos + size])
            if len(body) < size:
                raise Violation(f"answer cut short: {size} bytes announced, {len(body)} written")
            pos += size
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise Violation(f"answer body is not JSON: {body[:80]!r}") from None
            if not isinstance(parsed, dict):
                raise Violation("answer body is not an object")
            answers.append(Answer(status, headers, body, parsed))
        else:
            answers.append(Answer(status, headers, None))
    return answers


@dataclass
class Options:
    defer: bool = False  # the app answers later (as with the WAL), in a shuffled order
    high_water: int = 0  # >0: pause_writing above this many unsent bytes
    eof_capable: bool = True
    eof_at_end: bool = False  # the client half-closes after its last byte
    deadlines: bool = False  # fire the connection's deadline handler between pieces
    small_limits: bool = False
    seed: int = 0


@dataclass
class Run:
    transport: FakeTransport
    app: App
    server: HttpServer
    conn: _Conn
    answers: list[Answer] = field(default_factory=list)
    fed: int = 0  # bytes handed to data_received
    lost: bool = False  # connection_lost delivered
    half_closed: bool = False  # the client's EOF reached the protocol, which kept the transport open


def run(chunks: list[bytes], options: Options) -> Run:
    """Feed ``chunks`` to a fresh connection as separate reads; check the invariants after every step."""
    rng = random.Random(options.seed)
    limits = HttpLimits(max_body_bytes=64, max_header_bytes=160) if options.small_limits else HttpLimits()
    app = App(options.defer)
    server = HttpServer(app, limits)
    transport = FakeTransport(options.high_water, options.eof_capable)
    conn = server._factory()
    transport.protocol = conn
    state = Run(transport, app, server, conn)
    conn.connection_made(transport)
    closed_at: int | None = None  # output length when the transport closed or half-closed

    ERRORS.internal.clear()

    def step() -> None:
        nonlocal closed_at
        if ERRORS.internal:
            raise Violation(f"internal error in the server: {ERRORS.internal[0]}")
        if transport.violations:
            raise Violation(transport.violations[0])
        if closed_at is not None and len(transport.out) != closed_at:
            raise Violation(f"answer after a close: {bytes(transport.out[closed_at:closed_at + 80])!r}")
        if (transport.closed or transport.eof_written) and closed_at is None:
            closed_at = len(transport.out)
        if transport.closed and not state.lost:
            state.lost = True
            conn.connection_lost(None)

    def settle(all_of_them: bool) -> None:
        """Answer deferred requests (some, in random order, or all) and let the client read."""
        pending = app.pending
        if pending:
            count = len(pending) if all_of_them else rng.randint(0, len(pending))
            for _ in range(count):
                item = pending.pop(rng.randrange(len(pending)))
                item[0].answer(item[1])
                step()
        if transport.write_paused and (all_of_them or rng.random() < 0.7):
            transport.drain()
            step()

    for chunk in chunks:
        if state.lost:
            break
        while not transport.reading and not state.lost:  # a paused reader gets no input until it resumes
            settle(True)
            if state.lost:
                break
            if not transport.reading and not transport.write_paused and not app.pending:
                raise Violation("reading paused with nothing that would ever resume it")
        if state.lost or not transport.reading:
            break
        conn.data_received(chunk)
        state.fed += len(chunk)
        step()
        settle(False)
        if options.deadlines and rng.random() < 0.2 and not state.lost and 0.0 <= conn.deadline < float("inf"):
            conn._on_deadline(conn.deadline)  # as the sweeper does once the deadline has passed
            step()
    if options.eof_at_end and not state.lost and not transport.closed:
        if conn.eof_received():
            state.half_closed = True
        else:
            transport.close()  # what asyncio transports do when eof_received returns a false value
        step()
    for _ in range(1000):
        if state.lost or not (app.pending or transport.write_paused):
            break
        settle(True)
    step()
    if state.half_closed and not transport.closed:
        raise Violation("the client half-closed and has every answer, but the connection stays open")
    state.answers = parse_answers(bytes(transport.out))
    closes = [i for i, a in enumerate(state.answers) if a.headers.get(b"connection") == b"close"]
    if closes and closes[0] != len(state.answers) - 1:
        raise Violation(f"{len(state.answers) - 1 - closes[0]} answers after a Connection: close answer")
    if closes and not (transport.closed or transport.eof_written):
        raise Violation("a Connection: close answer, but the connection stays open")
    if not state.lost:
        conn.connection_lost(None)
        state.lost = True
    if server._open != 0 or server._conns:
        raise Violation("connection still counted after connection_lost")
    return state


def app_answers(state: Run) -> list[int | None]:
    """The n of every 202 from the app, in the order written; None for one written without its body."""
    return [a.json["n"] if a.json is not None else None for a in state.answers if a.status == 202]
