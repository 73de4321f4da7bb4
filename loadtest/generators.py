"""Load generators for the benchmark: wrk (closed loop, C) and the uvloop emitter (open or closed loop).

Why two: on a 2-core box a Python generator cannot saturate the distributor
and measure it at the same time, so peak throughput uses wrk when it is
installed; wrk is closed loop, though, so latency at a given rate uses the
emitter's open-loop mode (latency from the scheduled send time). Both report
into the same ``RunResult`` so the benchmark treats them alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Self
from urllib.parse import urlsplit

import uvloop

from distributor.tools.emitter import LatencyHistogram, LoadSpec, LoadStats, PacketFactory, run_load

LUA = Path(__file__).with_name("wrk_ingest.lua")
SIZES = {"fixed": ((10, 1.0),), "skewed": ((5, 0.5), (20, 0.5))}


@dataclass
class RunResult:
    """What one load run saw from the client side (latencies in ms)."""

    generator: str
    duration_s: float
    connections: int
    offered_rate: float | None = None  # open loop: packets/s scheduled; None: closed loop
    sent: int = 0
    accepted_packets: int = 0  # answered 202 (or 2xx through nginx)
    accepted_messages: int | None = None  # None when the generator cannot tell (nginx answers)
    by_status: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    service_ms: dict[str, float] | None = None  # emitter: from the write, without the generator's timer lag
    latency_503_ms: dict[str, float] | None = None
    probe_latency_ms: dict[str, dict[str, float]] | None = None  # per status, from the stress probe
    processes: int = 1  # generator processes (several wrk in stress-cpu)
    retry_after_503: int | None = None  # wrk: 503 answers that carried Retry-After
    errors_by_kind: dict[str, int] | None = None  # wrk: connect/read/write/timeout
    latency_corrected_ms: dict[str, float] | None = None  # wrk: its coordinated-omission-corrected figures
    latency_is_raw: bool = True  # False: latency_ms holds wrk's corrected figures (the raw ones were not readable)
    packets_per_request: int = 1  # batches (POST /ingest/batch, OTLP exports) carry more

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def answered(self) -> int:
        return sum(self.by_status.values())

    @property
    def ratio_503(self) -> float:
        return self.by_status.get("503", 0) / max(self.answered, 1)


class EverySecond:
    """A daemon thread that calls ``tick`` once a second for as long as the ``with`` block lasts."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Progress(EverySecond):
    """Prints one line per second to stderr while a run lasts (``sample`` says what to print)."""

    def __init__(self, label: str, sample: Callable[[], str]) -> None:
        super().__init__()
        self.label = label
        self.sample = sample
        self.started = time.monotonic()

    def tick(self) -> None:
        try:
            text = self.sample()
        except Exception as exc:  # progress must never kill a run
            text = f"({exc.__class__.__name__})"
        print(f"  [{self.label}] {time.monotonic() - self.started:5.1f}s {text}", file=sys.stderr, flush=True)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_version() -> str | None:
    if not wrk_available():
        return None
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return out.split(" [")[0].strip() or None


@dataclass(frozen=True)
class WrkPool:
    """Request bodies built ahead of a run (wrk_ingest.lua's pool mode), sent in turn and unchanged.

    Why: gzip and protobuf bodies cannot be assembled in wrk's Lua at the rate wrk sends them; built
    once, each request costs wrk no more than a copy. ``answer`` says how wrk_ingest.lua reads what was
    taken: ``ingest`` (202: one packet), ``batch`` (200 with ``accepted``), ``otlp`` (an
    ExportLogsServiceResponse).
    """

    path: Path  # "<length>\n<bytes>" per body (payloads.write_pool)
    packets: int  # per body
    messages: int  # per packet
    content_type: str = "application/json"
    encoding: str = ""
    answer: str = "ingest"

    def options(self) -> list[str]:
        return [f"pool={self.path}", f"packets={self.packets}", f"messages={self.messages}",
                f"type={self.content_type}", f"encoding={self.encoding}", f"answer={self.answer}"]


def batch_url(url: str) -> str:
    """``.../ingest`` -> ``.../ingest/batch`` (what the emitter does for ``batch``)."""
    return url.rstrip("/") + "/batch" if urlsplit(url).path.rstrip("/").endswith("/ingest") else url


def parse_wrk(stdout: str) -> dict[str, int]:
    """The ``wrk-result KEY VALUE`` lines printed by wrk_ingest.lua's done()."""
    values: dict[str, int] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "wrk-result":
            values[parts[1]] = int(parts[2])
    if "requests" not in values:
        raise RuntimeError(f"wrk printed no wrk-result lines:\n{stdout[-2000:]}")
    return values


def parse_quantiles(stdout: str, kind: str = "wrk-raw-quantile") -> list[tuple[float, float]]:
    """The ``wrk-raw-quantile P US`` (or ``wrk-quantile``) lines: (fraction 0..1, latency µs), ascending."""
    points = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == kind:
            points.append((float(parts[1]) / 100, float(parts[2])))
    return sorted(points)


