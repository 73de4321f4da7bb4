"""The supervisor under faults (issue 17): recycling, reloads, the watchdog, signals, the state file, namespaces.

Real processes, real signals and real sockets on 127.0.0.1. Every test names the item of issue 17 it
covers and fails on the code before the fix (commit dcd8e1c); the two under "defects found while writing
these tests" fail before their later fix. Settings a SIGHUP must change live in a TOML file in ``tmp_path``
(``ConfigFileCluster``): command-line flags would win over the file at every reload.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import psutil
import pytest

from cluster_helpers import (
    STALL_TOLERANT,
    ConfigFileCluster,
    fill,
    log_text,
    metric,
    metrics,
    sets,
    sighup_and_wait,
    workers,
)
from distributor.control.client import http_json
from distributor.shared_table import NAME_PREFIX, SHM_DIR
from distributor.tools.localcluster import LocalCluster, free_ports, wait_until
from http_sinks import ThreadedServer
from support import Client, packet

MiB = 1 << 20
TOKEN = "test-admin-token"
# the supervisor samples every worker's RSS once a second (supervisor.MEMORY_CHECK_INTERVAL)
MEMORY_CHECK_INTERVAL = 1.0


# --- processes started outside LocalCluster ---------------------------------------------------------------------


class Spawned:
    """Processes a test starts itself; at teardown each is stopped by pid (TERM, then KILL), and so are any of
    its descendants still alive (workers of a supervisor that had to be killed)."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.descendants: dict[int, psutil.Process] = {}

    def start(self, argv: list[str], log_path: Path, new_session: bool = False,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=new_session, env=env)
        self.procs.append((proc, log_path))
        return proc

    def remember_descendants(self) -> None:
        for proc, _ in self.procs:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self.descendants.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def stop_all(self) -> None:
        self.remember_descendants()
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for child in self.descendants.values():
            try:
                child.kill()  # psutil checks the pid still belongs to the process it saw
            except psutil.Error:
                pass


