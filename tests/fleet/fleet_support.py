"""A fleet in network namespaces: HAProxy, 3 distributors, 4 analyzers, 2 emitter hosts, 1 operator host.

::

    e1 10.77.0.31 ─┐                                 ┌─ a1 10.77.0.21:9001          weight 0.4
    e2 10.77.0.32 ─┼─ lb 10.77.0.2:8080 (HAProxy) ─┬─ d1 10.77.0.11 ─┼─ a2 10.77.0.22:9002 (delay proxy) 0.3 packet mode
    ops 10.77.0.3 ─┘   deploy/haproxy/haproxy.cfg  ├─ d2 10.77.0.12 ─┼─ a3 10.77.0.23:9001          weight 0.2
                                                   └─ d3 10.77.0.13 ─┴─ a4 10.77.0.24:9001          weight 0.1

(one bridge joins them all; the lines show who talks to whom). Each distributor: 1 worker, its own
write-ahead log directory, the same configuration (``distributor_toml``). a2 takes one packet per
request (``mode = "packet"``) behind a userspace delaying proxy in its own namespace, so a slow link
toward it caps what it can take (``max_inflight / delay`` per worker): with batches, latency alone
would never limit an analyzer. The operator host ``ops`` is where the test's own requests and the
``distributor status|admin --fleet`` commands come from.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import psutil

from fleet.fleet_net import Proc, Topology

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
HERE = Path(__file__).resolve().parent

LAYOUT = (("lb", 2), ("ops", 3), ("d1", 11), ("d2", 12), ("d3", 13),
          ("a1", 21), ("a2", 22), ("a3", 23), ("a4", 24), ("e1", 31), ("e2", 32))
DISTRIBUTORS = ("d1", "d2", "d3")
WEIGHTS = {"a1": 0.4, "a2": 0.3, "a3": 0.2, "a4": 0.1}
SLOW = "a2"  # behind the delaying proxy, packet mode
DATA_PORT, ADMIN_PORT, ANALYZER_PORT, PROXY_PORT = 8080, 9091, 9001, 9002
TOKEN = "fleet-test-token"
RATE_LIMIT, BURST = 100, 100  # per emitter, the same on every instance
QUEUE_PACKETS = 256  # per analyzer per worker: a saturated analyzer's queue fills within seconds


def distributor_toml(fleet: "Fleet", host: str, wal_dir: Path) -> str:
    analyzers = []
    for name, weight in WEIGHTS.items():
        address = fleet.net.hosts[name].address
        port = PROXY_PORT if name == SLOW else ANALYZER_PORT
        mode = "packet" if name == SLOW else "batch"
        analyzers.append(f'[[analyzers]]\nname = "{name}"\nurl = "http://{address}:{port}"\nweight = {weight}\n'
                         f'mode = "{mode}"\n')
    return "\n".join([
        f'listen = "0.0.0.0:{DATA_PORT}"',
        f'admin_listen = "0.0.0.0:{ADMIN_PORT}"',
        "workers = 1",
        "graceful_timeout = 10.0",
        # The CPU guard sheds (503) when the event loop runs late: on a machine busy with other work it
        # would answer the machine's load, not the faults a scenario injects (it has tests of its own).
        "[ingest]",
        "max_loop_lag = 0",
        "[queue]",
        f"max_packets = {QUEUE_PACKETS}",
        "[sender]",
        "request_timeout = 3.0",
        "[health]",
        "interval = 1.0",  # generous: a shared 2-core box must not fail checks by itself
        "timeout = 1.0",
        "fall = 3",
        "rise = 2",
        "[outlier]",
        "base_ejection_time = 1.0",
        "slow_start = 1.0",
        "[rate_limit]",
        f"rate = {RATE_LIMIT}",
        f"burst = {BURST}",
        "[admin]",
        f'token = "{TOKEN}"',
        "[wal]",
        f'dir = "{wal_dir}"',
        'sync = "interval"',
        "",
        *analyzers,
    ])


def haproxy_config(fleet: "Fleet", socket_path: Path) -> str:
    """deploy/haproxy/haproxy.cfg with this fleet's servers and a private runtime socket; nothing else changes."""
    text = HAPROXY_CFG.read_text()
    text, sockets = re.subn(r"^(\s*stats socket )\S+", rf"\g<1>{socket_path}", text, flags=re.M)
    servers = [f"    server {d} {fleet.net.hosts[d].address}:{DATA_PORT} id {i}" for i, d in enumerate(DISTRIBUTORS, 1)]
    lines = text.splitlines()
    server_lines = [i for i, line in enumerate(lines) if re.match(r"\s*server\s", line)]
    assert sockets == 1 and server_lines, "deploy/haproxy/haproxy.cfg changed shape: update tests/fleet"
    lines[server_lines[0]:server_lines[-1] + 1] = servers
    return "\n".join(lines) + "\n"


