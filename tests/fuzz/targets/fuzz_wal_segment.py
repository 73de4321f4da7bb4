"""Fuzz target: the WAL segment scanner (``wal/scan.py`` SegmentScanner) on arbitrary file contents.

Invariants: the header parser (``format.parse_segment_header``) accepts only this segment's valid
header; no exception and the scan finishes; every record reported is really in the file at its
offset, whole, with a matching CRC (a record that fails its check is never reported); offsets and
record indices strictly increase and records never overlap; a torn tail and a corrupt tail exclude
each other; an undamaged scan tiles the file exactly; and the result does not depend on the chunk
size the file is read with (chunk edges are where resynchronisation bugs hide).
"""

from __future__ import annotations

import os

from fuzzlib import instrumented, main

with instrumented("distributor"):
    from distributor.wal.format import (FORMAT_VERSION, RECORD_HEADER, RECORD_MAGIC, SEGMENT_HEADER, SEGMENT_MAGIC,
                                        parse_segment_header, record_crc)
    from distributor.wal.scan import SegmentScanner

FD = os.memfd_create("fuzz-wal-segment")
CHUNKS = (1 << 20, 37, 64)


def scan(size: int, chunk: int) -> tuple[list[tuple[int, int, int, int, bytes]], int, int | None, bool, int]:
    scanner = SegmentScanner(FD, size, chunk)
    records = []
    for _ in range(size + 2):
        if scanner.finished:
            break
        records += [(r.offset, r.record_index, r.messages, r.accepted_ms, r.payload) for r in scanner.read()]
    assert scanner.finished and scanner.read() == [], "the scan does not finish"
    return records, scanner.corrupt, scanner.torn_at, scanner.corrupt_tail, scanner.pos


def check(data: bytes) -> None:
    header = parse_segment_header(data, 0)  # the seeds are the real writer's segments 0 to 3
    if header is not None:
        magic, version, slot, segment_id, created_ns = SEGMENT_HEADER.unpack_from(data)
        assert (magic, version, segment_id) == (SEGMENT_MAGIC, FORMAT_VERSION, 0) and header == (slot, created_ns)
    os.ftruncate(FD, 0)
    os.pwrite(FD, data, 0)
    size = len(data)
    first = scan(size, CHUNKS[0])
    records, corrupt, torn_at, corrupt_tail, pos = first
    end = SEGMENT_HEADER.size
    index = -1
    for offset, record_index, messages, accepted, payload in records:
        assert offset >= end, f"record at {offset} overlaps the previous one (ends at {end})"
        assert record_index > index, "record indices must strictly increase"
        magic, length, crc, found_index, found_messages, flags, found_accepted = RECORD_HEADER.unpack_from(data, offset)
        assert magic == RECORD_MAGIC and length == len(payload)
        assert data[offset + RECORD_HEADER.size:offset + RECORD_HEADER.size + length] == payload
        assert (found_index, found_messages, found_accepted) == (record_index, messages, accepted)
        assert record_crc(length, found_index, found_messages, flags, found_accepted, payload) == crc, \
            "a record whose CRC does not match was reported"
        end = offset + RECORD_HEADER.size + length
        index = record_index
    assert corrupt >= 0 and not (torn_at is not None and corrupt_tail)
    if torn_at is not None:
        assert end <= torn_at <= size
    if not corrupt and torn_at is None and not corrupt_tail and size > SEGMENT_HEADER.size:
        assert end == size == pos, "an undamaged segment must be read to its end"
    for chunk in CHUNKS[1:]:
        assert scan(size, chunk) == first, f"chunk size {chunk} reads the segment differently"


if __name__ == "__main__":
    main(check)
