"""kill -9 under load, end to end: a 202 survives the death of a worker, of the whole distributor, and of
twenty-odd distributors in a row killed at random moments (issue 11, "Tests").

Real analyzers answer in ~150 ms (``--delay-ms``), so the workers' queues and the write-ahead logs always
hold packets in flight when the kill comes. The load records the key of every packet answered 202; the
analyzers record the key of every packet they accepted; every 202 must be among them.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from distributor.tools.localcluster import wait_until
from wal_e2e_support import (
    PATIENT,
    Distributor,
    Harness,
    Load,
    accepted_keys,
    cross_analyzer_duplicates,
    harness,
    inspect,
    missing,
    report,
    sets,
    start_load,
    unanswered,
    wal_cli,
)

__all__ = ["harness"]  # the fixture, imported for pytest

DELAY = ["--delay-ms", "150"]


def _slot(distributor: Distributor, slot: int) -> dict[str, Any]:
    return next(w for w in distributor.workers() if w["slot"] == slot)


@pytest.mark.timeout(120)
def test_kill9_of_one_worker_under_load_loses_no_202(harness: Harness, tmp_path: Path) -> None:
    """One worker SIGKILLed with packets queued and in flight: its successor replays them; nothing is lost."""
    analyzers = harness.analyzers(*DELAY)
    distributor = harness.distributor(analyzers, tmp_path / "wal", 2,
                                      [*PATIENT, *sets(wal__segment_bytes=256 << 10, ingest__max_body_bytes=64 << 10)])
    distributor.start()
    load = start_load(distributor.ingest_url, 7.0, rate=1000)
    wait_until(lambda: load.stats.accepted_packets > 2000, 20, "2000 packets answered 202")
    victim = wait_until(lambda: next((w for w in distributor.workers()
                                      if w["slot"] == 0 and w["wal"]["unacked_packets"] > 0), None),
                        10, "worker 0 to hold unacknowledged packets")
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: (lambda w: w["pid"] not in (None, victim["pid"]) and w["state"] == "ready")(
        _slot(distributor, 0)), 30, "worker 0's successor to be ready")
    stats = load.join()
    distributor.wait_delivered()

    view = distributor.analyzers_view()
    successor = _slot(distributor, 0)
    seen = analyzers.keys()
    accepted = accepted_keys([stats])
    lost = missing(accepted, seen)
    assert not lost, f"{len(lost)} of {len(accepted)} packets answered 202 never reached an analyzer: {lost[:5]}"
    assert sum(a["lost_packets"] for a in view) == 0
    assert successor["restarts"] == 1
    assert successor["wal"]["replayed_packets"] > 0, "the kill came with packets in the log: they must be replayed"
    assert successor["wal"]["corrupt_records"] == 0 and successor["wal"]["set_aside"] == 0
    duplicates = cross_analyzer_duplicates(seen) + analyzers.absorbed_duplicates()
    bound = successor["wal"]["possible_duplicates"] + sum(a["possible_duplicates"] for a in view) + unanswered([stats])
    assert duplicates <= bound
    report("kill -9 one worker", {"answered_202": len(accepted), "unacked_at_kill": victim["wal"]["unacked_packets"],
                                  "replayed": successor["wal"]["replayed_packets"],
                                  "wal_possible_duplicates": successor["wal"]["possible_duplicates"],
                                  "duplicates_seen": duplicates, "unanswered": unanswered([stats]),
                                  "statuses": stats.by_status})


@pytest.mark.timeout(120)
def test_kill9_of_the_whole_process_group_under_load_then_restart_loses_no_202(
        harness: Harness, tmp_path: Path) -> None:
    """Supervisor and workers SIGKILLed at once, restarted on the same directory: the next start replays
    exactly what ``wal inspect`` saw unacknowledged; duplicates stay within what was counted as possible."""
    wal_dir = tmp_path / "wal"
    analyzers = harness.analyzers(*DELAY)
    distributor = harness.distributor(analyzers, wal_dir, 2,
                                      [*PATIENT, *sets(wal__segment_bytes=256 << 10, ingest__max_body_bytes=64 << 10)])
    distributor.start()
    load = start_load(distributor.ingest_url, 8.0, rate=1000)
    wait_until(lambda: load.stats.accepted_packets > 2500, 20, "2500 packets answered 202")
    before = distributor.analyzer_totals()
    distributor.kill_group()
    on_disk = inspect(wal_dir)["totals"]
    assert on_disk["unacked_packets"] > 0, "the kill came under load: the log must hold packets"
    assert on_disk["corrupt_records"] == 0, "a kill is not corruption"
    distributor.start()
    stats = load.join()
    distributor.wait_delivered()

    wal = distributor.wal_totals()
    after = distributor.analyzer_totals()
    seen = analyzers.keys()
    accepted = accepted_keys([stats])
    lost = missing(accepted, seen)
    assert not lost, f"{len(lost)} of {len(accepted)} packets answered 202 never reached an analyzer: {lost[:5]}"
    assert wal["replayed_packets"] == on_disk["unacked_packets"]
    assert wal["possible_duplicates"] == on_disk["possible_duplicates"]
    assert wal["corrupt_records"] == 0 and wal["set_aside"] == 0
    assert after["lost_packets"] == 0
    duplicates = cross_analyzer_duplicates(seen) + analyzers.absorbed_duplicates()
    bound = (on_disk["possible_duplicates"] + before["possible_duplicates"] + after["possible_duplicates"]
             + unanswered([stats]))
    assert duplicates <= bound
    report("kill -9 process group", {
        "answered_202": len(accepted), "unacked_on_disk": on_disk["unacked_packets"],
        "replayed": wal["replayed_packets"], "possible_duplicates": on_disk["possible_duplicates"],
        "duplicates_seen": duplicates, "unanswered": unanswered([stats]), "torn_tails": on_disk["torn_tails"],
        "statuses": stats.by_status})


def _replaying(distributor: Distributor) -> bool:
    """A worker is serving while its replay still has bytes to read (what its last heartbeat published)."""
    return any(w["state"] == "ready" and (w.get("wal") or {}).get("replay_remaining_bytes", 0) > 0
               for w in distributor.workers())


CRASH_LOOP_SETTINGS = [
    *PATIENT,
    # small segments: they roll every ~50 packets and are deleted as soon as their packets are delivered
    *sets(wal__segment_bytes=128 << 10, ingest__max_body_bytes=64 << 10),
    # small queues: replay fills half of 1 MiB and waits for room, so a backlog of a few MiB takes a while
    *sets(queue__worker_max_bytes=1 << 20, queue__max_bytes=512 << 10),
]


@pytest.mark.timeout(240)
def test_crash_loop_of_kill9_at_random_moments_never_loses_a_202(harness: Harness, tmp_path: Path) -> None:
    """24 cycles of start, load, kill -9 of the whole group at a seeded random moment, on one directory.

    Moments: under load ("load"); just after the load ends, while acknowledgements pour in and finished
    segments are deleted ("drain"); during the start, before the workers are ready ("boot"); with the
    analyzers stalled so a backlog of several replay fills builds up ("stall"), followed by a start that
    is killed while its replay still has bytes on disk to read ("replay"). The analyzers live through every
    cycle, so their packet keys accumulate. Every start must succeed, every 202 of every cycle must reach an
    analyzer, and a crash must never look like corruption.
    """
    started = time.monotonic()
    rng = random.Random(20250611)
    wal_dir = tmp_path / "wal"
    analyzers = harness.analyzers(*DELAY)
    distributor = harness.distributor(analyzers, wal_dir, 2, CRASH_LOOP_SETTINGS)
    units = [["load"]] * 8 + [["drain"]] * 5 + [["boot"]] * 3 + [["stall", "replay"]] * 4
    rng.shuffle(units)
    plans = [plan for unit in units for plan in unit]
    loads: list[Load] = []
    counted_possible = 0  # possible duplicates: WAL records flagged on disk at each kill + the distributors' own
    kills_while_replaying = torn = orphan_acks = temp_files = 0
    cycles: list[str] = []

    for cycle, plan in enumerate(plans):
        if plan == "boot":
            distributor.spawn()
            time.sleep(rng.uniform(0.05, 0.8))  # a random instant of the start (not a synchronisation)
        elif plan == "replay":
            distributor.spawn()
            wait_until(lambda: _replaying(distributor), 60, "a worker serving while replay has bytes to read")
            time.sleep(rng.uniform(0.0, 0.5))  # a random instant of the replay
            assert _replaying(distributor), "replay cannot finish while the analyzers are stalled"
            kills_while_replaying += 1
        else:
            distributor.start()
            if plan == "stall":
                analyzers.control(stall=True)
            # a stall cycle offers more than both workers' queues hold, so each has a backlog of about
            # 0.9 MiB on disk: nearly twice the half of queue.worker_max_bytes that the next replay may fill
            duration, rate = (2.0, 1200) if plan == "stall" else (rng.uniform(1.2, 2.5), 900)
            load = start_load(distributor.ingest_url, duration, rate=rate, prefix=f"c{cycle}")
            loads.append(load)
            if plan == "load":
                target = rng.randint(100, int(duration * 900 * 0.8))
                wait_until(lambda: load.stats.accepted_packets >= target or load.done, 30, f"{target} 202s")
            else:
                wait_until(lambda: load.done, 30, "the cycle's load to end")
                if plan == "drain":
                    time.sleep(rng.uniform(0.0, 0.3))  # a random instant of the drain
            counted_possible += distributor.analyzer_totals().get("possible_duplicates", 0)
        distributor.kill_group()
        if plan == "replay":
            analyzers.control(stall=False)
        report_ = inspect(wal_dir)
        totals = report_["totals"]
        assert totals["corrupt_records"] == 0, f"cycle {cycle} ({plan}): a kill left corruption: {totals}"
        for worker in report_["workers"]:
            assert not worker["bad_headers"] and not worker["set_aside"], f"cycle {cycle} ({plan}): {worker}"
            orphan_acks += len(worker["orphan_acks"])
            temp_files += len(worker["temp_files"])
        counted_possible += totals["possible_duplicates"]
        torn += totals["torn_tails"]
        cycles.append(f"{plan}:{totals['unacked_packets']}/{totals['segments']}")

    last = inspect(wal_dir)["totals"]
    distributor.start()
    stats = [load.join() for load in loads]
    distributor.wait_delivered(timeout=120)
    wal = distributor.wal_totals()
    counted_possible += distributor.analyzer_totals().get("possible_duplicates", 0)
    seen = analyzers.keys()
    accepted = accepted_keys(stats)
    lost = missing(accepted, seen)
    assert not lost, f"{len(lost)} of {len(accepted)} packets answered 202 never reached an analyzer: {lost[:5]}"
    assert wal["replayed_packets"] == last["unacked_packets"]
    assert wal["corrupt_records"] == 0 and wal["set_aside"] == 0
    duplicates = cross_analyzer_duplicates(seen) + analyzers.absorbed_duplicates()
    assert duplicates <= counted_possible + unanswered(stats)
    assert kills_while_replaying == plans.count("replay")
    distributor.stop()
    assert "failed to boot" not in distributor.log_text()
    verified = wal_cli("verify", str(wal_dir))
    assert verified.returncode == 0, verified.stdout  # crashes leave nothing for the operator to look at
    segment_ids = [int(name[:16], 16) for slot in wal_dir.iterdir() if slot.is_dir() for name in os.listdir(slot)
                   if name.endswith(".wal")]
    statuses: Counter[int] = Counter()
    for one in stats:
        statuses.update(one.by_status)
    report("crash loop", {"cycles": len(plans), "starts": distributor.starts, "answered_202": len(accepted),
                          "duplicates_seen": duplicates, "possible_duplicates_counted": counted_possible,
                          "unanswered": unanswered(stats), "torn_tails_at_kills": torn,
                          "orphan_acks_at_kills": orphan_acks, "temp_files_at_kills": temp_files,
                          "highest_segment_id": max(segment_ids, default=-1),
                          "segments_left": len(segment_ids),
                          "statuses": dict(statuses), "seconds": time.monotonic() - started,
                          "unacked/segments at each kill": " ".join(cycles)})
