"""Shared pieces of the write-ahead log's end-to-end tests: real processes, real files, real signals.

* ``Analyzers``: long-lived analyzer processes (a ``LocalCluster`` without its distributor), so their
  packet keys accumulate across any number of distributor crashes;
* ``Distributor``: a distributor started in its own session (its own process group), so a test can
  ``kill -9`` the supervisor and every worker at once with ``os.killpg`` and start it again on the same
  write-ahead log directory and ports;
* loads that record the keys of every packet answered 202, and the checks on them;
* ``wal inspect --json`` through the real CLI, and a reader of the segment files' records.

Every process is stopped by PID (or by the process group of a session this module created); every wait
polls with a deadline (``wait_until``), never a bare sleep.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import psutil
import pytest
import uvloop

from distributor.control.client import http_json
from distributor.tools.emitter import LoadSpec, LoadStats, run_load
from distributor.tools.localcluster import AnalyzerProcess, LocalCluster, wait_until

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = (("a1", 0.4), ("a2", 0.3), ("a3", 0.2), ("a4", 0.1))

# Analyzers that are stalled on purpose hang /health too: these keep the supervisor from marking them
# down (and the senders from giving up on their requests) for the length of a test, so a stalled analyzer
# means "nothing is acknowledged", not "no analyzer can take packets".
PATIENT = [
    "--set", "health.interval=30", "--set", "health.timeout=30", "--set", "health.fall=3",
    "--set", "health.max_latency_ms=0", "--set", "health.max_queue_depth=0",
    "--set", "sender.request_timeout=120", "--set", "outlier.consecutive_failures=1000",
    "--set", "graceful_timeout=5",
]

# The segment format (distributor/wal/format.py), restated here so the tests read the files on their own.
SEGMENT_HEADER_SIZE = 32
RECORD_HEADER = struct.Struct("<IIIIIIQ")  # magic, length, crc, index, messages, flags, accepted ms


def sets(**settings: Any) -> list[str]:
    """``--set key=value`` flags, keys with a dot written as a double underscore: ``wal__dir=...``."""
    out: list[str] = []
    for key, value in settings.items():
        out += ["--set", f"{key.replace('__', '.')}={value}"]
    return out


# ------------------------------------------------------------------------------------------ processes


class Analyzers:
    """Analyzer processes that outlive every distributor of a test."""

    def __init__(self, log_dir: Path, args: Sequence[str] = (), weights: Sequence[tuple[str, float]] = WEIGHTS) -> None:
        self.cluster = LocalCluster(analyzers=weights, start_distributor=False, log_dir=log_dir,
                                    analyzer_args={name: list(args) for name, _ in weights})

    def start(self) -> Analyzers:
        self.cluster.start()
        return self

    @property
    def procs(self) -> list[AnalyzerProcess]:
        return self.cluster.analyzer_procs

    def control(self, **settings: Any) -> None:
        for proc in self.procs:
            proc.control(**settings)

    def keys(self) -> Counter[tuple[str, str]]:
        """Every packet key accepted by any analyzer, counted once per analyzer that accepted it."""
        seen: Counter[tuple[str, str]] = Counter()
        for proc in self.procs:
            seen.update(proc.packet_keys())
        return seen

    def absorbed_duplicates(self) -> int:
        """Packets an analyzer received again and absorbed by its idempotency (same analyzer twice)."""
        return sum(int(proc.stats().get("duplicates", 0)) for proc in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


class Distributor:
    """One distributor (supervisor + workers) in its own session, on fixed ports and a fixed WAL directory."""

    def __init__(self, analyzers: Analyzers, wal_dir: Path | None, workers: int, settings: Sequence[str],
                 log_path: Path) -> None:
        self.cluster = analyzers.cluster
        self.cluster.workers = workers
        self.wal_dir = wal_dir
        self.settings = list(settings)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def port(self) -> int:
        return self.cluster.data_port

    @property
    def ingest_url(self) -> str:
        return self.cluster.ingest_url

    def argv(self) -> list[str]:
        extra = sets(wal__dir=self.wal_dir) if self.wal_dir is not None else []
        return [*self.cluster.distributor_argv(), *extra, *self.settings]

    def spawn(self) -> None:
        """Start the supervisor in a new session: its workers share its process group (pgid = its pid)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        self.starts += 1

    def start(self, timeout: float = 60.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"distributor exited with {self.process.returncode if self.process else None}:\n"
                                   f"{self.log_tail()}")
            workers = self.workers()
            return bool(workers) and all(w["state"] == "ready" for w in workers) \
                and http_json(self.cluster.admin_url + "/ready", timeout=2)[0] == 200

        wait_until(ready, timeout, "distributor workers ready")

    def admin(self, path: str) -> Any:
        return http_json(self.cluster.admin_url + path, timeout=5)[1]

    def workers(self) -> list[dict[str, Any]]:
        return list(self.admin("/admin/workers")["workers"])

    def analyzers_view(self) -> list[dict[str, Any]]:
        return list(self.admin("/admin/analyzers")["analyzers"])

    def group_pids(self) -> list[int]:
        """The supervisor and every process of its group that is still running (workers included)."""
        assert self.process is not None
        pgid = self.process.pid
        pids = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    pids.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        return pids

    def kill_group(self) -> None:
        """SIGKILL to the supervisor and all its workers at once; return once none of them runs."""
        assert self.process is not None
        code = self.process.poll()
        assert code is None, f"the distributor exited by itself ({code}) before the kill:\n{self.log_tail()}"
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        wait_until(lambda: not self.group_pids(), 30, "every process of the killed group to be gone")

    def stop(self) -> None:
        """SIGTERM (a graceful stop), then SIGKILL to whatever of the group is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers of a supervisor that died first, if any
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=30)
        wait_until(lambda: not self.group_pids(), 30, "every process of the distributor to be gone")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # --- figures -------------------------------------------------------------------------------

    def wal_totals(self) -> dict[str, int]:
        """The workers' WAL counters summed (this incarnation's: a new supervisor starts them at zero)."""
        totals: Counter[str] = Counter()
        for worker in self.workers():
            wal = worker.get("wal") or {}
            for key, value in wal.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[key] += int(value)
        return dict(totals)

    def analyzer_totals(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for analyzer in self.analyzers_view():
            for key, value in analyzer.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    totals[key] += value
        return dict(totals)

    def wait_delivered(self, timeout: float = 90.0) -> None:
        """Until no queue holds a packet and every worker's WAL has nothing unacknowledged nor left to replay."""
        def settled() -> bool:
            if not self.alive():
                raise RuntimeError(f"distributor exited:\n{self.log_tail()}")
            workers = self.workers()
            queued = sum(a["queue_packets"] for a in self.analyzers_view())
            wals = [w.get("wal") or {} for w in workers]
            return queued == 0 and all(w["state"] == "ready" for w in workers) and all(
                wal.get("unacked_packets", 1) == 0 and wal.get("replay_remaining_bytes", 1) == 0 for wal in wals)

        wait_until(settled, timeout, "every packet delivered and the write-ahead logs empty", interval=0.1)


