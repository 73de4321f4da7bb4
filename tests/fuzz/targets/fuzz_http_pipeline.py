"""Fuzz target: pipelined valid requests (and one malformed tail) against a model of the exact answers.

The input drives a generator (atheris.FuzzedDataProvider): a sequence of requests framed every
supported way (Content-Length, chunked with extensions and trailers, ``Expect: 100-continue``,
HTTP/1.0 keep-alive, HEAD, 404/405 with and without a body, ``Connection: close``), optionally a
malformed tail, the whole stream cut at drawn points, answered now or deferred in a shuffled order,
with write back-pressure. Model: each request gets exactly its answer, in order (202 with the exact
body length and CRC the app saw, 100 Continue first when asked for); a request the server must
refuse before its body (404 with a body) or one asking to close is the last answered; a malformed
tail gets one 4xx/5xx with ``Connection: close`` and nothing after.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import atheris

from fuzzlib import main
import http_harness
from http_harness import Options, Violation
from malformed_http import MALFORMED

GARBAGE = MALFORMED + (  # the 400s, and tails answered otherwise
    b"GET /ingest HTTP/2.0\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
)


@dataclass
class Expected:
    status: int
    keep: bool  # the connection stays open after it
    body_len: int = -1  # for 202: what the app must have seen
    crc: int = 0
    continue_first: bool = False
    head: bool = False  # no body in the answer
    http10: bool = False


def request(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, Expected]:
    kind = fdp.ConsumeIntInRange(0, 9)
    body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    close = fdp.ConsumeIntInRange(0, 7) == 0
    conn = b"Connection: close\r\n" if close else b""
    if kind in (0, 1, 2):  # POST /ingest, Content-Length (1: with 100-continue)
        expect = kind == 1 and fdp.ConsumeBool()
        head = b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s%s\r\n" % (
            len(body), b"Expect: 100-continue\r\n" if expect else b"", conn)
        return head + body, Expected(202, not close, len(body), zlib.crc32(body), expect and bool(body))
    if kind in (3, 4):  # chunked, with extensions and trailers
        expect = kind == 4 and fdp.ConsumeBool()
        chunked = bytearray(b"POST /ingest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n%s%s\r\n" % (
            b"Expect: 100-continue\r\n" if expect else b"", conn))
        pos = 0
        while pos < len(body):
            size = fdp.ConsumeIntInRange(1, len(body) - pos)
            ext = b";x=%d" % size if fdp.ConsumeBool() else b""
            chunked += b"%x%s\r\n%s\r\n" % (size, ext, body[pos:pos + size])
            pos += size
        chunked += b"0\r\n" + (b"Trailer-Field: v\r\n" if fdp.ConsumeBool() else b"") + b"\r\n"
        return bytes(chunked), Expected(202, not close, len(body), zlib.crc32(body), expect)
    if kind == 5:  # HTTP/1.0: keep-alive only when asked
        keep = not close and fdp.ConsumeBool()
        raw = b"POST /ingest HTTP/1.0\r\nContent-Length: %d\r\n%s\r\n%s" % (
            len(body), b"Connection: keep-alive\r\n" if keep else b"", body)
        return raw, Expected(202, keep, len(body), zlib.crc32(body), http10=True)
    if kind == 6:
        method = b"HEAD" if fdp.ConsumeBool() else b"GET"
        return b"%s /healthz HTTP/1.1\r\nHost: t\r\n%s\r\n" % (method, conn), \
            Expected(200, not close, head=method == b"HEAD")
    if kind == 7:  # 404: refused at the head; a body is never read, so the connection closes
        return b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), conn, body), \
            Expected(404, not close and not body)
    if kind == 8:
        return b"GET /ingest HTTP/1.1\r\nHost: t\r\n%s\r\n" % conn, Expected(405, not close)
    return b"POST /ingest?q=%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), len(body), conn, body), Expected(202, not close, len(body), zlib.crc32(body))


def check(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    flags = fdp.ConsumeIntInRange(0, 255)
    options = Options(defer=bool(flags & 1), high_water=fdp.ConsumeIntInRange(1, 400) if flags & 2 else 0,
                      eof_capable=not flags & 4, eof_at_end=bool(flags & 8), seed=fdp.ConsumeIntInRange(0, 1 << 16))
    stream = bytearray()
    model: list[Expected] = []
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        raw, expected = request(fdp)
        stream += raw
        model.append(expected)
        if not expected.keep:
            break
    garbage = model[-1].keep and flags & 16
    if garbage:
        stream += GARBAGE[fdp.ConsumeIntInRange(0, len(GARBAGE) - 1)]
    cuts = sorted(set(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 10), 1, max(1, len(stream) - 1))))
    edges = [0, *cuts, len(stream)]
    chunks = [bytes(stream[a:b]) for a, b in zip(edges, edges[1:]) if b > a]
    state = http_harness.run(chunks, options)
    answers = state.answers
    i = 0
    n = 0  # the app's numbering of 202s
    for index, expected in enumerate(model):
        if expected.continue_first:
            if i >= len(answers) or answers[i].status != 100:
                raise Violation(f"request {index}: no 100 Continue before its answer")
            i += 1
        if i >= len(answers):
            raise Violation(f"request {index} ({expected.status}) got no answer; answers: "
                            f"{[a.status for a in answers]}")
        got = answers[i]
        i += 1
        if got.status != expected.status:
            raise Violation(f"request {index}: {got.status}, expected {expected.status}")
        keep = got.headers.get(b"connection") != b"close"
        if keep != expected.keep:
            raise Violation(f"request {index}: keep-alive {keep}, expected {expected.keep}")
        if expected.http10 and keep and got.headers.get(b"connection") != b"keep-alive":
            raise Violation(f"request {index}: an HTTP/1.0 keep-alive answer without Connection: keep-alive")
        if expected.head != (got.body is None):
            raise Violation(f"request {index}: a HEAD answer must have no body and others one")
        if expected.status == 202:
            if got.json != {"n": n, "len": expected.body_len, "crc": expected.crc}:
                raise Violation(f"request {index}: the app saw {got.json}, expected n={n} len={expected.body_len}")
            n += 1
    if garbage:
        if i >= len(answers):
            raise Violation("a malformed request got no answer")
        got = answers[i]
        i += 1
        if not (400 <= got.status < 600 and got.headers.get(b"connection") == b"close"):
            raise Violation(f"a malformed request got {got.status} {got.headers.get(b'connection')!r}")
    if i != len(answers):
        raise Violation(f"{len(answers) - i} answers more than requests: {[a.status for a in answers[i:]]}")
    if not model[-1].keep or garbage:
        if not (state.transport.closed or state.transport.eof_written):
            raise Violation("the connection should be closed")


if __name__ == "__main__":
    main(check)
