"""Fuzz target: the WAL acknowledgement decoder (``wal/scan.py`` parse_acks) on arbitrary sidecar contents.

Invariants: no exception; flags only DONE/ATTEMPTED bits and only for indices below ``max_records``;
every bit set comes from an ack record somewhere in the file whose CRC matches (a damaged record is
never applied); ``valid_end`` is a record boundary: the file cut there decodes to the same flags
with no torn tail; a wrong or short header applies nothing.
"""

from __future__ import annotations

import struct
import zlib

from fuzzlib import instrumented, main

with instrumented("distributor"):
    from distributor.wal.format import (ACK_CRC_META, ACK_HEADER, ACK_RECORD, ACK_RECORD_MAGIC, ACK_RECORD_MAGIC_BYTES,
                                        ATTEMPTED, DONE)
    from distributor.wal.scan import parse_acks

SEGMENT_ID = 0  # the first segment the real writer creates (the seeds in corpus/wal_ack)
MAX_RECORDS = 1000


def valid_records(data: bytes) -> dict[int, int]:
    """index -> bits, from every CRC-valid ack record at any offset after the header."""
    bits: dict[int, int] = {}
    at = data.find(ACK_RECORD_MAGIC_BYTES, ACK_HEADER.size)
    while at != -1:
        if at + ACK_RECORD.size <= len(data):
            magic, count, crc, kind = ACK_RECORD.unpack_from(data, at)
            body = data[at + ACK_RECORD.size:at + ACK_RECORD.size + 4 * count]
            if (magic == ACK_RECORD_MAGIC and kind in (DONE, ATTEMPTED) and len(body) == 4 * count
                    and zlib.crc32(body, zlib.crc32(ACK_CRC_META.pack(count, kind))) == crc):
                for index in struct.unpack(f"<{count}I", body):
                    bits[index] = bits.get(index, 0) | kind
        at = data.find(ACK_RECORD_MAGIC_BYTES, at + 1)
    return bits


def check(data: bytes) -> None:
    acks = parse_acks(data, SEGMENT_ID, MAX_RECORDS)
    flags = acks.flags
    assert len(flags) <= MAX_RECORDS and all(flag <= DONE | ATTEMPTED for flag in flags)
    assert 0 <= acks.valid_end <= len(data)
    if len(data) < ACK_HEADER.size or not acks.header_ok:
        assert not any(flags) and acks.valid_end == 0
        return
    possible = valid_records(data)
    for index, flag in enumerate(flags):
        assert flag & ~possible.get(index, 0) == 0, f"record {index} flagged {flag} by no valid ack record"
    again = parse_acks(data[:acks.valid_end], SEGMENT_ID, MAX_RECORDS)
    assert not again.torn and again.valid_end == acks.valid_end
    assert again.flags.rstrip(b"\0") == flags.rstrip(b"\0"), "valid_end is not where the applied records end"


if __name__ == "__main__":
    main(check)
