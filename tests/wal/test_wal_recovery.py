"""Starting after a crash at any instant and after damage: torn tails, lost acks, deleted and mangled files.

Each case builds a log, damages a copy of its files the way a crash or a disk would, reopens it and
checks that the start succeeds, that exactly the right packets replay and that the counts are exact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from distributor.wal.format import ACK_RECORD, RECORD_HEADER, SEGMENT_HEADER
from distributor.wal.inspect import verify
from distributor.wal.log import WorkerLog
from distributor.wal.stats import WalStats
from wal_support import append_turn, data_segments, durable, number, packet, record_offsets, replay_all, run


def _build(root: Path, count: int, size: int = 40, segment_bytes: int = 1 << 20, acked: tuple[range, ...] = ()) -> Path:
    """A closed log of ``count`` packets, one per turn; each range in ``acked`` acknowledged in one turn."""
    async def write() -> None:
        log = await WorkerLog.open(root, 0, sync="none", segment_bytes=segment_bytes)
        refs = []
        for n in range(count):
            refs += (await append_turn(log, [packet(n, size)]))[0]
            await log.settle()
        for numbers in acked:
            for n in numbers:
                log.ack(refs[n])
            assert await durable(log)
        await log.close()

    run(write())
    return root / "worker-0"


async def _reopen(root: Path) -> tuple[list[int], list[bool], WalStats, WorkerLog]:
    log = await WorkerLog.open(root, 0, sync="none")
    replayed = await replay_all(log)
    return [number(r.raw) for r in replayed], [r.possible_duplicate for r in replayed], log.stats, log


def _copy(base: Path, root: Path) -> Path:
    shutil.copytree(base, root)
    return root / "worker-0"


def test_a_torn_last_record_is_cut_at_every_byte_offset(tmp_path: Path) -> None:
    base = _build(tmp_path / "base", 6).parent
    segment = data_segments(base / "worker-0")[0]
    start, end = record_offsets(segment)[-1]

    async def every_cut() -> None:
        for cut in range(start, end + 1):
            slot = _copy(base, tmp_path / f"cut-{cut}")
            os.truncate(slot / segment.name, cut)
            numbers, duplicates, stats, log = await _reopen(slot.parent)
            await log.close()
            assert numbers == list(range(6 if cut == end else 5)), cut
            assert not any(duplicates)
            assert stats.torn_tails == (0 if cut in (start, end) else 1), cut
            assert stats.corrupt_records == 0 and stats.set_aside == 0
            assert (slot / segment.name).stat().st_size == (end if cut == end else start)
            shutil.rmtree(slot.parent)

    run(every_cut())


def test_a_torn_last_ack_record_at_every_byte_offset_replays_its_packets_as_possible_duplicates(
        tmp_path: Path) -> None:
    base = _build(tmp_path / "base", 10, acked=(range(3), range(3, 7))).parent
    segment = data_segments(base / "worker-0")[0]
    ack = segment.with_suffix(".ack")
    end = ack.stat().st_size
    start = end - ACK_RECORD.size - 4 * 4

    async def every_cut() -> None:
        for cut in range(start, end + 1):
            slot = _copy(base, tmp_path / f"cut-{cut}")
            os.truncate(slot / ack.name, cut)
            numbers, duplicates, stats, log = await _reopen(slot.parent)
            await log.close()
            torn = start < cut < end
            assert numbers == (list(range(7, 10)) if cut == end else list(range(3, 10))), cut
            assert duplicates == [torn] * len(numbers)
            assert stats.damaged_acks == int(torn) and stats.possible_duplicates == (len(numbers) if torn else 0)
            assert (slot / ack.name).stat().st_size == (end if cut == end else start)  # cut back before appending
            shutil.rmtree(slot.parent)

    run(every_cut())


def _numbers_in(segment: Path) -> list[int]:
    data = segment.read_bytes()
    return [number(data[start + RECORD_HEADER.size:end]) for start, end in record_offsets(segment)]


def test_a_deleted_segment_leaves_an_orphan_ack_that_the_start_removes(tmp_path: Path) -> None:
    slot = _build(tmp_path, 20, size=300, segment_bytes=1024, acked=(range(0, 20, 2),))
    segments = data_segments(slot)
    assert len(segments) >= 4
    gone = segments[1]
    lost = _numbers_in(gone)
    gone.unlink()  # by hand, or a crash between unlinking the .wal and its .ack
    assert gone.with_suffix(".ack").exists()

    async def scenario() -> None:
        numbers, _, stats, log = await _reopen(tmp_path)
        assert numbers == [n for n in range(1, 20, 2) if n not in lost]
        assert stats.corrupt_records == 0 and stats.set_aside == 0
        assert not gone.with_suffix(".ack").exists()
        await log.close()

    run(scenario())


def test_a_half_created_segment_is_removed_and_a_mangled_header_set_aside(tmp_path: Path) -> None:
    slot = _build(tmp_path, 5)
    ids = sorted(int(entry.stem, 16) for entry in slot.glob("*.wal"))
    top = ids[-1]
    (slot / f"{top + 1:016x}.wal.tmp").write_bytes(SEGMENT_HEADER.pack(b"LDWAL\x00\x01\n", 1, 0, top + 1, 0)[:10])
    (slot / f"{top + 2:016x}.wal").write_bytes(b"LDWAL\x00")  # a header cut short: not from a crash of ours
    (slot / f"{top + 3:016x}.wal").write_bytes(b"")  # zero length
    (slot / f"{top + 3:016x}.ack").write_bytes(b"")

    async def scenario() -> None:
        numbers, _, stats, log = await _reopen(tmp_path)
        await log.settle()
        assert numbers == list(range(5))
        assert stats.set_aside == 2 and stats.corrupt_records == 0
        names = sorted(os.listdir(slot))
        assert not any(name.endswith(".tmp") for name in names)
        aside = [name for name in names if ".corrupt-" in name]
        assert sorted(name.split(".corrupt-")[0] for name in aside) == \
            [f"{top + 2:016x}.wal", f"{top + 3:016x}.ack", f"{top + 3:016x}.wal"]
        new_ids = [int(name[:16], 16) for name in names if name.endswith(".wal")]
        assert all(found in ids or found > top + 3 for found in new_ids)  # no id is ever reused
        assert max(new_ids) > top + 3
        await log.close()
        assert len(verify(tmp_path)) == 3  # the set-aside files wait for the operator

    run(scenario())


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _replay_and_ack(root: Path) -> tuple[list[int], list[bool], WalStats, list[str]]:
    async def scenario() -> tuple[list[int], list[bool], WalStats, list[str]]:
        log = await WorkerLog.open(root, 0, sync="none")
        replayed = await replay_all(log)
        for item in replayed:
            log.ack(item.ref)
        assert await durable(log)
        await log.settle()
        names = sorted(os.listdir(root / "worker-0"))
        await log.close()
        return [number(r.raw) for r in replayed], [r.possible_duplicate for r in replayed], log.stats, names

    return run(scenario())


def test_a_flipped_payload_bit_mid_segment_skips_one_record_and_sets_the_segment_aside(tmp_path: Path) -> None:
    slot = _build(tmp_path, 10)
    segment = data_segments(slot)[0]
    start, end = record_offsets(segment)[4]
    _flip(segment, start + RECORD_HEADER.size + 5)
    numbers, _, stats, names = _replay_and_ack(tmp_path)
    assert numbers == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert stats.corrupt_records == 1 and stats.torn_tails == 0 and stats.set_aside == 1
    assert any(name.startswith(segment.name + ".corrupt-") for name in names)
    assert segment.name not in names
    assert [problem for problem in verify(tmp_path) if "set aside" in problem]


@pytest.mark.parametrize("bit", [0, 3, 17, 31])
def test_a_flipped_length_bit_resynchronises_on_the_next_record(tmp_path: Path, bit: int) -> None:
    slot = _build(tmp_path, 10)
    segment = data_segments(slot)[0]
    start, _ = record_offsets(segment)[6]
    _flip(segment, start + 4 + bit // 8, 1 << (bit % 8))
    numbers, _, stats, _ = _replay_and_ack(tmp_path)
    assert numbers == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert stats.corrupt_records == 1 and stats.torn_tails == 0 and stats.set_aside == 1


def test_garbage_over_several_records_counts_each_lost_record(tmp_path: Path) -> None:
    slot = _build(tmp_path, 10)
    segment = data_segments(slot)[0]
    offsets = record_offsets(segment)
    data = bytearray(segment.read_bytes())
    garbage_start, garbage_end = offsets[3][0] + 7, offsets[5][0] + 20
    data[garbage_start:garbage_end] = random.Random(7).randbytes(garbage_end - garbage_start)
    segment.write_bytes(bytes(data))
    numbers, _, stats, _ = _replay_and_ack(tmp_path)
    assert numbers == [0, 1, 2, 6, 7, 8, 9]
    assert stats.corrupt_records == 3


def test_a_corrupt_last_record_is_counted_not_cut(tmp_path: Path) -> None:
    slot = _build(tmp_path, 10)
    segment = data_segments(slot)[0]
    size = segment.stat().st_size
    _flip(segment, size - 3)
    numbers, _, stats, _ = _replay_and_ack(tmp_path)
    assert numbers == list(range(9))
    assert stats.corrupt_records == 1 and stats.torn_tails == 0 and stats.set_aside == 1


def test_a_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    slot = _build(tmp_path, 10)
    segment = data_segments(slot)[0]
    size = segment.stat().st_size
    with open(segment, "ab") as file:
        file.write(bytes(5000))

    async def scenario() -> None:
        numbers, _, stats, log = await _reopen(tmp_path)
        await log.close()
        assert numbers == list(range(10))
        assert stats.torn_tails == 1 and stats.corrupt_records == 0
        assert segment.stat().st_size == size

    run(scenario())


def test_a_garbage_ack_file_replays_everything_as_possible_duplicates(tmp_path: Path) -> None:
    slot = _build(tmp_path, 10, acked=(range(5),))
    segment = data_segments(slot)[0]
    segment.with_suffix(".ack").write_bytes(random.Random(3).randbytes(300))
    numbers, duplicates, stats, names = _replay_and_ack(tmp_path)
    assert numbers == list(range(10)) and all(duplicates)
    assert stats.damaged_acks == 1 and stats.possible_duplicates == 10 and stats.corrupt_records == 0
    assert any(name.startswith(segment.with_suffix(".ack").name + ".corrupt-") for name in names)
    assert segment.name not in names  # the segment itself was sound: delivered, then deleted


def test_garbage_between_ack_records_skips_only_what_it_covers(tmp_path: Path) -> None:
    slot = _build(tmp_path, 10, acked=(range(2), range(2, 4), range(4, 6)))
    segment = data_segments(slot)[0]
    ack = segment.with_suffix(".ack")
    data = bytearray(ack.read_bytes())
    second = 24 + ACK_RECORD.size + 2 * 4  # the header, then the first record (2 indices)
    data[second + 8] ^= 0xFF  # the second record's crc
    ack.write_bytes(bytes(data))
    numbers, duplicates, stats, _ = _replay_and_ack(tmp_path)
    assert numbers == [2, 3, 6, 7, 8, 9] and all(duplicates)
    assert stats.damaged_acks == 1
