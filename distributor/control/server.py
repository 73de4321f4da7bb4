"""Control plane (aiohttp, in the supervisor): health, readiness, admin views, metrics.

Every figure is read from the shared table when asked for; the data path never
calls into this module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import psutil
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from distributor.control.admin_api import AdminApi
from distributor.control.metrics import TableCollector, cumulative
from distributor.tls import server_context
from distributor.shared_table import (
    C_NET_ROUTED_MESSAGES,
    H_MEMORY_PRESSURE,
    HTTP_STAT_CELLS,
    LATENCY_BUCKETS,
    STATE_NAMES,
    W_ACCEPTED,
    W_CONNECTIONS,
    W_GENERATION,
    W_LATENCY_BUCKETS,
    W_LATENCY_SUM_NS,
    W_LOOP_LAG,
    W_PID,
    W_QUEUED_BYTES,
    W_QUEUED_PACKETS,
    W_RATE_LIMITED,
    W_READY,
    W_REJECTED_INVALID,
    W_REJECTED_UNAVAILABLE,
    W_REQUESTS,
    W_SHED,
    W_LAG_SHED,
    W_STARTED,
    W_STATE,
    W_STOPPING,
    W_WAL_BYTES,
    W_WAL_FSYNC_BUCKETS,
    W_WAL_FSYNC_SUM_NS,
    W_WAL_OLDEST_MS,
    W_WAL_ORPHAN_SLOTS,
    W_WAL_OWN_BYTES,
    W_WAL_REPLAY_REMAINING_BYTES,
    W_WAL_SEGMENTS,
    W_WAL_STATE,
    W_WAL_UNACKED_MESSAGES,
    W_WAL_UNACKED_PACKETS,
    W_WAL_UNAVAILABLE_PACKETS,
    WAL_AVAILABLE,
    WAL_FSYNC_BUCKETS,
    WAL_OFF,
    SharedTable,
)
from distributor.wal.export import COUNTER_CELLS as WAL_COUNTER_CELLS

if TYPE_CHECKING:
    from distributor.supervisor import Supervisor

WORKER_STATES = {0: "free", 1: "booting", 2: "ready", 3: "stopping"}


def analyzers_view(supervisor: "Supervisor") -> list[dict[str, Any]]:
    """Per analyzer: definition, health, drain, queue depth and counters summed over every worker.

    ``share`` is the analyzer's fraction of all messages routed to it net of failovers
    (a packet failed over from A to B counts for B); ``epoch_share`` the same since the last
    change of the analyzer set or of an effective weight. ``state`` is one word (a failure wins
    over a drain); ``health`` and ``draining`` are the two facts apart.
    """
    table = supervisor.table
    _, rows = table.read_analyzers()
    counters = supervisor.analyzers.counters()
    health = supervisor.analyzers.view()
    rows = [row for row in rows if row.slot in counters]
    net = {row.slot: counters[row.slot]["net_routed_messages"] for row in rows}
    routable_weight = sum(r.effective_weight for r in rows if r.routable)
    routed_all = sum(net.values())
    epoch_routed = {r.slot: table.global_counters(C_NET_ROUTED_MESSAGES)[r.slot] - r.base_messages
                    for r in rows if r.routable}
    epoch_all = sum(epoch_routed.values())
    capacity = supervisor.config.queue.max_packets * len(supervisor.workers)
    view = []
    for row in rows:
        view.append({
            "name": row.name,
            "url": row.url,
            "mode": row.mode,
            "compression": row.compression,
            "weight": row.weight,
            "effective_weight": row.effective_weight if row.routable else 0.0,
            "state": row.display_state,
            "health": STATE_NAMES[row.state],
            "target_share": row.effective_weight / routable_weight if row.routable and routable_weight else 0.0,
            "share": net[row.slot] / routed_all if routed_all else 0.0,
            "epoch_share": epoch_routed.get(row.slot, 0) / epoch_all if epoch_all else 0.0,
            "queue_capacity_packets": capacity,
            **health.get(row.name, {}),
            **counters[row.slot],
        })
    return view


class WorkerSampler:
    """psutil samples of worker processes, at most one per second per process.

    Reading USS walks /proc/<pid>/smaps: on the supervisor's loop, a scrape storm on an
    unauthenticated endpoint must not turn into that much work, so a sample younger than
    ``MAX_AGE`` is served again. Process objects are kept so cpu_percent has a baseline, and
    dropped with their process.
    """

    MAX_AGE = 1.0

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        self._samples: dict[int, tuple[float, dict[str, Any]]] = {}

    def retain(self, pids: set[int]) -> None:
        for pid in [pid for pid in self._processes if pid not in pids]:
            del self._processes[pid]
            self._samples.pop(pid, None)

    def sample(self, pid: int) -> dict[str, Any]:
        now = time.monotonic()
        cached = self._samples.get(pid)
        if cached is not None and now - cached[0] < self.MAX_AGE:
            return cached[1]
        process = self._processes.get(pid)
        try:
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
                process.cpu_percent(None)
            with process.oneshot():
                memory = process.memory_full_info()
                cpu = process.cpu_times()
                data = {
                    "rss_bytes": memory.rss,
                    "uss_bytes": memory.uss,
                    "cpu_percent": process.cpu_percent(None),
                    "cpu_seconds": cpu.user + cpu.system,
                    "open_fds": process.num_fds(),
                }
        except psutil.Error:
            self._processes.pop(pid, None)
            self._samples.pop(pid, None)
            return {}
        self._samples[pid] = (now, data)
        return data


def workers_view(supervisor: "Supervisor", sampler: WorkerSampler) -> list[dict[str, Any]]:
    table = supervisor.table
    sampler.retain({h.process.pid for h in supervisor.workers if h.process is not None})
    view = []
    for handle in supervisor.workers:
        base = table.worker_base(handle.slot)
        pid = table.ints[base + W_PID]
        alive = handle.process is not None and handle.process.pid == pid
        state = table.ints[base + W_STATE] if alive else 0
        entry: dict[str, Any] = {
            "slot": handle.slot,
            "pid": pid if alive else None,
            "state": WORKER_STATES.get(state, "unknown"),
            "uptime_s": time.time() - table.floats[base + W_STARTED] if alive else 0.0,
            "restarts": handle.restarts,
            "event_loop_lag_s": table.floats[base + W_LOOP_LAG],
            "connections": table.ints[base + W_CONNECTIONS],
            "requests": table.ints[base + W_REQUESTS],
            "accepted_packets": table.ints[base + W_ACCEPTED],
            "rejected_invalid": table.ints[base + W_REJECTED_INVALID],
            "rejected_unavailable": table.ints[base + W_REJECTED_UNAVAILABLE],
            "shed_packets": table.ints[base + W_SHED],
            "loop_lag_shed_packets": table.ints[base + W_LAG_SHED],
            "rate_limited_packets": table.ints[base + W_RATE_LIMITED],
            "queued_packets": table.ints[base + W_QUEUED_PACKETS],
            "queued_bytes": table.ints[base + W_QUEUED_BYTES],
            "analyzer_generation": table.ints[base + W_GENERATION],
            "http": {name: table.ints[base + cell] for name, cell in HTTP_STAT_CELLS.items()},
            "wal_unavailable_packets": table.ints[base + W_WAL_UNAVAILABLE_PACKETS],
        }
        if table.ints[base + W_WAL_STATE] != WAL_OFF:
            entry["wal"] = {**wal_view(table, base), "max_bytes": supervisor.config.wal.max_bytes}
        if alive and state in (W_READY, W_STOPPING):
            entry.update(sampler.sample(pid))
        entry["cpu_seconds"] = handle.cpu_base + entry.get("cpu_seconds", 0.0)  # a slot's CPU never goes back
        view.append(entry)
    return view


def wal_view(table: SharedTable, base: int) -> dict[str, Any]:
    """A worker's write-ahead log from its row: gauges, counters and the fsync histogram (per bucket)."""
    ints = table.ints
    oldest_ms = ints[base + W_WAL_OLDEST_MS]
    return {
        "available": ints[base + W_WAL_STATE] == WAL_AVAILABLE,
        "bytes": ints[base + W_WAL_BYTES],
        "own_bytes": ints[base + W_WAL_OWN_BYTES],
        "segments": ints[base + W_WAL_SEGMENTS],
        "unacked_packets": ints[base + W_WAL_UNACKED_PACKETS],
        "unacked_messages": ints[base + W_WAL_UNACKED_MESSAGES],
        "oldest_unacked_age_s": max(0.0, time.time() - oldest_ms / 1000) if oldest_ms else 0.0,
        "replay_remaining_bytes": ints[base + W_WAL_REPLAY_REMAINING_BYTES],
        "orphan_slots": ints[base + W_WAL_ORPHAN_SLOTS],
        **{name: ints[base + cell] for name, cell in WAL_COUNTER_CELLS.items()},
        "fsync_seconds_sum": ints[base + W_WAL_FSYNC_SUM_NS] / 1e9,
        "fsync_buckets": [ints[base + W_WAL_FSYNC_BUCKETS + i] for i in range(len(WAL_FSYNC_BUCKETS))],
    }


