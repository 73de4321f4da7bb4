"""Helpers for the write-ahead log tests: packets that carry their number, one-turn appends, full replays."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any, Coroutine, TypeVar

import uvloop

from distributor.wal.format import RECORD_HEADER, SEGMENT_HEADER
from distributor.wal.log import Replayed, WorkerLog

T = TypeVar("T")
_NUMBER = re.compile(rb'"n":(\d+)')


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


def packet(n: int, size: int = 64) -> bytes:
    """A JSON packet carrying its number ``n``, padded to ``size`` bytes."""
    head, tail = b'{"n":%d,"pad":"' % n, b'"}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def number(raw: bytes) -> int:
    found = _NUMBER.search(raw)
    assert found, raw[:80]
    return int(found.group(1))


async def durable(log: WorkerLog) -> bool:
    """Register for this turn's writes and wait for the verdict."""
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    log.when_durable(future.set_result)
    return await future


async def append_turn(log: WorkerLog, packets: list[bytes], messages: int = 1) -> tuple[list[int], bool]:
    """Append ``packets`` in one loop turn; their refs and whether the turn became durable."""
    refs = [log.append(raw, messages) for raw in packets]
    return refs, await durable(log)


async def replay_all(log: WorkerLog, max_bytes: int = 1 << 20) -> list[Replayed]:
    out: list[Replayed] = []
    while batch := await log.replay_batch(max_bytes):
        out += batch
    return out


def slot_files(path: Path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name != "lock")


def data_segments(path: Path) -> list[Path]:
    """Segment files that hold at least one record, in id order."""
    return sorted(entry for entry in path.glob("*.wal") if entry.stat().st_size > SEGMENT_HEADER.size)


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every record of an undamaged segment file."""
    data = path.read_bytes()
    offsets, pos = [], SEGMENT_HEADER.size
    while pos < len(data):
        length = RECORD_HEADER.unpack_from(data, pos)[1]
        offsets.append((pos, pos + RECORD_HEADER.size + length))
        pos += RECORD_HEADER.size + length
    return offsets
