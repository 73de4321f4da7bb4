"""Reading log files back: segment records chunk by chunk (torn tails, corruption, resync) and ack sidecars.

Blocking, read-only code on file descriptors and bytes: replay runs it in an executor thread so
the event loop never waits on the disk, the operator tools run it directly. Damage never raises:
it is classified and counted, so no file content can make a start fail or loop.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from typing import NamedTuple

from distributor.wal.format import (
    ACK_CRC_META,
    ACK_HEADER,
    ACK_MAGIC,
    ACK_RECORD,
    ACK_RECORD_MAGIC,
    ACK_RECORD_MAGIC_BYTES,
    ATTEMPTED,
    DONE,
    FORMAT_VERSION,
    RECORD_HEADER,
    RECORD_MAGIC,
    RECORD_MAGIC_BYTES,
    SEGMENT_HEADER,
    record_crc,
)

CHUNK = 1 << 20
_HEAD = RECORD_HEADER.size
_MAGIC_AND_LENGTH = struct.Struct("<II")


class Record(NamedTuple):
    offset: int
    record_index: int
    messages: int
    accepted_ms: int
    payload: bytes


class SegmentScanner:
    """The records of one segment in file order, about ``chunk`` bytes per ``read()``, never the whole file.

    Damage is classified where it is met. A *torn tail* (fewer bytes than a record header, a
    record running past the end of the file, or only zero bytes to the end) is what a crash
    mid-write leaves; ``torn_at`` is where the file should be cut. Anything else that fails its
    check is *corruption*: the scanner resynchronises on the next record magic whose record
    validates and counts the records lost from the gap in record indices (at least one), or sets
    ``corrupt_tail`` when nothing valid follows. Either way the scan goes on or ends cleanly.
    """

    def __init__(self, fd: int, size: int, chunk: int = CHUNK) -> None:
        self._fd = fd
        self.size = size
        self._chunk = chunk
        self.pos = SEGMENT_HEADER.size  # the next byte to parse; after a clean end, the end of the last record
        self.next_index = 0
        self.corrupt = 0
        self.torn_at: int | None = None
        self.corrupt_tail = False
        self.finished = size <= self.pos
        self._buf = b""
        self._buf_start = 0

    def read(self) -> list[Record]:
        """The next records (about one chunk of them); ``[]`` once ``finished``."""
        records: list[Record] = []
        budget = self._chunk
        while budget > 0 and not self.finished:
            if self.pos >= self.size:
                self.finished = True
                break
            record = self._record_at(self.pos)
            if record is None or record.record_index < self.next_index:
                self._damaged(self.pos)
                continue
            self.corrupt += record.record_index - self.next_index  # indices missing without damaged bytes
            records.append(record)
            length = _HEAD + len(record.payload)
            self.pos += length
            self.next_index = record.record_index + 1
            budget -= length
        return records

    def _bytes(self, offset: int, n: int) -> bytes:
        start = offset - self._buf_start
        if start < 0 or start + n > len(self._buf):
            self._buf = os.pread(self._fd, max(self._chunk, n), offset)
            self._buf_start, start = offset, 0
        return self._buf[start:start + n]

    def _record_at(self, offset: int) -> Record | None:
        """The valid record at ``offset``, or None."""
        if offset + _HEAD > self.size:
            return None
        head = self._bytes(offset, _HEAD)
        if len(head) < _HEAD:
            return None
        magic, length, crc, index, messages, flags, accepted = RECORD_HEADER.unpack(head)
        if magic != RECORD_MAGIC or offset + _HEAD + length > self.size:
            return None
        payload = self._bytes(offset + _HEAD, length)
        if len(payload) != length or record_crc(length, index, messages, flags, accepted, payload) != crc:
            return None
        return Record(offset, index, messages, accepted, payload)

    def _damaged(self, at: int) -> None:
        found = self._resync(at + 1)
        if found is not None:
            self.corrupt += max(1, found.record_index - self.next_index)
            self.next_index = found.record_index
            self.pos = found.offset
            return
        self.finished = True
        if self._torn(at):
            self.torn_at = at
        else:
            self.corrupt += 1
            self.corrupt_tail = True

    def _resync(self, start: int) -> Record | None:
        """The first valid record at or after ``start`` that continues the index sequence."""
        overlap = len(RECORD_MAGIC_BYTES) - 1
        offset = start
        while offset + _HEAD <= self.size:
            data = os.pread(self._fd, self._chunk, offset)
            at = data.find(RECORD_MAGIC_BYTES)
            while at != -1:
                record = self._record_at(offset + at)
                if record is not None and record.record_index >= self.next_index:
                    return record
                at = data.find(RECORD_MAGIC_BYTES, at + 1)
            if len(data) <= overlap:
                break
            offset += len(data) - overlap
        return None

    def _torn(self, at: int) -> bool:
        if self.size - at < _HEAD:
            return True
        magic, length = _MAGIC_AND_LENGTH.unpack(self._bytes(at, _MAGIC_AND_LENGTH.size))
        if magic == RECORD_MAGIC and at + _HEAD + length > self.size:
            return True
        return self._zeros_from(at)  # a power loss can leave a file longer than the data that reached it

    def _zeros_from(self, offset: int) -> bool:
        while offset < self.size:
            data = os.pread(self._fd, min(self._chunk, self.size - offset), offset)
            if not data:
                break
            if data.count(0) != len(data):
                return False
            offset += len(data)
        return True


class Acks:
    """What an ack sidecar says: per record index, DONE and ATTEMPTED bits; and how damaged it is."""

    __slots__ = ("flags", "valid_end", "header_ok", "bad_records", "torn")

    def __init__(self) -> None:
        self.flags = bytearray()
        self.valid_end = 0  # where appending may continue: after the last valid record (0: rewrite the header)
        self.header_ok = True  # False: a full-length header that is not this segment's (garbage)
        self.bad_records = 0  # ack records that failed their check and were skipped
        self.torn = False  # the file ends inside its header or inside a record (a crash mid-write)

    @property
    def damaged(self) -> bool:
        """Some acknowledgements may be lost: replayed packets of the segment are possible duplicates."""
        return not self.header_ok or self.bad_records > 0 or self.torn


def parse_acks(data: bytes, segment_id: int, max_records: int) -> Acks:
    """Decode a whole sidecar; indices at or beyond ``max_records`` (what the segment can hold) are damage."""
    acks = Acks()
    if len(data) < ACK_HEADER.size:
        acks.torn = len(data) > 0
        return acks
    magic, version, _slot, found_id = ACK_HEADER.unpack_from(data)
    if magic != ACK_MAGIC or version != FORMAT_VERSION or found_id != segment_id:
        acks.header_ok = False
        return acks
    pos = acks.valid_end = ACK_HEADER.size
    while pos < len(data):
        end = _apply_ack(data, pos, max_records, acks.flags)
        if end:
            pos = acks.valid_end = end
            continue
        found = _resync_ack(data, pos + 1, max_records, acks.flags)
        if found:
            acks.bad_records += 1
            pos = acks.valid_end = found
            continue
        if _ack_torn(data, pos):
            acks.torn = True
        else:
            acks.bad_records += 1
        break
    return acks


def _apply_ack(data: bytes, pos: int, max_records: int, flags: bytearray) -> int:
    """Apply the valid ack record at ``pos`` to ``flags`` and return its end; 0 when it is not valid."""
    if pos + ACK_RECORD.size > len(data):
        return 0
    magic, count, crc, kind = ACK_RECORD.unpack_from(data, pos)
    body_start = pos + ACK_RECORD.size
    end = body_start + 4 * count
    if magic != ACK_RECORD_MAGIC or kind not in (DONE, ATTEMPTED) or end > len(data):
        return 0
    body = data[body_start:end]
    if zlib.crc32(body, zlib.crc32(ACK_CRC_META.pack(count, kind))) != crc:
        return 0
    indices = array("I", body)
    if sys.byteorder == "big":
        indices.byteswap()
    if count and max(indices) >= max_records:
        return 0
    if count and max(indices) >= len(flags):
        flags.extend(bytes(max(indices) + 1 - len(flags)))
    for index in indices:
        flags[index] |= kind
    return end


def _resync_ack(data: bytes, start: int, max_records: int, flags: bytearray) -> int:
    at = data.find(ACK_RECORD_MAGIC_BYTES, start)
    while at != -1:
        end = _apply_ack(data, at, max_records, flags)
        if end:
            return end
        at = data.find(ACK_RECORD_MAGIC_BYTES, at + 1)
    return 0


def _ack_torn(data: bytes, pos: int) -> bool:
    if len(data) - pos < ACK_RECORD.size:
        return True
    magic, count, _crc, _kind = ACK_RECORD.unpack_from(data, pos)
    if magic == ACK_RECORD_MAGIC and pos + ACK_RECORD.size + 4 * count > len(data):
        return True
    return data.count(0, pos) == len(data) - pos
