"""Soak: a real distributor pool under a steady, mixed, open-loop load for minutes, watched for creeping growth.

``python -m loadtest.soak --minutes 22 --out DIR [--workers 2] [--rate PACKETS_PER_S | --fraction 0.5]
[--no-wal] [--interval 5] [--warmup S] [--event-every 60] [--min-window-packets N --max-minutes M]``

It starts 4 real analyzers and the distributor (``LocalCluster``; the
write-ahead log on, in a temporary directory, unless ``--no-wal``), measures
the capacity first when no ``--rate`` is given (a closed-loop burst of single
packets; capacity = packets accepted / (burst + the time to deliver them)),
then offers ``--fraction`` of it, open loop, for ``--minutes``, as a mix:

* single packets (``POST /ingest``) of 1 to 200 messages, with priorities;
* single packets gzip-compressed;
* ``/ingest/batch`` of 20 packets, and of 50 packets zstd-compressed;
* short-lived connections ("churn"): each opens, sends 1 to 6 requests and
  closes, some pipelined, some refused on purpose (invalid JSON and contract
  violations: 400; a wrong path: 404; a Content-Length over the limit: 413;
  malformed HTTP: 400 and closed by the server), some aborted mid-body, so
  connection setup and teardown are exercised all along.

Every ``--event-every`` seconds a lifecycle event, in turn: an analyzer's
weight changed through the admin API, a SIGHUP reload (which puts the weight
back: no state file), an analyzer drained, then undrained.

Every ``--interval`` seconds it samples, per worker process (pids from
``/admin/workers``), RSS and USS (psutil ``memory_full_info``), open fds, the
worker's queued packets and connections; the supervisor's and the analyzers'
RSS/USS/fds; and the queue depth and packet counters from ``/metrics``. After
the load it waits for the queues to drain and the connections to close and
samples the idle processes again.

Slopes are least-squares fits over the steady part (after ``--warmup``, by
default 15% of the run, at least 60 s and at most half of it) in MiB/hour,
fds/hour and packets/hour, over the whole window and over its second half (a
step followed by a flat second half is a high-water mark, not a leak). The end
checks: every packet answered 202 (the distributor's ``accepted`` counter)
reached an analyzer (their own deduplicated counts, which may exceed it by the
possible duplicates the distributor counted after failovers), the
distributor's books balance, queue depth 0 after the drain, fds back to the
idle level before the load, and the growth bounds of ``growth_failures``. A
JSON report and a PNG plot go to ``--out``, side by side
(``soak-<time>.json`` / ``.png``); exit 1 when a check failed.

``--inject-leak BYTES`` is a negative control: every packet enqueued by a
worker also appends ``BYTES`` to a list that is never freed (through a
``sitecustomize`` put on the distributor's ``PYTHONPATH``), which the growth
checks must catch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import queue as queue_module
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import psutil

from distributor.tools.localcluster import LocalCluster, wait_until
from loadtest.bench.environment import git_revision
from loadtest.free_sinks import PythonSinks, SinkCount

MIB = float(1 << 20)
HOUR = 3600.0
WEIGHTS = (("a1", 4.0), ("a2", 3.0), ("a3", 2.0), ("a4", 1.0))
SINGLE_SIZES = ((1, 0.2), (5, 0.4), (20, 0.3), (100, 0.08), (200, 0.02))
BATCH_SIZES = ((5, 0.5), (20, 0.5))
PRIORITIES = (("high", 0.1), ("normal", 0.8), ("low", 0.1))
EVENTS = ("weight", "reload", "drain", "undrain")
ANALYZER_ARGS = ["--dedup-window", "100000"]  # bounded, so the analyzers' RSS levels off within minutes
FDS_SLACK = 8  # WAL segments (and their .ack) and pooled analyzer connections come and go
GATE_MAX_USS_GROWTH_MIB = 8.0  # growth bounds of growth_failures (tests/test_soak_gate.py says why)
GATE_MAX_BYTES_PER_PACKET = 32.0
RESULT_TIMEOUT = 120.0


# --------------------------------------------------------------------------- the load (in its own process)


@dataclass(frozen=True)
class Stream:
    """One open-loop stream of the mix: ``share`` of the packets, as requests of ``batch`` packets."""

    name: str
    share: float
    connections: int
    batch: int = 0
    encoding: str = ""
    sizes: tuple[tuple[int, float], ...] = SINGLE_SIZES
    priorities: tuple[tuple[str, float], ...] = ()


MIX = (
    Stream("single", 0.50, 16, priorities=PRIORITIES),
    Stream("single-gzip", 0.10, 4, encoding="gzip"),
    Stream("batch-20", 0.25, 4, batch=20, sizes=BATCH_SIZES),
    Stream("batch-50-zstd", 0.10, 2, batch=50, encoding="zstd", sizes=BATCH_SIZES),
)
CHURN_SHARE = 0.05  # of the packets, sent by short-lived connections
CHURN_VALID_PER_SESSION = 2.0  # about: 1-6 requests, ~45% of them valid packets, some pipelined by 3
CHURN_MAX_SESSIONS = 64  # at once; a session that would exceed it is counted as skipped


@dataclass
class ChurnStats:
    sessions: int = 0
    skipped: int = 0
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    accepted_packets: int = 0
    accepted_messages: int = 0
    aborted: int = 0
    unexpected: int = 0  # an answer outside what the request's kind allows
    errors: int = 0  # connections that failed unexpectedly (refused, reset, timed out)
    examples: list[str] = field(default_factory=list)


EXPECTED = {  # request kind -> statuses it may get (503: the loop-lag guard answers before parsing)
    "valid": {202, 429, 503},
    "pipelined": {202, 429, 503},
    "bad_json": {400, 503},
    "bad_contract": {400, 503},
    "not_found": {404},
    "health": {200},
    "too_large": {413},
    "bad_http": {400},
}
CHURN_KINDS = (("valid", 0.40), ("pipelined", 0.05), ("bad_json", 0.10), ("bad_contract", 0.10),
               ("not_found", 0.05), ("health", 0.10), ("too_large", 0.05), ("bad_http", 0.05), ("abort", 0.10))


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, the server closes) of one HTTP/1.1 answer with a Content-Length body."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed before an answer")
    status = int(line.split()[1])
    length, close = 0, False
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b""):
            break
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
            % (path, extra, len(body))) + body


class Churn:
    """Short-lived connections at ``sessions_per_s`` (open loop), each a few requests of mixed kinds."""

    def __init__(self, host: str, port: int, sessions_per_s: float, seed: int) -> None:
        from distributor.tools.emitter import PacketFactory

        self.host, self.port = host, port
        self.interval = 1.0 / sessions_per_s
        self.rng = random.Random(seed)
        self.factory = PacketFactory(SINGLE_SIZES[:3], 200, emitter_prefix=f"churn-{os.urandom(3).hex()}")
        self.stats = ChurnStats()
        self.live = 0
        self.kinds = [k for k, _ in CHURN_KINDS]
        self.weights = [w for _, w in CHURN_KINDS]

    def _status(self, kind: str, status: int, messages: int = 0) -> None:
        stats = self.stats
        stats.by_status[str(status)] = stats.by_status.get(str(status), 0) + 1
        if status not in EXPECTED[kind]:
            stats.unexpected += 1
            if len(stats.examples) < 10:
                stats.examples.append(f"{kind} answered {status}")
        if status == 202:
            stats.accepted_packets += 1
            stats.accepted_messages += messages

    async def _session(self) -> None:
        stats, rng = self.stats, self.rng
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            for _ in range(rng.randint(1, 6)):
                kind = rng.choices(self.kinds, self.weights)[0]
                stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
                stats.requests += 1
                if kind == "valid":
                    body, _, _, n = self.factory.next()
                    writer.write(_post(b"/ingest", body))
                    status, close = await _answer(reader)
                    self._status(kind, status, n)
                elif kind == "pipelined":
                    packets = [self.factory.next() for _ in range(3)]
                    writer.write(b"".join(_post(b"/ingest", p[0]) for p in packets))
                    close = False
                    for packet in packets:
                        status, close = await _answer(reader)
                        self._status(kind, status, packet[3])
                elif kind == "bad_json":
                    writer.write(_post(b"/ingest", b'{"emitter_id": "churn", "packet_id": "x", "messages": ['))
                    status, close = await _answer(reader)
                    self._status(kind, status)
                elif kind == "bad_contract":
                    body = (b'{"emitter_id":"churn","packet_id":"bad-%d","messages":[{"timestamp":1,'
                            b'"level":"","message":"no level"}]}' % rng.getrandbits(32))
                    writer.write(_post(b"/ingest", body))
                    status, close = await _answer(reader)
                    self._status(kind, status)
                elif kind == "not_found":
                    writer.write(_post(b"/nowhere", b"{}"))
                    status, close = await _answer(reader)
                    self._status(kind, status)
                elif kind == "health":
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    status, close = await _answer(reader)
                    self._status(kind, status)
                elif kind == "too_large":  # refused from Content-Length, before any body is sent
                    writer.write(b"POST /ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                                 % (8 << 20))
                    status, _ = await _answer(reader)
                    self._status(kind, status)
                    close = True  # the unread body makes the connection useless
                elif kind == "bad_http":
                    writer.write(b"THIS IS NOT HTTP\r\n\r\n")
                    status, _ = await _answer(reader)
                    self._status(kind, status)
                    close = True
                else:  # abort: half a body, then a reset
                    body, _, _, _ = self.factory.next()
                    writer.write(_post(b"/ingest", body)[: -max(1, len(body) // 2)])
                    await writer.drain()
                    writer.transport.abort()
                    stats.aborted += 1
                    return
                if close:
                    return
        finally:
            writer.close()

    async def _guarded(self) -> None:
        self.live += 1
        self.stats.sessions += 1
        try:
            await asyncio.wait_for(self._session(), 10.0)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError,
                IndexError) as exc:
            self.stats.errors += 1
            if len(self.stats.examples) < 10:
                self.stats.examples.append(f"session failed: {exc!r}")
        finally:
            self.live -= 1

    async def run(self, duration: float) -> None:
        start = time.monotonic()
        end = start + duration
        tasks: set[asyncio.Task[None]] = set()
        slot = 0
        while True:
            at = start + slot * self.interval
            slot += 1
            if at >= end:
                break
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.live >= CHURN_MAX_SESSIONS:
                self.stats.skipped += 1
                continue
            task = asyncio.create_task(self._guarded())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)


def _stream_specs(url: str, rate: float, duration: float) -> list[tuple[Stream, Any]]:
    from distributor.tools.emitter import LoadSpec

    specs = []
    for stream in MIX:
        packets_per_s = rate * stream.share
        requests_per_s = packets_per_s / max(1, stream.batch)
        specs.append((stream, LoadSpec(
            url=url, duration=duration, connections=stream.connections, rate=max(requests_per_s, 0.2),
            sizes=stream.sizes, emitters=500, priorities=stream.priorities,
            emitter_prefix=f"soak-{stream.name}-{os.urandom(3).hex()}", batch=stream.batch,
            encoding=stream.encoding)))
    return specs


async def _mixed_load(url: str, rate: float, duration: float, seed: int) -> dict[str, Any]:
    from distributor.tools.emitter import LoadStats, run_load, summary

    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    streams = _stream_specs(url, rate, duration)
    stats = [LoadStats() for _ in streams]
    churn = Churn(host, int(port), max(rate * CHURN_SHARE / CHURN_VALID_PER_SESSION, 1.0), seed)
    await asyncio.gather(*(run_load(spec, st) for (_, spec), st in zip(streams, stats)), churn.run(duration))
    result: dict[str, Any] = {}
    for (stream, spec), st in zip(streams, stats):
        snap = summary(st)
        result[stream.name] = {
            "requests_per_s_offered": spec.rate, "packets_per_request": max(1, stream.batch),
            "encoding": stream.encoding or "identity", "connections": stream.connections,
            "sent": snap["sent"], "by_status": {str(k): v for k, v in snap["by_status"].items()},
            "accepted_packets": snap["accepted_packets"], "accepted_messages": snap["accepted_messages"],
            "errors": snap["errors"], "timeouts": snap["timeouts"], "reconnects": snap["reconnects"],
            "latency_ms": snap["latency_ms"],
        }
    result["churn"] = asdict(churn.stats)
    return result


async def _closed_loop(url: str, duration: float, connections: int) -> dict[str, Any]:
    from distributor.tools.emitter import LoadSpec, run_load, summary

    spec = LoadSpec(url=url, duration=duration, connections=connections, rate=None, sizes=SINGLE_SIZES,
                    emitters=500, emitter_prefix=f"soak-calibrate-{os.urandom(3).hex()}")
    snap = summary(await run_load(spec))
    return {"sent": snap["sent"], "by_status": {str(k): v for k, v in snap["by_status"].items()},
            "accepted_packets": snap["accepted_packets"], "errors": snap["errors"], "elapsed": snap["elapsed"]}


def _generator_main(kind: str, args: tuple[Any, ...], results: Any) -> None:
    """Entry point of the load process (spawned): runs one load on uvloop and puts its summary in ``results``."""
    import uvloop

    try:
        if kind == "calibrate":
            outcome: dict[str, Any] = uvloop.run(_closed_loop(*args))
        else:
            outcome = uvloop.run(_mixed_load(*args))
        results.put(("ok", outcome))
    except BaseException as exc:  # the parent reports it
        results.put(("error", repr(exc)))
        raise


class LoadProcess:
    """The load generator in a process of its own, so sampling here never slows it down (and vice versa)."""

    def __init__(self, kind: str, *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.results: Any = context.Queue()
        self.process = context.Process(target=_generator_main, args=(kind, args, self.results), daemon=True)

    def start(self) -> "LoadProcess":
        self.process.start()
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            status, outcome = self.results.get(timeout=timeout)
        except queue_module.Empty:
            raise RuntimeError(f"the load process gave no result within {timeout:.0f} s") from None
        finally:
            self.process.join(10)
            self.stop()
        if status != "ok":
            raise RuntimeError(f"the load process failed: {outcome}")
        return dict(outcome)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# --------------------------------------------------------------------------- sampling


class ProcessSampler:
    """psutil samples of any pid: RSS, USS, open fds (a pid's Process is kept for as long as it lives)."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}

    def sample(self, pid: int | None) -> dict[str, Any] | None:
        if not pid:
            return None
        try:
            process = self._processes.get(pid)
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
            with process.oneshot():
                memory = process.memory_full_info()
                return {"pid": pid, "rss": memory.rss, "uss": memory.uss, "fds": process.num_fds()}
        except psutil.Error:
            self._processes.pop(pid, None)
            return None


def parse_metrics(text: str) -> dict[str, Any]:
    """The figures of ``/metrics`` the soak follows: queue depth, packet outcomes, message outcomes, WAL backlog."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, Any] = {"queue_depth": 0, "queue_bytes": 0, "packets": {}, "messages": {},
                             "analyzer_packets": {}, "wal_unacked_packets": None, "connections": {},
                             "possible_duplicates": 0, "failover_packets": 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "distributor_queue_depth":
                found["queue_depth"] += int(value)
            elif name == "distributor_queue_bytes":
                found["queue_bytes"] += int(value)
            elif name == "distributor_packets_total":
                found["packets"][labels["outcome"]] = int(value)
            elif name == "distributor_messages_total":
                outcome = labels["outcome"]
                found["messages"][outcome] = found["messages"].get(outcome, 0) + int(value)
            elif name == "distributor_analyzer_packets_total":
                outcome = labels["outcome"]
                found["analyzer_packets"][outcome] = found["analyzer_packets"].get(outcome, 0) + int(value)
            elif name == "distributor_possible_duplicate_packets_total":
                found["possible_duplicates"] += int(value)
            elif name == "distributor_failover_packets_total":
                found["failover_packets"] += int(value)
            elif name == "distributor_wal_unacked_packets":
                found["wal_unacked_packets"] = (found["wal_unacked_packets"] or 0) + int(value)
            elif name == "distributor_worker_connections":
                found["connections"][labels["worker"]] = int(value)
    return found


def fetch_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


class Sampler:
    """One sample: every worker, the supervisor, the analyzers and the load generator, plus /metrics."""

    def __init__(self, cluster: LocalCluster, sinks: PythonSinks) -> None:
        self.cluster = cluster
        self.sinks = sinks
        self.processes = ProcessSampler()
        self.generator_pid: int | None = None

    def take(self, t: float, phase: str) -> dict[str, Any]:
        cluster = self.cluster
        workers: dict[str, Any] = {}
        for w in cluster.admin("/admin/workers")["workers"]:
            entry: dict[str, Any] = {"pid": w["pid"], "state": w["state"], "restarts": w["restarts"],
                                     "queued_packets": w["queued_packets"], "queued_bytes": w["queued_bytes"],
                                     "connections": w["connections"], "accepted": w["accepted_packets"],
                                     "requests": w["requests"], "loop_lag_s": w["event_loop_lag_s"]}
            entry.update(self.processes.sample(w["pid"]) or {})
            if "wal" in w:
                entry["wal_unacked_packets"] = w["wal"]["unacked_packets"]
                entry["wal_bytes"] = w["wal"]["bytes"]
                entry["wal_segments"] = w["wal"]["segments"]
            workers[str(w["slot"])] = entry
        supervisor = self.processes.sample(cluster.distributor.pid if cluster.distributor else None)
        analyzers = {p.name: self.processes.sample(p.pid) for p in cluster.analyzer_procs if p.alive()}
        metrics = parse_metrics(fetch_text(cluster.admin_url + "/metrics"))
        return {
            "t": round(t, 3), "phase": phase, "workers": workers, "supervisor": supervisor, "analyzers": analyzers,
            "generator": self.processes.sample(self.generator_pid), "queue_depth": metrics["queue_depth"],
            "queue_bytes": metrics["queue_bytes"], "packets": metrics["packets"],
            "messages": metrics["messages"], "wal_unacked_packets": metrics["wal_unacked_packets"],
            "possible_duplicates": metrics["possible_duplicates"], "failover_packets": metrics["failover_packets"],
        }


# --------------------------------------------------------------------------- figures


def least_squares(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through ``points`` (slope 0 with fewer than 2 distinct x)."""
    n = len(points)
    if n == 0:
        return 0.0, 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0, mean_y
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return slope, mean_y - slope * mean_x


def series_figures(points: Sequence[tuple[float, float]], scale: float = 1.0) -> dict[str, Any]:
    """Slope per hour, fitted growth over the window, first/last/min/max; values divided by ``scale``."""
    if not points:
        return {"samples": 0}
    scaled = [(t, v / scale) for t, v in points]
    slope, intercept = least_squares(scaled)
    span = scaled[-1][0] - scaled[0][0]
    values = [v for _, v in scaled]
    middle = scaled[0][0] + span / 2
    late = least_squares([p for p in scaled if p[0] >= middle])[0]
    return {
        "samples": len(scaled), "window_s": round(span, 1),
        "slope_per_hour": slope * HOUR, "fitted_growth": slope * span,
        "second_half_slope_per_hour": late * HOUR,  # ~0 while the first half rose: a plateau, not a leak
        "first": values[0], "last": values[-1], "min": min(values), "max": max(values),
        "mean": sum(values) / len(values),
    }


PROCESS_KEYS = (("rss", MIB, "rss_mib"), ("uss", MIB, "uss_mib"), ("fds", 1.0, "fds"))


def steady(samples: Iterable[dict[str, Any]], warmup: float, end: float) -> list[dict[str, Any]]:
    return [s for s in samples if s["phase"] == "load" and warmup <= s["t"] <= end]


def worker_points(samples: Sequence[dict[str, Any]], slot: str, key: str) -> tuple[list[tuple[float, float]], int]:
    """(t, value) of one worker slot, only from the process that held the slot last (and how many pids it had)."""
    pids = [s["workers"].get(slot, {}).get("pid") for s in samples]
    pids = [p for p in pids if p]
    if not pids:
        return [], 0
    last = pids[-1]
    points = [(s["t"], float(s["workers"][slot][key])) for s in samples
              if s["workers"].get(slot, {}).get("pid") == last and key in s["workers"][slot]]
    return points, len(set(pids))


def analyse(samples: list[dict[str, Any]], warmup: float, load_end: float) -> dict[str, Any]:
    """Slopes and figures of every process over the steady window [warmup, load_end]."""
    window = steady(samples, warmup, load_end)
    out: dict[str, Any] = {"window": {"from_s": warmup, "to_s": load_end, "samples": len(window)},
                           "workers": {}, "supervisor": {}, "analyzers": {}}
    slots = sorted({slot for s in window for slot in s["workers"]}, key=int)
    for slot in slots:
        figures: dict[str, Any] = {}
        for key, scale, label in PROCESS_KEYS + (("queued_packets", 1.0, "queued_packets"),
                                                 ("connections", 1.0, "connections")):
            points, pids = worker_points(window, slot, key)
            figures[label] = series_figures(points, scale)
            figures["processes"] = pids
        accepted, _ = worker_points(window, slot, "accepted")
        figures["packets_in_window"] = int(accepted[-1][1] - accepted[0][1]) if len(accepted) > 1 else 0
        lags, _ = worker_points(window, slot, "loop_lag_s")
        figures["loop_lag_s_max"] = max((v for _, v in lags), default=None)
        queued, _ = worker_points(window, slot, "queued_bytes")
        # what the bounded queues took beyond their level at the window's start: memory legitimately held
        # (and kept as a high-water mark by the allocators), not a leak
        figures["queued_mib_peak_growth"] = max(0.0, max(v for _, v in queued) - queued[0][1]) / MIB if queued else 0.0
        out["workers"][slot] = figures
    for key, scale, label in PROCESS_KEYS:
        out["supervisor"][label] = series_figures(
            [(s["t"], float(s["supervisor"][key])) for s in window if s["supervisor"]], scale)
    names = sorted({name for s in window for name in s["analyzers"]})
    for name in names:
        out["analyzers"][name] = {label: series_figures(
            [(s["t"], float(s["analyzers"][name][key])) for s in window if s["analyzers"].get(name)], scale)
            for key, scale, label in PROCESS_KEYS}
    out["queue_depth"] = series_figures([(s["t"], float(s["queue_depth"])) for s in window])
    accepted_total = [(s["t"], float(s["packets"].get("accepted", 0))) for s in window]
    out["accepted_packets_per_s"] = (least_squares(accepted_total)[0] if len(accepted_total) > 1 else 0.0)
    return out


def growth_failures(report: dict[str, Any], max_uss_growth_mib: float, max_bytes_per_packet: float,
                    fds_slack: int = FDS_SLACK) -> list[str]:
    """What a leak gate objects to in ``report`` (empty: it passes).

    Per worker: the fitted USS growth over the steady window must stay under
    ``max_uss_growth_mib`` + ``max_bytes_per_packet`` x the packets that worker
    accepted in the window + how far its queued bytes rose above their level
    at the window's start (bounded queues legitimately hold that much, and
    the allocators keep it); a worker process must not have been replaced;
    after the load its open fds are back to at most the idle level before the
    load + ``fds_slack``. The queues are empty after the drain, and every 202
    reached an analyzer.
    """
    failures: list[str] = []
    slopes = report["slopes"]
    for slot, figures in slopes["workers"].items():
        uss = figures["uss_mib"]
        packets = figures["packets_in_window"]
        bound = max_uss_growth_mib + max_bytes_per_packet * packets / MIB + figures.get("queued_mib_peak_growth", 0.0)
        if uss.get("samples", 0) < 5:
            failures.append(f"worker {slot}: only {uss.get('samples', 0)} samples in the steady window")
        elif uss["fitted_growth"] > bound:
            failures.append(f"worker {slot}: USS grew {uss['fitted_growth']:.1f} MiB over {uss['window_s']:.0f} s "
                            f"after warm-up ({packets} packets, {uss['fitted_growth'] * MIB / max(packets, 1):.0f} "
                            f"B/packet); bound {bound:.1f} MiB")
        if figures["processes"] > 1:
            failures.append(f"worker {slot}: {figures['processes']} processes held the slot during the window")
    idle = report["idle"]
    for slot, before in idle["before"].items():
        after = idle["after"].get(slot)
        if after is None or "fds" not in before or "fds" not in after:
            failures.append(f"worker {slot}: no idle fd sample before and after the load")
        elif after["fds"] > before["fds"] + fds_slack:
            failures.append(f"worker {slot}: {after['fds']} open fds after the load, {before['fds']} before it "
                            f"(slack {fds_slack})")
    drain = report["drain"]
    if drain["queue_depth_after"] != 0:
        failures.append(f"queue depth {drain['queue_depth_after']} after the drain")
    if drain["connections_after"] != 0:
        failures.append(f"{drain['connections_after']} ingest connections still open after the load")
    delivery = report["delivery"]
    if not delivery["ok"]:
        failures.append(f"delivery: {delivery['problem']}")
    return failures


# --------------------------------------------------------------------------- plot


def plot(report: dict[str, Any], path: Path) -> None:
    """RSS/USS, fds, queue depth and accepted packets/s over time, warm-up shaded, lifecycle events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    load_samples = [s for s in samples if s["phase"] in ("load", "drain", "idle-after")]
    if not load_samples:
        return
    minutes = [s["t"] / 60 for s in load_samples]
    fig, axes = plt.subplots(5, 1, figsize=(12, 16), sharex=True)
    mem, analyzers_ax, fds, depth, rate = axes
    slots = sorted({slot for s in load_samples for slot in s["workers"]}, key=int)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, slot in enumerate(slots):
        color = colors[i % len(colors)]
        for key, style, label in (("rss", "-", "RSS"), ("uss", "--", "USS")):
            xs = [s["t"] / 60 for s in load_samples if key in s["workers"].get(slot, {})]
            ys = [s["workers"][slot][key] / MIB for s in load_samples if key in s["workers"].get(slot, {})]
            mem.plot(xs, ys, style, color=color, label=f"worker {slot} {label}")
        xs = [s["t"] / 60 for s in load_samples if "fds" in s["workers"].get(slot, {})]
        fds.plot(xs, [s["workers"][slot]["fds"] for s in load_samples if "fds" in s["workers"].get(slot, {})],
                 color=color, label=f"worker {slot}")
        xs = [s["t"] / 60 for s in load_samples if slot in s["workers"]]
        depth.plot(xs, [s["workers"][slot]["queued_packets"] for s in load_samples if slot in s["workers"]],
                   color=color, linewidth=0.8, label=f"worker {slot} queued")
    sup = [(s["t"] / 60, s["supervisor"]) for s in load_samples if s["supervisor"]]
    mem.plot([t for t, _ in sup], [v["rss"] / MIB for _, v in sup], ":", color="black", label="supervisor RSS")
    fds.plot([t for t, _ in sup], [v["fds"] for _, v in sup], ":", color="black", label="supervisor")
    names = sorted({name for s in load_samples for name in s["analyzers"]})
    for i, name in enumerate(names):
        pts = [(s["t"] / 60, s["analyzers"][name]["rss"] / MIB) for s in load_samples if s["analyzers"].get(name)]
        analyzers_ax.plot([t for t, _ in pts], [v for _, v in pts], color=colors[(i + 3) % len(colors)],
                          label=f"analyzer {name} RSS")
    depth.plot(minutes, [s["queue_depth"] for s in load_samples], color="black", label="queue depth (/metrics)")
    accepted = [(s["t"], s["packets"].get("accepted", 0)) for s in load_samples]
    rates = [(b[0] / 60, (b[1] - a[1]) / max(b[0] - a[0], 1e-9)) for a, b in zip(accepted, accepted[1:])]
    rate.plot([t for t, _ in rates], [v for _, v in rates], color="black", label="accepted packets/s")
    mem.set_ylabel("MiB")
    analyzers_ax.set_ylabel("MiB")
    fds.set_ylabel("open fds")
    depth.set_ylabel("packets")
    rate.set_ylabel("packets/s")
    rate.set_xlabel("minutes since the load started")
    warmup = report["config"]["warmup_s"] / 60
    load_end = report["config"]["load_s"] / 60
    for ax in axes:
        ax.axvspan(0, warmup, color="0.9", zorder=0)
        ax.axvline(load_end, color="0.5", linewidth=0.8)
        for event in report["events"]:
            ax.axvline(event["t"] / 60, color="tab:red", linewidth=0.5, alpha=0.4)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    slopes = report["slopes"]["workers"]
    summary = "  ".join(f"w{slot}: USS {_slope(f['uss_mib'], 'MiB')}, fds {_slope(f['fds'], 'fds')}"
                        for slot, f in slopes.items())
    mem.set_title(f"soak: {report['config']['workers']} workers, {report['config']['rate']:.0f} packets/s offered, "
                  f"WAL {'on' if report['config']['wal'] else 'off'} (grey: warm-up, red: lifecycle events)\n"
                  f"slopes after warm-up (second half): {summary}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- the run


def admin_call(cluster: LocalCluster, token: str, method: str, path: str, body: dict[str, Any] | None = None
               ) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(cluster.admin_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def lifecycle_event(cluster: LocalCluster, token: str, index: int, rng: random.Random) -> dict[str, Any]:
    """The ``index``-th event of the cycle: weight change, SIGHUP reload (puts weights back), drain, undrain."""
    kind = EVENTS[index % len(EVENTS)]
    if kind == "weight":
        name, weight = WEIGHTS[rng.randrange(len(WEIGHTS))]
        new = round(weight * rng.choice((0.5, 2.0)), 3)
        status = admin_call(cluster, token, "PUT", f"/admin/analyzers/{name}", {"weight": new})
        return {"kind": kind, "detail": f"{name} {weight} -> {new}", "status": status, "ok": status == 200}
    if kind == "reload":
        assert cluster.distributor is not None
        cluster.distributor.signal(signal.SIGHUP)
        return {"kind": kind, "detail": "SIGHUP to the supervisor", "status": None, "ok": True}
    name = WEIGHTS[-1][0]
    status = admin_call(cluster, token, "POST", f"/admin/analyzers/{name}/{kind}")
    return {"kind": kind, "detail": name, "status": status, "ok": status == 200}


SITECUSTOMIZE = '''"""Written by loadtest/soak.py --inject-leak: a deliberate leak, the soak's negative control."""
import os

_BYTES = int(os.environ.get("SOAK_INJECT_LEAK_BYTES", "0"))
if _BYTES > 0:
    from distributor.ingest import app as _app

    _LEAK = []
    _enqueue = _app.IngestApp.enqueue

    def _leaky_enqueue(self, slot, raw, messages, ref):
        _LEAK.append(bytes(_BYTES))
        return _enqueue(self, slot, raw, messages, ref)

    _app.IngestApp.enqueue = _leaky_enqueue
'''


def _start_distributor(cluster: LocalCluster, inject_leak: int, scratch: Path) -> None:
    """Start the distributor; with ``inject_leak`` its processes load a sitecustomize that leaks per packet."""
    if not inject_leak:
        cluster.start_distributor_process(60)
        return
    hook = scratch / "leak-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "SOAK_INJECT_LEAK_BYTES")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), saved["PYTHONPATH"]) if p)
    os.environ["SOAK_INJECT_LEAK_BYTES"] = str(inject_leak)
    try:
        cluster.start_distributor_process(60)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _totals(sinks: PythonSinks) -> SinkCount:
    total = SinkCount()
    for count in sinks.totals().values():
        total = SinkCount(total.packets + count.packets, total.messages + count.messages,
                          total.requests + count.requests)
    return total


def _analyzer_duplicates(cluster: LocalCluster) -> int:
    return sum(int(s.get("duplicates", 0)) for s in cluster.analyzer_totals().values())


def _log(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _idle_workers(sample: dict[str, Any]) -> dict[str, Any]:
    return {slot: {k: w[k] for k in ("pid", "rss", "uss", "fds") if k in w} for slot, w in sample["workers"].items()}


def default_warmup(load_s: float) -> float:
    """15% of the run, at least 60 s, at most half of it."""
    return min(max(60.0, 0.15 * load_s), 0.5 * load_s)


def run_soak(minutes: float, workers: int = 2, out_dir: Path | str = "loadtest/results", rate: float | None = None,
             wal: bool = True, *, fraction: float = 0.5, interval: float = 5.0, warmup: float | None = None,
             event_every: float = 60.0, calibrate_s: float = 8.0, inject_leak: int = 0, progress: bool = True,
             plot_png: bool = True, seed: int | None = None, min_window_packets: int = 0,
             max_minutes: float | None = None) -> dict[str, Any]:
    """Run the soak (see the module docstring); returns the report, also written to ``out_dir`` with its plot.

    ``rate``: packets/s offered in total (None: ``fraction`` of the capacity
    measured first); ``warmup``: seconds of the load left out of the slopes
    (None: ``default_warmup``); ``event_every``: seconds between lifecycle
    events (0: none); ``inject_leak``: bytes leaked per packet (negative control).
    ``min_window_packets``: the load is lengthened (up to ``max_minutes``) until
    each worker should take that many packets after the warm-up at the offered
    rate, so a gate judges a number of packets rather than a number of seconds.
    """
    load_s = minutes * 60.0
    warmup_s = default_warmup(load_s) if warmup is None else warmup
    if load_s <= 0 or not 0 <= warmup_s < load_s or interval <= 0 or not 0 < fraction <= 1:
        raise ValueError("need minutes > 0, 0 <= warmup < the load, interval > 0 and 0 < fraction <= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, png_path = out / f"soak-{stamp}.json", out / f"soak-{stamp}.png"
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="soak-"))
    token = os.urandom(12).hex()
    distributor_args = ["--set", f"admin.token={token}", "--set", "graceful_timeout=30"]
    if wal:
        distributor_args += ["--set", f"wal.dir={scratch / 'wal'}"]
    cluster = LocalCluster(analyzers=WEIGHTS, workers=workers, start_distributor=False,
                           analyzer_args={name: list(ANALYZER_ARGS) for name, _ in WEIGHTS},
                           distributor_args=distributor_args, log_dir=scratch / "logs")
    (scratch / "logs").mkdir()
    report: dict[str, Any] = {
        "scenario": "soak", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load1_start": os.getloadavg()[0]},
        "git": git_revision(), "events": [], "samples": [],
    }
    load: LoadProcess | None = None
    codes: dict[str, int | None] = {}
    failed = True
    try:
        cluster.start(60)
        _start_distributor(cluster, inject_leak, scratch)
        sinks = PythonSinks(cluster)
        sampler = Sampler(cluster, sinks)
        url = cluster.ingest_url
        calibration: dict[str, Any] | None = None
        if rate is None:
            _log(progress, f"soak: measuring capacity ({calibrate_s:.0f} s closed loop)")
            began = time.monotonic()
            load = LoadProcess("calibrate", url, calibrate_s, 32).start()
            calibration = load.result(calibrate_s + RESULT_TIMEOUT)
            cluster.wait_drained(120)
            took = time.monotonic() - began
            capacity = calibration["accepted_packets"] / max(took, 1e-9)
            calibration.update({"until_delivered_s": round(took, 2), "capacity_packets_per_s": capacity})
            rate = max(fraction * capacity, 50.0)
            _log(progress, f"soak: capacity {capacity:.0f} packets/s accepted and delivered; offering {rate:.0f}/s")
        if min_window_packets:  # enough packets after the warm-up, whatever this machine's speed
            needed = warmup_s + 1.2 * min_window_packets * workers / rate
            load_s = max(load_s, min(needed, (max_minutes or minutes) * 60.0))
        report["config"] = {
            "minutes": load_s / 60, "load_s": load_s, "min_window_packets": min_window_packets, "workers": workers,
            "rate": rate, "fraction": fraction,
            "calibration": calibration, "wal": wal, "interval_s": interval, "warmup_s": warmup_s,
            "event_every_s": event_every, "inject_leak_bytes": inject_leak,
            "mix": {**{s.name: asdict(s) for s in MIX}, "churn": {"share": CHURN_SHARE, "kinds": dict(CHURN_KINDS)}},
            "analyzers": dict(WEIGHTS), "analyzer_args": ANALYZER_ARGS,
        }
        # idle baseline: after the calibration (sender pools open), before the soak load
        wait_until(lambda: all(w["connections"] == 0 for w in cluster.admin("/admin/workers")["workers"]),
                   60, "connections of the calibration to close")
        before = sampler.take(-1.0, "idle-before")
        report["samples"].append(before)
        base_accepted = before["packets"].get("accepted", 0)
        base_delivered = _totals(sinks)
        base_duplicates = _analyzer_duplicates(cluster)

        load = LoadProcess("mixed", url, rate, load_s, rng.getrandbits(32)).start()
        sampler.generator_pid = load.pid
        started = time.monotonic()
        next_sample, next_event, events = started, started + event_every if event_every > 0 else float("inf"), 0
        while load.alive():
            now = time.monotonic()
            if now >= next_event and now - started < load_s - interval:
                event = lifecycle_event(cluster, token, events, rng)
                event["t"] = round(now - started, 2)
                report["events"].append(event)
                events += 1
                next_event += event_every
                _log(progress, f"  [{event['t']:7.1f}s] event {event['kind']}: {event['detail']} ({event['status']})")
            if now >= next_sample:
                next_sample += interval
                try:
                    sample = sampler.take(now - started, "load" if now - started <= load_s else "drain")
                except (OSError, ValueError, KeyError) as exc:  # a scrape that failed (e.g. during a reload)
                    report.setdefault("sample_errors", []).append(f"{now - started:.1f}s: {exc!r}")
                    continue
                report["samples"].append(sample)
                w = "  ".join(f"w{slot} {v.get('rss', 0) / MIB:5.1f}/{v.get('uss', 0) / MIB:5.1f} MiB "
                              f"{v.get('fds', 0):3d} fds q{v['queued_packets']:5d}"
                              for slot, v in sample["workers"].items())
                accepted_now = sample["packets"].get("accepted", 0) - base_accepted
                _log(progress, f"  [{sample['t']:7.1f}s] accepted {accepted_now:9d}  "
                               f"depth {sample['queue_depth']:6d}  {w}")
            time.sleep(max(0.05, min(next_sample, next_event) - time.monotonic()))
        load_result = load.result(RESULT_TIMEOUT)
        load_ended = time.monotonic() - started
        # drain: every queue empty, every ingest connection closed, the log acknowledged
        drain_began = time.monotonic()
        cluster.wait_drained(180)
        if events % len(EVENTS) == EVENTS.index("undrain"):  # the last event drained an analyzer: undo it
            report["events"].append({**lifecycle_event(cluster, token, events, rng),
                                     "t": round(time.monotonic() - started, 2)})
        wait_until(lambda: all(w["connections"] == 0 for w in cluster.admin("/admin/workers")["workers"]),
                   60, "ingest connections to close")
        if wal:
            wait_until(lambda: parse_metrics(fetch_text(cluster.admin_url + "/metrics"))["wal_unacked_packets"] == 0,
                       60, "the write-ahead log to be acknowledged")
        drained_in = time.monotonic() - drain_began
        last = sampler.take(time.monotonic() - started, "idle-after")
        report["samples"].append(last)
        delivered = _totals(sinks).minus(base_delivered)
        accepted = last["packets"].get("accepted", 0) - base_accepted
        duplicates = _analyzer_duplicates(cluster) - base_duplicates
        possible = last["possible_duplicates"] - before["possible_duplicates"]
        books = last["messages"]
        unbalanced = (books.get("routed", 0) - books.get("failed_over", 0) - books.get("delivered", 0)
                      - books.get("rejected", 0) - books.get("dropped_shutdown", 0) - books.get("lost_worker_crash", 0))
        client_accepted = sum(v["accepted_packets"] for v in load_result.values())
        client_errors = sum(v["errors"] for v in load_result.values())
        # a request without an answer may still have been accepted: up to its packets (3 for a churn session)
        unseen_max = sum(v["errors"] * v.get("packets_per_request", 3) for v in load_result.values())
        lost = accepted - delivered.packets
        problem = ""
        if lost > 0:
            problem = f"{lost} packets answered 202 never reached an analyzer"
        elif -lost > possible:  # a packet failed over after a send that may have arrived counts at two analyzers
            problem = (f"the analyzers counted {-lost} packets more than were accepted, more than the "
                       f"{possible} possible duplicates the distributor counted")
        elif unbalanced or any(books.get(k, 0) for k in ("rejected", "dropped_shutdown", "lost_worker_crash")):
            problem = f"the distributor's books do not balance: {books}"
        elif not client_accepted <= accepted <= client_accepted + unseen_max:
            problem = (f"the clients counted {client_accepted} 202s ({client_errors} requests without an answer), "
                       f"the distributor {accepted}")
        report["delivery"] = {
            "accepted_distributor": accepted, "accepted_clients": client_accepted,
            "client_requests_unanswered": client_errors, "delivered_analyzers": delivered.packets,
            "delivered_messages": delivered.messages, "analyzer_requests": delivered.requests,
            "lost": max(lost, 0), "extra_at_analyzers": max(-lost, 0), "possible_duplicates_counted": possible,
            "failover_packets": last["failover_packets"] - before["failover_packets"],
            "duplicates_absorbed_by_analyzers": duplicates,
            "distributor_messages": last["messages"], "ok": not problem, "problem": problem,
        }
        report["drain"] = {"seconds": round(drained_in, 2), "queue_depth_after": last["queue_depth"],
                           "connections_after": sum(w["connections"] for w in last["workers"].values()),
                           "wal_unacked_after": last["wal_unacked_packets"]}
        report["idle"] = {"before": _idle_workers(before), "after": _idle_workers(last),
                          "supervisor": {"before": before["supervisor"], "after": last["supervisor"]},
                          "analyzers": {"before": before["analyzers"], "after": last["analyzers"]}}
        report["load"] = {"seconds": round(load_ended, 1), "streams": load_result,
                          "by_status": _merge_status(load_result), "accepted_packets": client_accepted,
                          "packets_per_s": client_accepted / load_s, "offered_packets_per_s": rate}
        report["slopes"] = analyse(report["samples"], warmup_s, load_s)
        report["final"] = {slot: {"pid": w.get("pid"), "rss_mib": w.get("rss", 0) / MIB,
                                  "uss_mib": w.get("uss", 0) / MIB, "fds": w.get("fds")}
                           for slot, w in last["workers"].items()}
        failed = False
    finally:
        if load is not None:
            load.stop()
        codes = cluster.stop()
        report["exit_codes"] = codes
        report["machine"]["load1_end"] = os.getloadavg()[0]
        if failed:
            report["logs"] = {p.name: p.log_tail(60) for p in [cluster.distributor, *cluster.analyzer_procs] if p}
            json_path.write_text(json.dumps(report, indent=1, default=str))
            _log(progress, f"soak: failed; partial report and log tails in {json_path} (logs kept in {scratch})")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if codes.get("distributor") not in (0, None):
        report["delivery"]["ok"] = False
        report["delivery"]["problem"] += f" distributor exited {codes.get('distributor')}"
    report["checks"] = {"bounds": {"max_uss_growth_mib": GATE_MAX_USS_GROWTH_MIB,
                                   "max_bytes_per_packet": GATE_MAX_BYTES_PER_PACKET, "fds_slack": FDS_SLACK},
                        "failures": growth_failures(report, GATE_MAX_USS_GROWTH_MIB, GATE_MAX_BYTES_PER_PACKET)}
    report["report"], report["plot"] = str(json_path), str(png_path) if plot_png else None
    json_path.write_text(json.dumps(report, indent=1, default=str))
    if plot_png:
        plot(report, png_path)
    return report


def _merge_status(load_result: dict[str, Any]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for stream in load_result.values():
        for code, n in stream["by_status"].items():
            merged[code] = merged.get(code, 0) + n
    return merged


def _slope(figures: dict[str, Any], unit: str, fmt: str = "+.1f") -> str:
    """'slope (second half)' of a series, per hour."""
    return (f"{format(figures.get('slope_per_hour', 0.0), fmt)} {unit}/h "
            f"({format(figures.get('second_half_slope_per_hour', 0.0), fmt)})")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The figures a closing note quotes, as text."""
    cfg, slopes, delivery, load = report["config"], report["slopes"], report["delivery"], report["load"]
    window = slopes["window"]
    lines = [f"soak: {cfg['minutes']:.3g} min, {cfg['workers']} workers, {cfg['rate']:.0f} packets/s offered "
             f"(fraction {cfg['fraction']} of capacity), WAL {'on' if cfg['wal'] else 'off'}, load average "
             f"{report['machine']['load1_start']:.1f} -> {report['machine']['load1_end']:.1f}; slopes over "
             f"{window['from_s']:.0f}-{window['to_s']:.0f} s ({window['samples']} samples), per hour "
             f"(in brackets: over the window's second half)"]
    for slot, f in slopes["workers"].items():
        final = report["final"].get(slot, {})
        lines.append(
            f"  worker {slot}: RSS {_slope(f['rss_mib'], 'MiB')}  USS {_slope(f['uss_mib'], 'MiB')}  "
            f"fds {_slope(f['fds'], 'fds')}  queued {_slope(f['queued_packets'], 'packets', '+.0f')}  | final "
            f"(idle) RSS {final.get('rss_mib', 0):.1f} MiB USS {final.get('uss_mib', 0):.1f} MiB fds "
            f"{final.get('fds')} (before the load {report['idle']['before'].get(slot, {}).get('fds')}); "
            f"{f['packets_in_window']} packets in the window; peaks: fds {f['fds'].get('max', 0):.0f}, queued "
            f"{f['queued_packets'].get('max', 0):.0f} packets, loop lag {f.get('loop_lag_s_max') or 0:.2f} s")
    sup = slopes["supervisor"]
    lines.append(f"  supervisor: RSS {_slope(sup['rss_mib'], 'MiB')}  USS {_slope(sup['uss_mib'], 'MiB')}  "
                 f"fds {_slope(sup['fds'], 'fds')}  last RSS {sup['rss_mib'].get('last', 0):.1f} MiB")
    for name, f in slopes["analyzers"].items():
        lines.append(f"  analyzer {name}: RSS {_slope(f['rss_mib'], 'MiB')}  last {f['rss_mib'].get('last', 0):.1f} MiB"
                     f"  fds {f['fds'].get('last', 0):.0f}")
    lines.append(f"  queue depth: {_slope(slopes['queue_depth'], 'packets', '+.0f')}, mean "
                 f"{slopes['queue_depth'].get('mean', 0):.0f}, max {slopes['queue_depth'].get('max', 0):.0f}; "
                 f"after the drain {report['drain']['queue_depth_after']}")
    lines.append(f"  load: {load['accepted_packets']} packets accepted ({load['packets_per_s']:.0f}/s of "
                 f"{cfg['rate']:.0f}/s offered), answers {load['by_status']}, churn sessions "
                 f"{load['streams']['churn']['sessions']}, lifecycle events {len(report['events'])}")
    lines.append(f"  delivery: accepted {delivery['accepted_distributor']}, at the analyzers "
                 f"{delivery['delivered_analyzers']}, lost {delivery['lost']}, extra {delivery['extra_at_analyzers']} "
                 f"(possible duplicates counted {delivery['possible_duplicates_counted']}, failed over "
                 f"{delivery['failover_packets']}) -> {'OK' if delivery['ok'] else 'FAILED: ' + delivery['problem']}")
    failures = report["checks"]["failures"]
    lines.append("  checks: " + ("passed" if not failures else "FAILED: " + "; ".join(failures)))
    lines.append(f"  report {report['report']}  plot {report['plot']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the load (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="distributor workers (default 2)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"), help="directory for the JSON and PNG")
    parser.add_argument("--rate", type=float, default=None, help="packets/s offered (default: --fraction of capacity)")
    parser.add_argument("--fraction", type=float, default=0.5, help="of the measured capacity (default 0.5)")
    parser.add_argument("--no-wal", action="store_true", help="leave the write-ahead log off")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds left out of the slopes "
                        "(default 15%% of the run, 60 s to half of it)")
    parser.add_argument("--event-every", type=float, default=60.0, help="seconds between lifecycle events (0: none)")
    parser.add_argument("--calibrate-s", type=float, default=8.0, help="seconds of the capacity measurement")
    parser.add_argument("--seed", type=int, default=None, help="seed of the churn and the lifecycle events")
    parser.add_argument("--min-window-packets", type=int, default=0, help="lengthen the load until each worker "
                        "should take this many packets after the warm-up (up to --max-minutes)")
    parser.add_argument("--max-minutes", type=float, default=None, help="cap of --min-window-packets")
    parser.add_argument("--inject-leak", type=int, default=0, metavar="BYTES",
                        help="negative control: leak BYTES per packet in the workers")
    args = parser.parse_args(argv)
    report = run_soak(args.minutes, args.workers, args.out, args.rate, not args.no_wal, fraction=args.fraction,
                      interval=args.interval, warmup=args.warmup, event_every=args.event_every,
                      calibrate_s=args.calibrate_s, seed=args.seed, inject_leak=args.inject_leak,
                      min_window_packets=args.min_window_packets, max_minutes=args.max_minutes)
    print("\n".join(summary_lines(report)))
    return 0 if not report["checks"]["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
