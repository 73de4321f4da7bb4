"""Benchmark: a real distributor pool and 4 analyzers on 127.0.0.1, next to an nginx proxy and a bare floor.

``python -m loadtest.bench [--scenarios throughput,latency,stress,stress-cpu,memory,ingest,soak] [--duration 5]
[--sinks python|nginx] [--baseline none|nginx|floor] [--rounds 3] [--batch N]``

Analyzers (``--sinks``): ``python`` = the four analyzer processes in sink mode
(they parse, deduplicate and count, so delivery is checked at the analyzers);
``nginx`` = "free" analyzers, one nginx answering 200 to everything at once
(loadtest/free_sinks.py), so the figures are about the distributor alone.

Scenarios (see loadtest/README.md for what each figure means):
* throughput: closed loop as fast as the distributor answers (wrk when installed,
  else the uvloop emitter): max accepted packets/s with < 1% 503; ``--batch N``:
  N packets per request to POST /ingest/batch;
* latency: open loop (uvloop emitter) at 25/50/75% of that max: p50/p99/p99.9
  measured from each request's scheduled send time, and the generator's own
  floor at 50% (the same load against an nginx stub), side by side;
* stress: open loop at 2x the max, first with the analyzers draining normally,
  then with them stalled (queues fill, the excess must be answered 503 at once):
  p99 of 503 answers and worker RSS sampled every second;
* stress-cpu: several wrk processes with many connections (closed loop, default
  3 x 256) against free analyzers: answers/s by status, p50/p99 of all answers,
  503s with Retry-After, event-loop lag, queued bytes and RSS per worker;
* memory: every analyzer stalled until every queue is full: peak RSS/USS per worker;
* ingest (not in the default list): messages/s, packets/s, requests/s and CPU per
  message of single packets, 100-packet NDJSON batches, the same gzipped, OTLP
  protobuf, single packets over TLS, with tracing sampled, and with the analyzers'
  compression gzip / zstd (bytes sent to them too), rounds alternating, wrk and
  free analyzers; target: batch >= 5x single in messages/s;
* soak (not in the default list; ``--scenario soak --minutes N``): N minutes of
  mixed load with lifecycle events, per-worker RSS/USS/fds/queue slopes, a JSON
  report and a PNG plot next to it (loadtest/soak.py).
With ``--baseline nginx``, ``--rounds`` rounds of wrk runs alternate distributor /
nginx weighted proxy (in front of the same analyzers) / bare floor (N processes
of uvloop + httptools + orjson, loadtest/bare_floor.py); ``--baseline floor``
leaves nginx out. Each run records the CPU seconds of every party (system under
test, sinks, generator, the rest of the machine) and the load average.

Every run is checked after a drain (which checks apply depends on the sinks,
see the README). A run that fails is reported FAILED; exit 1.
"""

from loadtest.bench.cli import main
from loadtest.bench.runner import Bench

__all__ = ["Bench", "main"]
