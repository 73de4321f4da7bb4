"""Operator tools on clean, torn and corrupt directories: what they report, and that they change nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from distributor.wal.inspect import inspect, render, verify
from distributor.wal.log import WorkerLog
from wal_support import append_turn, data_segments, durable, record_offsets, packet, run


def _build(root: Path, slot: int = 0) -> Path:
    async def write() -> None:
        log = await WorkerLog.open(root, slot, sync="none")
        refs, _ = await append_turn(log, [packet(i, 100) for i in range(10)], messages=4)
        await log.attempted(refs[4:6])
        for ref in refs[:4]:
            log.ack(ref)
        assert await durable(log)
        await log.close()

    run(write())
    return root / f"worker-{slot}"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in root.rglob("*") if path.is_file()}


def test_inspect_and_verify_a_clean_directory(tmp_path: Path) -> None:
    _build(tmp_path, 0)
    _build(tmp_path, 1)
    before = _snapshot(tmp_path)
    report = inspect(tmp_path)
    assert _snapshot(tmp_path) == before  # read-only
    assert [worker["name"] for worker in report["workers"]] == ["worker-0", "worker-1"]
    worker = report["workers"][0]
    assert worker["unacked_packets"] == 6 and worker["unacked_messages"] == 24
    assert worker["possible_duplicates"] == 2
    assert worker["corrupt_records"] == 0 and worker["torn_tails"] == 0
    assert worker["oldest_unacked_age_seconds"] is not None and worker["oldest_unacked_age_seconds"] >= 0
    assert worker["segments"] >= 1 and worker["bytes"] > 1000
    assert report["totals"]["unacked_packets"] == 12
    assert verify(tmp_path) == []
    assert inspect(tmp_path / "worker-1")["workers"][0]["unacked_packets"] == 6  # one slot directory too
    text = render(report)
    assert "worker-0" in text and "worker-1" in text and "unacked" in text


def test_a_torn_tail_is_reported_but_is_not_a_problem(tmp_path: Path) -> None:
    slot = _build(tmp_path)
    segment = data_segments(slot)[0]
    os.truncate(segment, segment.stat().st_size - 10)
    (slot / "00000000000000ff.ack").write_bytes(b"orphan")
    before = _snapshot(tmp_path)
    worker = inspect(tmp_path)["workers"][0]
    assert _snapshot(tmp_path) == before
    assert worker["torn_tails"] == 1 and worker["unacked_packets"] == 5
    assert worker["orphan_acks"] == ["00000000000000ff.ack"]
    assert verify(tmp_path) == []  # crash leftovers: the next start repairs them by itself
    assert "orphan acks: 00000000000000ff.ack" in render(inspect(tmp_path))


def test_corruption_is_a_problem(tmp_path: Path) -> None:
    slot = _build(tmp_path)
    segment = data_segments(slot)[0]
    start, _ = record_offsets(segment)[7]
    data = bytearray(segment.read_bytes())
    data[start + 40] ^= 0x10
    segment.write_bytes(bytes(data))
    (slot / "0000000000000100.wal").write_bytes(b"")
    (slot / "0000000000000005.wal.corrupt-1700000000").write_bytes(b"old")
    before = _snapshot(tmp_path)
    report = inspect(tmp_path)
    assert _snapshot(tmp_path) == before
    worker = report["workers"][0]
    assert worker["corrupt_records"] == 1 and worker["unacked_packets"] == 5
    assert worker["bad_headers"] == ["0000000000000100.wal"]
    assert worker["set_aside"] == ["0000000000000005.wal.corrupt-1700000000"]
    problems = verify(tmp_path)
    assert len(problems) == 3, problems
    assert any("1 corrupt records" in problem for problem in problems)
    assert any("invalid segment header" in problem for problem in problems)
    assert any("set aside" in problem for problem in problems)


def test_a_garbage_sidecar_is_a_problem(tmp_path: Path) -> None:
    slot = _build(tmp_path)
    segment = data_segments(slot)[0]
    segment.with_suffix(".ack").write_bytes(os.urandom(200))
    worker = inspect(tmp_path)["workers"][0]
    assert worker["unacked_packets"] == 10 and worker["possible_duplicates"] == 10
    assert [problem for problem in verify(tmp_path) if "sidecar" in problem]


def test_a_missing_directory_is_empty_not_an_error(tmp_path: Path) -> None:
    report = inspect(tmp_path / "nope")
    assert report["exists"] is False and report["workers"] == []
    assert verify(tmp_path / "nope") == []
    assert "no such directory" in render(report)


WRITER = Path(__file__).with_name("live_writer.py")
REPO = Path(__file__).resolve().parents[2]


def test_inspect_and_verify_on_a_live_log_never_raise_nor_report_problems(tmp_path: Path) -> None:
    """Regression (review of issue 11): the tools are documented as safe on a running distributor's
    directory, but a segment deleted between the listing and its opening raised FileNotFoundError, and a
    sidecar read after the segment was sized could hold marks for records appended meanwhile, which were
    reported as "unreadable acknowledgement records". A real writer process (``live_writer.py``: appends
    and acknowledges without end in 4 KiB segments, deleted as soon as they roll) works on the directory
    while the tools read it for a few seconds."""
    root = tmp_path / "wal"
    errors = tmp_path / "writer.err"
    with open(errors, "wb") as err:
        writer = subprocess.Popen([sys.executable, str(WRITER), str(root)], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=err)
    try:
        deadline = time.monotonic() + 30
        while len(list((root / "worker-0").glob("*.wal"))) < 2:  # the writer is under way
            assert writer.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "the writer made no segments"
            time.sleep(0.01)
        calls = 0
        raised: list[str] = []
        problems: list[str] = []
        seen: set[str] = set()
        end = time.monotonic() + 3.0  # how long the tools read the live directory, not a synchronisation
        while time.monotonic() < end:
            calls += 1
            try:
                problems += verify(root)
                report = inspect(root)
            except Exception as exc:  # collected: the assertion below shows how many and which
                raised.append(f"{type(exc).__name__}: {exc}")
                continue
            seen.update(segment["name"] for worker in report["workers"] for segment in worker["segment_list"])
        assert writer.poll() is None, f"the writer died: {errors.read_text()[-2000:]}"
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert not raised and not problems, (
        f"{len(raised)} of {calls} inspect/verify calls raised (first: {raised[:2]}); {len(problems)} problems "
        f"reported on a healthy live log (first: {problems[:2]})")
    assert len(seen) >= 10, f"only {len(seen)} segments seen in {calls} calls: the writer hardly turned over"
    assert verify(root) == []  # and once it stopped (killed: at most a torn tail, which is not a problem)
