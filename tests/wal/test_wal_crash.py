"""kill -9 of a real writer process at random moments, again and again, on the same directory.

Each cycle starts ``crash_child.py``, which replays and delivers what the previous one left, then
appends and delivers new packets; the test kills it with SIGKILL after a random number of its
reports (so also during replay, during segment rolls and deletions, mid-write). Across all cycles:
every start succeeds, nothing reported DONE ever replays, everything reported durable replays
at the next complete replay with its exact bytes unless it was reported DONE or was being
delivered when the kill came (then it may have left the log), anything replayed after it was
handed to the wire is flagged a possible duplicate, and a crash never counts as corruption.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("crash_child.py")
REPO = Path(__file__).resolve().parents[2]


def _run_child(root: Path, first: int, sync: str, mode: str, kill_after: int | None,
               after_replay: bool = False) -> list[str]:
    """The child's report lines; killed with SIGKILL after ``kill_after`` of them (counted from the end
    of its replay with ``after_replay``), or run to its end."""
    proc = subprocess.Popen([sys.executable, str(CHILD), str(root), str(first), sync, mode], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        counting, counted = not after_replay, 0
        for raw in proc.stdout:
            line = raw.decode().rstrip("\n")
            lines.append(line)
            counted += counting
            counting = counting or line.startswith("S ")
            if kill_after is not None and counting and counted >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        lines += proc.stdout.read().decode().splitlines()  # what was reported before the kill, read-ahead included
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == (0 if kill_after is None else -signal.SIGKILL), err[-3000:]
    return lines


class Cycle:
    def __init__(self, lines: list[str]) -> None:
        self.replayed: dict[int, bool] = {}  # number -> flagged as a possible duplicate
        self.durable: set[int] = set()
        self.attempted: set[int] = set()
        self.acked: set[int] = set()
        self.stats: tuple[int, ...] | None = None
        self.bad = [line for line in lines if line.startswith("BAD")]
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "R":
                n, duplicate = rest.split()
                self.replayed[int(n)] = duplicate == "1"
            elif kind == "D":
                self.durable.update(map(int, rest.split()))
            elif kind == "T":
                self.attempted.update(map(int, rest.split()))
            elif kind == "A":
                self.acked.update(map(int, rest.split()))
            elif kind == "S":
                self.stats = tuple(map(int, rest.split()))


@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_never_loses_a_durable_packet_nor_replays_a_done_one(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    durable: set[int] = set()
    attempted: set[int] = set()
    acked: set[int] = set()
    completed_replays = kills_during_replay = 0

    def check(run: Cycle, cycle: str) -> None:
        assert not run.bad, run.bad
        assert not run.replayed.keys() & acked, f"{cycle}: a packet acknowledged DONE was replayed"
        unflagged = [n for n in run.replayed.keys() & attempted if not run.replayed[n]]
        assert not unflagged, f"{cycle}: replayed after being sent, not flagged as a possible duplicate"
        if run.stats is not None:
            lost = durable - acked - attempted - run.replayed.keys()
            assert not lost, f"{cycle}: lost {sorted(lost)[:10]}"
            corrupt, set_aside, _torn = run.stats
            assert corrupt == 0 and set_aside == 0, "a crash must only ever leave torn tails, not corruption"

    for cycle in range(24):
        sync = rng.choice(["none", "interval", "always"])
        kill_after = rng.choice([1, 2, 3, rng.randint(4, 40), rng.randint(40, 400), rng.randint(400, 1500)])
        after_replay = cycle % 3 == 2  # a third of the cycles run past their replay, the others die anywhere
        run = Cycle(_run_child(tmp_path, (cycle + 1) * 1_000_000, sync, "run", kill_after, after_replay))
        check(run, f"cycle {cycle} ({sync}, killed after {kill_after} lines)")
        completed_replays += run.stats is not None
        kills_during_replay += run.stats is None
        durable |= run.durable
        attempted = (attempted | run.attempted) - run.acked - acked
        acked |= run.acked
    assert completed_replays >= 8 and kills_during_replay >= 1
    assert len(durable) > 1000
    final = Cycle(_run_child(tmp_path, 0, "interval", "drain", None))
    check(final, "final replay")
    assert final.stats is not None
    after = Cycle(_run_child(tmp_path, 0, "interval", "drain", None))
    assert after.replayed == {}  # everything was delivered and acknowledged: the log is empty
