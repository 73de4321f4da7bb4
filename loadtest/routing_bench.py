"""Micro-benchmark: cost of one routing decision with W workers x A analyzers.

Measures ``Router.choose`` on a real shared table (other workers' counters
re-read every ``routing_refresh_interval``) and the refresh itself.
``python -m loadtest.routing_bench --workers 16 --analyzers 8``
"""

from __future__ import annotations

import argparse
import random
import time

from distributor.delivery.routing import Router
from distributor.shared_table import ACTIVE, C_NET_ROUTED_MESSAGES, SharedTable


def measure(workers: int, analyzers: int, packets: int, refresh_interval: float) -> dict[str, float]:
    table = SharedTable.create(max_workers=workers)
    try:
        table.begin_update()
        for slot in range(analyzers):
            table.write_analyzer(slot, f"a{slot}", f"http://127.0.0.1:{9000 + slot}", slot + 1.0, "batch", 1)
            table.set_effective(slot, ACTIVE, slot + 1.0, 0)
        table.start_epoch()
        table.end_update()
        for worker in range(1, workers):
            for slot in range(analyzers):
                table.ints[table.counter_index(worker, slot, C_NET_ROUTED_MESSAGES)] = random.randrange(10**6)
        router = Router(table, 0, refresh_interval)
        router.set_analyzers(*table.read_analyzers())
        sizes = [random.choice((5, 20)) for _ in range(packets)]
        ints = table.ints
        cells = [table.counter_index(0, slot, C_NET_ROUTED_MESSAGES) for slot in range(analyzers)]
        room = lambda slot: True  # noqa: E731
        start = time.perf_counter()
        for n in sizes:
            slot = router.choose(n, room)
            ints[cells[slot]] += n
        per_packet = (time.perf_counter() - start) / packets
        start = time.perf_counter()
        for _ in range(1000):
            router.refresh()
        per_refresh = (time.perf_counter() - start) / 1000
    finally:
        table.close()
    return {"choose_us": per_packet * 1e6, "refresh_us": per_refresh * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--analyzers", type=int, default=8)
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--refresh-interval", type=float, default=0.005)
    args = parser.parse_args()
    result = measure(args.workers, args.analyzers, args.packets, args.refresh_interval)
    print(f"{args.workers} workers x {args.analyzers} analyzers: route+count {result['choose_us']:.2f} us/packet "
          f"(includes amortised refresh), one refresh of the global totals {result['refresh_us']:.1f} us")


if __name__ == "__main__":
    main()
