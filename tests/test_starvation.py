"""Starvation and memory pressure with real processes (issue 15, "Starvation").

* A worker stopped with SIGSTOP for longer than ``worker_timeout`` while load runs: the supervisor SIGKILLs and
  reaps it and starts a replacement, the other workers answer 202 all along, and the replacement replays the
  stopped worker's write-ahead log: every 202 reaches an analyzer.
* A worker whose RSS passes ``max_worker_memory_mb`` with the write-ahead log on is recycled while its analyzer is
  still stalled: it leaves its queue in its log, the replacement replays it, nothing answered 202 is lost.
  (The same recycling without the log, flushed from memory, is ``tests/test_supervisor.py``.)
* Under a real cgroup memory limit far below what the queues may hold, the distributor answers 503 (memory
  pressure) instead of being OOM-killed, delivers everything it accepted once the analyzers are back, and the
  pressure ends (``tests/cgroup_support.py`` makes the cgroup: v2 or v1, whichever this machine lets us write).
* The limit is found from inside a container that has no cgroup namespace of its own (its cgroup directory
  mounted on the hierarchy's mount point), with fake /proc files and with a real mount namespace.

Every packet answered 202 is checked against the packet keys the analyzer processes accepted (duplicates are
reported, never counted as delivery). Waits poll with deadlines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import psutil
import pytest
import uvloop

from cgroup_support import MemoryCgroup, MiB, memory_cgroup
from cluster_helpers import fill, log_text, metric, metrics, sets, show_logs, workers
from distributor.cgroup import CgroupMemory
from distributor.tools.emitter import LoadSpec, LoadStats, run_load
from distributor.tools.localcluster import AnalyzerProcess, LocalCluster, wait_until
from support import Client, packet

__all__ = ["memory_cgroup"]  # the fixture, imported for pytest

# a stalled analyzer stays routable (its /health hangs too): no health check for a minute, sends wait for it
STALL_TOLERANT: dict[str, object] = {
    "health.interval": 60, "health.timeout": 30, "health.max_latency_ms": 0, "health.max_queue_depth": 0,
    "sender.request_timeout": 120, "outlier.consecutive_failures": 1000,
}


def slot(cluster: LocalCluster, number: int) -> dict[str, Any]:
    return next(w for w in workers(cluster) if w["slot"] == number)


# --- load and delivery ---------------------------------------------------------------------------------------------


@dataclass
class Load:
    """The built-in emitter in a thread, recording the key of every packet answered 202.

    With ``rounds``, it runs ``spec.duration``-long rounds (new connections, new packet ids) until ``stop``.
    """

    spec: LoadSpec
    rounds: bool = False
    stats: LoadStats = field(default_factory=LoadStats)
    thread: threading.Thread | None = None
    halt: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Load":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while True:
            uvloop.run(run_load(self.spec, self.stats))
            if not self.rounds or self.halt.is_set():
                return

    def join(self, timeout: float = 60.0) -> LoadStats:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the load did not stop by itself"
        return self.stats

    def stop(self) -> LoadStats:
        self.halt.set()
        return self.join()

    def accepted(self) -> set[tuple[str, str]]:
        return {(emitter, packet_id) for emitter, packet_id, _ in self.stats.accepted}


class PeakRss:
    """The highest RSS of one process, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


class Progress:
    """Samples a load's 202 count every 20 ms, to show answers kept coming over an interval."""

    def __init__(self, stats: LoadStats) -> None:
        self.stats = stats
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.stats.accepted_packets))
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float) -> tuple[int, float]:
        """(202s answered from ``start`` to ``end``, the longest stretch in between without a new one)."""
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        assert len(inside) > 10, "too few samples"
        longest, last_change, last_count = 0.0, inside[0][0], inside[0][1]
        for t, n in inside[1:]:
            if n != last_count:
                last_change, last_count = t, n
            longest = max(longest, t - last_change)
        return inside[-1][1] - inside[0][1], longest


def seen_keys(analyzers: Sequence[AnalyzerProcess]) -> Counter[tuple[str, str]]:
    """Every packet key any analyzer accepted, counted once per analyzer that accepted it."""
    seen: Counter[tuple[str, str]] = Counter()
    for proc in analyzers:
        seen.update(proc.packet_keys())
    return seen


