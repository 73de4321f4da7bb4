"""Damaged files, a full disk and a backlog larger than memory, end to end (issue 11, "Tests").

Every scenario builds its backlog on disk with the analyzers stalled (their ``/control`` stall fault: nothing
is acknowledged, and with ``PATIENT`` health settings nobody gives up on them either), then does something a
disk or an operator can do to the log, and checks what the next start reports and delivers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from distributor.tools.localcluster import wait_until
from wal_e2e_support import (
    PATIENT,
    RECORD_HEADER,
    Client,
    Distributor,
    Harness,
    Load,
    SegmentRecord,
    accepted_keys,
    harness,
    inspect,
    missing,
    packet,
    read_records,
    report,
    sets,
    start_load,
    wal_cli,
)

__all__ = ["harness"]  # the fixture, imported for pytest


def _worker(distributor: Distributor) -> dict[str, Any]:
    workers = distributor.workers()
    assert len(workers) == 1
    return workers[0]


# ------------------------------------------------------------------------------------------ corruption


@pytest.mark.timeout(120)
def test_corruption_end_to_end_start_succeeds_counts_are_exact_rest_is_delivered(
        harness: Harness, tmp_path: Path) -> None:
    """After a kill -9 with a backlog on disk: a torn tail, flipped bits mid-segment, a zero-length segment and
    a deleted segment. The next start succeeds by itself; it replays exactly the undamaged records, counts one
    corrupt record, one torn tail and sets aside the zero-length segment at once and the bit-flipped one once
    the rest of it is delivered; every undamaged packet reaches an analyzer."""
    wal_dir = tmp_path / "wal"
    slot_dir = wal_dir / "worker-0"
    analyzers = harness.analyzers()
    settings = [*PATIENT, *sets(wal__segment_bytes=128 << 10, ingest__max_body_bytes=64 << 10)]
    distributor = harness.distributor(analyzers, wal_dir, 1, settings)
    distributor.start()
    analyzers.control(stall=True)
    load = start_load(distributor.ingest_url, 1.5, rate=800)
    stats = load.join()
    accepted = accepted_keys([stats])
    assert len(accepted) > 800
    distributor.kill_group()

    # what is on disk, before any damage: the operator's tool and our own reading of the files agree
    before = inspect(wal_dir)
    slot = before["workers"][0]
    assert before["totals"]["corrupt_records"] == 0 and before["totals"]["torn_tails"] == 0
    records: dict[str, list[SegmentRecord]] = {s["name"]: read_records(slot_dir / s["name"])
                                               for s in slot["segment_list"]}
    for entry in slot["segment_list"]:
        assert entry["records"] == len(records[entry["name"]]) == entry["unacked_packets"], entry
    on_disk = {r.key for found in records.values() for r in found}
    assert accepted <= on_disk, f"{len(accepted - on_disk)} packets were answered 202 without being in the log"
    full = [name for name in sorted(records) if len(records[name]) >= 3]
    assert len(full) >= 5, f"need 5 segments with records, got {len(full)}"
    flipped, zeroed, deleted, torn = full[1], full[2], full[3], full[-1]

    # the damage
    flip = records[flipped][len(records[flipped]) // 2]
    with open(slot_dir / flipped, "r+b") as file:  # one bit in the middle of the payload of a middle record
        at = (flip.offset + RECORD_HEADER.size + flip.end) // 2
        file.seek(at)
        byte = file.read(1)[0]
        file.seek(at)
        file.write(bytes([byte ^ 0x10]))
    os.truncate(slot_dir / zeroed, 0)
    os.unlink(slot_dir / deleted)  # its .ack stays behind
    cut = records[torn][-1]
    os.truncate(slot_dir / torn, (cut.offset + RECORD_HEADER.size + cut.end) // 2)  # a crash mid-write

    damaged = {flip.key, cut.key} | {r.key for r in records[zeroed]} | {r.key for r in records[deleted]}
    expected_replayed = sum(len(found) for found in records.values()) - len(records[zeroed]) \
        - len(records[deleted]) - 2
    after_damage = inspect(wal_dir)["workers"][0]
    assert after_damage["bad_headers"] == [zeroed] and after_damage["corrupt_records"] == 1
    assert after_damage["torn_tails"] == 1 and after_damage["unacked_packets"] == expected_replayed
    assert wal_cli("verify", str(wal_dir)).returncode == 1

    distributor.start()  # no manual step: the start repairs what it can and sets aside the rest
    wait_until(lambda: _worker(distributor)["wal"]["replayed_packets"] == expected_replayed, 30,
               f"{expected_replayed} packets replayed")
    wal = _worker(distributor)["wal"]
    assert wal["corrupt_records"] == 1
    assert wal["torn_tails"] == 1
    assert wal["set_aside"] == 1  # the zero-length segment, at once; the damaged one still has packets to deliver
    analyzers.control(stall=False)
    distributor.wait_delivered()
    wait_until(lambda: _worker(distributor)["wal"]["set_aside"] == 2, 30, "the bit-flipped segment set aside")
    wal = _worker(distributor)["wal"]
    assert (wal["replayed_packets"], wal["corrupt_records"], wal["torn_tails"]) == (expected_replayed, 1, 1)

    seen = analyzers.keys()
    undamaged = accepted - damaged
    lost = missing(undamaged, seen)
    assert not lost, f"{len(lost)} undamaged packets were not delivered: {lost[:5]}"
    names = os.listdir(slot_dir)
    for name in (flipped, zeroed):
        assert any(n.startswith(name + ".corrupt-") for n in names), f"{name} not set aside: {names}"
    assert not any(n.startswith(deleted.replace(".wal", "")) for n in names), names  # its orphan .ack is gone
    assert distributor.alive() and _worker(distributor)["restarts"] == 0
    report("corruption", {"answered_202": len(accepted), "records_on_disk": sum(map(len, records.values())),
                          "replayed": wal["replayed_packets"], "corrupt_records": wal["corrupt_records"],
                          "torn_tails": wal["torn_tails"], "set_aside": wal["set_aside"],
                          "possible_duplicates": wal["possible_duplicates"],
                          "damaged_packets": len(damaged), "damaged_yet_delivered": len(damaged & set(seen))})


# ------------------------------------------------------------------------------------------- ENOSPC


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test (CI runs as root), always unmounted at the end."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a size-limited filesystem")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 4 MiB tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _wal_states(distributor: Distributor) -> list[bool]:
    return [bool((w.get("wal") or {}).get("available")) for w in distributor.workers()]


def _post_until(client: Client, status: int, keys: set[tuple[str, str]], prefix: str, timeout: float = 30) -> Any:
    """Post fresh packets one at a time until one is answered ``status``; record the keys answered 202."""
    sent = [0]

    def attempt() -> Any:
        sent[0] += 1
        packet_id = f"{prefix}-{sent[0]}"
        code, headers, body = client.post(packet("probe", packet_id))
        if code == 202:
            keys.add(("probe", packet_id))
        return (code, headers, body) if code == status else None

    return wait_until(attempt, timeout, f"a packet answered {status}", interval=0.05)


def _fill(distributor: Distributor, keys: set[tuple[str, str]], prefix: str) -> tuple[int, int]:
    """Load until no worker's log can take a packet; (202s, 503s) of that load."""
    load = start_load(distributor.ingest_url, 4.0, rate=1500, prefix=prefix)
    wait_until(lambda: not any(_wal_states(distributor)) or load.done, 30, "the filesystem to fill")
    stats = load.join()
    keys |= accepted_keys([stats])
    return stats.by_status.get(202, 0), stats.by_status.get(503, 0)