def merge_quantiles(parts: list[tuple[int, list[tuple[float, float]]]], fraction: float) -> float:
    """The ``fraction`` quantile of several latency distributions, each (answers, quantile points).

    Each process's CDF is interpolated linearly between its printed quantiles;
    the mixture weights them by their answers and is inverted at ``fraction``.
    Exact at the printed points when there is one process (then it is simply
    that process's quantile).
    """
    parts = [(n, pts) for n, pts in parts if n > 0 and pts]
    if not parts:
        return 0.0
    total = sum(n for n, _ in parts)

    def cdf(points: list[tuple[float, float]], x: float) -> float:
        if x < points[0][1]:
            return 0.0
        for (q0, v0), (q1, v1) in zip(points, points[1:]):
            if v0 <= x < v1:
                return q0 + (q1 - q0) * (x - v0) / (v1 - v0)
        return 1.0 if x >= points[-1][1] else points[-1][0]

    candidates = sorted({v for _, pts in parts for _, v in pts})
    previous_x, previous_f = candidates[0], 0.0
    for x in candidates:
        f = sum(n * cdf(pts, x) for n, pts in parts) / total
        if f >= fraction - 1e-12:
            if f == previous_f:
                return x
            return previous_x + (x - previous_x) * (fraction - previous_f) / (f - previous_f)
        previous_x, previous_f = x, f
    return candidates[-1]


def run_wrk(url: str, duration: float, connections: int, sizes: str, nonce: str,
            progress: Callable[[], str], threads: int = 2, processes: int = 1, batch: int = 0,
            pool: WrkPool | None = None) -> RunResult:
    """wrk closed loop with wrk_ingest.lua; 202s and messages are counted in the script.

    ``processes`` > 1 starts that many wrk at once (each with ``connections``
    and ``threads``, and its own nonce so packet ids stay unique); counts are
    summed and the latency percentiles merged over all their answers.
    ``batch``: N packets per request to ``/ingest/batch`` (unique ids, built by the
    script); ``pool``: bodies built ahead, sent in turn (``sizes`` is then ignored).

    ``latency_ms``: the answers as measured (wrk's histogram with its
    coordinated-omission correction undone by wrk_ingest.lua);
    ``latency_corrected_ms``: wrk's own corrected figures (what ``wrk`` prints).
    """
    options = pool.options() if pool else [f"batch={batch}"] if batch else []
    if batch:
        url = batch_url(url)
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", "5s", "-s", str(LUA), url, "--"]
    with Progress("wrk", progress), tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        procs = []
        for i in range(processes):
            stdout, stderr = open(Path(tmp, f"{i}.out"), "wb"), open(Path(tmp, f"{i}.err"), "wb")
            procs.append(subprocess.Popen([*argv, nonce if processes == 1 else f"{nonce}p{i}",
                                           "pool" if pool else sizes, str(connections), *options],
                                          stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL))
            stdout.close()
            stderr.close()
        deadline = time.monotonic() + duration + 60
        for proc in procs:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        outputs = [Path(tmp, f"{i}.out").read_text() for i in range(processes)]
        errors = [Path(tmp, f"{i}.err").read_text() for i in range(processes)]
    for proc, err in zip(procs, errors):
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited {proc.returncode}: {err[-2000:]}")
    each = [parse_wrk(out) for out in outputs]
    v = {key: sum(e.get(key, 0) for e in each) for key in each[0]}
    statuses = {"202": v["status_202"], "2xx_other": v["status_2xx"] - v["status_202"], "429": v["status_429"],
                "503": v["status_503"], "other": v["status_other"]}
    answered = [e["status_2xx"] + e["status_429"] + e["status_503"] + e["status_other"] for e in each]
    points = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))

    def figures(prefix: str, kind: str, counts: list[int]) -> dict[str, float]:
        if processes == 1:
            return {key: v[f"{prefix}_p{key[1:]}_us"] / 1e3 for key, _ in points}
        parts = list(zip(counts, (parse_quantiles(out, kind) for out in outputs)))
        return {key: merge_quantiles(parts, q) / 1e3 for key, q in points}

    corrected = figures("latency", "wrk-quantile", answered)
    corrected["max"] = max(e["latency_max_us"] for e in each) / 1e3
    raw_ok = all("raw_count" in e for e in each)
    if raw_ok:
        raw_counts = [e["raw_count"] for e in each]
        latency = figures("raw_latency", "wrk-raw-quantile", raw_counts)
        latency["mean"] = sum(e["raw_mean_us"] * n for e, n in zip(each, raw_counts)) / max(sum(raw_counts), 1) / 1e3
        latency["count"] = float(sum(raw_counts))
        latency["max"] = corrected["max"]  # the largest sample is never a synthetic one
    else:  # the FFI read failed: only wrk's corrected figures exist (flagged in the record)
        latency = dict(corrected)
        latency["count"] = float(sum(answered))
    kinds = {kind: v[f"errors_{kind}"] for kind in ("connect", "read", "write", "timeout")}
    # 202 answers echo their packet's messages; batch and OTLP answers (200) say what was taken
    batches = bool(batch) or (pool is not None and pool.answer != "ingest")
    known = v["status_202"] > 0 or (batches and v["status_2xx"] > 0)
    return RunResult(
        generator="wrk", duration_s=max(e["duration_us"] for e in each) / 1e6, connections=connections * processes,
        sent=v["requests"], accepted_packets=v["packets_accepted"],
        accepted_messages=v["messages_202"] if known and not v["messages_unknown"] else None,
        by_status={k: n for k, n in statuses.items() if n},
        errors=sum(kinds.values()), errors_by_kind=kinds, latency_ms=latency, processes=processes,
        retry_after_503=v.get("status_503_retry_after"), latency_corrected_ms=corrected,
        latency_is_raw=raw_ok, packets_per_request=batch or (pool.packets if pool else 1),
    )


