"""An emitter host's load: the built-in emitter (``distributor.tools.emitter.run_load``), result to a file.

Run inside an emitter namespace by tests/fleet. Every request carries ``X-Emitter-Id`` unless
``--no-header``; the emitter records the key of every packet answered 202, so the test can check
that each of them reached an analyzer. Writes ``--out`` as JSON: the summary, the accepted packets
``[emitter_id, packet_id, messages]`` and the accepted packets per emitter.

    python tests/fleet/fleet_load.py --url http://10.77.0.2:8080/ingest --rate 400 --duration 8 \\
        --emitters 24 --prefix e1 --out /tmp/e1.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import uvloop

from distributor.tools.emitter import LoadSpec, run_load, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="packets/s, open loop (0: closed loop)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--emitters", type=int, default=24)
    parser.add_argument("--prefix", default="e")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--sizes", default="5:0.5,20:0.5")
    parser.add_argument("--no-header", action="store_true", help="omit X-Emitter-Id (round robin at the balancer)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sizes = tuple((int(n), float(p)) for n, p in (item.split(":") for item in args.sizes.split(",")))
    spec = LoadSpec(url=args.url, duration=args.duration, connections=args.connections, rate=args.rate or None,
                    sizes=sizes, emitters=args.emitters, emitter_prefix=args.prefix, batch=args.batch,
                    record_accepted=True, emitter_header=not args.no_header)
    stats = uvloop.run(run_load(spec))
    result = summary(stats)
    result["by_status"] = {str(k): v for k, v in result["by_status"].items()}
    result["accepted"] = stats.accepted
    result["accepted_by_emitter"] = dict(Counter(emitter for emitter, _, _ in stats.accepted))
    with open(args.out, "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
