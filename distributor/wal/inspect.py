"""Operator tools: what a log directory holds (``inspect``), whether it is damaged (``verify``), for a terminal (``render``).

Read-only: files are opened O_RDONLY, nothing is repaired, deleted, renamed or locked, so they
are safe on the directory of a running distributor (an active segment may then show a torn tail:
the write in progress). The same scanner as replay reads the segments, chunk by chunk.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from distributor.wal.format import (
    ATTEMPTED,
    DONE,
    RECORD_HEADER,
    SEGMENT_HEADER,
    SET_ASIDE_MARK,
    TEMP_SUFFIX,
    ack_name,
    name_id,
    parse_segment_header,
    segment_name,
)
from distributor.wal.scan import Acks, SegmentScanner, parse_acks

_TOTALS = ("segments", "bytes", "unacked_packets", "unacked_messages", "possible_duplicates", "corrupt_records",
           "torn_tails")


def inspect(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Per worker directory under ``root`` (or ``root`` itself if it is one): segments, bytes, backlog, damage."""
    base = Path(root)
    if not base.is_dir():
        return {"dir": str(base), "exists": False, "workers": [], "totals": dict.fromkeys(_TOTALS, 0)}
    if _is_slot_dir(base):
        dirs = [base]
    else:
        dirs = sorted((entry for entry in base.iterdir() if entry.is_dir() and entry.name.startswith("worker-")),
                      key=lambda entry: (len(entry.name), entry.name))
    now_ms = time.time_ns() // 1_000_000
    workers = [inspect_slot(path, now_ms) for path in dirs]
    totals = {key: sum(worker[key] for worker in workers) for key in _TOTALS}
    return {"dir": str(base), "exists": True, "workers": workers, "totals": totals}


def _is_slot_dir(path: Path) -> bool:
    return path.name.startswith("worker-") or any(name_id(name) is not None for name in os.listdir(path))


def inspect_slot(path: Path, now_ms: int) -> dict[str, Any]:
    names = sorted(os.listdir(path))
    segment_ids = [found for name in names if (found := name_id(name)) is not None and name == segment_name(found)]
    present = set(segment_ids)
    segments = [info for segment_id in segment_ids if (info := _inspect_segment(path, segment_id)) is not None]
    oldest = min((s["oldest_unacked_ms"] for s in segments if s["oldest_unacked_ms"] is not None), default=None)
    valid = [s for s in segments if s["header_ok"]]
    return {
        "name": path.name,
        "path": str(path),
        "segments": len(valid),
        "bytes": sum(s["bytes"] for s in valid),
        "unacked_packets": sum(s["unacked_packets"] for s in valid),
        "unacked_messages": sum(s["unacked_messages"] for s in valid),
        "possible_duplicates": sum(s["possible_duplicates"] for s in valid),
        "oldest_unacked_ms": oldest,
        "oldest_unacked_age_seconds": None if oldest is None else max(0.0, (now_ms - oldest) / 1000),
        "corrupt_records": sum(s["corrupt_records"] for s in valid),
        "torn_tails": sum(1 for s in valid if s["torn"]),
        "bad_headers": [s["name"] for s in segments if not s["header_ok"]],
        "set_aside": [name for name in names if SET_ASIDE_MARK in name and name_id(name) is not None],
        "orphan_acks": [name for name in names if (found := name_id(name)) is not None and name == ack_name(found)
                        and found not in present],
        "temp_files": [name for name in names if name.endswith(TEMP_SUFFIX) and name_id(name) is not None],
        "segment_list": segments,
    }