@pytest.fixture
def spawned(request: pytest.FixtureRequest) -> Iterator[Spawned]:
    tracker = Spawned()
    yield tracker
    tracker.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for _, log_path in tracker.procs:
            print(f"--- {log_path.name} ---\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-60:]))


def distributor_argv(data_port: int, admin_port: int, analyzers: Sequence[tuple[str, str]], workers: int = 2,
                     extra: Sequence[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "distributor", "serve", "--listen", f"127.0.0.1:{data_port}",
            "--admin-listen", f"127.0.0.1:{admin_port}", "--workers", str(workers)]
    for name, url in analyzers:
        argv += ["--analyzer", f"{name}={url}@1"]
    return argv + list(extra)


# --- a fake analyzer for /health bodies a real one never sends ----------------------------------------------------


class FakeAnalyzer:
    """Answers ``GET /health`` with a fixed JSON body and 200 to every ingest; counts the health checks."""

    def __init__(self, health_body: object) -> None:
        self.health_body = json.dumps(health_body).encode()
        self.health_requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    fake.health_requests += 1
                    self.answer(fake.health_body)
                else:
                    self.answer(b'{"error": "not_found"}', 404)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer(b'{"accepted": 1, "duplicates": 0}')

            def answer(self, body: bytes, status: int = 200) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadedServer(Handler)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake_analyzer() -> Iterator[Callable[[object], FakeAnalyzer]]:
    fakes: list[FakeAnalyzer] = []

    def factory(health_body: object) -> FakeAnalyzer:
        fakes.append(FakeAnalyzer(health_body))
        return fakes[-1]

    yield factory
    for fake in fakes:
        fake.close()


# --- observing a distributor ---------------------------------------------------------------------------------------


def analyzers(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in cluster.admin("/admin/analyzers")["analyzers"]}


def generation(cluster: LocalCluster) -> int:
    return int(cluster.admin("/admin/analyzers")["generation"])


def log_records(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def dropped_at_shutdown(text: str) -> int:
    """Packets the workers logged as not delivered by their shutdown deadline."""
    return sum(int(r.get("packets", 0)) for r in log_records(text) if r.get("event") == "dropped_shutdown")


def hold_for(seconds: float, predicate: Callable[[], bool], what: str) -> None:
    """Observe for ``seconds`` that ``predicate`` stays true (a bounded observation window, not a sync point)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), what
        time.sleep(0.05)


def segments_of(pid: int) -> list[Path]:
    return list(SHM_DIR.glob(f"{NAME_PREFIX}{pid}-*"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def supervisor_of(cluster: LocalCluster) -> psutil.Process:
    assert cluster.distributor is not None
    return psutil.Process(cluster.distributor.pid)


def new_child(supervisor: psutil.Process, known: set[int], cluster: LocalCluster | None = None) -> psutil.Process:
    """The first child of the supervisor not in ``known``, caught within milliseconds of its spawn."""

    def find() -> psutil.Process | None:
        if cluster is not None and cluster.distributor is not None and not cluster.distributor.alive():
            raise AssertionError(f"the supervisor exited with {cluster.distributor.process.returncode}"  # type: ignore[union-attr]
                                 f":\n{cluster.distributor.log_tail(20)}")
        return next((c for c in supervisor.children() if c.pid not in known), None)

    child: psutil.Process = wait_until(find, 15, "a new worker process", interval=0.001)
    return child


def post_accepted(client: Client, body: bytes) -> None:
    """POST until 202. A CPU-starved worker may answer 503 + Retry-After (its event loop lags: admission refuses
    before parsing); nothing was queued then, so the same packet goes again."""
    for _ in range(300):
        status = client.post(body)[0]
        if status == 202:
            return
        assert status == 503, status
        time.sleep(0.05)  # pacing the retry, not a synchronisation
    raise AssertionError("still refused with 503 after 300 tries")


def check_delivered(cluster: LocalCluster, name: str, accepted: list[str], emitter: str = "big") -> None:
    """Everything answered 202 arrived at ``name`` once (its own key list), nothing lost or dropped."""
    analyzer = cluster.analyzer(name)
    wait_until(lambda: analyzer.stats()["packets"] >= len(accepted), 60, "every accepted packet to arrive")
    keys = analyzer.packet_keys()
    assert sorted(keys) == sorted((emitter, packet_id) for packet_id in accepted)
    view = analyzers(cluster)[name]
    assert view["lost_packets"] == 0 and view["shutdown_dropped_packets"] == 0


class Connector(threading.Thread):
    """Opens a new connection to the data port every few milliseconds and asks ``GET /healthz``; a refused or
    reset connection, or one that gives no HTTP answer, is a failure (a busy worker may answer 503: the port is
    open)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.attempts = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.attempts += 1
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    reply = sock.recv(64)
                    if not reply.startswith(b"HTTP/1.1 "):
                        self.failures.append(f"answer {reply[:40]!r}")
            except OSError as exc:
                self.failures.append(repr(exc))
            self.halt.wait(0.005)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


class WorkerWatcher(threading.Thread):
    """Polls /admin/workers and remembers the most workers ever seen stopping and the fewest ready at once."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.most_stopping = 0
        self.fewest_ready = len(workers(cluster))
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                states = [w["state"] for w in workers(self.cluster)]
            except (OSError, ValueError):
                continue
            self.samples += 1
            self.most_stopping = max(self.most_stopping, states.count("stopping"))
            self.fewest_ready = min(self.fewest_ready, states.count("ready"))
            self.halt.wait(0.02)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


# --- item 1: memory recycling -------------------------------------------------------------------------------------


def test_memory_recycling_replaces_one_worker_at_a_time_and_the_port_never_closes(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """Issue 17 item 1: two workers above max_worker_memory_mb are replaced one after the other."""
    limit_mb = 120
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2, distributor_args=sets({
        "max_worker_memory_mb": limit_mb, "graceful_timeout": 60, **STALL_TOLERANT,
        "queue.max_packets": 20_000, "queue.max_bytes": 200 * MiB}))
    assert all(w["rss_bytes"] < limit_mb * MiB / 2 for w in workers(cluster)), "a fresh worker is too big here"
    analyzer = cluster.analyzer("a1")
    accepted: list[str] = []
    connector, watcher = Connector(cluster.data_port), WorkerWatcher(cluster)
    analyzer.control(stall=True)  # queues grow: every packet waits in its worker
    try:
        connector.start()
        watcher.start()

        def one_replaced_while_the_other_is_well_over_the_limit() -> bool:
            """Well over: its RSS stays above the limit after its queue drained, so it is recycled next."""
            states = workers(cluster)
            stopping = [w for w in states if w["state"] == "stopping"]
            over = [w for w in states if w["state"] == "ready" and w.get("rss_bytes", 0) > (limit_mb + 40) * MiB]
            return len(stopping) > 1 or (len(stopping) == 1 and len(over) == 1)

        fill(cluster.data_port, accepted, one_replaced_while_the_other_is_well_over_the_limit, "m")
        # both are above the limit; the second must wait while the first is replaced (three memory checks)
        hold_for(3 * MEMORY_CHECK_INTERVAL, lambda: [w["state"] for w in workers(cluster)].count("stopping") == 1,
                 "a second worker was told to stop while the first was still being replaced")
    finally:
        analyzer.control(stall=False)
    wait_until(lambda: all(w["restarts"] == 1 and w["state"] == "ready" for w in workers(cluster)), 60,
               "both workers to be recycled, one after the other")
    connector.stop()
    watcher.stop()
    assert connector.attempts > 100 and watcher.samples > 20
    assert connector.failures == [], f"{len(connector.failures)} of {connector.attempts} connections failed: " \
                                     f"{connector.failures[:5]}"
    assert watcher.most_stopping == 1 and watcher.fewest_ready >= 1
    assert metric(metrics(cluster), "distributor_worker_memory_recycles_total") == 2
    assert log_text(cluster).count(f"above max_worker_memory_mb={limit_mb}; replacing it gracefully") == 2
    check_delivered(cluster, "a1", accepted)


def test_memory_limit_below_a_fresh_worker_warns_and_recycles_nothing(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """Issue 17 item 1: a limit no worker can ever meet is reported once per worker, not obeyed in a loop."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2, distributor_args=sets({"max_worker_memory_mb": 1}))
    warning = "max_worker_memory_mb=1 is below a fresh worker's RSS"
    wait_until(lambda: log_text(cluster).count(warning) == 2, 15, "a warning for each worker")
    hold_for(3 * MEMORY_CHECK_INTERVAL, lambda: all(w["restarts"] == 0 and w["state"] == "ready"
                                                    for w in workers(cluster)), "a worker was recycled")
    assert metric(metrics(cluster), "distributor_worker_memory_recycles_total") == 0
    assert "replacing it gracefully" not in log_text(cluster)


# --- item 3: a malformed /health body -----------------------------------------------------------------------------


BAD_HEALTH_BODIES: dict[str, object] = {
    "bad-depth": {"status": "ok", "queue_depth": "lots"},
    "bad-inflight": {"status": "ok", "inflight": None},
    "bad-latency": {"status": "ok", "latency_ms": "fast"},
}


def test_malformed_health_body_fails_only_that_analyzers_check(
    make_cluster: Callable[..., LocalCluster], fake_analyzer: Callable[[object], FakeAnalyzer],
) -> None:
    """Issue 17 item 3: the checker keeps running: a killed analyzer goes down, an ejected one is readmitted."""
    fakes = {name: fake_analyzer(body) for name, body in BAD_HEALTH_BODIES.items()}
    flags = [flag for name, fake in fakes.items() for flag in ("--analyzer", f"{name}={fake.url}@1")]
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1, distributor_args=[*flags, *sets({
        "health.interval": 0.5, "health.timeout": 0.5, "outlier.consecutive_failures": 2,
        "outlier.base_ejection_time": 1, "outlier.retry_budget": 1})])
    wait_until(lambda: all(analyzers(cluster)[name]["state"] == "down" for name in fakes), 15,
               "the analyzers with malformed /health bodies to be marked down")
    for name in fakes:
        assert "bad /health body" in analyzers(cluster)[name]["last_check"]
    # an ejected analyzer is readmitted by good checks
    a2 = cluster.analyzer("a2")
    a2.control(error_rate=1.0)
    client = Client(cluster.data_port)
    sent = 0

    def ejected() -> bool:
        nonlocal sent
        for _ in range(10):
            post_accepted(client, packet(packet_id=f"e-{sent}"))
            sent += 1
        return bool(analyzers(cluster)["a2"]["state"] == "ejected")

    wait_until(ejected, 20, "a2 to be ejected after failed sends")
    client.close()
    a2.control(error_rate=0.0)
    wait_until(lambda: (a := analyzers(cluster)["a2"])["state"] in ("warming", "active") and a["admissions"] >= 1,
               20, "the ejected a2 to be readmitted by its health checks")
    # a killed analyzer is marked down
    a1 = cluster.analyzer("a1")
    assert a1.process is not None
    a1.process.kill()
    a1.process.wait()
    wait_until(lambda: analyzers(cluster)["a1"]["state"] == "down", 15, "the killed a1 to be marked down")
    assert all(fake.health_requests >= 5 for fake in fakes.values())
    assert "health checker ended" not in log_text(cluster)


# --- item 4: a rejected reload changes nothing ---------------------------------------------------------------------


def test_reload_with_65_analyzers_is_rejected_whole(file_cluster: Callable[..., ConfigFileCluster]) -> None:
    """Issue 17 item 4: no analyzer of a rejected file goes live; the old ones keep all the traffic."""
    cluster = file_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)))
    before = generation(cluster)
    cluster.write(extra_analyzers=[(f"x{i}", f"http://127.0.0.1:{port}", 1.0) for i, port in enumerate(free_ports(63))])
    line = sighup_and_wait(cluster, "reload rejected")
    assert sorted(analyzers(cluster)) == ["a1", "a2"]
    assert generation(cluster) == before
    assert "got 65" in line
    client = Client(cluster.data_port)
    for i in range(100):
        post_accepted(client, packet(packet_id=f"r-{i}"))
    client.close()
    cluster.wait_drained()
    assert sum(t["packets"] for t in cluster.analyzer_totals().values()) == 100
    assert sum(a["routed_packets"] for a in analyzers(cluster).values()) == 100


