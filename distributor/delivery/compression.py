"""Compression of the request bodies sent to analyzers (``compression = "gzip" | "zstd"`` per analyzer).

Level 1 of either: the point is bytes on the wire between hosts, not an
archive. A big batch is compressed in a thread (zlib and zstd release the GIL),
so the event loop that answers emitters never stalls on it.
"""

from __future__ import annotations

import asyncio
import zlib
from functools import partial
from typing import Callable

try:  # the standard library's from Python 3.14 on (PEP 784); its backport before
    from compression import zstd  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef, unused-ignore]

INLINE_BYTES = 64 << 10  # smaller bodies are compressed on the loop: a thread hop would cost more


def _gzip(body: bytes) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(body) + packer.flush()


def _zstd(body: bytes) -> bytes:
    return bytes(zstd.compress(body, level=1))


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {"gzip": _gzip, "zstd": _zstd}


async def compressed(body: bytes, kind: str) -> bytes:
    compress = partial(COMPRESSORS[kind], body)
    if len(body) < INLINE_BYTES:
        return compress()
    return await asyncio.get_running_loop().run_in_executor(None, compress)
