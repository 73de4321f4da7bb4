"""Fuzz target: the HTTP/1.1 server (a real ``_Conn`` on a fake transport) fed arbitrary byte streams.

Input: a flags byte, a cut-seed byte, then the stream, cut into reads at points drawn from the seed
(255: one byte per read). Flags: deferred answers (as with the WAL), write back-pressure, a
transport without write_eof, a client half-close at the end, deadlines firing, small limits.

Invariants: no exception out of the protocol methods and no internal error hidden behind a 500;
every answer well-formed (status line, content-type/length, date, a JSON body of the announced
length); no answer after a ``Connection: close`` answer nor after the transport closed; each
request the app handled answered exactly once, in order; the connection uncounted once lost.
"""

from __future__ import annotations

import random

from fuzzlib import main
import http_harness
from http_harness import Options, Violation


def options(flags: int, seed: int) -> Options:
    return Options(defer=bool(flags & 1), high_water=64 if flags & 2 else 0, eof_capable=not flags & 4,
                   eof_at_end=bool(flags & 8), deadlines=bool(flags & 16), small_limits=bool(flags & 32),
                   seed=seed)


def cut(stream: bytes, seed: int) -> list[bytes]:
    if seed == 255:
        return [stream[i:i + 1] for i in range(min(len(stream), 2048))]
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 12)))) if stream else []
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, seed, stream = data[0], data[1], data[2:]
    state = http_harness.run(cut(stream, seed), options(flags, seed))
    answered = http_harness.app_answers(state)
    expected: list[int | None] = list(state.app.handled)
    if answered != expected:
        raise Violation(f"requests handled {state.app.handled}, answers written for {answered}")


if __name__ == "__main__":
    main(check, "http")
