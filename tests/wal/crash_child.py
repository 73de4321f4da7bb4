"""A log writer for the kill -9 tests (run as a script, not collected): it reports each step on stdout.

``crash_child.py ROOT FIRST SYNC MODE``: open ``ROOT``'s slot 0, replay and deliver (acknowledge) what
is left, then, in mode ``run``, append and deliver packets numbered from FIRST until killed; in
mode ``drain`` stop after the replay. Lines, each written once the step is done:

* ``R <n> <possible duplicate 0/1>``: packet n was replayed (and its bytes were exactly right);
* ``D <n> ...``: these packets are durable (their turn's callback said so);
* ``T <n> ...``: their ATTEMPTED marks are written (what follows is delivering them: acknowledging);
* ``A <n> ...``: their DONE marks are written to the OS;
* ``S <corrupt> <set aside> <torn>``: the stats after the replay; ``BAD <n>``: a replayed packet's bytes differ.
"""

from __future__ import annotations

import os
import sys

import uvloop

from distributor.wal.log import WorkerLog
from wal_support import durable, number, packet


def size_of(n: int) -> int:
    return 40 + (n * 37) % 1500


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


async def main(root: str, first: int, sync: str, mode: str) -> None:
    log = await WorkerLog.open(root, 0, sync=sync, sync_interval=0.005, segment_bytes=16 << 10,
                               retry_interval=0.01)
    say("open")
    while batch := await log.replay_batch(8 << 10):
        for item in batch:
            n = number(item.raw)
            say(f"R {n} {int(item.possible_duplicate)}" if item.raw == packet(n, size_of(n)) else f"BAD {n}")
        await log.attempted([item.ref for item in batch])
        say("T " + " ".join(str(number(item.raw)) for item in batch))
        for item in batch:
            log.ack(item.ref)
        if await durable(log):
            say("A " + " ".join(str(number(item.raw)) for item in batch))
    say(f"S {log.stats.corrupt_records} {log.stats.set_aside} {log.stats.torn_tails}")
    if mode == "drain":
        await log.close()
        return
    n = first
    pending: list[tuple[int, int]] = []
    while True:
        batch_size = 1 + n % 17
        refs = [(n + i, log.append(packet(n + i, size_of(n + i)), 1)) for i in range(batch_size)]
        n += batch_size
        if await durable(log):
            say("D " + " ".join(str(k) for k, _ in refs))
            pending += refs
        if len(pending) > 60:  # deliver the oldest half
            done, pending = pending[:30], pending[30:]
            await log.attempted([ref for _, ref in done])
            say("T " + " ".join(str(k) for k, _ in done))
            for _, ref in done:
                log.ack(ref)
            if await durable(log):
                say("A " + " ".join(str(k) for k, _ in done))


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