class Probe:
    """A light open-loop side load that records latency *per status* (the emitter mixes them).

    Why: the stress scenario must show that 503 answers stay prompt while 202s
    queue up; the emitter's single histogram cannot separate the two. It runs in
    its own process (``ProbeResult.run``) so the emitter's busy loop does not
    delay it and pass for a slow distributor.
    """

    def __init__(self, url: str, rate: float, connections: int = 4) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        self.rate = rate
        self.connections = connections
        self.factory = PacketFactory(SIZES["fixed"], 16, emitter_prefix="probe")
        self.by_status: dict[int, LatencyHistogram] = {}
        self.accepted_packets = self.accepted_messages = self.errors = 0

    async def _one(self, index: int, end: float) -> None:
        interval = self.connections / self.rate
        reader, writer = await asyncio.open_connection(self.host, self.port)
        next_at = time.monotonic() + index * interval / self.connections
        try:
            while next_at < end:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                body, _, _, n = self.factory.next()
                writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (self.path.encode(), self.host.encode(), len(body), body))
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                self.by_status.setdefault(status, LatencyHistogram()).record(time.monotonic() - next_at)
                if status == 202:
                    self.accepted_packets += 1
                    self.accepted_messages += n
                next_at += interval
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            self.errors += 1
        finally:
            writer.close()

    async def run(self, duration: float) -> None:
        end = time.monotonic() + duration
        await asyncio.gather(*(self._one(i, end) for i in range(self.connections)))

    def summary(self) -> dict[str, dict[str, float]]:
        return {str(code): h.summary_ms() for code, h in sorted(self.by_status.items())}


@dataclass
class ProbeResult:
    """What a probe process saw: latency per status and the packets it got accepted."""

    per_status: dict[str, dict[str, float]]
    accepted_packets: int
    accepted_messages: int
    errors: int

    @classmethod
    def run(cls, url: str, rate: float, duration: float) -> "ProbeResult":
        """Entry point of the probe process."""
        probe = Probe(url, rate)
        uvloop.run(probe.run(duration))
        return cls(probe.summary(), probe.accepted_packets, probe.accepted_messages, probe.errors)


def run_emitter(url: str, duration: float, connections: int, sizes: str, rate: float | None = None,
                probe_rate: float = 0.0, batch: int = 0) -> RunResult:
    """The uvloop emitter in this process (open loop when ``rate``), plus an optional per-status probe.

    ``batch``: N packets per request to ``/ingest/batch`` (``rate`` is then requests/s).
    """
    stats = LoadStats()
    spec = LoadSpec(url=url, duration=duration, connections=connections, rate=rate, sizes=SIZES[sizes],
                    emitter_prefix=f"bench-{os.urandom(3).hex()}", batch=batch)

    def sample() -> str:
        snap = stats.snapshot()
        elapsed = snap["elapsed"] or 1e-9
        return (f"sent {snap['sent'] / elapsed:8.0f}/s  202 {snap['accepted_packets'] / elapsed:8.0f}/s  "
                f"503 {snap['by_status'].get(503, 0)}  errors {snap['errors']}")

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # started first and given the same duration: the probe's run overlaps the emitter's
        probe = pool.submit(ProbeResult.run, url, probe_rate, duration) if probe_rate > 0 else None
        with Progress("emitter", sample):
            uvloop.run(run_load(spec, stats))
        probed = probe.result(timeout=duration + 60) if probe is not None else None
    snap = stats.snapshot()
    by_status = {str(code): n for code, n in sorted(snap["by_status"].items())}
    result = RunResult(
        generator="emitter", duration_s=snap["elapsed"], connections=connections, offered_rate=rate,
        sent=snap["sent"], accepted_packets=snap["accepted_packets"], accepted_messages=snap["accepted_messages"],
        by_status=by_status, errors=snap["errors"], latency_ms=stats.latency.summary_ms(),
        service_ms=stats.service.summary_ms(), packets_per_request=batch or 1,
    )
    if probed is not None:
        per_status = probed.per_status
        result.latency_503_ms = per_status.get("503")
        result.accepted_packets += probed.accepted_packets
        result.accepted_messages = (result.accepted_messages or 0) + probed.accepted_messages
        result.errors += probed.errors
        merged = dict(result.by_status)
        for code, figures in per_status.items():
            merged[code] = merged.get(code, 0) + int(figures["count"])
        result.by_status = merged
        result.probe_latency_ms = per_status
    return result