def _inspect_segment(path: Path, segment_id: int) -> dict[str, Any] | None:
    """A segment's figures; None if it was deleted since the directory was listed (a live log)."""
    name = segment_name(segment_id)
    info: dict[str, Any] = {"name": name, "ack_name": ack_name(segment_id), "header_ok": False, "bytes": 0, "records": 0, "unacked_packets": 0,
                            "unacked_messages": 0, "possible_duplicates": 0, "oldest_unacked_ms": None,
                            "corrupt_records": 0, "torn": False, "corrupt_tail": False, "ack": "missing",
                            "bad_ack_records": 0}
    try:
        fd = os.open(path / name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        # the sidecar first: every acknowledgement it holds is for a record written before it, so the
        # segment's size taken afterwards covers them all even while a live log appends
        ack_data = _read_ack_file(path, segment_id)
        size = os.fstat(fd).st_size
        info["bytes"] = size
        if parse_segment_header(os.pread(fd, SEGMENT_HEADER.size, 0), segment_id) is None:
            return info
        info["header_ok"] = True
        acks = _parse_acks(ack_data, segment_id, size, info)
        flags = acks.flags
        scanner = SegmentScanner(fd, size)
        while not scanner.finished:
            for record in scanner.read():
                info["records"] += 1
                flag = flags[record.record_index] if record.record_index < len(flags) else 0
                if flag & DONE:
                    continue
                info["unacked_packets"] += 1
                info["unacked_messages"] += record.messages
                info["possible_duplicates"] += bool(flag & ATTEMPTED) or acks.damaged
                if info["oldest_unacked_ms"] is None:
                    info["oldest_unacked_ms"] = record.accepted_ms
        info["corrupt_records"] = scanner.corrupt
        info["torn"] = scanner.torn_at is not None
        info["corrupt_tail"] = scanner.corrupt_tail
    finally:
        os.close(fd)
    return info


def _read_ack_file(path: Path, segment_id: int) -> bytes | None:
    try:
        return (path / ack_name(segment_id)).read_bytes()
    except FileNotFoundError:
        return None


def _parse_acks(data: bytes | None, segment_id: int, size: int, info: dict[str, Any]) -> Acks:
    if data is None:
        return Acks()
    acks = parse_acks(data, segment_id, max(0, (size - SEGMENT_HEADER.size) // RECORD_HEADER.size))
    info["ack"] = "garbage" if not acks.header_ok else "torn" if acks.torn else "ok"
    info["bad_ack_records"] = acks.bad_records
    return acks


def verify(root: str | os.PathLike[str]) -> list[str]:
    """Damage in a log directory, one line each; empty when clean.

    Corruption counts, crash leftovers do not: a torn tail, an orphan sidecar or a temporary file
    is what a crash leaves and the next start repairs by itself. Set-aside files are listed until
    the operator has looked at them and deleted them.
    """
    problems: list[str] = []
    for worker in inspect(root)["workers"]:
        where = worker["name"]
        for name in worker["bad_headers"]:
            problems.append(f"{where}/{name}: invalid segment header (set aside at the next start)")
        for segment in worker["segment_list"]:
            if segment["corrupt_records"]:
                problems.append(f"{where}/{segment['name']}: {segment['corrupt_records']} corrupt records")
            if segment["ack"] == "garbage":
                problems.append(f"{where}/{segment['ack_name']}: not this segment's sidecar; its packets replay "
                                f"as possible duplicates")
            elif segment["bad_ack_records"]:
                problems.append(f"{where}/{segment['ack_name']}: {segment['bad_ack_records']} unreadable "
                                f"acknowledgement records")
        for name in worker["set_aside"]:
            problems.append(f"{where}/{name}: set aside after damage; look at it, then delete it")
    return problems


def render(report: dict[str, Any]) -> str:
    """``inspect``'s report as a table for a terminal."""
    lines = [f"write-ahead log {report['dir']}" + ("" if report["exists"] else ": no such directory")]
    if not report["workers"]:
        return "\n".join(lines)
    header = ("worker", "segments", "bytes", "unacked pkts", "unacked msgs", "oldest age", "dup?", "corrupt", "torn")
    rows = [header]
    for worker in report["workers"]:
        age = worker["oldest_unacked_age_seconds"]
        rows.append((worker["name"], str(worker["segments"]), _size(worker["bytes"]), str(worker["unacked_packets"]),
                     str(worker["unacked_messages"]), "-" if age is None else f"{age:.1f}s",
                     str(worker["possible_duplicates"]), str(worker["corrupt_records"]), str(worker["torn_tails"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))))
    for worker in report["workers"]:
        for label in ("bad_headers", "set_aside", "orphan_acks", "temp_files"):
            if worker[label]:
                lines.append(f"{worker['name']} {label.replace('_', ' ')}: {', '.join(worker[label])}")
    return "\n".join(lines)


def _size(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    value, unit = float(n), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {units[unit]}"