def test_reload_rejected_for_a_corrupt_state_file_keeps_the_running_health_settings(
    file_cluster: Callable[..., ConfigFileCluster], fake_analyzer: Callable[[object], FakeAnalyzer], tmp_path: Path,
) -> None:
    """Issue 17 item 4: the new file's health thresholds would mark this analyzer saturated: they must not apply."""
    busy = fake_analyzer({"status": "ok", "inflight": 1, "queue_depth": 100, "latency_ms": {"p99": 1.0}})
    state = tmp_path / "state.json"
    cluster = file_cluster(analyzers=(), extra_analyzers=[("busy", busy.url, 1.0)], settings={
        "health.interval": 0.5, "health.timeout": 0.5, "health.max_queue_depth": 0, "admin.state_file": str(state)})
    assert analyzers(cluster)["busy"]["state"] == "active"
    state.write_text('{"weights": {"busy": ')
    cluster.write({"health.max_queue_depth": 10, "health.saturated_weight": 0.5})
    line = sighup_and_wait(cluster, "reload rejected")
    assert "state_file" in line
    checks = busy.health_requests
    wait_until(lambda: busy.health_requests >= checks + 5, 15, "five more health checks")
    view = analyzers(cluster)["busy"]
    assert view["state"] == "active" and view["effective_weight"] == 1.0, view


# --- item 5: the watchdog ----------------------------------------------------------------------------------------


