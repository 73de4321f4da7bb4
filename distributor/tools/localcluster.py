"""Start and stop real analyzers and a real distributor on 127.0.0.1.

Used by the demo, the tests and the benchmark, so all three exercise the same
processes a user runs. Every process started here is stopped by PID in
``stop`` (TERM, then KILL after a deadline); logs go to files in a temporary
directory so a failing run can show them.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from distributor.control.client import http_json

DEMO_WEIGHTS = (("a1", 0.4), ("a2", 0.3), ("a3", 0.2), ("a4", 0.1))


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held together while picking, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except (OSError, urllib.error.URLError, ValueError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """TERM, wait up to ``timeout``, then KILL; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class AnalyzerProcess(ManagedProcess):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        return http_json(self.url + "/stats")[1]

    def packet_keys(self) -> list[tuple[str, str]]:
        """Every packet key the analyzer accepted, oldest first, following /stats/packets page by page.

        Raises if the analyzer's key log overflowed (``--record-packets``), so a
        delivery check can never pass on a truncated list.
        """
        keys: list[tuple[str, str]] = []
        url = self.url + "/stats/packets"
        while True:
            status, page = http_json(url)
            if status != 200:
                raise RuntimeError(f"analyzer {self.name}: GET {url} answered {status}: {page}")
            keys.extend((emitter, pid) for emitter, pid in page["packets"])
            if not page["more"]:
                break
            url = f"{self.url}/stats/packets?after={page['next']}"  # cursors are URL-safe
        if page["not_recorded"]:
            raise RuntimeError(f"analyzer {self.name} did not record {page['not_recorded']} packet keys "
                               f"(--record-packets {page['record_limit']}): its key list is incomplete")
        return keys

    def control(self, **settings: Any) -> dict[str, Any]:
        return http_json(self.url + "/control", "POST", json.dumps(settings).encode())[1]


@dataclass
class LocalCluster:
    """N analyzers + one distributor (supervisor and workers) on loopback ports."""

    analyzers: Sequence[tuple[str, float]] = DEMO_WEIGHTS
    workers: int = 1
    analyzer_args: dict[str, list[str]] = field(default_factory=dict)
    distributor_args: list[str] = field(default_factory=list)
    start_distributor: bool = True
    analyzer_flags: bool = True  # False when distributor_args carry --config with the analyzers
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="log-distributor-")))
    analyzer_procs: list[AnalyzerProcess] = field(default_factory=list)
    distributor: ManagedProcess | None = None
    data_port: int = 0
    admin_port: int = 0

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.data_port}/ingest"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def analyzer(self, name: str) -> AnalyzerProcess:
        return next(a for a in self.analyzer_procs if a.name == name)

    def start(self, timeout: float = 30.0) -> "LocalCluster":
        try:
            ports = free_ports(len(self.analyzers) + 2)
            self.data_port, self.admin_port = ports[-2:]
            for (name, _), port in zip(self.analyzers, ports):
                self.start_analyzer(name, port)
            for proc in self.analyzer_procs:
                wait_until(lambda: self._analyzer_up(proc), timeout, f"analyzer {proc.name}")
            if self.start_distributor:
                self.start_distributor_process(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _analyzer_up(proc: AnalyzerProcess) -> bool:
        """Serving *and* the process we started (not another one that holds the port).

        Asks /stats, which answers even while the analyzer is stalled on purpose.
        """
        if not proc.alive():
            raise RuntimeError(f"analyzer {proc.name} exited early:\n{proc.log_tail()}")
        status, stats = http_json(proc.url + "/stats")
        return status == 200 and stats.get("name") == proc.name

    def start_analyzer(self, name: str, port: int | None = None) -> AnalyzerProcess:
        """Start (or restart, on the same port) the analyzer ``name``."""
        existing = next((a for a in self.analyzer_procs if a.name == name), None)
        port = port or (existing.port if existing else free_port())
        argv = [sys.executable, "-m", "analyzer.server", "--listen", f"127.0.0.1:{port}", "--name", name,
                *self.analyzer_args.get(name, [])]
        proc = AnalyzerProcess(name, argv, self.log_dir / f"analyzer-{name}.log", port=port)
        proc.start()
        if existing:
            self.analyzer_procs[self.analyzer_procs.index(existing)] = proc
        else:
            self.analyzer_procs.append(proc)
        return proc

    def distributor_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "distributor", "serve",
                "--listen", f"127.0.0.1:{self.data_port}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
                "--workers", str(self.workers)]
        if self.analyzer_flags:
            for (name, weight), proc in zip(self.analyzers, self.analyzer_procs):
                argv += ["--analyzer", f"{name}={proc.url}@{weight}"]
        return argv + self.distributor_args

    def start_distributor_process(self, timeout: float = 30.0) -> ManagedProcess:
        if not (self.data_port and self.admin_port):
            self.data_port, self.admin_port = free_ports(2)
        self.distributor = ManagedProcess("distributor", self.distributor_argv(), self.log_dir / "distributor.log")
        self.distributor.start()
        distributor = self.distributor

        def ready() -> bool:
            if not distributor.alive():
                raise RuntimeError(f"distributor exited early:\n{distributor.log_tail()}")
            workers = self.admin("/admin/workers")["workers"]
            return all(w["state"] == "ready" for w in workers) and http_json(self.admin_url + "/ready")[0] == 200

        wait_until(ready, timeout, "distributor workers ready")
        return distributor

    def admin(self, path: str) -> Any:
        return http_json(self.admin_url + path)[1]

    def analyzer_totals(self) -> dict[str, dict[str, Any]]:
        return {proc.name: proc.stats() for proc in self.analyzer_procs}

    def wait_drained(self, timeout: float = 30.0) -> None:
        """Until no worker holds a queued or in-flight packet."""
        wait_until(
            lambda: all(a["queue_packets"] == 0 for a in self.admin("/admin/analyzers")["analyzers"]),
            timeout, "sender queues to drain",
        )

    def stop(self) -> dict[str, int | None]:
        """Stop every process started here (distributor first, so it can flush); exit codes by name."""
        codes: dict[str, int | None] = {}
        if self.distributor:
            codes["distributor"] = self.distributor.stop(timeout=60)
        for proc in self.analyzer_procs:
            codes[proc.name] = proc.stop()
        return codes

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