@pytest.mark.timeout(120)
def test_enospc_on_a_small_filesystem_answers_503_loses_no_202_and_recovers_by_itself(
        small_fs: Path, harness: Harness) -> None:  # this order: the distributor stops before the unmount
    """The log on a 4 MiB tmpfs, analyzers stalled: the disk fills, new packets get 503 ``wal_unavailable``
    with Retry-After; space comes back twice (a filler file deleted, then acknowledgements deleting segments)
    and each time the workers take packets again by themselves; every 202 is delivered in the end."""
    wal_dir = small_fs / "wal"
    filler = small_fs / "filler"
    filler.write_bytes(os.urandom(1 << 20))
    analyzers = harness.analyzers()
    settings = [*PATIENT, *sets(wal__segment_bytes=256 << 10, ingest__max_body_bytes=64 << 10)]
    distributor = harness.distributor(analyzers, wal_dir, 2, settings)
    distributor.start()
    analyzers.control(stall=True)
    accepted: set[tuple[str, str]] = set()
    client = Client(distributor.port)
    try:
        first_202, first_503 = _fill(distributor, accepted, "fill1")
        assert first_503 > 0, "the disk filled: packets must have been refused"
        code, headers, body = _post_until(client, 503, accepted, "full1")
        assert body["error"] == "wal_unavailable" and float(headers["retry-after"]) > 0, (headers, body)
        workers = distributor.workers()
        assert sum(w["wal_unavailable_packets"] for w in workers) > 0
        assert sum(w["wal"]["write_errors"] for w in workers) > 0
        held = sum(w["wal"]["unacked_packets"] for w in workers)

        # space returns: the operator deletes a file; the workers' probes find it without any help
        filler.unlink()
        wait_until(lambda: all(_wal_states(distributor)), 30, "every worker's log available again")
        _post_until(client, 202, accepted, "back1")

        # full again; this time the analyzers recover and the acknowledgements delete whole segments
        second_202, second_503 = _fill(distributor, accepted, "fill2")
        assert second_503 > 0
        _post_until(client, 503, accepted, "full2")
        analyzers.control(stall=False)
        wait_until(lambda: all(_wal_states(distributor)), 30, "every worker's log available again")
        _post_until(client, 202, accepted, "back2")
    finally:
        client.close()
    distributor.wait_delivered()

    workers = distributor.workers()
    assert all(w["restarts"] == 0 for w in workers), "the workers recovered by themselves, not by a restart"
    seen = analyzers.keys()
    lost = missing(accepted, seen)
    assert not lost, f"{len(lost)} of {len(accepted)} packets answered 202 were not delivered: {lost[:5]}"
    assert sum(a["lost_packets"] for a in distributor.analyzers_view()) == 0
    report("ENOSPC", {"answered_202": len(accepted), "unacked_when_full": held,
                      "fill1_202/503": f"{first_202}/{first_503}", "fill2_202/503": f"{second_202}/{second_503}",
                      "write_errors": sum(w["wal"]["write_errors"] for w in workers),
                      "wal_unavailable_answers": sum(w["wal_unavailable_packets"] for w in workers)})