def test_watchdog_replaces_a_replacement_stopped_while_it_boots(make_cluster: Callable[..., LocalCluster]) -> None:
    """Issue 17 item 5: a booting worker that never gets ready is killed after worker_timeout and replaced."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2,
                           distributor_args=sets({"worker_timeout": 5, "graceful_timeout": 5}))
    supervisor = supervisor_of(cluster)
    stopped: psutil.Process | None = None
    try:
        for _attempt in range(3):
            victim = workers(cluster)[0]["pid"]
            known = {c.pid for c in supervisor.children()}
            os.kill(victim, signal.SIGKILL)
            stopped = new_child(supervisor, known, cluster)
            stopped.suspend()  # SIGSTOP while it imports
            slot = workers(cluster)[0]
            if slot["state"] != "ready":
                break
            stopped.resume()  # too late: it was ready already; try again
            wait_until(lambda: workers(cluster)[0]["state"] == "ready", 15, "worker 0 ready again")
        else:
            pytest.fail("never caught a replacement before it was ready")
        assert slot["pid"] in (None, stopped.pid) and slot["state"] in ("free", "booting"), slot
        replaced = wait_until(lambda: (w := workers(cluster)[0])["state"] == "ready"
                              and w["pid"] not in (victim, stopped.pid) and w, 30,
                              "the stopped booting worker to be replaced")
        assert not alive(stopped.pid)
        assert replaced["restarts"] >= 2
        assert "not ready within worker_timeout=5s" in log_text(cluster)
    finally:
        if stopped is not None and alive(stopped.pid):
            stopped.kill()


def test_watchdog_kills_a_stopped_worker_being_rolled_after_its_graceful_timeout(
    file_cluster: Callable[..., ConfigFileCluster],
) -> None:
    """Issue 17 item 5: a worker asked to stop (here: rolled by a reload) that is SIGSTOPped is killed after its
    graceful_timeout plus the margin, and the roll goes on."""
    cluster = file_cluster(workers=2, settings={"graceful_timeout": 2, "worker_timeout": 60,
                                                "ingest.retry_after": 1.0})
    frozen = workers(cluster)[0]["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        cluster.write({"ingest.retry_after": 2.0})  # a worker setting: the reload rolls the workers
        assert cluster.distributor is not None
        cluster.distributor.signal(signal.SIGHUP)
        wait_until(lambda: all(w["restarts"] == 1 and w["state"] == "ready" for w in workers(cluster)), 30,
                   "the roll to replace the stopped worker and then the other")
        assert not alive(frozen)
        assert "did not stop within graceful_timeout" in log_text(cluster)
    finally:
        if alive(frozen):
            os.kill(frozen, signal.SIGKILL)


# --- item 6: lowering graceful_timeout by reload --------------------------------------------------------------------


def test_lowered_graceful_timeout_never_kills_a_worker_within_its_own(
    file_cluster: Callable[..., ConfigFileCluster],
) -> None:
    """Issue 17 item 6: workers started with graceful_timeout=10 keep it after a reload to 1; a SIGTERM then lets
    them drain and count what they drop instead of being killed at 1 + 5 s."""
    cluster = file_cluster(workers=2, settings={"graceful_timeout": 10, **STALL_TOLERANT})
    cluster.analyzer("a1").control(stall=True)
    client = Client(cluster.data_port)
    for i in range(40):
        post_accepted(client, packet(packet_id=f"g-{i}"))
    client.close()
    cluster.write({"graceful_timeout": 1})
    sighup_and_wait(cluster, "reloaded: ")
    assert cluster.distributor is not None and cluster.distributor.process is not None
    cluster.distributor.signal(signal.SIGTERM)
    assert cluster.distributor.process.wait(60) == 0
    text = log_text(cluster)
    assert "did not stop in time; killing" not in text
    assert "did not stop within graceful_timeout" not in text
    assert dropped_at_shutdown(text) == 40


def test_sigterm_during_a_roll_lets_the_worker_being_rolled_flush_its_queues(
    file_cluster: Callable[..., ConfigFileCluster],
) -> None:
    """Issue 17 items 6 and 18: one SIGTERM is a graceful stop for every worker, the one a reload is rolling too
    (it has its SIGTERM already: a second one would hurry it into dropping its queues)."""
    cluster = file_cluster(workers=2, settings={"graceful_timeout": 30, **STALL_TOLERANT, "ingest.retry_after": 1.0})
    analyzer = cluster.analyzer("a1")
    assert cluster.distributor is not None and cluster.distributor.process is not None
    analyzer.control(stall=True)
    try:
        accepted = []
        for i in range(40):  # a new connection each: both workers hold packets
            client = Client(cluster.data_port)
            post_accepted(client, packet(packet_id=f"roll-{i}"))
            accepted.append(f"roll-{i}")
            client.close()
        wait_until(lambda: all(w["queued_packets"] > 0 for w in workers(cluster)), 5, "both workers to hold packets")
        cluster.write({"ingest.retry_after": 2.0})  # the reload rolls the workers: worker 0 drains first
        cluster.distributor.signal(signal.SIGHUP)
        wait_until(lambda: [w["state"] for w in workers(cluster)] == ["stopping", "ready"], 15,
                   "the roll to stop worker 0")
        cluster.distributor.signal(signal.SIGTERM)
        wait_until(lambda: all(w["state"] != "ready" for w in workers(cluster)), 15, "every worker stopping")
    finally:
        analyzer.control(stall=False)
    assert cluster.distributor.process.wait(60) == 0
    assert dropped_at_shutdown(log_text(cluster)) == 0
    assert sorted(pid for _, pid in analyzer.packet_keys()) == sorted(accepted)


# --- item 7: reloaded worker settings reach every worker ----------------------------------------------------------------


def test_reload_adding_a_rate_limit_rolls_every_worker_and_names_restart_only_keys(
    file_cluster: Callable[..., ConfigFileCluster],
) -> None:
    """Issue 17 item 7."""
    cluster = file_cluster(workers=2)
    cluster.write({"rate_limit.rate": 1, "rate_limit.burst": 5})
    assert cluster.distributor is not None
    cluster.distributor.signal(signal.SIGHUP)
    wait_until(lambda: all(w["restarts"] == 1 and w["state"] == "ready" for w in workers(cluster)), 30,
               "the reload to roll both workers")
    rolled = next(r for r in log_records(log_text(cluster)) if r.get("event") == "reload_rolling")
    assert "rate_limit.rate" in rolled["msg"] and "rate_limit.burst" in rolled["msg"]
    statuses: list[int] = []
    for i in range(100):  # a new connection each: both workers see the emitter
        client = Client(cluster.data_port)
        statuses.append(client.post(packet(emitter="noisy", packet_id=f"n-{i}"))[0])
        client.close()
    assert statuses.count(429) >= 50
    wait_until(lambda: all(w["rate_limited_packets"] > 0 for w in workers(cluster)), 5,
               "both workers to count 429s")
    # keys that need a restart are named, and nothing of them changes now
    data_port, admin_port = free_ports(2)
    line = sighup_and_wait_after_write(cluster, {"listen": f"127.0.0.1:{data_port}",
                                                 "admin_listen": f"127.0.0.1:{admin_port}", "workers": 3},
                                       "at the next start only")
    for key in ("workers", "listen", "admin_listen"):
        assert key in line
    assert len(workers(cluster)) == 2
    client = Client(cluster.data_port)
    post_accepted(client, packet(emitter="quiet", packet_id="q-1"))
    client.close()


def sighup_and_wait_after_write(cluster: ConfigFileCluster, changes: dict[str, object], text: str) -> str:
    cluster.write(changes)
    return sighup_and_wait(cluster, text)


# --- item 8: an honest /ready ------------------------------------------------------------------------------------


def test_ready_is_503_while_every_worker_is_stopping(make_cluster: Callable[..., LocalCluster]) -> None:
    """Issue 17 item 8."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2,
                           distributor_args=sets({"graceful_timeout": 60, **STALL_TOLERANT}))
    analyzer = cluster.analyzer("a1")
    analyzer.control(stall=True)
    try:
        client = Client(cluster.data_port)
        for i in range(20):
            post_accepted(client, packet(packet_id=f"s-{i}"))
        client.close()
        assert http_json(cluster.admin_url + "/ready")[0] == 200
        assert cluster.distributor is not None and cluster.distributor.process is not None
        cluster.distributor.signal(signal.SIGTERM)
        wait_until(lambda: all(w["state"] == "stopping" for w in workers(cluster)), 15, "every worker stopping")
        status, body = http_json(cluster.admin_url + "/ready")
        assert status == 503 and body["workers_ready"] == 0, body
    finally:
        analyzer.control(stall=False)
    assert cluster.distributor.process.wait(60) == 0