def wait_delivered(cluster: LocalCluster, timeout: float = 60.0) -> None:
    """Until every worker is ready, no queue holds a packet and no write-ahead log (if on) holds one."""
    def settled() -> bool:
        assert cluster.distributor is not None and cluster.distributor.alive(), "the distributor exited"
        queued = sum(a["queue_packets"] for a in cluster.admin("/admin/analyzers")["analyzers"])
        states = workers(cluster)
        logs = [w.get("wal") or {} for w in states]
        return queued == 0 and all(w["state"] == "ready" for w in states) and all(
            not wal or (wal["unacked_packets"] == 0 and wal["replay_remaining_bytes"] == 0) for wal in logs)

    wait_until(settled, timeout, "every packet delivered (queues and write-ahead logs empty)", interval=0.1)


def check_delivered(cluster: LocalCluster, accepted: set[tuple[str, str]]) -> dict[str, int]:
    """Every key answered 202 was accepted by an analyzer; returns the duplicate figures for the report."""
    seen = seen_keys(cluster.analyzer_procs)
    lost = sorted(key for key in accepted if key not in seen)
    assert not lost, f"{len(lost)} of {len(accepted)} packets answered 202 never reached an analyzer: {lost[:5]}"
    view = cluster.admin("/admin/analyzers")["analyzers"]
    assert sum(a["lost_packets"] for a in view) == 0
    return {"answered_202": len(accepted),
            "cross_analyzer_duplicates": sum(n - 1 for n in seen.values() if n > 1),
            "absorbed_duplicates": sum(int(p.stats().get("duplicates", 0)) for p in cluster.analyzer_procs),
            "counted_possible_duplicates": sum(a["possible_duplicates"] for a in view)}