def check_settings() -> dict[str, float]:
    """The shipped health-check settings (seconds): what bounds the time to take a cut-off server out."""
    text = HAPROXY_CFG.read_text()

    def seconds(pattern: str) -> float:
        match = re.search(pattern, text, flags=re.M)
        assert match, pattern
        value = match.group(1)
        return float(value[:-2]) / 1000 if value.endswith("ms") else float(value.rstrip("s"))

    default_server = re.search(r"^\s*default-server .*$", text, flags=re.M)
    assert default_server
    fall = re.search(r"\bfall (\d+)", default_server.group(0))
    assert fall
    return {
        "inter": seconds(r"default-server .*\binter (\d+(?:ms|s))"),
        "fastinter": seconds(r"default-server .*\bfastinter (\d+(?:ms|s))"),
        "fall": float(fall.group(1)),
        "timeout_connect": seconds(r"^\s*timeout connect (\d+(?:ms|s))"),
        "timeout_check": seconds(r"^\s*timeout check (\d+(?:ms|s))"),
    }


@dataclass
class LogLine:
    at: float  # when the request started (epoch seconds)
    server: str
    status: int
    emitter: str


LOG_LINE = re.compile(r"\[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3})\] \S+ [^/\s]+/(\S+) \S+ (-?\d+) .* emitter=(\S*) ")


def parse_log(text: str) -> list[LogLine]:
    lines = []
    for match in LOG_LINE.finditer(text):
        at = datetime.strptime(match.group(1), "%d/%b/%Y:%H:%M:%S.%f").timestamp()  # local time, as logged
        emitter = match.group(4)
        lines.append(LogLine(at, match.group(2), int(match.group(3)), "" if emitter == "-" else emitter))
    return lines


@dataclass
class Load:
    host: str
    proc: Proc
    out: Path

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.process is not None
        code = self.proc.process.wait(timeout)
        assert code == 0, f"load on {self.host} exited {code}:\n{self.proc.log_tail()}"
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