# --- item 9: a second distributor on the same port ----------------------------------------------------------------


def test_second_distributor_on_the_same_data_port_exits_2(
    make_cluster: Callable[..., LocalCluster], spawned: Spawned, tmp_path: Path,
) -> None:
    """Issue 17 item 9."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1)
    (admin_port,) = free_ports(1)
    argv = distributor_argv(cluster.data_port, admin_port, [("a1", cluster.analyzer("a1").url)], workers=1)
    log_path = tmp_path / "second.log"
    second = spawned.start(argv, log_path)
    try:
        code = second.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("a second distributor started on a data port in use")
    output = log_path.read_text()
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, output  # one line: the port is taken, and what to do about it
    assert str(cluster.data_port) in lines[0] and "allow_shared_port" in lines[0] and "Traceback" not in output
    # deliberate sharing
    shared = spawned.start(argv + sets({"allow_shared_port": True}), tmp_path / "shared.log")
    wait_until(lambda: shared.poll() is None and http_json(f"http://127.0.0.1:{admin_port}/ready")[0] == 200, 30,
               "a deliberately shared second distributor to be ready")
    shared.send_signal(signal.SIGTERM)
    assert shared.wait(30) == 0


# --- item 10: counters never go back ------------------------------------------------------------------------------


def test_connection_and_cpu_counters_never_decrease_across_a_respawn(make_cluster: Callable[..., LocalCluster]) -> None:
    """Issue 17 item 10."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1)
    for i in range(150):
        client = Client(cluster.data_port)
        post_accepted(client, packet(packet_id=f"c-{i}"))
        client.close()
    client = Client(cluster.data_port)
    sent = 0

    def busy() -> bool:  # until the worker used far more CPU than a fresh one (about 0.2 s to boot)
        nonlocal sent
        for _ in range(200):
            assert client.post(packet(packet_id=f"cpu-{sent}", messages=20))[0] in (202, 503)
            sent += 1
        return bool(workers(cluster)[0]["cpu_seconds"] > 1.5)

    wait_until(busy, 60, "the worker to use 1.5 s of CPU")
    client.close()
    connections = 'distributor_http_events_total{event="connections_total"}'
    cpu = 'distributor_worker_cpu_seconds_total{worker="0"}'
    before = metrics(cluster)
    victim = workers(cluster)[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (w := workers(cluster)[0])["state"] == "ready" and w["pid"] != victim, 15,
               "worker 0 to be replaced")
    after = metrics(cluster)
    assert metric(before, connections) >= 151
    assert metric(after, connections) >= metric(before, connections)
    assert metric(after, cpu) >= metric(before, cpu)
    client = Client(cluster.data_port)
    post_accepted(client, packet(packet_id="after"))
    client.close()
    wait_until(lambda: metric(metrics(cluster), connections) > metric(before, connections), 5,
               "a new connection counted on top")


# --- item 11: stale-segment cleanup across pid namespaces ----------------------------------------------------------------