# ------------------------------------------------------------------------------------------- loads


@dataclass
class Load:
    """A built-in emitter load in a thread (open loop, records the key of every packet answered 202)."""

    spec: LoadSpec
    stats: LoadStats = field(default_factory=LoadStats)
    thread: threading.Thread | None = None

    def run(self) -> None:
        uvloop.run(run_load(self.spec, self.stats))

    def join(self, timeout: float = 60.0) -> LoadStats:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the load did not stop by itself"
        return self.stats

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()


def start_load(url: str, duration: float, rate: float | None = 800, connections: int = 8,
               sizes: tuple[tuple[int, float], ...] = ((5, 0.5), (20, 0.5)), prefix: str = "agent") -> Load:
    spec = LoadSpec(url=url, duration=duration, connections=connections, rate=rate, sizes=sizes,
                    record_accepted=True, emitter_prefix=prefix, emitters=200)
    load = Load(spec)
    load.thread = threading.Thread(target=load.run, daemon=True)
    load.thread.start()
    return load


def accepted_keys(loads: Iterable[LoadStats]) -> set[tuple[str, str]]:
    return {(emitter, packet_id) for stats in loads for emitter, packet_id, _ in stats.accepted}


def unanswered(loads: Iterable[LoadStats]) -> int:
    """Requests written to a socket whose answer the emitter never saw (connection lost, timed out)."""
    return sum(stats.sent - sum(stats.by_status.values()) for stats in loads)