def latency_histogram(supervisor: "Supervisor") -> tuple[list[tuple[str, int]], float]:
    """Ingest handler latency over every worker: cumulative (le, count) buckets and the sum in seconds."""
    table = supervisor.table
    counts = [0] * len(LATENCY_BUCKETS)
    total_ns = 0
    for handle in supervisor.workers:
        base = table.worker_base(handle.slot)
        total_ns += table.ints[base + W_LATENCY_SUM_NS]
        for i in range(len(LATENCY_BUCKETS)):
            counts[i] += table.ints[base + W_LATENCY_BUCKETS + i]
    return cumulative(LATENCY_BUCKETS, counts), total_ns / 1e9


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def build_app(supervisor: "Supervisor") -> web.Application:
    sampler = WorkerSampler()
    api = AdminApi(supervisor, lambda name: next((a for a in analyzers_view(supervisor) if a["name"] == name), None))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TableCollector(
        lambda: analyzers_view(supervisor),
        lambda: workers_view(supervisor, sampler),
        lambda: supervisor.restarts_total,
        lambda: supervisor.memory_recycles,
        lambda: supervisor.config.max_worker_memory_mb * (1 << 20),
        lambda: latency_histogram(supervisor),
        lambda: dict(api.changes),
        lambda: (supervisor.cgroup.limit or 0, supervisor.memory_ratio,
                 supervisor.table.ints[H_MEMORY_PRESSURE]),
    ))

    async def health(_: web.Request) -> web.Response:
        return _json({"status": "ok", "pid": os.getpid(), "uptime_s": time.time() - supervisor.started_at})

    async def ready(_: web.Request) -> web.Response:
        """200 only when a worker accepts connections now and an analyzer can take packets."""
        analyzers = [a for a in analyzers_view(supervisor) if a["effective_weight"] > 0]
        workers = len(supervisor.serving())
        ok = bool(analyzers) and workers > 0
        return _json({"ready": ok, "analyzers_available": len(analyzers), "workers_ready": workers},
                     status=200 if ok else 503)

    async def analyzers(_: web.Request) -> web.Response:
        return _json({"generation": supervisor.table.generation, "analyzers": analyzers_view(supervisor)})

    async def workers(_: web.Request) -> web.Response:
        return _json({"workers": workers_view(supervisor, sampler)})

    openapi = (Path(__file__).parent / "openapi.json").read_bytes()

    async def openapi_document(_: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/analyzers", analyzers)
    app.router.add_get("/admin/workers", workers)
    app.router.add_get("/openapi.json", openapi_document)
    api.register(app)
    return app


async def start_control_plane(supervisor: "Supervisor") -> web.AppRunner:
    runner = web.AppRunner(build_app(supervisor), access_log=None)
    await runner.setup()
    address = supervisor.config.admin_listen
    context = server_context(supervisor.config.tls, verify_clients=False)  # admin: bearer token, not certificates
    await web.TCPSite(runner, address.host, address.port, ssl_context=context).start()
    return runner
