"""A busy log writer for the tests of the tools on a live directory (run as a script, not collected).

``live_writer.py ROOT``: open ``ROOT``'s slot 0 with 4 KiB segments and, until killed, append eight tiny
packets in one loop turn, then acknowledge them all in the next: the active segment is written and its
sidecar marked all the time, full segments are deleted as soon as they roll, so files come and go. Prints
``open`` once the log is open.
"""

from __future__ import annotations

import os
import sys

import uvloop

from distributor.wal.log import WorkerLog
from wal_support import durable, packet


async def main(root: str) -> None:
    log = await WorkerLog.open(root, 0, sync="none", segment_bytes=4096, retry_interval=0.01)
    os.write(1, b"open\n")
    n = 0
    while True:
        refs = [log.append(packet(n + i, 0), 1) for i in range(8)]  # ~50-byte records: sidecars run ahead fast
        n += 8
        await durable(log)
        for ref in refs:
            log.ack(ref)
        await durable(log)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