def missing(accepted: set[tuple[str, str]], seen: Counter[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(key for key in accepted if key not in seen)


def cross_analyzer_duplicates(seen: Counter[tuple[str, str]]) -> int:
    return sum(count - 1 for count in seen.values() if count > 1)


class Client:
    """One keep-alive HTTP/1.1 connection to the data port (the stdlib's http.client)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def post(self, body: bytes) -> tuple[int, dict[str, str], Any]:
        self.conn.request("POST", "/ingest", body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        payload = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            json.loads(payload) if payload else None

    def close(self) -> None:
        self.conn.close()


def packet(emitter: str, packet_id: str, messages: int = 5, pad: int = 0) -> bytes:
    body = {
        "emitter_id": emitter,
        "packet_id": packet_id,
        "messages": [{"timestamp": 1764172800123 + i, "level": "INFO", "message": f"event {i} " + "x" * pad,
                      "metadata": {"service": "wal-e2e"}} for i in range(messages)],
    }
    return json.dumps(body).encode()


# ------------------------------------------------------------------------------------ log directory


def wal_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distributor", "wal", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def inspect(wal_dir: Path) -> dict[str, Any]:
    """``distributor wal inspect DIR --json`` (the operator's tool, read-only)."""
    done = wal_cli("inspect", str(wal_dir), "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@dataclass
class SegmentRecord:
    offset: int
    end: int
    index: int
    key: tuple[str, str]


def read_records(path: Path) -> list[SegmentRecord]:
    """The records of an undamaged segment file, with the packet key each carries."""
    data = path.read_bytes()
    records: list[SegmentRecord] = []
    pos = SEGMENT_HEADER_SIZE
    while pos + RECORD_HEADER.size <= len(data):
        _magic, length, _crc, index, _messages, _flags, _accepted = RECORD_HEADER.unpack_from(data, pos)
        end = pos + RECORD_HEADER.size + length
        if end > len(data):
            break
        payload = json.loads(data[pos + RECORD_HEADER.size:end])
        records.append(SegmentRecord(pos, end, index, (payload["emitter_id"], payload["packet_id"])))
        pos = end
    return records


def report(name: str, figures: dict[str, Any]) -> None:
    """Figures for the closing note; shown with pytest -s."""
    print(f"\n[wal-e2e] {name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in figures.items()))


# ------------------------------------------------------------------------------------------ harness


class Harness:
    """What one test started: analyzers and distributors, all stopped (by PID / own process group) at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.analyzer_sets: list[Analyzers] = []
        self.distributors: list[Distributor] = []

    def analyzers(self, *args: str) -> Analyzers:
        log_dir = self.tmp / f"analyzers-{len(self.analyzer_sets)}"
        log_dir.mkdir()
        analyzers = Analyzers(log_dir, args)
        self.analyzer_sets.append(analyzers)
        return analyzers.start()

    def distributor(self, analyzers: Analyzers, wal_dir: Path | None, workers: int,
                    settings: Sequence[str]) -> Distributor:
        distributor = Distributor(analyzers, wal_dir, workers, settings,
                                  self.tmp / f"distributor-{len(self.distributors)}.log")
        self.distributors.append(distributor)
        return distributor

    def close(self, show_logs: bool) -> None:
        errors: list[BaseException] = []
        for distributor in self.distributors:
            try:
                distributor.stop()
            except BaseException as exc:  # stop the rest anyway
                errors.append(exc)
        for analyzers in self.analyzer_sets:
            analyzers.stop()
        if show_logs:
            for distributor in self.distributors:
                print(f"--- {distributor.log_path.name} ---\n{distributor.log_tail(80)}")
            for analyzers in self.analyzer_sets:
                for proc in analyzers.procs:
                    print(f"--- analyzer {proc.name} ---\n{proc.log_tail(20)}")
        if errors:
            raise errors[0]


@pytest.fixture
def harness(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    made = Harness(tmp_path)
    try:
        yield made
    finally:
        report_call = getattr(request.node, "rep_call", None)
        made.close(show_logs=report_call is not None and report_call.failed)
