"""Segment files and their books: creation, the start-up survey of a slot directory, deletion, setting aside.

The functions here block on the disk and run in the log's executor threads; the ``Segment`` and
``DataFile`` books are only touched on the event loop. Every change of the directory is ordered
so that a crash between any two steps leaves a state the next survey repairs by itself:

* a segment is created as ``<id>.wal.tmp`` and renamed once its header is written (a crash leaves
  a ``.tmp`` file, which the survey deletes), then its ``.ack`` is created (a crash leaves a
  segment without sidecar, which the survey creates);
* a finished segment is deleted ``.wal`` first, then ``.ack``; a damaged one is set aside in the
  same order (a crash in between leaves an orphan ``.ack``, which the survey deletes);
* a torn ack tail is cut back to its last whole record before anything is appended after it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from array import array
from pathlib import Path
from typing import NamedTuple

from distributor.wal.format import (
    ATTEMPTED,
    DONE,
    RECORD_HEADER,
    SEGMENT_HEADER,
    SET_ASIDE_MARK,
    TEMP_SUFFIX,
    ack_header,
    ack_name,
    name_id,
    parse_segment_header,
    segment_header,
    segment_name,
)
from distributor.wal.scan import Acks, parse_acks

log = logging.getLogger("distributor.wal")

LOCK_NAME = "lock"
# Space kept aside in every slot directory for acknowledgements and ATTEMPTED marks: when the disk
# fills, the log gives it up so they are still written (a lost ATTEMPTED mark would replay a packet
# that may have been sent without counting it as a possible duplicate). Not counted in max_bytes.
RESERVE_NAME = "reserve"
RESERVE_BYTES = 1 << 20
TIME_STRIDE = 64  # one accepted time kept per 64 records: enough for the oldest-unacked age


class WalLocked(RuntimeError):
    """Another live process holds this slot directory (two writers would corrupt it)."""


class DataFile:
    """An open file descriptor the log writes; closed only once no fsync round still holds it."""

    __slots__ = ("fd", "dirty", "syncing", "closing")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dirty = False  # written since the last fsync round started
        self.syncing = 0  # fsync rounds in flight that hold this descriptor
        self.closing = False

    def close_when_idle(self) -> None:
        self.closing = True
        self.release()

    def release(self) -> None:
        if self.closing and self.syncing == 0 and not self.dirty and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Segment:
    """One segment's books: per record DONE/ATTEMPTED flags, message counts and sampled accepted times."""

    __slots__ = ("handle", "home", "id", "size", "created_ns", "file", "ack", "flags", "messages", "times",
                 "records", "pending", "sealed", "scanned", "corrupt", "ack_damaged", "retiring", "done_buf",
                 "attempted_buf")

    def __init__(self, handle: int, home: SlotDir, segment_id: int, size: int, created_ns: int, ack: DataFile) -> None:
        self.handle = handle  # process-local: refs are handle << 32 | record index
        self.home = home
        self.id = segment_id
        self.size = size  # bytes on disk
        self.created_ns = created_ns
        self.file: DataFile | None = None  # open for writing while active (and until its last fsync)
        self.ack = ack
        self.flags = bytearray()  # per record index: DONE | ATTEMPTED bits (may run ahead of `records`)
        self.messages = array("I")
        self.times = array("q")  # accepted unix ms of records 0, 64, 128...
        self.records = 0  # record indices known: appended, or read back by replay
        self.pending = 0  # known records not DONE
        self.sealed = False  # no longer written: deleted once scanned and without pending records
        self.scanned = True  # False for a segment found at start until replay has read all of it
        self.corrupt = False  # damage found: set aside instead of deleted once finished
        self.ack_damaged = False  # acknowledgements may be lost: its replayed packets are possible duplicates
        self.retiring = False
        self.done_buf: list[int] = []  # indices acknowledged this turn, written at the end of it
        self.attempted_buf: list[int] = []

    def know(self, index: int, messages: int, accepted_ms: int) -> None:
        """Record that index ``index`` exists; indices skipped before it were lost to damage (marked DONE)."""
        flags = self.flags
        if len(flags) <= index:
            flags.extend(bytes(index + 1 - len(flags)))
        while self.records < index:
            flags[self.records] |= DONE
            self._add(0, accepted_ms)
        self._add(messages, accepted_ms)

    def _add(self, messages: int, accepted_ms: int) -> None:
        if not self.records % TIME_STRIDE:
            self.times.append(accepted_ms)
        self.messages.append(messages)
        self.records += 1

    def forget_from(self, index: int) -> tuple[int, int]:
        """Drop records ``index`` and later (their write failed); return the (packets, messages) dropped."""
        flags = self.flags
        packets = sum(1 for flag in flags[index:self.records] if not flag & DONE)
        messages = sum(self.messages[i] for i in range(index, self.records) if not flags[i] & DONE)
        del flags[index:]
        del self.messages[index:]
        del self.times[(index + TIME_STRIDE - 1) // TIME_STRIDE:]
        self.records = index
        self.pending -= packets
        return packets, messages

    def oldest_unacked_ms(self) -> int | None:
        """Accepted time of the first record not DONE (to 64 records); creation time while not yet replayed."""
        if not self.scanned:
            return self.created_ns // 1_000_000
        if not self.pending:
            return None
        flags = self.flags
        first = min(at for at in (flags.find(0), flags.find(ATTEMPTED)) if at >= 0)
        return self.times[first // TIME_STRIDE]


class SlotDir:
    """One slot directory, held under an exclusive flock for as long as this process uses it.

    The kernel drops the lock when the process dies, even by SIGKILL: a successor never waits for
    a stale lock, and a second distributor started on the same directory is refused instead of
    interleaving its segments with ours.
    """

    __slots__ = ("path", "slot", "lock_fd", "held")

    def __init__(self, path: Path, slot: int) -> None:
        self.path = path
        self.slot = slot
        self.held = 0  # segment files of this directory still held
        self.lock_fd = lock(path)
        make_reserve(path)

    def unlock(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def make_reserve(path: Path) -> None:
    """Put the reserve back (best effort: on a full disk it waits for the next recovery)."""
    target = path / RESERVE_NAME
    if target.exists():
        return
    temporary = path / (RESERVE_NAME + ".tmp")
    try:
        with open(temporary, "wb") as fh:
            fh.write(bytes(RESERVE_BYTES))
        os.rename(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)


def release_reserve(path: Path) -> bool:
    """Give the reserve's space back to the filesystem; False if there was none left to give."""
    try:
        os.unlink(path / RESERVE_NAME)
    except OSError:
        return False
    log.warning("write-ahead log: disk full, the reserve of %s is used for acknowledgements", path,
                extra={"event": "wal_reserve_used"})
    return True


def lock(path: Path) -> int:
    """An exclusive flock on ``path/lock`` (read-only open: a read-only filesystem still opens, unavailable)."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WalLocked(f"{path} is in use by another process") from None
    return fd


class Found(NamedTuple):
    """A segment found by the survey, with its sidecar read and opened for appending."""

    id: int
    size: int
    created_ns: int
    acks: Acks
    ack_fd: int


class Survey(NamedTuple):
    segments: list[Found]
    next_id: int
    set_aside: int  # segment files set aside now (invalid header)
    damaged_acks: int


def survey(path: Path, slot: int) -> Survey:
    """Repair a slot directory after any crash and read its acknowledgements; file names and headers only.

    Deletes leftover ``.tmp`` files and orphan ``.ack`` files, sets aside segments whose header is
    invalid (a zero-length one too), reads each sidecar into per-record flags, cuts torn ack tails
    and replaces unreadable sidecars. Segment contents are left to replay, which streams them.
    A segment the disk will not let us read or repair now (EIO, a read-only filesystem) is left
    untouched for a later start, and logged; it never fails the start.
    """
    names = os.listdir(path)
    ids = [found for found in map(name_id, names) if found is not None]
    next_id = max(ids, default=-1) + 1  # set-aside and temp names count: an id is never reused
    wal_ids = sorted(found for name in names if (found := name_id(name)) is not None and name == segment_name(found))
    present = set(wal_ids)
    for name in names:
        found = name_id(name)
        if found is None:
            continue
        if name == segment_name(found) + TEMP_SUFFIX or (name == ack_name(found) and found not in present):
            try:
                _unlink(path / name)
            except OSError as exc:  # harmless where it is: the next start tries again
                log.error("write-ahead log: cannot remove %s: %s", path / name, exc)
    segments: list[Found] = []
    set_aside = damaged = 0
    for segment_id in wal_ids:
        try:
            with open(path / segment_name(segment_id), "rb") as file:
                header = file.read(SEGMENT_HEADER.size)
                size = os.fstat(file.fileno()).st_size
            parsed = parse_segment_header(header, segment_id)
            if parsed is None:
                set_aside_segment(path, segment_id)
                set_aside += 1
                continue
            acks = _read_acks(path, segment_id, size)
            ack_fd = _open_acks(path, slot, segment_id, acks)
        except OSError as exc:
            log.error("write-ahead log: %s left for a later start: %s", path / segment_name(segment_id), exc)
            continue
        damaged += acks.damaged
        segments.append(Found(segment_id, size, parsed[1], acks, ack_fd))
    return Survey(segments, next_id, set_aside, damaged)


def _read_acks(path: Path, segment_id: int, size: int) -> Acks:
    try:
        data = (path / ack_name(segment_id)).read_bytes()
    except FileNotFoundError:
        return Acks()
    acks = parse_acks(data, segment_id, max(0, (size - SEGMENT_HEADER.size) // RECORD_HEADER.size))
    if not acks.header_ok:
        os.rename(path / ack_name(segment_id), path / _aside_name(path, ack_name(segment_id)))
    elif acks.valid_end < len(data):
        os.truncate(path / ack_name(segment_id), acks.valid_end)
    return acks


def _open_acks(path: Path, slot: int, segment_id: int, acks: Acks) -> int:
    fd = os.open(path / ack_name(segment_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    if acks.valid_end == 0 or not acks.header_ok:
        os.ftruncate(fd, 0)
        write_all(fd, ack_header(slot, segment_id))
    return fd


def create_segment(path: Path, slot: int, segment_id: int, sync: bool) -> tuple[int, int, int]:
    """Create segment ``segment_id`` and its sidecar; (segment fd, ack fd, created unix ns).

    The header is written under a temporary name and renamed: a crash never leaves a ``.wal``
    with a partial header. With ``sync``, the header and the directory entry are fsynced.
    """
    final = path / segment_name(segment_id)
    temp = path / (segment_name(segment_id) + TEMP_SUFFIX)
    created_ns = time.time_ns()
    fd = ack_fd = -1
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        write_all(fd, segment_header(slot, segment_id, created_ns))
        if sync:
            os.fdatasync(fd)
        os.rename(temp, final)
        ack_fd = os.open(path / ack_name(segment_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                         | os.O_CLOEXEC, 0o644)
        write_all(ack_fd, ack_header(slot, segment_id))
        if sync:
            fsync_dir(path)
    except OSError:
        for open_fd in (fd, ack_fd):
            if open_fd >= 0:
                os.close(open_fd)
        for leftover in (temp, final, path / ack_name(segment_id)):
            _unlink(leftover)
        raise
    return fd, ack_fd, created_ns


def delete_segment(path: Path, segment_id: int) -> None:
    """Unlink the segment, then its sidecar (an orphan sidecar is deleted by the next survey)."""
    _unlink(path / segment_name(segment_id))
    _unlink(path / ack_name(segment_id))


def set_aside_segment(path: Path, segment_id: int) -> None:
    """Rename a damaged segment, then its sidecar, to ``<name>.corrupt-<unix time>``: kept, out of the log."""
    for name in (segment_name(segment_id), ack_name(segment_id)):
        try:
            os.rename(path / name, path / _aside_name(path, name))
        except FileNotFoundError:
            pass


def _aside_name(path: Path, name: str) -> str:
    stamp = f"{name}{SET_ASIDE_MARK}{int(time.time())}"
    candidate, n = stamp, 0
    while (path / candidate).exists():
        n += 1
        candidate = f"{stamp}-{n}"
    return candidate


def write_all(fd: int, data: bytes | bytearray) -> None:
    """One write call unless the kernel writes short (then the rest, or the error it raises)."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)
        while written < len(data):
            more = os.write(fd, view[written:])
            if more == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += more


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

