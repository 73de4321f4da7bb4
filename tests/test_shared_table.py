"""The shared-memory table: layout, seqlock snapshots, epochs, leak-free lifecycle."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from distributor.delivery.routing import Router
from distributor.shared_table import (
    ACTIVE,
    C_NET_ROUTED_MESSAGES,
    NAME_PREFIX,
    REMOVED,
    SHM_DIR,
    SharedTable,
    remove_stale_segments,
)


def test_create_attach_and_unlink() -> None:
    table = SharedTable.create(max_workers=2, max_analyzers=4)
    try:
        table.begin_update()
        table.write_analyzer(0, "a1", "http://127.0.0.1:9001", 0.4, "batch", 1)
        table.set_effective(0, ACTIVE, 0.4, 0)
        table.write_analyzer(1, "a2", "http://127.0.0.1:9002", 0.6, "packet", 1)
        table.set_effective(1, ACTIVE, 0.6, 0)
        table.end_update()
        other = SharedTable.attach(table.name)
        generation, rows = other.read_analyzers()
        assert generation == 2
        assert [(r.name, r.url, r.weight, r.mode) for r in rows] == [
            ("a1", "http://127.0.0.1:9001", 0.4, "batch"), ("a2", "http://127.0.0.1:9002", 0.6, "packet")]
        other.ints[other.counter_index(1, 1, C_NET_ROUTED_MESSAGES)] += 7
        assert table.global_counters(C_NET_ROUTED_MESSAGES)[:2] == [0, 7]
        assert table.global_counters(C_NET_ROUTED_MESSAGES, exclude_worker=1)[:2] == [0, 0]
        other.close()
        assert table.path.exists(), "a worker closing its mapping must not unlink the segment"
    finally:
        table.close()
    assert not table.path.exists()


def test_epoch_rebases_routing_without_catch_up() -> None:
    """An analyzer added late gets its weight's share from then on, not a burst to catch up."""
    table = SharedTable.create(max_workers=1, max_analyzers=4)
    try:
        table.begin_update()
        table.write_analyzer(0, "a1", "http://127.0.0.1:1", 1.0, "batch", 1)
        table.set_effective(0, ACTIVE, 1.0, 0)
        table.start_epoch()
        table.end_update()
        router = Router(table, 0, refresh_interval=0.001)
        router.set_analyzers(*table.read_analyzers())
        cell = table.counter_index(0, 0, C_NET_ROUTED_MESSAGES)
        table.ints[cell] += 10_000  # a1 took everything so far
        table.begin_update()
        table.write_analyzer(1, "a2", "http://127.0.0.1:2", 1.0, "batch", 1)
        table.set_effective(1, ACTIVE, 1.0, 0)
        table.start_epoch()
        table.end_update()
        router.set_analyzers(*table.read_analyzers())
        picks = []
        for _ in range(100):
            slot = router.choose(10, lambda s: True)
            table.ints[table.counter_index(0, slot, C_NET_ROUTED_MESSAGES)] += 10
            picks.append(slot)
        assert picks.count(0) == 50 and picks.count(1) == 50
        assert set(picks[:4]) == {0, 1}, "the newcomer must not take a catch-up run"
        table.begin_update()
        table.set_effective(0, REMOVED, 0.0, 0)
        table.start_epoch()
        table.end_update()
        router.set_analyzers(*table.read_analyzers())
        assert router.choose(10, lambda s: True) == 1
    finally:
        table.close()


def test_stale_segment_is_recognised_by_its_lock_not_by_a_pid() -> None:
    """A segment nobody holds the flock of is removed; a locked one stays, whatever pid its name carries.

    The live segment here carries the pid of a process that has exited (as a supervisor in another pid
    namespace would look from here): pid liveness would delete it, the lock keeps it.
    """
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = SHM_DIR / f"{NAME_PREFIX}{int(dead.stdout)}-deadbeef"
    stale.write_bytes(b"\0" * 64)
    live = SHM_DIR / f"{NAME_PREFIX}{int(dead.stdout)}-cafef00d"
    live.write_bytes(b"\0" * 64)
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        removed = remove_stale_segments()
        assert stale in removed and not stale.exists()
        assert live.exists() and live not in removed
    finally:
        os.close(holder)
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_a_created_table_survives_another_supervisors_cleanup() -> None:
    table = SharedTable.create(max_workers=1, max_analyzers=2)
    try:
        other = SharedTable.create(max_workers=1, max_analyzers=2)  # runs remove_stale_segments first
        other.close()
        assert table.path.exists()
    finally:
        table.close()
    assert not table.path.exists()
