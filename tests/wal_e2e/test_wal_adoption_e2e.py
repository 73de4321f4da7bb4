"""Adoption of orphaned slot directories and the one-distributor-per-``wal.dir`` rule, end to end (review of
issue 11).

* After ``workers`` shrank, a slot directory whose old worker had not exited yet (it still held the
  directory's ``flock``) was skipped once at start and never looked at again: its 202'd packets waited for
  the next restart. Here the test process itself holds ``worker-1/lock`` (standing for an old worker that is
  slow to exit) while a distributor with ``workers = 1`` starts.
* A second distributor started on the directory of a running one took slots the first one's workers own.
"""

from __future__ import annotations

import copy
import fcntl
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from distributor.tools.localcluster import free_ports, wait_until
from wal_e2e_support import (
    PATIENT,
    Client,
    Distributor,
    Harness,
    accepted_keys,
    harness,
    inspect,
    packet,
    read_records,
    report,
    start_load,
)

__all__ = ["harness"]  # the fixture, imported for pytest


def _slot_keys(wal_dir: Path) -> dict[str, set[tuple[str, str]]]:
    """The packet keys of every record on disk, per slot directory (read from the segment files)."""
    keys: dict[str, set[tuple[str, str]]] = {}
    for worker in inspect(wal_dir)["workers"]:
        keys[worker["name"]] = {record.key for segment in worker["segment_list"]
                                for record in read_records(wal_dir / worker["name"] / segment["name"])}
    return keys


def _metric(distributor: Distributor, name: str, worker: str) -> float | None:
    with urllib.request.urlopen(distributor.cluster.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf'^{name}{{worker="{worker}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def _hold(lock_path: Path) -> int:
    """An exclusive flock on a slot directory's lock file, as its worker takes it: the slot is in use."""
    fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


@pytest.mark.timeout(240)
def test_an_orphaned_slot_still_locked_at_start_is_adopted_as_soon_as_it_is_free(
        harness: Harness, tmp_path: Path) -> None:
    """A backlog in worker-0/ and worker-1/ (analyzers stalled, then kill -9), a restart with ``workers = 1``
    while worker-1/ is still locked: worker 0 delivers its own backlog, counts the orphan (``orphan_slots`` 1
    in /admin/workers, ``distributor_wal_orphan_slots`` 1) and delivers nothing of worker-1/; once the lock
    is released it adopts worker-1/ by itself (no restart) and every packet answered 202 is delivered."""
    wal_dir = tmp_path / "wal"
    analyzers = harness.analyzers()
    first = harness.distributor(analyzers, wal_dir, 2, PATIENT)
    first.start()
    analyzers.control(stall=True)
    stats = start_load(first.ingest_url, 1.5, rate=600, connections=16).join()
    accepted = accepted_keys([stats])
    first.kill_group()

    on_disk = _slot_keys(wal_dir)
    own, orphan = on_disk.get("worker-0", set()), on_disk.get("worker-1", set())
    assert own and orphan, f"need a backlog in both slot directories: {({k: len(v) for k, v in on_disk.items()})}"
    assert accepted <= own | orphan, f"{len(accepted - own - orphan)} packets answered 202 are not on disk"

    analyzers.control(stall=False)
    held = _hold(wal_dir / "worker-1" / "lock")  # the old worker 1, still exiting
    released = False
    try:
        second = harness.distributor(analyzers, wal_dir, 1, PATIENT)
        second.start()
        wait_until(lambda: own <= set(analyzers.keys()), 60, "worker-0's own backlog delivered")
        wait_until(lambda: second.workers()[0]["wal"].get("replay_remaining_bytes", 1) == 0
                   and second.workers()[0]["wal"].get("unacked_packets", 1) == 0, 30, "worker 0's log empty")
        orphans_while_held = second.workers()[0]["wal"].get("orphan_slots")
        metric_while_held = _metric(second, "distributor_wal_orphan_slots", "0")
        leaked = orphan & set(analyzers.keys())
        assert not leaked, f"{len(leaked)} packets of worker-1/ delivered while another process held it"
        still = next(w for w in inspect(wal_dir)["workers"] if w["name"] == "worker-1")
        assert still["unacked_packets"] == len(orphan)
        os.close(held)
        released = True
    finally:
        if not released:
            os.close(held)

    wait_until(lambda: orphan <= set(analyzers.keys()), 30,
               f"the {len(orphan)} packets of worker-1/ delivered once its lock was released (orphan_slots "
               f"seen while it was held: {orphans_while_held})")
    assert orphans_while_held == 1, f"/admin/workers wal.orphan_slots while worker-1/ was held: {orphans_while_held}"
    assert metric_while_held == 1, f"distributor_wal_orphan_slots while worker-1/ was held: {metric_while_held}"
    wait_until(lambda: second.workers()[0]["wal"]["orphan_slots"] == 0, 30, "orphan_slots back to 0")
    assert _metric(second, "distributor_wal_orphan_slots", "0") == 0
    second.wait_delivered()
    seen = analyzers.keys()
    assert not accepted - set(seen), f"{len(accepted - set(seen))} packets answered 202 never delivered"
    after = {w["name"]: w for w in inspect(wal_dir)["workers"]}
    assert after["worker-1"]["segments"] == 0 and after["worker-1"]["unacked_packets"] == 0
    report("orphan adoption", {"accepted": len(accepted), "own": len(own), "orphan": len(orphan),
                               "replayed": second.workers()[0]["wal"]["replayed_packets"]})


@pytest.mark.timeout(120)
def test_a_second_distributor_on_the_same_wal_dir_exits_2_naming_it(harness: Harness, tmp_path: Path) -> None:
    """A distributor is running on ``wal.dir``; a second one started on the same directory (its own ports)
    exits 2 at once with one error line naming ``wal.dir``, and the first one goes on taking packets."""
    wal_dir = tmp_path / "wal"
    analyzers = harness.analyzers()
    first = harness.distributor(analyzers, wal_dir, 2, PATIENT)
    first.start()

    other_ports = copy.copy(analyzers)  # the same analyzers, a cluster view with ports of its own
    other_ports.cluster = copy.copy(analyzers.cluster)
    other_ports.cluster.data_port, other_ports.cluster.admin_port = free_ports(2)
    second = harness.distributor(other_ports, wal_dir, 1, PATIENT)
    second.spawn()
    assert second.process is not None
    try:
        code: int | None = second.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    if code is None:
        states = [(w["slot"], w["state"]) for w in second.workers()]
        pytest.fail(f"the second distributor on {wal_dir} still runs after 30 s (workers {states}):\n"
                    f"{second.log_tail(20)}")
    output = [line for line in second.log_text().splitlines() if line and not line.startswith("=====")]
    assert code == 2, f"exit {code}:\n" + "\n".join(output[-20:])
    naming = [line for line in output if "wal.dir" in line]
    assert len(naming) == 1 and str(wal_dir) in naming[0], output[-20:]

    first.wait_ready(10)
    client = Client(first.port)
    try:
        status, _, _ = client.post(packet("e2e-second", "after-refusal"))
    finally:
        client.close()
    assert status == 202
    assert {w["slot"] for w in first.workers()} == {0, 1}
