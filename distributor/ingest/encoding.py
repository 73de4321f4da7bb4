"""Request bodies in ``Content-Encoding: gzip`` or ``zstd``, inflated within ``max_body_bytes``.

The limit applies to the decompressed body, and decompression stops one byte
past it: a decompression bomb (a few KB that inflate to GBs) costs at most the
limit in memory and CPU before it gets 413. An unknown encoding gets 415, a
body that does not decode (or is truncated) gets 400. Several gzip members or
zstd frames one after the other are one body, as the formats allow, up to
``MAX_MEMBERS`` of them: every member costs a decompressor, so a body of
thousands of empty members (20 bytes each in gzip, 8 or 9 in zstd) would make
the event loop spend seconds on a request that inflates to nothing. The input
is fed in pieces of ``_PIECE`` bytes, so what a decompressor leaves over after
its member ends (copied into ``unused_data``) is never the whole rest of the
body: the work is linear in the body, not quadratic.
"""

from __future__ import annotations

import zlib
from typing import Callable, Protocol


from distributor.delivery.compression import zstd
from distributor.ingest.http11 import Response, json_error

ENCODINGS = ("gzip", "zstd", "identity")
MAX_MEMBERS = 1000  # gzip members or zstd frames (skippable ones too) in one body; 400 above
_PIECE = 16 << 10  # input handed to a decompressor at a time


class BodyError(Exception):
    """The body cannot be used; ``response`` says why."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Inflater(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes | memoryview, max_length: int = ..., /) -> bytes: ...


def decoded_body(body: bytes, encoding: bytes | None, max_bytes: int) -> bytes:
    """The body as the application reads it; raises BodyError (413, 415 or 400)."""
    if encoding is None:
        return body
    name = encoding.strip().lower()
    if name in (b"", b"identity"):
        return body
    if name in (b"gzip", b"x-gzip"):
        return _inflate(body, max_bytes, "gzip", lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), zlib.error)
    if name == b"zstd":
        return _inflate(body, max_bytes, "zstd", zstd.ZstdDecompressor, zstd.ZstdError)
    raise BodyError(json_error(415, "unsupported_encoding", f"Content-Encoding {encoding.decode('latin-1')!r} is "
                               f"not supported; use one of {', '.join(ENCODINGS)}"))


def _inflate(body: bytes, max_bytes: int, name: str, inflater: Callable[[], _Inflater],
             error: type[Exception]) -> bytes:
    chunks: list[bytes] = []
    total = 0
    view = memoryview(body)
    pos, end = 0, len(body)
    members = 0
    try:
        while pos < end:  # one member (gzip) or frame (zstd) per round
            members += 1
            if members > MAX_MEMBERS:
                raise BodyError(json_error(400, "bad_encoding", f"{name} body has more than {MAX_MEMBERS} "
                                           f"{'members' if name == 'gzip' else 'frames'}"))
            member = inflater()
            while True:
                piece = view[pos:pos + _PIECE]
                if not piece:
                    raise BodyError(json_error(400, "bad_encoding", f"{name} body is truncated"))
                chunk = member.decompress(piece, max_bytes + 1 - total)
                total += len(chunk)
                if total > max_bytes:
                    raise BodyError(json_error(413, "body_too_large", f"decompressed body exceeds {max_bytes} bytes"))
                if chunk:
                    chunks.append(chunk)
                if member.eof:  # what follows the member in this piece is the next member's
                    pos += len(piece) - len(member.unused_data)
                    break
                pos += len(piece)  # below the output limit a decompressor takes all of its input
    except error as exc:
        raise BodyError(json_error(400, "bad_encoding", f"{name} body does not decode: {exc}")) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
