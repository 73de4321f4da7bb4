"""What the supervisor, reload and starvation tests share: a cluster whose distributor reads one TOML file,
the views they poll, big packets that grow a worker's memory, and the logs shown when a test fails."""

from __future__ import annotations

import http.client
import json
import signal
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from distributor.tools.localcluster import LocalCluster, wait_until
from support import Client

# a stalled analyzer stays routable: its /health is not asked again for a minute and its sends wait for it
STALL_TOLERANT: dict[str, object] = {"health.interval": 60, "health.timeout": 1, "sender.request_timeout": 120}


# --- configuration --------------------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def sets(settings: dict[str, object]) -> list[str]:
    """``--set KEY=VALUE`` flags (a path or a number as written, a bool as TOML writes it)."""
    flags: list[str] = []
    for key, value in settings.items():
        flags += ["--set", f"{key}={toml_value(value) if isinstance(value, bool) else value}"]
    return flags


def write_toml(path: Path, settings: dict[str, object], analyzers: Sequence[tuple[str, str, float]]) -> None:
    """Top-level keys, then ``[section]`` tables from dotted keys, then ``[[analyzers]]``."""
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items() if "." not in key]
    sections: dict[str, list[str]] = {}
    for key, value in settings.items():
        section, dot, name = key.partition(".")
        if dot:
            sections.setdefault(section, []).append(f"{name} = {toml_value(value)}")
    for section, entries in sections.items():
        lines += [f"[{section}]", *entries]
    for name, url, weight in analyzers:
        lines += ["[[analyzers]]", f"name = {json.dumps(name)}", f"url = {json.dumps(url)}", f"weight = {weight!r}"]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class ConfigFileCluster(LocalCluster):
    """A LocalCluster whose distributor reads every setting, listen/admin_listen/workers included, from one file."""

    config_path: Path = Path("distributor.toml")
    settings: dict[str, object] = field(default_factory=dict)
    extra_analyzers: list[tuple[str, str, float]] = field(default_factory=list)  # not started here

    def distributor_argv(self) -> list[str]:
        return [sys.executable, "-m", "distributor", "serve", "--config", str(self.config_path), *self.distributor_args]

    def write(self, changes: dict[str, object] | None = None,
              extra_analyzers: list[tuple[str, str, float]] | None = None) -> None:
        """Rewrite the file: the settings so far plus ``changes``; the started analyzers plus the extra ones."""
        self.settings.update(changes or {})
        if extra_analyzers is not None:
            self.extra_analyzers = extra_analyzers
        base: dict[str, object] = {"listen": f"127.0.0.1:{self.data_port}",
                                   "admin_listen": f"127.0.0.1:{self.admin_port}", "workers": self.workers}
        started = [(proc.name, proc.url, weight) for (_, weight), proc in zip(self.analyzers, self.analyzer_procs)]
        write_toml(self.config_path, {**base, **self.settings}, started + self.extra_analyzers)


def show_logs(request: pytest.FixtureRequest, clusters: Sequence[LocalCluster], lines: int = 60) -> None:
    """After a failed test, the tail of each process's log (conftest records the call's report on the node)."""
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for cluster in clusters:
            for proc in [cluster.distributor, *cluster.analyzer_procs]:
                if proc is not None:
                    print(f"--- {proc.name} log ---\n{proc.log_tail(lines)}")


# --- views ------------------------------------------------------------------------------------------------------


def workers(cluster: LocalCluster) -> list[dict[str, Any]]:
    return list(cluster.admin("/admin/workers")["workers"])


def metrics(cluster: LocalCluster) -> str:
    with urllib.request.urlopen(cluster.admin_url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, series: str) -> float:
    """The value of one series (``distributor_worker_cpu_seconds_total{worker="0"}``), or of the first sample of
    a name given without labels."""
    for line in text.splitlines():
        if line.startswith(series + " ") or line.startswith(series + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {series} in /metrics")


def log_text(cluster: LocalCluster) -> str:
    assert cluster.distributor is not None
    return cluster.distributor.log_path.read_text(errors="replace")


def log_lines(cluster: LocalCluster, text: str) -> list[str]:
    """The distributor's log lines containing ``text``."""
    return [line for line in log_text(cluster).splitlines() if text in line]


def sighup_and_wait(cluster: LocalCluster, text: str, timeout: float = 15.0) -> str:
    """SIGHUP, then wait for one more log line containing ``text`` (the supervisor must stay alive); returns it."""
    before = len(log_lines(cluster, text))
    distributor = cluster.distributor
    assert distributor is not None and distributor.process is not None
    distributor.signal(signal.SIGHUP)

    def logged() -> bool:
        assert distributor.alive(), (f"the supervisor exited with {distributor.process.returncode} after "  # type: ignore[union-attr]
                                     f"SIGHUP:\n{distributor.log_tail(15)}")
        return len(log_lines(cluster, text)) > before

    wait_until(logged, timeout, f"a log line with {text!r} after SIGHUP")
    return log_lines(cluster, text)[before]


# --- memory growth ----------------------------------------------------------------------------------------------


def big_packet(packet_id: str, size: int = 20_000) -> bytes:
    """One message of ``size`` bytes: a few thousand make a worker's RSS pass a limit."""
    return json.dumps({"emitter_id": "big", "packet_id": packet_id,
                       "messages": [{"timestamp": 1764172800123, "level": "INFO", "message": "x" * size}]}).encode()


def fill(port: int, accepted: list[str], until: Callable[[], bool], prefix: str, limit: int = 40_000,
         per_connection: int = 25) -> None:
    """Post 20 KB packets on fresh keep-alive connections (the kernel spreads them over the workers) until
    ``until()`` holds, checked every ``per_connection`` packets; the ids answered 202 go to ``accepted``."""
    sent = 0
    while not until():
        assert sent < limit, f"gave up after {sent} packets"
        client = Client(port)
        try:
            for _ in range(per_connection):
                packet_id = f"{prefix}-{sent}"
                sent += 1
                if client.post(big_packet(packet_id))[0] == 202:
                    accepted.append(packet_id)
        except (OSError, http.client.HTTPException):
            pass  # the worker closed the connection: it is being replaced
        finally:
            client.close()
