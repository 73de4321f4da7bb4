"""Who ate the cores during a run: CPU seconds per group of processes, the generator, the machine.

Why: on a shared 2-core box a throughput figure alone cannot say whether the
system under test, its sinks, the load generator or a neighbour (another
engineer's test run) used the CPU. Every run of the benchmark is wrapped in a
``CpuWindow``: user + system seconds of each named group of processes (read
with psutil at the start and the end, processes found afresh each time), of
the children this process reaped meanwhile (wrk, the probe process:
``RUSAGE_CHILDREN``), of this process itself (``RUSAGE_SELF``: the harness, and
the generator too when it is the in-process emitter), and of the whole machine
(``/proc/stat`` through psutil). What the machine spent beyond all of these is
``other_s``: somebody else's work. The load average at both ends is kept so a
noisy round can be spotted.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable, Iterable

import psutil

PidSource = Callable[[], Iterable[int]]


def process_tree(pid: int | None) -> list[int]:
    """``pid`` and all its descendants (empty if it is gone)."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def _cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = times.user + times.system
    return out


def _rusage_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _machine() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, getattr(t, "steal", 0.0)


TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "TCPTimeouts", "TCPReqQFullDrop",
                "TCPReqQFullDoCookies", "SyncookiesSent", "TCPAbortOnData", "TCPAbortOnClose")


def tcp_counters() -> dict[str, int]:
    """Machine-wide TcpExt counters that explain a latency tail: accept-queue overflows, SYN retransmits."""
    try:
        lines = open("/proc/net/netstat").read().split("\n")
    except OSError:
        return {}
    for header, values in zip(lines[::2], lines[1::2]):
        if header.startswith("TcpExt:"):
            found = dict(zip(header.split()[1:], values.split()[1:]))
            return {k: int(found[k]) for k in TCP_COUNTERS if k in found}
    return {}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class CpuWindow:
    """Start with ``CpuWindow(groups)``, end with ``stop()``: a dict of CPU seconds for that window."""

    def __init__(self, groups: dict[str, PidSource]) -> None:
        self.groups = groups
        self.loadavg_start = loadavg()
        self.before = {name: _cpu_seconds(source()) for name, source in groups.items()}
        self.children = _rusage_seconds(resource.RUSAGE_CHILDREN)
        self.self_ = _rusage_seconds(resource.RUSAGE_SELF)
        self.machine_busy, self.machine_steal = _machine()
        self.tcp = tcp_counters()
        self.started = time.monotonic()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        busy, steal = _machine()
        groups: dict[str, float] = {}
        for name, source in self.groups.items():
            before = self.before[name]
            pids = set(source()) | set(before)
            after = _cpu_seconds(pids)
            # a process born during the window counts from 0; one that died in it is lost (rare: a respawn)
            groups[name] = sum(max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in after.items())
        generator = _rusage_seconds(resource.RUSAGE_CHILDREN) - self.children
        harness = _rusage_seconds(resource.RUSAGE_SELF) - self.self_
        machine = busy - self.machine_busy
        ours = sum(groups.values()) + generator + harness
        cores = os.cpu_count() or 1
        tcp = tcp_counters()
        return {
            "wall_s": wall,
            "groups_s": groups,
            "generator_s": generator,  # children reaped in the window: wrk, the probe process
            "harness_s": harness,  # this process: progress lines, samplers, and the emitter when it generates
            "machine_busy_s": machine,
            "machine_steal_s": steal - self.machine_steal,
            "other_s": machine - ours,  # not ours: other engineers' tests, the kernel's own threads
            "machine_busy_fraction": machine / max(wall * cores, 1e-9),
            "loadavg_start": self.loadavg_start,
            "loadavg_end": loadavg(),
            # machine-wide, so another engineer's test can add to them; non-zero ListenOverflows or
            # TCPSynRetrans in a run explain second-long latencies (a retransmitted SYN waits 1 s)
            "tcp": {k: v - self.tcp.get(k, 0) for k, v in tcp.items() if v - self.tcp.get(k, 0)},
        }


def per_answer_us(cpu: dict[str, Any], answers: int, generator_in_harness: bool) -> dict[str, float | None]:
    """µs of CPU per answer for each party of a run (``sut`` is the system under test's own processes)."""
    if answers <= 0:
        return {}
    generator = cpu["generator_s"] + (cpu["harness_s"] if generator_in_harness else 0.0)
    out: dict[str, float | None] = {name: seconds / answers * 1e6 for name, seconds in cpu["groups_s"].items()}
    out["generator"] = generator / answers * 1e6
    out["machine"] = cpu["machine_busy_s"] / answers * 1e6
    return out