def report(name: str, figures: dict[str, Any]) -> None:
    """Figures for the closing note (pytest -s)."""
    print(f"\n[starvation] {name}: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


def gone(pid: int) -> bool:
    """No such process: exited *and* reaped (a zombie still shows, with status 'zombie')."""
    try:
        psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return True
    return False


# --- 1. a SIGSTOPped worker ----------------------------------------------------------------------------------------


# small, but a worker must also boot within it (three booting at once on two CPUs take about 2 s)
WORKER_TIMEOUT = 4.0
HEARTBEAT_INTERVAL = 0.25  # distributor/workers/ingest_worker.py: a stopped worker's last stamp is up to this old


@pytest.mark.timeout(120)
def test_sigstopped_worker_is_killed_reaped_and_replaced_its_wal_replayed_while_the_others_serve(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    rate = 600.0
    delay = ["--delay-ms", "100"]  # sends take 100 ms: a worker always holds unacknowledged packets
    cluster = make_cluster(analyzers=(("a1", 0.5), ("a2", 0.5)), workers=3,
                           analyzer_args={"a1": delay, "a2": delay},
                           distributor_args=sets({"worker_timeout": WORKER_TIMEOUT, "wal.dir": tmp_path / "wal"}))
    # one round long enough for the stop, the kill and the replacement (a round ends only when its requests are
    # answered: a second round would pause behind those stuck on the stopped worker)
    load = Load(LoadSpec(url=cluster.ingest_url, duration=3 * WORKER_TIMEOUT, connections=24, rate=rate,
                         record_accepted=True, emitters=200)).start()
    progress = Progress(load.stats)
    try:
        wait_until(lambda: load.stats.accepted_packets > 600, 20, "600 packets answered 202")
        victim = wait_until(lambda: (w := slot(cluster, 1))["wal"]["unacked_packets"] > 0 and w, 10,
                            "worker 1 to hold unacknowledged packets")
        process = psutil.Process(victim["pid"])
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        others_before = {w["slot"]: w["accepted_packets"] for w in workers(cluster) if w["slot"] != 1}
        assert wait_until(lambda: process.status() == psutil.STATUS_STOPPED, 2, "the victim to be stopped")

        # the supervisor must SIGKILL it (nothing else ends a stopped process: a TERM would stay pending) and
        # reap it: psutil then finds no process, not even a zombie
        statuses: list[tuple[float, str]] = []

        def victim_gone() -> bool:
            if gone(victim["pid"]):
                return True
            try:
                statuses.append((time.monotonic(), process.status()))
            except psutil.NoSuchProcess:
                return True
            return False

        wait_until(victim_gone, WORKER_TIMEOUT + 10, "the stopped worker to be killed and reaped", interval=0.02)
        gone_at = time.monotonic()
        counts_at_kill = {w["slot"]: w["accepted_packets"] for w in workers(cluster)}  # a slot keeps its counters
        replaced = wait_until(lambda: (w := slot(cluster, 1))["pid"] not in (None, victim["pid"])
                              and w["state"] == "ready" and w, 30, "worker 1's replacement to be ready")
        stats = load.join()
    finally:
        progress.stop()

    # killed for its stall after worker_timeout, not before, and not much later
    stall = gone_at - stopped_at
    assert WORKER_TIMEOUT - HEARTBEAT_INTERVAL <= stall <= WORKER_TIMEOUT + 3, stall
    # stopped until the watchdog's deadline (a SIGKILL wakes it to exit: running, then a zombie), gone soon after
    woke_at = next((t for t, status in statuses if status != psutil.STATUS_STOPPED), gone_at)
    assert woke_at - stopped_at >= WORKER_TIMEOUT - HEARTBEAT_INTERVAL, (woke_at - stopped_at, statuses[-5:])
    assert gone_at - woke_at < 1.0, f"killed but not reaped for {gone_at - woke_at:.2f} s: {statuses[-5:]}"
    log = log_text(cluster)
    assert f"worker 1 (pid {victim['pid']}): event loop stalled for" in log
    assert replaced["restarts"] == 1
    assert all(w["restarts"] == 0 for w in workers(cluster) if w["slot"] != 1), "only the stopped worker restarts"

    # the other workers answered 202 all along: each of them accepted packets while it was stopped, and the 202s
    # kept coming without a pause anywhere near worker_timeout
    assert all(counts_at_kill[s] > others_before[s] for s in others_before), (others_before, counts_at_kill)
    answered, longest_pause = progress.between(stopped_at, gone_at)
    assert answered >= 0.5 * rate * stall, f"only {answered} answers in the {stall:.1f} s the worker was stopped"
    assert longest_pause < WORKER_TIMEOUT / 2, f"no 202 for {longest_pause:.2f} s while one worker was stopped"

    # the replacement serves: new connections spread over the three listening sockets (SO_REUSEPORT)
    fresh: set[tuple[str, str]] = set()
    for i in range(30):
        client = Client(cluster.data_port)
        try:
            assert client.post(packet(emitter="fresh", packet_id=f"fresh-{i}"))[0] == 202
            fresh.add(("fresh", f"fresh-{i}"))
        finally:
            client.close()
    assert slot(cluster, 1)["accepted_packets"] > counts_at_kill[1], "the replacement answered none of 30 connections"

    # its log was replayed by the replacement, and every 202 reached an analyzer
    wait_delivered(cluster)
    successor = slot(cluster, 1)
    assert successor["wal"]["replayed_packets"] > 0, "the stopped worker's unacknowledged packets were not replayed"
    assert successor["wal"]["corrupt_records"] == 0
    figures = check_delivered(cluster, load.accepted() | fresh)
    # duplicates only where a packet was counted as possibly delivered already (sent before the stop, unacknowledged)
    duplicates = figures["cross_analyzer_duplicates"] + figures["absorbed_duplicates"]
    assert duplicates <= successor["wal"]["possible_duplicates"] + figures["counted_possible_duplicates"], figures
    report("SIGSTOP one of three workers", {
        "stopped_for_s": stall, "answers_while_stopped": answered, "longest_pause_s": longest_pause,
        "unacked_before_stop": victim["wal"]["unacked_packets"], "replayed": successor["wal"]["replayed_packets"],
        "wal_possible_duplicates": successor["wal"]["possible_duplicates"], **figures,
        "statuses": stats.by_status, "errors": stats.errors})


# --- 2. memory recycling with the write-ahead log on ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_worker_above_memory_limit_with_wal_is_recycled_and_its_log_replayed_without_loss(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    """The analyzer stays stalled past the recycled worker's graceful_timeout: the worker cannot flush, its queue
    stays in its write-ahead log (not counted as dropped), the replacement replays it, and once the analyzer is back
    every 202 arrives. The queue bound keeps what replay may hold (half of queue.worker_max_bytes) under the limit,
    so the replacement is not recycled in turn."""
    limit_mb = 120
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1, distributor_args=sets({
        **STALL_TOLERANT, "max_worker_memory_mb": limit_mb, "graceful_timeout": 3, "wal.dir": tmp_path / "wal",
        "queue.max_packets": 20_000, "queue.max_bytes": 110 * MiB, "queue.worker_max_bytes": 110 * MiB}))
    fresh = workers(cluster)[0]
    assert fresh["rss_bytes"] < limit_mb * MiB / 2, "a fresh worker is too big for this limit"
    analyzer = cluster.analyzer("a1")
    accepted: list[str] = []
    analyzer.control(stall=True)
    try:
        fill(cluster.data_port, accepted, lambda: workers(cluster)[0]["state"] == "stopping", "m", limit=20_000)
        # still stalled: the old worker gives up its drain at graceful_timeout and exits, its queue in the log
        replaced = wait_until(lambda: (w := workers(cluster)[0])["pid"] not in (None, fresh["pid"])
                              and w["state"] == "ready" and w, 30, "the recycled worker's replacement")
        assert gone(fresh["pid"])
        replacement_rss = PeakRss(replaced["pid"])
        wait_until(lambda: workers(cluster)[0]["wal"]["replayed_packets"] > 0, 15,
                   "the replacement to replay the recycled worker's log")
    finally:
        analyzer.control(stall=False)
    wait_delivered(cluster)
    replacement_peak = replacement_rss.stop()
    log = log_text(cluster)
    assert f"above max_worker_memory_mb={limit_mb}; replacing it gracefully" in log
    assert "below a fresh worker's RSS" not in log
    assert metric(metrics(cluster), "distributor_worker_memory_recycles_total") == 1
    successor = workers(cluster)[0]
    assert successor["pid"] == replaced["pid"] and successor["restarts"] == 1, "the replacement was recycled too"
    assert len(accepted) > 1000
    view = cluster.admin("/admin/analyzers")["analyzers"][0]
    assert view["lost_packets"] == 0 and view["shutdown_dropped_packets"] == 0
    keys = analyzer.packet_keys()
    missing = sorted(set(("big", p) for p in accepted) - set(keys))
    assert not missing, f"{len(missing)} of {len(accepted)} packets answered 202 never arrived: {missing[:5]}"
    report("memory recycle with the WAL on", {
        "answered_202": len(accepted), "replayed": successor["wal"]["replayed_packets"],
        "wal_possible_duplicates": successor["wal"]["possible_duplicates"],
        "absorbed_duplicates": analyzer.stats().get("duplicates", 0), "fresh_rss_mb": fresh["rss_bytes"] / MiB,
        "replacement_peak_rss_mb": replacement_peak / MiB})


# --- 3. a cgroup memory limit --------------------------------------------------------------------------------------


@dataclass
class CgroupCluster(LocalCluster):
    """A LocalCluster whose supervisor enters ``cgroup`` before it starts (its workers are forked inside)."""

    cgroup: MemoryCgroup | None = None

    def distributor_argv(self) -> list[str]:
        assert self.cgroup is not None
        return self.cgroup.wrap(super().distributor_argv())


@pytest.fixture
def cgroup_cluster(memory_cgroup: MemoryCgroup, request: pytest.FixtureRequest) -> Iterator[
        Callable[..., CgroupCluster]]:
    """Factory for one started CgroupCluster; stopped before the cgroup is removed, logs shown on failure."""
    made: list[CgroupCluster] = []

    def factory(**kwargs: Any) -> CgroupCluster:
        cluster = CgroupCluster(cgroup=memory_cgroup, **kwargs)
        made.append(cluster)
        return cluster.start()  # type: ignore[return-value]

    yield factory
    for cluster in made:
        cluster.stop()
    show_logs(request, made)


class MemorySampler:
    """The cgroup's anonymous memory every 20 ms, and its peak."""

    def __init__(self, cgroup: MemoryCgroup) -> None:
        self.cgroup = cgroup
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.cgroup.anonymous())
            except OSError:
                pass
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


LIMIT = 256 * MiB
WATERMARK = 0.85  # overload.memory_watermark's default


@pytest.mark.timeout(150)
def test_memory_pressure_in_a_cgroup_sheds_503_instead_of_an_oom_kill_then_delivers_everything(
        cgroup_cluster: Callable[..., CgroupCluster], memory_cgroup: MemoryCgroup) -> None:
    """Two workers whose queues may hold 1 GiB each, in a cgroup of 256 MiB, with every analyzer stalled. Without
    the memory watermark the queues would grow until the OOM killer takes a worker and every packet in it."""
    cgroup = memory_cgroup
    cgroup.set_limit(LIMIT)
    cluster = cgroup_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=2, distributor_args=sets({
        **STALL_TOLERANT, "graceful_timeout": 10,
        "queue.worker_max_bytes": 1 << 30, "queue.max_bytes": 1 << 30, "queue.max_packets": 1_000_000}))
    assert cluster.distributor is not None
    pool = [cluster.distributor.pid, *(w["pid"] for w in workers(cluster))]
    assert sorted(cgroup.procs()) == sorted(pool), "the supervisor and its workers are not (only) in the cgroup"
    assert metric(metrics(cluster), "distributor_cgroup_memory_limit_bytes") == LIMIT, "the limit is not seen"
    assert "exceeds the cgroup's memory limit" in log_text(cluster)  # the queues alone could take 8 x the limit
    assert cgroup.oom_kills() == 0
    sampler = MemorySampler(cgroup)
    for proc in cluster.analyzer_procs:
        proc.control(stall=True)
    # as fast as the emitter goes (tens of MB/s of queued packets), until told to stop
    load = Load(LoadSpec(url=cluster.ingest_url, duration=1.0, connections=32, sizes=((20, 1.0),),
                         record_accepted=True, emitters=200), rounds=True).start()
    probes_accepted: set[tuple[str, str]] = set()
    try:
        wait_until(lambda: "memory pressure:" in log_text(cluster), 60, "the supervisor to report memory pressure")
        # a packet now is refused for the memory, not queued (and not refused for another reason); the pressure may
        # end for a moment when a worker hands freed memory back, so ask until the answer comes
        probe = Client(cluster.data_port)
        try:
            def refused_for_memory() -> bool:
                key = ("probe", f"probe-{time.monotonic_ns()}")
                status, _, body = probe.post(packet(*key))
                if status == 202:
                    probes_accepted.add(key)
                return status == 503 and body["error"] == "overloaded" and "memory is under pressure" in body["detail"]

            wait_until(refused_for_memory, 10, "a 503 naming the memory pressure")
        finally:
            probe.close()
        # the shedding holds while the load goes on
        shed_before = load.stats.by_status.get(503, 0)
        wait_until(lambda: load.stats.by_status.get(503, 0) > shed_before + 5000, 20, "5000 more packets shed")
    finally:
        stats = load.stop()
        for proc in cluster.analyzer_procs:
            proc.control(stall=False)
    try:
        wait_delivered(cluster, timeout=60)
    finally:
        sampler.stop()

    # shed, not killed: no OOM kill in the cgroup (its usage never even reached the limit: the kernel never had to
    # reclaim), the same processes, no worker death
    assert cgroup.oom_kills() == 0, "the OOM killer took a process of the distributor"
    assert cgroup.limit_hits() == 0, f"the cgroup's usage reached its limit {cgroup.limit_hits()} times " \
                                     f"(peak anonymous memory {sampler.peak / MiB:.0f} MiB of {LIMIT // MiB})"
    assert sorted(cgroup.procs()) == sorted(pool)
    assert all(w["restarts"] == 0 for w in workers(cluster))
    log = log_text(cluster)
    assert "died" not in log and "signal 9" not in log
    assert "memory pressure:" in log
    assert stats.by_status.get(503, 0) > 0 and stats.accepted_packets > 1000
    assert sampler.peak >= WATERMARK * LIMIT, "the load never reached the watermark: this test proved nothing"
    text = metrics(cluster)
    assert metric(text, 'distributor_packets_total{outcome="shed"}') > 0

    # everything answered 202 was delivered; the pressure is over and packets are accepted again
    figures = check_delivered(cluster, load.accepted() | probes_accepted)
    wait_until(lambda: metric(metrics(cluster), "distributor_memory_pressure") == 0, 15,
               "the memory pressure to end once the queues drained")
    after = Client(cluster.data_port)
    try:
        assert after.post(packet(emitter="after", packet_id="after-pressure"))[0] == 202
    finally:
        after.close()
    wait_until(lambda: ("after", "after-pressure") in seen_keys(cluster.analyzer_procs), 15, "the last packet")
    report("cgroup memory limit", {
        "cgroup_version": cgroup.version, "limit_mib": LIMIT // MiB, "peak_anon_mib": sampler.peak / MiB,
        "peak_ratio": sampler.peak / LIMIT, "limit_hits": cgroup.limit_hits(), "oom_kills": cgroup.oom_kills(),
        "pressure_episodes": log.count("memory pressure:"), "statuses": stats.by_status, **figures})