def test_stale_segment_cleanup_spares_a_live_supervisor_in_another_pid_namespace(
    make_cluster: Callable[..., LocalCluster], spawned: Spawned, tmp_path: Path,
) -> None:
    """Issue 17 item 11: distributor A runs in its own pid namespace (as in a sidecar container sharing /dev/shm)
    under a pid that does not exist in ours; distributor B starting here must not take A's segment for stale."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    rng = random.Random()
    ns_pid = next(p for p in (rng.randrange(5_000, 30_000) for _ in range(1000)) if not psutil.pid_exists(p))
    data_port, admin_port, dead_port = free_ports(3)
    serve = " ".join(distributor_argv(data_port, admin_port, [("a1", f"http://127.0.0.1:{dead_port}")]))
    # sh is pid 1 of the namespace; the supervisor it forks gets ns_pid
    script = f"echo {ns_pid - 1} > /proc/sys/kernel/ns_last_pid && {serve}; exit $?"
    log_path = tmp_path / "namespaced.log"
    unshared = spawned.start(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", script],
                             log_path)
    admin_url = f"http://127.0.0.1:{admin_port}"

    def a_ready() -> bool:
        if unshared.poll() is not None:
            pytest.skip(f"cannot run a distributor in a new pid namespace (needs root): {log_path.read_text()[-500:]}")
        view = http_json(admin_url + "/admin/workers")[1]["workers"]
        return all(w["state"] == "ready" for w in view)

    wait_until(a_ready, 30, "distributor A in its own pid namespace")
    assert not psutil.pid_exists(ns_pid)
    (segment,) = segments_of(ns_pid)
    spawned.remember_descendants()
    supervisor_a = next(p for p in psutil.Process(unshared.pid).children(recursive=True)
                        if "serve" in p.cmdline())
    # B starts here and cleans up stale segments
    make_cluster(analyzers=(("b1", 1.0),), workers=1)
    assert segment.exists(), "B removed the segment of the live distributor A"
    # A can still respawn a worker (the worker attaches to its segment by name)
    before = http_json(admin_url + "/admin/workers")[1]["workers"][0]
    victim = next(p for p in supervisor_a.children() if "--slot" in p.cmdline() and p.cmdline()[-3] == "0")
    victim.kill()
    wait_until(lambda: (w := http_json(admin_url + "/admin/workers")[1]["workers"][0])["state"] == "ready"
               and w["restarts"] == 1 and w["pid"] != before["pid"], 20, "A to respawn its worker 0")
    assert supervisor_a.is_running() and segment.exists()
    supervisor_a.terminate()
    assert unshared.wait(30) == 0
    assert not segment.exists()


# --- item 13: an unwritable state file --------------------------------------------------------------------------------


def admin_call(cluster: LocalCluster, method: str, path: str, body: object) -> tuple[int, str]:
    request = urllib.request.Request(cluster.admin_url + path, data=json.dumps(body).encode(), method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_with_state_dir(make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> tuple[LocalCluster, Path]:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1, distributor_args=sets({
        "admin.token": TOKEN, "admin.state_file": str(state_dir / "state.json")}))
    shutil.rmtree(state_dir)  # as root, chmod would not stop the writes
    return cluster, state_dir


def test_admin_change_that_cannot_be_saved_is_refused_and_not_applied(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path,
) -> None:
    """Issue 17 item 13."""
    cluster, state_dir = start_with_state_dir(make_cluster, tmp_path)
    before = generation(cluster)
    status, body = admin_call(cluster, "PUT", "/admin/analyzers/a1", {"weight": 3})
    assert 400 <= status < 600
    assert {name: a["weight"] for name, a in analyzers(cluster).items()} == {"a1": 1.0, "a2": 1.0}
    assert "state_file" in body, body  # says why
    assert generation(cluster) == before
    assert not state_dir.exists()
    assert "admin change: weight" not in log_text(cluster)  # not audited as a change


# --- item 16: no-op reloads ------------------------------------------------------------------------------------------


def test_unchanged_reloads_start_no_routing_epoch(file_cluster: Callable[..., ConfigFileCluster]) -> None:
    """Issue 17 item 16: 50 SIGHUPs of an unchanged file, with traffic in between: one epoch, an exact split."""
    weights = (("a1", 0.6), ("a2", 0.3), ("a3", 0.1))
    cluster = file_cluster(analyzers=weights)
    before = generation(cluster)
    rng = random.Random(16)
    client = Client(cluster.data_port)
    largest = 0
    for i in range(50):
        for k in range(8):
            size = rng.randint(1, 20)
            largest = max(largest, size)
            post_accepted(client, packet(packet_id=f"h-{i}-{k}", messages=size))
        sighup_and_wait(cluster, "reloaded: ")
    client.close()
    assert generation(cluster) == before
    view = analyzers(cluster)
    total = sum(a["routed_messages"] for a in view.values())
    for name, weight in weights:
        assert abs(view[name]["routed_messages"] - weight * total) <= largest, (name, view[name]["routed_messages"])


# --- item 17: deaths by an outside signal are not boot failures -----------------------------------------------------------


def test_three_sigkills_of_a_booting_replacement_do_not_stop_the_supervisor(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """Issue 17 item 17: as an OOM killer might; only a worker's own boot error exit counts as a boot failure."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2)
    supervisor = supervisor_of(cluster)
    first, other = (w["pid"] for w in workers(cluster))
    known = {c.pid for c in supervisor.children()}
    os.kill(first, signal.SIGKILL)
    for _ in range(3):
        booting = new_child(supervisor, known, cluster)
        known.add(booting.pid)
        booting.kill()
    def booted() -> dict[str, Any] | None:
        assert cluster.distributor is not None and cluster.distributor.process is not None
        assert cluster.distributor.alive(), f"the supervisor exited with {cluster.distributor.process.returncode}"
        worker = workers(cluster)[0]
        return worker if worker["state"] == "ready" and worker["pid"] not in known else None

    replaced = wait_until(booted, 20, "worker 0 to boot after three kills")
    assert replaced["restarts"] == 4
    assert workers(cluster)[1]["pid"] == other
    assert "failed to boot" not in log_text(cluster)


# --- item 18: signals at awkward moments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_early_in_startup(spawned: Spawned, tmp_path: Path, sig: signal.Signals) -> None:
    """Issue 17 item 18: sent as soon as the shared segment exists (before the control plane answers): SIGTERM
    stops cleanly, SIGHUP is a reload; neither is the default action."""
    data_port, admin_port, dead_port = free_ports(3)
    log_path = tmp_path / "early.log"
    proc = spawned.start(distributor_argv(data_port, admin_port, [("a1", f"http://127.0.0.1:{dead_port}")]), log_path)
    wait_until(lambda: proc.poll() is None and segments_of(proc.pid), 30, "the shared segment", interval=0.001)
    os.kill(proc.pid, sig)
    if sig == signal.SIGHUP:
        def serving() -> bool:
            assert proc.poll() is None, f"the early SIGHUP ended the distributor (exit {proc.returncode})"
            view = http_json(f"http://127.0.0.1:{admin_port}/admin/workers")[1]["workers"]
            return all(w["state"] == "ready" for w in view)

        wait_until(serving, 30, "the workers after an early SIGHUP")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log_path.read_text()[-2000:]
    assert not segments_of(proc.pid)
    assert "Traceback" not in log_path.read_text()