@dataclass
class Fleet:
    net: Topology
    workdir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    loads: int = 0

    # ------------------------------------------------------------------ start

    def start(self) -> "Fleet":
        py = sys.executable
        self.delay_file.write_text("0")
        for name in WEIGHTS:
            self.procs[name] = self.net.start(name, name, [py, "-m", "analyzer.server", "--listen",
                                                           f"0.0.0.0:{ANALYZER_PORT}", "--name", name],
                                              self.workdir / f"{name}.log", cwd=REPO)
        self.procs["proxy"] = self.net.start(SLOW, "proxy", [
            py, str(HERE / "fleet_delay_proxy.py"), "--listen", f"0.0.0.0:{PROXY_PORT}",
            "--upstream", f"127.0.0.1:{ANALYZER_PORT}", "--control", str(self.delay_file)],
            self.workdir / "proxy.log", cwd=REPO)
        for d in DISTRIBUTORS:
            config = self.workdir / f"{d}.toml"
            config.write_text(distributor_toml(self, d, self.workdir / d / "wal"))
            (self.workdir / d).mkdir(exist_ok=True)
            self.procs[d] = self.net.start(d, d, [py, "-m", "distributor", "serve", "--config", str(config)],
                                           self.workdir / f"{d}.log", cwd=REPO, private_shm=True)
        for name in WEIGHTS:
            self.wait(partial(self.analyzer_named, name), 30, f"analyzer {name}")
        self.wait(lambda: self.get("ops", f"{self.analyzer_url(SLOW)}/stats")[0] == 200, 30, "the delaying proxy")
        for d in DISTRIBUTORS:
            self.wait(partial(self.ready, d), 60, f"distributor {d} ready")
        self.haproxy_socket.unlink(missing_ok=True)
        config = self.workdir / "haproxy.cfg"
        config.write_text(haproxy_config(self, self.haproxy_socket))
        self.procs["haproxy"] = self.net.start("lb", "haproxy", ["haproxy", "-db", "-f", str(config)],
                                               self.workdir / "haproxy.log")
        self.wait(lambda: all(s == "UP" for s in self.servers().values()), 30, "HAProxy: every distributor UP")
        return self

    @property
    def delay_file(self) -> Path:
        return self.workdir / "a2-delay-ms"

    @property
    def haproxy_socket(self) -> Path:
        return self.workdir / "haproxy.sock"

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            for proc in self.procs.values():
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited ({proc.stop()}) while waiting for {what}:\n"
                                         f"{proc.log_tail()}")
            try:
                result = predicate()
            except (OSError, ValueError, KeyError, TypeError) as exc:
                result, last = None, exc
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last!r})")
            time.sleep(interval)

    # ------------------------------------------------------------------ addresses and requests

    def admin_url(self, d: str) -> str:
        return f"http://{self.net.hosts[d].address}:{ADMIN_PORT}"

    def analyzer_url(self, name: str) -> str:
        return f"http://{self.net.hosts[name].address}:{PROXY_PORT if name == SLOW else ANALYZER_PORT}"

    @property
    def ingest_url(self) -> str:
        return f"http://{self.net.hosts['lb'].address}:{DATA_PORT}/ingest"

    @property
    def fleet_arg(self) -> str:
        return ",".join(self.admin_url(d) for d in DISTRIBUTORS)

    def get(self, host: str, url: str, timeout: float = 5.0) -> tuple[int, Any]:
        return self.net.http_json(host, url, timeout=timeout)

    def analyzer_named(self, name: str) -> bool:
        return bool(self.analyzer_stats(name)["name"] == name)

    def ready(self, d: str) -> bool:
        """/ready answers 200 from the operator host (so across the bridge)."""
        return self.get("ops", f"{self.admin_url(d)}/ready")[0] == 200

    def analyzer_stats(self, name: str) -> dict[str, Any]:
        """From the analyzer's own namespace (its loopback, not through the proxy or the bridge)."""
        status, body = self.get(name, f"http://127.0.0.1:{ANALYZER_PORT}/stats")
        assert status == 200, body
        return dict(body)

    def messages(self) -> dict[str, int]:
        return {name: int(self.analyzer_stats(name)["messages"]) for name in WEIGHTS}

    def analyzer_keys(self) -> set[tuple[str, str]]:
        keys: set[tuple[str, str]] = set()
        for name in WEIGHTS:
            url = f"http://127.0.0.1:{ANALYZER_PORT}/stats/packets"
            while True:
                status, page = self.get(name, url, timeout=30)
                assert status == 200, page
                keys.update((e, p) for e, p in page["packets"])
                if not page["more"]:
                    break
                url = f"http://127.0.0.1:{ANALYZER_PORT}/stats/packets?after={page['next']}"
            assert not page["not_recorded"], f"{name}: its key log overflowed"
        return keys

    def view(self, d: str, host: str | None = None) -> list[dict[str, Any]]:
        """A distributor's /admin/analyzers, from ``host`` (default: its own namespace, so a cut does not matter)."""
        base = self.admin_url(d) if host else f"http://127.0.0.1:{ADMIN_PORT}"
        status, body = self.get(host or d, f"{base}/admin/analyzers")
        assert status == 200, body
        return list(body["analyzers"])

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds so far: HAProxy, each analyzer, each distributor (its workers)."""
        seconds = {}
        for name in ("haproxy", *WEIGHTS):
            times = psutil.Process(self.procs[name].pid).cpu_times()
            seconds[name] = times.user + times.system
        for d in DISTRIBUTORS:
            seconds[d] = sum(float(w["cpu_seconds"]) for w in self.workers(d))
        return seconds

    def refusals(self) -> dict[str, int]:
        """Packets refused so far over the fleet, by reason: no analyzer had room (``unavailable``), queue-fill
        shedding (``shed``), the CPU guard (``loop_lag``: the event loop ran late, e.g. on a starved box)."""
        totals = {"unavailable": 0, "shed": 0, "loop_lag": 0}
        for d in DISTRIBUTORS:
            for w in self.workers(d):
                totals["unavailable"] += int(w["rejected_unavailable"])
                totals["shed"] += int(w["shed_packets"])
                totals["loop_lag"] += int(w["loop_lag_shed_packets"])
        return totals

    def workers(self, d: str) -> list[dict[str, Any]]:
        status, body = self.get(d, f"http://127.0.0.1:{ADMIN_PORT}/admin/workers")
        assert status == 200, body
        return list(body["workers"])

    def routed(self) -> dict[str, dict[str, int]]:
        """Net routed messages per instance per analyzer (the split each instance made)."""
        return {d: {a["name"]: int(a["net_routed_messages"]) for a in self.view(d)} for d in DISTRIBUTORS}

    def states(self) -> dict[str, dict[str, str]]:
        return {d: {a["name"]: str(a["state"]) for a in self.view(d)} for d in DISTRIBUTORS}

    def queued(self) -> dict[str, int]:
        return {d: sum(int(a["queue_packets"]) for a in self.view(d)) for d in DISTRIBUTORS}

    def wait_quiet(self, timeout: float = 40.0) -> None:
        """No fault left: every analyzer active on every instance, queues empty, every server UP at HAProxy."""
        self.wait(lambda: all(state == "active" for d in self.states().values() for state in d.values()),
                  timeout, "every analyzer active on every distributor")
        self.wait(lambda: not any(self.queued().values()), timeout, "every distributor's queues empty")
        self.wait(lambda: all(s == "UP" for s in self.servers().values()), timeout, "every distributor UP at HAProxy")

    # ------------------------------------------------------------------ HAProxy

    def haproxy(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.haproxy_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stat(self) -> dict[str, dict[str, str]]:
        """``show stat`` rows of the distributors backend's servers, by server name."""
        text = self.haproxy("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows
                if row["pxname"] == "distributors" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def servers(self) -> dict[str, str]:
        """Server -> UP / DOWN (transitional states such as "UP 1/2" count as what they are heading from)."""
        return {name: row["status"].split()[0] for name, row in self.stat().items()}

    def health_marks(self) -> dict[str, int]:
        """Counts of health transitions so far: HAProxy's UP->DOWN per server, each instance's downs+ejections
        per analyzer. A scenario compares them with its own faults (``unexpected``)."""
        marks = {f"haproxy took {name} out": int(row["chkdown"] or 0) for name, row in self.stat().items()}
        for d in DISTRIBUTORS:
            for a in self.view(d):
                marks[f"{d} took {a['name']} out"] = int(a.get("downs", 0)) + int(a.get("ejections", 0))
        return marks

    def unexpected(self, before: dict[str, int], expected: Sequence[str] = ()) -> list[str]:
        """Health transitions since ``before`` that no fault of the scenario explains (``expected``: their keys).

        On a shared machine they mean checks timed out under CPU starvation; the message says so, so a
        failure that follows from one is not mistaken for a routing bug.
        """
        now = self.health_marks()
        found = [f"{key} ({now[key] - before.get(key, 0)}x)" for key in now
                 if now[key] > before.get(key, 0) and key not in expected]
        if found:
            found.append(f"no fault explains these: checks failed by themselves; load average {os.getloadavg()} "
                         f"on {os.cpu_count()} CPUs")
        return found

    def log(self) -> list[LogLine]:
        return parse_log((self.workdir / "haproxy.log").read_text(errors="replace"))

    # ------------------------------------------------------------------ load

    def load(self, host: str, duration: float, rate: float, emitters: int, prefix: str, connections: int = 16,
             header: bool = True, sizes: str = "5:0.5,20:0.5") -> Load:
        self.loads += 1
        out = self.workdir / f"load-{self.loads}-{prefix}.json"
        argv = [sys.executable, str(HERE / "fleet_load.py"), "--url", self.ingest_url, "--duration", str(duration),
                "--rate", str(rate), "--emitters", str(emitters), "--prefix", prefix,
                "--connections", str(connections), "--sizes", sizes, "--out", str(out)]
        if not header:
            argv.append("--no-header")
        proc = self.net.start(host, f"load-{prefix}", argv, self.workdir / f"load-{self.loads}-{prefix}.log", cwd=REPO)
        return Load(host, proc, out)


# ---------------------------------------------------------------------- arithmetic


def shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total if total else 0.0 for k, v in counts.items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def routed_delta(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {d: delta(after[d], before[d]) for d in after}


def expected_split(per_instance: dict[str, dict[str, int]], reachable: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """What the aggregate split should be when instance i splits its traffic over ``reachable[i]`` by weight."""
    total = sum(sum(counts.values()) for counts in per_instance.values())
    expected = {name: 0.0 for name in WEIGHTS}
    for d, counts in per_instance.items():
        names = list(reachable[d])
        weight = sum(WEIGHTS[n] for n in names)
        for n in names:
            expected[n] += sum(counts.values()) * WEIGHTS[n] / weight
    return {n: v / total for n, v in expected.items()}


def servers_by_emitter(lines: Sequence[LogLine], start: float, end: float) -> dict[str, set[str]]:
    """Emitter -> the servers that answered its requests 202 between start and end (request start times)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        if start <= line.at < end and line.status == 202 and line.emitter:
            seen[line.emitter].add(line.server)
    return dict(seen)


def accepted_keys(results: Sequence[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(emitter, packet_id) for result in results for emitter, packet_id, _ in result["accepted"]}


def report(title: str, figures: dict[str, Any]) -> None:
    """Printed with -s, and kept in the test log: the figures a run measured."""
    print(f"\n[fleet] {title}: " + json.dumps(figures, sort_keys=True, default=str), flush=True)
