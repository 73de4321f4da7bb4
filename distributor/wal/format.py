"""The on-disk format, byte for byte: segment and acknowledgement files, their headers and records.

Everything is little-endian and versioned by the file headers. A segment file is
``<id as 16 hex digits>.wal``: a 32-byte header, then records of a 32-byte header and the raw
packet. Its sidecar ``<id>.ack`` holds acknowledgement records, each a list of record indices.
Record and ack-record magics contain the bytes 0xFE and 0xFF, which never occur in UTF-8 (so
never in a JSON payload): scanning forward for a magic after damage finds few false candidates,
and each candidate must still pass its CRC.
"""

from __future__ import annotations

import struct
import zlib

FORMAT_VERSION = 1

SEGMENT_MAGIC = b"LDWAL\x00\x01\n"
SEGMENT_HEADER = struct.Struct("<8sIIQQ")  # magic, version, slot, segment id, created unix ns
RECORD_MAGIC_BYTES = b"\xfeWR\xff"
RECORD_MAGIC = int.from_bytes(RECORD_MAGIC_BYTES, "little")
RECORD_HEADER = struct.Struct("<IIIIIIQ")  # magic, length, crc, index, messages, flags, accepted unix ms
RECORD_CRC_META = struct.Struct("<IIIIQ")  # what the crc covers before the payload: length, index..accepted

ACK_MAGIC = b"LDACK\x00\x01\n"
ACK_HEADER = struct.Struct("<8sIIQ")  # magic, version, slot, segment id
ACK_RECORD_MAGIC_BYTES = b"\xfeAK\xff"
ACK_RECORD_MAGIC = int.from_bytes(ACK_RECORD_MAGIC_BYTES, "little")
ACK_RECORD = struct.Struct("<IIII")  # magic, count, crc, kind; then count x u32 record indices
ACK_CRC_META = struct.Struct("<II")  # what the crc covers before the indices: count, kind
DONE = 1  # the packet left the log: delivered, or dropped with a counted reason
ATTEMPTED = 2  # handed to the wire at least once: replayed, it is a possible duplicate

SEGMENT_SUFFIX = ".wal"
ACK_SUFFIX = ".ack"
TEMP_SUFFIX = ".tmp"  # a segment being created; renamed to .wal once its header is written
SET_ASIDE_MARK = ".corrupt-"  # <name>.corrupt-<unix time>: damaged, kept for the operator
ID_DIGITS = 16


def segment_header(slot: int, segment_id: int, created_ns: int) -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, slot, segment_id, created_ns)


def parse_segment_header(data: bytes, segment_id: int) -> tuple[int, int] | None:
    """(slot, created unix ns) of a valid header for ``segment_id``, else None."""
    if len(data) < SEGMENT_HEADER.size:
        return None
    magic, version, slot, found_id, created_ns = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or version != FORMAT_VERSION or found_id != segment_id:
        return None
    return slot, created_ns


def record_crc(length: int, index: int, messages: int, flags: int, accepted_ms: int, payload: bytes) -> int:
    """CRC-32 of the record header after its crc field, the length too, and the payload.

    The length is covered as well (the header layout puts it before the crc): a flipped length
    bit then fails the check instead of silently framing the wrong bytes.
    """
    return zlib.crc32(payload, zlib.crc32(RECORD_CRC_META.pack(length, index, messages, flags, accepted_ms)))


def ack_header(slot: int, segment_id: int) -> bytes:
    return ACK_HEADER.pack(ACK_MAGIC, FORMAT_VERSION, slot, segment_id)


def encode_ack(kind: int, indices: list[int]) -> bytes:
    count = len(indices)
    body = struct.pack(f"<{count}I", *indices)
    crc = zlib.crc32(body, zlib.crc32(ACK_CRC_META.pack(count, kind)))
    return ACK_RECORD.pack(ACK_RECORD_MAGIC, count, crc, kind) + body


def segment_name(segment_id: int) -> str:
    return f"{segment_id:0{ID_DIGITS}x}{SEGMENT_SUFFIX}"


def ack_name(segment_id: int) -> str:
    return f"{segment_id:0{ID_DIGITS}x}{ACK_SUFFIX}"


def name_id(name: str) -> int | None:
    """The segment id a log file name starts with (segments, sidecars, temp and set-aside files)."""
    prefix = name[:ID_DIGITS]
    if len(prefix) != ID_DIGITS or name[ID_DIGITS:ID_DIGITS + 1] != "." or prefix.strip(_HEX):
        return None
    return int(prefix, 16)


_HEX = "0123456789abcdef"