def test_sighup_during_final_teardown_keeps_exit_0(make_cluster: Callable[..., LocalCluster]) -> None:
    """Issue 17 item 18: SIGHUPs from the SIGTERM until the process is gone."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2)
    assert cluster.distributor is not None and cluster.distributor.process is not None
    proc = cluster.distributor.process
    proc.send_signal(signal.SIGTERM)
    sent = 0
    while proc.poll() is None:  # not reaped yet, so the pid cannot be anybody else's
        os.kill(proc.pid, signal.SIGHUP)
        sent += 1
        time.sleep(0.0005)
    assert sent > 10
    assert proc.returncode == 0, log_text(cluster)[-2000:]


def test_second_sigterm_during_a_long_drain_stops_soon_and_counts_the_drops(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """Issue 17 item 18: graceful_timeout=60 with a stalled analyzer; the second SIGTERM ends it within seconds."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=2,
                           distributor_args=sets({"graceful_timeout": 60, **STALL_TOLERANT}))
    analyzer = cluster.analyzer("a1")
    assert cluster.distributor is not None and cluster.distributor.process is not None
    proc = cluster.distributor.process
    analyzer.control(stall=True)
    try:
        client = Client(cluster.data_port)
        for i in range(50):
            post_accepted(client, packet(packet_id=f"d-{i}"))
        client.close()
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: all(w["state"] == "stopping" for w in workers(cluster)), 15, "every worker draining")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail("the second SIGTERM did not stop a drain of graceful_timeout=60 within 15 s")
    finally:
        analyzer.control(stall=False)
    assert code == 0
    assert time.monotonic() - started < 15
    text = log_text(cluster)
    assert dropped_at_shutdown(text) == 50
    assert "did not stop in time; killing" not in text


def worker_processes(supervisor: psutil.Process) -> list[psutil.Process]:
    """The supervisor's children that run a worker (after their exec: the cmdline names the slot)."""
    found = []
    for child in supervisor.children():
        try:
            if "--slot" in child.cmdline():
                found.append(child)
        except psutil.Error:
            pass
    return found


