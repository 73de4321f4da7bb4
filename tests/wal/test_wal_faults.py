"""Disk faults: failed writes (EIO, EROFS, ENOSPC, EDQUOT, short writes) and a really full filesystem."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from distributor.wal import segment as segment_module
from distributor.wal.inspect import inspect, verify
from distributor.wal.log import WalUnavailable, WorkerLog
from wal_support import append_turn, durable, number, packet, replay_all, run


def _name(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.ENOSPC, errno.EDQUOT])
def test_a_failed_write_answers_failure_leaves_no_torn_record_and_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    real = os.write
    failing = threading.Event()

    def write(fd: int, data: Any) -> int:
        if failing.is_set() and _name(fd).endswith(".wal"):
            if len(data) > 1000:  # half the batch reaches the file first, like a disk filling up mid-write
                return real(fd, bytes(data[:len(data) // 2]))
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="interval", retry_interval=0.01)
        await log.settle()
        _, ok = await append_turn(log, [packet(i, 200) for i in range(10)])
        assert ok
        failing.set()
        _, ok = await append_turn(log, [packet(i, 200) for i in range(10, 20)])
        assert not ok
        assert not log.available
        assert log.unavailable_reason.startswith(f"write failed: {errno.errorcode[code]}")
        with pytest.raises(WalUnavailable):
            log.append(packet(99), 1)
        assert log.stats.write_errors >= 1
        assert log.stats.unacked_packets == 10  # the failed turn's packets are not in the books
        report = inspect(tmp_path)
        assert report["totals"]["torn_tails"] == 0 and report["totals"]["unacked_packets"] == 10
        assert verify(tmp_path) == []
        failing.clear()
        await log.wait_available()  # by itself: a probe segment could be written
        _, ok = await append_turn(log, [packet(i, 200) for i in range(20, 30)])
        assert ok
        await log.close()
        log = await WorkerLog.open(tmp_path, 0)
        replayed = await replay_all(log)
        await log.close()
        assert [number(r.raw) for r in replayed] == [*range(10), *range(20, 30)]
        assert log.stats.torn_tails == 0 and log.stats.corrupt_records == 0

    run(scenario())


def test_acknowledgements_that_cannot_be_written_only_cost_duplicates(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write

    def write(fd: int, data: Any) -> int:
        if _name(fd).endswith(".ack") and len(data) > 100:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data)

    async def scenario() -> None:
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        await log.settle()
        refs, _ = await append_turn(log, [packet(i) for i in range(50)])
        monkeypatch.setattr(os, "write", write)
        for ref in refs:
            log.ack(ref)
        await append_turn(log, [])
        assert log.available and log.stats.write_errors == 1
        monkeypatch.setattr(os, "write", real)
        await log.close()
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        assert len(await replay_all(log)) == 50  # delivered, but not recorded: replayed again
        await log.close()

    run(scenario())


def test_enospc_on_a_small_tmpfs_answers_failure_and_recovers_when_space_returns(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "3m")  # 1 MiB of it the log keeps in reserve for acknowledgements
    try:
        run(_fill_and_recover(mount))
    finally:
        _unmount(mount)


async def _fill_and_recover(mount: Path) -> None:
    filler = mount / "filler"
    filler.write_bytes(bytes(1 << 20))
    log = await WorkerLog.open(mount, 0, sync="interval", segment_bytes=256 << 10, max_bytes=64 << 20,
                               retry_interval=0.02)
    promised: list[int] = []
    failed = 0
    while log.available:
        first = len(promised) + failed
        batch = [packet(first + i, 2048) for i in range(20)]
        _, ok = await append_turn(log, batch)
        if ok:
            promised += [number(raw) for raw in batch]
        else:
            failed += len(batch)
        await log.settle()
    assert failed and "ENOSPC" in log.unavailable_reason
    assert 300 < len(promised) < 600
    report = inspect(mount)
    assert report["totals"]["torn_tails"] == 0  # the failed batch was cut back
    assert report["totals"]["unacked_packets"] == len(promised)
    filler.unlink()
    await log.wait_available()
    _, ok = await append_turn(log, [packet(10_000 + i, 2048) for i in range(20)])
    assert ok
    await log.close()
    log = await WorkerLog.open(mount, 0, sync="interval")
    replayed = await replay_all(log)
    await log.close()
    assert [number(r.raw) for r in replayed] == promised + list(range(10_000, 10_020))


def _mount_tmpfs(mount: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _unmount(mount: Path) -> None:
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_read_only_filesystem_at_start_opens_unavailable_and_recovers_when_writable(tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    _mount_tmpfs(mount, "4m")

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True, capture_output=True)

    async def scenario() -> None:
        log = await WorkerLog.open(mount, 0, sync="interval", retry_interval=0.01)
        await append_turn(log, [packet(i) for i in range(10)])
        await log.close()
        remount("ro")
        log = await WorkerLog.open(mount, 0, sync="interval", retry_interval=0.01)  # no crash, no crash loop
        assert not log.available and "EROFS" in log.unavailable_reason
        assert await replay_all(log) == []  # its sidecar cannot take acks: left for a later start
        remount("rw")
        await log.wait_available()
        assert (await append_turn(log, [packet(i) for i in range(10, 15)]))[1]
        await log.close()
        log = await WorkerLog.open(mount, 0, sync="interval")
        assert [number(r.raw) for r in await replay_all(log)] == list(range(15))
        await log.close()

    try:
        run(scenario())
    finally:
        _unmount(mount)


def test_attempted_marks_are_written_on_a_full_disk_from_the_reserve(tmp_path: Path) -> None:
    """A packet sent while the disk is full must still replay as a possible duplicate: its ATTEMPTED mark
    goes into the space the log kept in reserve."""
    mount = tmp_path / "full"
    _mount_tmpfs(mount, "3m")
    try:
        run(_attempt_on_a_full_disk(mount))
    finally:
        _unmount(mount)


async def _attempt_on_a_full_disk(mount: Path) -> None:
    log = await WorkerLog.open(mount, 0, sync="none", segment_bytes=1 << 20, max_bytes=64 << 20)
    assert (mount / "worker-0" / "reserve").exists()
    refs, ok = await append_turn(log, [packet(i, 64) for i in range(1014 + 20)])
    assert ok
    await log.attempted(refs[:1014])  # 24 + 16 + 4 x 1014 bytes: the sidecar ends exactly at a page
    ack = max((mount / "worker-0").glob("*.ack"), key=lambda path: path.stat().st_size)
    assert ack.stat().st_size == 4096
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # every page left
        for chunk in (64 << 10, 4096):
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    await log.attempted(refs[1014:])  # handed to the wire on a full disk: the marks need a new page
    assert not (mount / "worker-0" / "reserve").exists(), "the reserve made room for the marks"
    await log.close()
    filler.unlink()
    log = await WorkerLog.open(mount, 0, sync="none")
    replayed = await replay_all(log)
    await log.close()
    assert len(replayed) == 1034 and all(r.possible_duplicate for r in replayed)



async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` on the running loop (the log's callbacks go on meanwhile) until true or the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


class _FailingUnlink:
    """``os.unlink`` as ``distributor.wal.segment`` calls it: EIO for the segment files of one slot directory
    while ``failing`` is set; every refused name is recorded (one entry per attempt)."""

    def __init__(self, slot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.slot = slot
        self.failing = threading.Event()
        self.failing.set()
        self.refused: list[str] = []
        self._real = os.unlink
        monkeypatch.setattr(segment_module.os, "unlink", self)

    def __call__(self, path: Any, *args: Any, **kwargs: Any) -> None:
        where, name = os.path.split(os.fspath(path))
        if self.failing.is_set() and name.endswith(".wal") and where == str(self.slot):
            self.refused.append(name)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._real(path, *args, **kwargs)

    def on_disk(self) -> tuple[int, int]:
        """(segment files, their bytes) in the slot directory."""
        files = list(self.slot.glob("*.wal"))
        return len(files), sum(path.stat().st_size for path in files)


async def _retire_segments_that_cannot_be_removed(root: Path, unlink: _FailingUnlink) -> WorkerLog:
    """A log whose first six segments were delivered and retired, and whose removal failed."""
    log = await WorkerLog.open(root, 0, sync="none", segment_bytes=4096, retry_interval=0.05)
    await log.settle()
    for turn in range(6):  # 20 x 200 bytes per turn: each turn fills a segment, which rolls
        refs, ok = await append_turn(log, [packet(turn * 100 + i, 200) for i in range(20)])
        assert ok
        for ref in refs:
            log.ack(ref)
        await durable(log)  # DONE marks written: the full segments retire (and their removal fails)
        await log.settle()
    assert len(set(unlink.refused)) >= 4, unlink.refused
    await log.settle()  # no removal in flight: the books are as they stand
    return log


def test_a_segment_whose_removal_failed_is_counted_again_and_removed_once_unlink_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (review of issue 11): when deleting a finished segment failed (EIO on unlink), the books
    forgot it anyway and it stayed on disk for the rest of the process' life. Now it is counted again and
    removed by a retry every ``retry_interval`` once unlink works."""
    unlink = _FailingUnlink(tmp_path / "worker-0", monkeypatch)

    async def scenario() -> None:
        log = await _retire_segments_that_cannot_be_removed(tmp_path, unlink)
        files, _ = unlink.on_disk()
        assert log.stats.segments == files, (f"the books count {log.stats.segments} segments, {files} are on disk "
                                             f"({len(set(unlink.refused))} could not be removed)")
        assert log.stats.write_errors >= len(set(unlink.refused))
        stuck = sorted(set(unlink.refused))
        tries = len(unlink.refused)
        await _until(lambda: len(unlink.refused) >= tries + len(stuck), 10, "the failed removals to be tried again")
        unlink.failing.clear()
        await _until(lambda: not any((unlink.slot / name).exists() for name in stuck), 10,
                     f"{len(stuck)} segments whose removal failed to be removed once unlink works")
        await log.settle()
        files, size = unlink.on_disk()
        assert files == 2, sorted(path.name for path in unlink.slot.glob("*.wal"))  # the active one and the spare
        assert (log.stats.segments, log.stats.bytes, log.stats.own_bytes) == (files, size, size)
        assert not any((unlink.slot / name).with_suffix(".ack").exists() for name in stuck)
        await log.close()
        log = await WorkerLog.open(tmp_path, 0, sync="none")
        assert await replay_all(log) == []
        await log.close()

    run(scenario())


def test_a_segment_whose_removal_failed_still_counts_its_bytes_toward_max_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second half of "counted again": the bytes of a segment still on disk count toward ``max_bytes``."""
    unlink = _FailingUnlink(tmp_path / "worker-0", monkeypatch)

    async def scenario() -> None:
        log = await _retire_segments_that_cannot_be_removed(tmp_path, unlink)
        try:
            files, size = unlink.on_disk()
            assert (log.stats.segments, log.stats.bytes, log.stats.own_bytes) == (files, size, size), (
                f"the books count {log.stats.segments} segments / {log.stats.bytes} bytes (own "
                f"{log.stats.own_bytes}); on disk: {files} segments / {size} bytes")
        finally:
            unlink.failing.clear()
            await log.close()

    run(scenario())