# -------------------------------------------------------------------------------- backlog vs memory

QUEUE_BOUND = 4 << 20  # queue.worker_max_bytes (and queue.max_bytes) of the worker that replays
RSS_ALLOWANCE = 24 << 20  # fixed allowance above a fresh worker + the queue bound (see the test's docstring)
BACKLOG = 40 << 20


@pytest.mark.timeout(180)
def test_a_backlog_ten_times_the_queue_bound_replays_with_rss_inside_the_bound(
        harness: Harness, tmp_path: Path) -> None:
    """A ~40 MiB backlog (built with 96 MiB queues and stalled analyzers, then kill -9) replayed by a worker whose
    queues hold 4 MiB: replay streams it, so the worker's RSS while replaying stays within a fresh worker's RSS
    + the 4 MiB queue bound + a fixed 24 MiB allowance (the copies of in-flight batches in request bodies, the
    replay's 1 MiB read chunk, aiohttp's buffers and the allocator's slack), well below the backlog itself;
    and everything is delivered."""
    wal_dir = tmp_path / "wal"
    analyzers = harness.analyzers()
    big = harness.distributor(analyzers, wal_dir, 1, [*PATIENT, *sets(
        queue__worker_max_bytes=96 << 20, queue__max_bytes=64 << 20, wal__segment_bytes=4 << 20)])
    big.start()
    fresh_rss = _worker(big)["rss_bytes"]
    analyzers.control(stall=True)
    loads: list[Load] = []
    while _worker(big)["wal"]["bytes"] < BACKLOG:
        load = start_load(big.ingest_url, 2.0, rate=1500, sizes=((50, 1.0),), prefix=f"backlog{len(loads)}")
        loads.append(load)
        load.join()
        assert len(loads) < 10, "the backlog does not grow"
    big.kill_group()
    backlog = inspect(wal_dir)["totals"]
    assert backlog["bytes"] >= BACKLOG

    analyzers.control(delay_ms=150, stall=False)  # replay paced by analyzers answering in 150 ms
    small = harness.distributor(analyzers, wal_dir, 1, [*PATIENT, *sets(
        queue__worker_max_bytes=QUEUE_BOUND, queue__max_bytes=QUEUE_BOUND, wal__segment_bytes=4 << 20)])
    small.spawn()
    samples: list[tuple[int, int, int]] = []  # (rss, queued bytes, replay bytes left) while replay runs

    def replayed() -> bool:
        worker = _worker(small)
        wal = worker.get("wal") or {}
        if worker["state"] == "ready" and "rss_bytes" in worker and wal.get("replay_remaining_bytes", 0) > 0:
            samples.append((worker["rss_bytes"], worker["queued_bytes"], wal["replay_remaining_bytes"]))
        return worker["state"] == "ready" and wal.get("replayed_packets", 0) > 0 \
            and wal.get("replay_remaining_bytes", 1) == 0

    wait_until(replayed, 120, "the replay to read the whole backlog", interval=0.1)
    small.wait_delivered(timeout=120)
    stats = [load.join() for load in loads]
    accepted = accepted_keys(stats)
    lost = missing(accepted, analyzers.keys())
    assert not lost, f"{len(lost)} of {len(accepted)} packets answered 202 were not delivered: {lost[:5]}"
    wal = _worker(small)["wal"]
    assert wal["replayed_packets"] == backlog["unacked_packets"]
    assert len(samples) >= 5, f"only {len(samples)} samples taken while replay ran"
    peak = max(rss for rss, _, _ in samples)
    assert max(queued for _, queued, _ in samples) <= QUEUE_BOUND
    assert peak <= fresh_rss + QUEUE_BOUND + RSS_ALLOWANCE, \
        f"RSS {peak >> 20} MiB while replaying; fresh worker {fresh_rss >> 20} MiB"
    report("backlog replay", {"backlog_MiB": backlog["bytes"] / (1 << 20), "backlog_packets": backlog["unacked_packets"],
                              "fresh_rss_MiB": fresh_rss / (1 << 20), "peak_rss_MiB": peak / (1 << 20),
                              "growth_MiB": (peak - fresh_rss) / (1 << 20), "samples": len(samples),
                              "max_queued_MiB": max(q for _, q, _ in samples) / (1 << 20),
                              "replayed": wal["replayed_packets"], "answered_202": len(accepted)})