# --- 4. finding the cgroup from inside a container -----------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_the_limit_is_found_where_the_cgroup_is_mounted_in_a_container(tmp_path: Path, version: int) -> None:
    """A container without its own cgroup namespace: /proc/self/cgroup names /docker/abc, and that very directory
    is what is mounted on the hierarchy's mount point (the host's path does not exist inside). The limit used to be
    looked up only under /sys/fs/cgroup/<the path>: not found, no memory-pressure shedding at all."""
    mount_point = tmp_path / ("memory" if version == 1 else "unified")
    mount_point.mkdir()
    limit_file, anon_key = ("memory.limit_in_bytes", "total_rss") if version == 1 else ("memory.max", "anon")
    (mount_point / limit_file).write_text(f"{300 * MiB}\n")
    (mount_point / "memory.stat").write_text(f"cache 4096\n{anon_key} 12345678\n")
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text("4:memory:/docker/abc\n0::/\n" if version == 1 else "0::/docker/abc\n")
    fstype, options = ("cgroup", "rw,memory") if version == 1 else ("cgroup2", "rw")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"31 23 0:28 / {tmp_path} rw,relatime - tmpfs tmpfs rw\n"
                         f"35 31 0:32 /docker/abc {mount_point} rw,relatime - {fstype} {fstype} {options}\n")
    seen = CgroupMemory(proc_cgroup, root=tmp_path, mountinfo=mountinfo)
    assert seen.limit == 300 * MiB
    assert seen.anonymous() == 12345678
    # outside the mount's root: not this cgroup
    proc_cgroup.write_text("4:memory:/other\n" if version == 1 else "0::/other\n")
    assert CgroupMemory(proc_cgroup, root=tmp_path, mountinfo=mountinfo).limit is None


@pytest.mark.timeout(90)
def test_a_distributor_in_a_container_like_mount_namespace_sees_its_cgroup_limit(
        memory_cgroup: MemoryCgroup, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same with real processes: the supervisor enters the cgroup, then a mount namespace of its own in which
    the cgroup's directory is mounted on the hierarchy's mount point, and must report the limit."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    memory_cgroup.set_limit(LIMIT)

    @dataclass
    class ContainerCluster(LocalCluster):
        def distributor_argv(self) -> list[str]:
            return memory_cgroup.wrap_as_container(super().distributor_argv())

    cluster = ContainerCluster(analyzers=(("a1", 1.0),), workers=1, log_dir=tmp_path)
    try:
        cluster.start()
        assert metric(metrics(cluster), "distributor_cgroup_memory_limit_bytes") == LIMIT, \
            "the distributor does not see its cgroup's limit from inside the mount namespace"
        assert metric(metrics(cluster), "distributor_cgroup_memory_ratio") > 0
    finally:
        cluster.stop()
        report_call = getattr(request.node, "rep_call", None)
        if report_call is not None and report_call.failed and cluster.distributor is not None:
            print(f"--- distributor log ---\n{cluster.distributor.log_tail(40)}")