def loading_extensions(pid: int) -> bool:
    """The process has mapped a compiled module of a dependency: its interpreter is up and it imports."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return False
    return any("site-packages" in line and line.endswith(".so") for line in maps)


def died_or_listens(process: psutil.Process, port: int) -> bool:
    """The worker died (a zombie of its paused parent) or got through its imports to listening on the data port."""
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp"))
    except psutil.NoSuchProcess:
        return True


def ctrl_c(proc: subprocess.Popen[bytes], booting: list[psutil.Process], data_port: int) -> None:
    """SIGINT to the whole process group, as Ctrl-C in a terminal, with the supervisor paused meanwhile: each
    worker then shows what the SIGINT itself does to it (printing a traceback takes milliseconds, and the
    supervisor's SIGTERM to its workers would race it). The supervisor resumes once every worker has died of it
    or got through its imports; then it stops gracefully."""
    supervisor = psutil.Process(proc.pid)
    supervisor.suspend()
    try:
        os.killpg(proc.pid, signal.SIGINT)
        wait_until(lambda: all(died_or_listens(p, data_port) for p in booting), 30,
                   "every worker to die of the SIGINT or to get through its imports")
    finally:
        supervisor.resume()


def test_sigint_to_the_process_group_while_workers_import_prints_no_traceback(
    spawned: Spawned, tmp_path: Path,
) -> None:
    """Issue 17 item 18: Ctrl-C in a terminal signals the whole process group, workers included, here while
    both workers import their dependencies."""
    data_port, admin_port, dead_port = free_ports(3)
    log_path = tmp_path / "ctrl-c.log"
    proc = spawned.start(distributor_argv(data_port, admin_port, [("a1", f"http://127.0.0.1:{dead_port}")]),
                         log_path, new_session=True)
    supervisor = psutil.Process(proc.pid)

    def both_importing() -> bool:
        assert proc.poll() is None, log_path.read_text()
        booting = worker_processes(supervisor)
        return len(booting) == 2 and all(loading_extensions(p.pid) for p in booting)

    wait_until(both_importing, 30, "both workers importing their dependencies", interval=0.001)
    ctrl_c(proc, worker_processes(supervisor), data_port)
    code = proc.wait(30)
    output = log_path.read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert code == 0


# --- defects found while writing these tests --------------------------------------------------------------------------------


def test_memory_limit_set_by_reload_recycles_a_worker_that_grew_before(
    file_cluster: Callable[..., ConfigFileCluster],
) -> None:
    """A fresh worker is about 40 MB; one grown to over 160 MB gets a limit of 120 MB by SIGHUP: it is recycled."""
    limit_mb = 120
    cluster = file_cluster(workers=1, settings={"graceful_timeout": 60, **STALL_TOLERANT,
                                                "queue.max_packets": 20_000, "queue.max_bytes": 200 * MiB})
    assert workers(cluster)[0]["rss_bytes"] < limit_mb * MiB / 2
    analyzer = cluster.analyzer("a1")
    accepted: list[str] = []
    analyzer.control(stall=True)
    try:
        fill(cluster.data_port, accepted, lambda: workers(cluster)[0]["rss_bytes"] > (limit_mb + 40) * MiB, "grown")
        cluster.write({"max_worker_memory_mb": limit_mb})
        sighup_and_wait(cluster, "reloaded: ")
        wait_until(lambda: "replacing it gracefully" in log_text(cluster)
                   or "below a fresh worker's RSS" in log_text(cluster), 10, "the supervisor to judge the worker")
        assert "below a fresh worker's RSS" not in log_text(cluster)
    finally:
        analyzer.control(stall=False)
    wait_until(lambda: (w := workers(cluster)[0])["restarts"] == 1 and w["state"] == "ready", 60, "the replacement")
    check_delivered(cluster, "a1", accepted)


SLOW_INTERPRETER_START = """\
import os, sys, time
if "--slot" in sys.argv:  # a worker: its interpreter starts slowly (cold cache, a venv on a network file system)
    open(os.path.join(os.path.dirname(__file__), "starting-%d" % os.getpid()), "w").close()
    time.sleep(3)
"""


def test_sigint_to_the_process_group_while_a_worker_interpreter_starts_prints_no_traceback(
    spawned: Spawned, tmp_path: Path,
) -> None:
    """Issue 17 item 18, earlier in a worker's life: a sitecustomize makes the window wide enough to hit every time."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(SLOW_INTERPRETER_START)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site_dir), os.environ.get("PYTHONPATH")]))}
    data_port, admin_port, dead_port = free_ports(3)
    log_path = tmp_path / "ctrl-c-early.log"
    proc = spawned.start(distributor_argv(data_port, admin_port, [("a1", f"http://127.0.0.1:{dead_port}")]),
                         log_path, new_session=True, env=env)
    supervisor = psutil.Process(proc.pid)
    wait_until(lambda: len(list(site_dir.glob("starting-*"))) == 2, 30, "both worker interpreters in their site import",
               interval=0.001)
    ctrl_c(proc, worker_processes(supervisor), data_port)
    code = proc.wait(30)
    output = log_path.read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert code == 0


# --- review of issues 16/17: defects 6 and 7 (regression tests; the fixes are in 48f75a3) -------------------------------


def test_ready_is_503_while_the_only_worker_is_sigstopped(make_cluster: Callable[..., LocalCluster]) -> None:
    """Review defect 6: a SIGSTOPped worker keeps 'ready' in its row while the port hangs; /ready must see that its
    event loop stopped stamping the heartbeat (within seconds), long before the watchdog's worker_timeout."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1, distributor_args=sets({"worker_timeout": 60}))
    assert http_json(cluster.admin_url + "/ready")[0] == 200
    victim = workers(cluster)[0]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        try:
            wait_until(lambda: http_json(cluster.admin_url + "/ready")[0] == 503, 10, "/ready to answer 503")
        except TimeoutError:
            pytest.fail(f"/ready answered {http_json(cluster.admin_url + '/ready')} for 10 s while the only worker "
                        "was stopped")
        status, body = http_json(cluster.admin_url + "/ready")
        assert status == 503 and body["workers_ready"] == 0, body
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_until(lambda: http_json(cluster.admin_url + "/ready")[0] == 200, 10, "/ready to answer 200 again")
    assert workers(cluster)[0]["pid"] == victim, "the paused worker was replaced: worker_timeout is 60 s"
    client = Client(cluster.data_port)
    assert client.post(packet(packet_id="after-sigcont"))[0] == 202
    client.close()


@pytest.mark.parametrize("moment", ["starting", "respawning"])
def test_second_distributor_is_refused_while_the_first_has_no_worker_listening(
    make_cluster: Callable[..., LocalCluster], spawned: Spawned, tmp_path: Path, moment: str,
) -> None:
    """Review defect 7: the port was claimed only while one of A's workers listened. B, started while A's first
    worker was still booting (two instances started at the same moment) or while A respawned its only worker,
    passed the check and both ran on one port, silently splitting the traffic. A's booting worker is held
    (SIGSTOP) before it binds, so the window stays open for as long as B needs."""
    analyzers_only = make_cluster(analyzers=(("a1", 1.0),), start_distributor=False)
    url = analyzers_only.analyzer("a1").url
    data_port, admin_a, admin_b = free_ports(3)
    first = spawned.start(distributor_argv(data_port, admin_a, [("a1", url)], workers=1,
                                           extra=sets({"worker_timeout": 30})), tmp_path / "first.log")
    supervisor = psutil.Process(first.pid)
    known: set[int] = set()
    if moment == "respawning":
        wait_until(lambda: http_json(f"http://127.0.0.1:{admin_a}/ready")[0] == 200, 30, "distributor A ready")
        known = {child.pid for child in supervisor.children()}
        os.kill(http_json(f"http://127.0.0.1:{admin_a}/admin/workers")[1]["workers"][0]["pid"], signal.SIGKILL)
    booting = new_child(supervisor, known)
    booting.suspend()
    try:
        with pytest.raises(ConnectionRefusedError):  # the window: nobody listens on the data port now
            socket.create_connection(("127.0.0.1", data_port), timeout=5).close()
        second_log = tmp_path / "second.log"
        second = spawned.start(distributor_argv(data_port, admin_b, [("a1", url)], workers=1), second_log)

        def settled() -> str | None:
            if second.poll() is not None:
                return "exited"
            return "serving" if http_json(f"http://127.0.0.1:{admin_b}/ready")[0] == 200 else None

        outcome = wait_until(settled, 30, "the second distributor to exit or to serve")
        assert outcome == "exited", f"a second distributor serves on data port {data_port} while the first is " \
                                    f"{moment} its worker"
        assert second.returncode == 2, second_log.read_text()
        assert "claimed by another distributor" in second_log.read_text()
    finally:
        booting.resume()
    wait_until(lambda: http_json(f"http://127.0.0.1:{admin_a}/ready")[0] == 200, 30, "distributor A serving")
    assert first.poll() is None
    client = Client(data_port)
    assert client.post(packet(packet_id=f"after-{moment}"))[0] == 202
    client.close()
