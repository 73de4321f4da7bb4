"""Fuzz target: request body decoding (``encoding.decoded_body``): gzip, zstd, identity, within a limit.

Input: an encoding selector byte, a limit byte (x16 bytes), then the body. Invariants: the result
is at most the limit or BodyError is raised (413 past the limit, 400 for what does not decode, 415
for an unknown encoding), nothing else; identity returns the body itself; and the result agrees
with an independent decoder (the standard library's GzipFile, backports.zstd's ZstdFile) reading
at most limit + 1 bytes: same bytes when it fits, 413 when it does not, 400 only when that decoder
fails too.
"""

from __future__ import annotations

import gzip
import io
import zlib

import orjson
from backports import zstd

from fuzzlib import instrumented, main

with instrumented("distributor"):
    from distributor.ingest.encoding import BodyError, decoded_body

ENCODINGS: tuple[bytes | None, ...] = (None, b"gzip", b"zstd", b"identity", b" GZip ", b"x-gzip", b"br", b"")
IDENTITY = (None, b"identity", b"")


def strict_gzip(body: bytes) -> bool:
    """Whether body is gzip members and nothing else, as RFC 1952 reads it (zlib, member after member).

    Python's GzipFile, the reference, is more lenient in two ways the fuzzer found: it skips zero bytes
    after the last member (GNU gzip does too) and ignores reserved FLG bits (RFC 1952: a compliant
    decompressor must refuse them). decoded_body refuses both with 400; that is allowed here.
    """
    data = body
    while data:
        member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            member.decompress(data)
        except zlib.error:
            return False
        if not member.eof:
            return False
        data = member.unused_data
    return True


def reference(body: bytes, encoding: bytes, limit: int) -> bytes | None:
    """At most limit + 1 decoded bytes, or None when the body does not decode."""
    name = encoding.strip().lower()
    if not body:
        return b""  # no member or frame at all: an empty body, as both formats' tools treat it
    try:
        if name in (b"gzip", b"x-gzip"):
            with gzip.GzipFile(fileobj=io.BytesIO(body)) as fh:
                return fh.read(limit + 1)
        with zstd.ZstdFile(io.BytesIO(body)) as zfh:
            return zfh.read(limit + 1)
    except (OSError, EOFError, zlib.error, zstd.ZstdError):
        return None


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    encoding, limit, body = ENCODINGS[data[0] % len(ENCODINGS)], data[1] * 16, data[2:]
    try:
        result = decoded_body(body, encoding, limit)
    except BodyError as exc:
        status = exc.response.status
        assert orjson.loads(exc.response.body)["error"]
        if encoding == b"br":
            assert status == 415
            return
        assert encoding not in IDENTITY and status in (400, 413), status
        assert encoding is not None
        expected = reference(body, encoding, limit)
        if status == 413:
            assert expected is None or len(expected) > limit, "413 for a body that fits"
        elif not (encoding.strip().lower() in (b"gzip", b"x-gzip") and not strict_gzip(body)):
            assert expected is None or len(expected) > limit, f"400 for a body that decodes: {expected[:40]!r}"
        return
    assert isinstance(result, bytes)
    if encoding in IDENTITY:
        assert result is body
        return
    assert encoding != b"br", "an unknown encoding was accepted"
    assert len(result) <= limit, f"{len(result)} bytes decoded past the limit {limit}"
    assert encoding is not None
    assert result == reference(body, encoding, limit), "decodes differently from the reference decoder"


if __name__ == "__main__":
    main(check)
