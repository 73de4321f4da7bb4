"""The supervisor: owns the shared table, the worker pool and the control plane.

Modelled on gunicorn's arbiter: signal handlers only enqueue; one main loop
reaps, respawns and kills, and nothing that goes wrong in one of its steps
(a reload, the health checker, a psutil sample) ends it: the error is logged
and the next tick runs as usual.

* Graceful stop is TERM -> each worker's own ``graceful_timeout`` -> KILL; a
  second TERM/INT stops at once (the workers count what they drop).
* Workers are replaced one at a time (memory recycling, rolling a reload's
  worker settings), so the data port never closes while others serve.
* A worker slot that fails to boot ``MAX_BOOT_FAILURES`` times in a row (its
  own error exit, or no readiness within ``worker_timeout``) stops the
  supervisor with one error line instead of a restart loop; deaths by an
  outside signal (an OOM kill) are respawned, not counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import orjson
import psutil

from distributor.cgroup import CgroupMemory, under_pressure
from distributor.config import ENV_PREFIX, Config, ConfigError
from distributor.delivery.analyzer_set import AnalyzerSet
from distributor.ingest.listener import PortClaim, claim_port
from distributor.tls import analyzer_context, pin_files, server_context
from distributor.wal.segment import WalLocked, lock
from distributor.shared_table import (
    H_MEMORY_PRESSURE,
    W_HEARTBEAT,
    W_PID,
    W_READY,
    W_READY_RSS,
    W_STATE,
    W_WAL_STATE,
    WAL_AVAILABLE,
    SharedTable,
)
from distributor.workers.ingest_worker import CONFIG_ENV

log = logging.getLogger("distributor.supervisor")
MAX_BOOT_FAILURES = 3
BOOT_FAILURE_EXIT = 3
TICK = 0.1
MEMORY_CHECK_INTERVAL = 1.0
STOP_MARGIN = 5.0  # beyond a worker's graceful_timeout before it is killed
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# settings the workers read: a reload that changes one rolls the workers, one at a time
WORKER_SETTINGS = ("graceful_timeout", "routing_refresh_interval", "log_format", "ingest", "queue", "sender",
                   "outlier", "overload", "rate_limit", "tracing")
# the WAL too: a worker rolled onto another directory would leave the old one's packets behind
RESTART_SETTINGS = ("workers", "listen", "admin_listen", "allow_shared_port", "wal", "tls")
# settings the supervisor reads: a reload applies them at once (analyzers are reported by the analyzer set)
SUPERVISOR_SETTINGS = ("worker_timeout", "max_worker_memory_mb", "health", "admin")
WORKER_OVERHEAD = 60 << 20  # what a worker needs beside its queues (measured: README, memory bound)
STALE_HEARTBEAT = 2.0  # seconds: a worker whose loop has not stamped since is not counted as serving


class SignalInbox:
    """Signals only enqueue. Installed before the shared table exists, moved onto the loop by ``run``."""

    def __init__(self) -> None:
        self._early: list[int] = []
        self.queue: asyncio.Queue[int] | None = None

    def install_early(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._enqueue_early)

    def _enqueue_early(self, signum: int, _frame: object) -> None:
        self._early.append(signum)

    def attach(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[int]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for handled in HANDLED_SIGNALS:
            loop.add_signal_handler(handled, queue.put_nowait, int(handled))
        for early in self._early:
            queue.put_nowait(early)
        self._early.clear()
        self.queue = queue
        return queue


@dataclass
class WorkerHandle:
    """What the supervisor knows of one worker slot."""

    slot: int
    process: subprocess.Popen[bytes] | None = None
    config: Config | None = None  # what the running process was started with
    spawned_at: float = 0.0
    ready: bool = False
    restarts: int = 0
    boot_failures: int = 0
    kill_reason: str = ""
    retiring: bool = False  # asked to stop (recycle, roll): a replacement follows its exit
    stop_deadline: float = float("inf")
    fresh_rss: int = 0  # RSS the worker had before it listened: a memory limit below it can never be met
    cpu_base: float = 0.0  # CPU seconds of the slot's earlier processes: the counter never goes back
    exits: list[int] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        server_context(config.tls, verify_clients=True)  # a bad certificate file: exit 2 now, not a boot loop
        analyzer_context(config.tls)
        # what every worker loads, whenever it starts: the files as they were now (a restart takes new ones)
        self._worker_tls, self._tls_fds = pin_files(config.tls)
        self._port_claim: PortClaim | None = claim_port(config.listen, config.allow_shared_port)
        try:  # one distributor per WAL directory: a second one would take slots the first one's workers own
            self._wal_claim = lock(Path(config.wal.dir)) if config.wal.dir else -1
        except (WalLocked, OSError) as exc:
            self._port_claim.close()
            raise ConfigError(f"wal.dir: {config.wal.dir} is in use by another distributor ({exc})") from None
        self.table = SharedTable.create(max_workers=config.workers, rate_limit_slots=config.rate_limit.slots)
        try:
            self.analyzers = AnalyzerSet(self.table, config)
        except BaseException:
            self.close()
            raise
        self.workers = [WorkerHandle(slot) for slot in range(config.workers)]
        self.cgroup = CgroupMemory()
        self.memory_ratio = 0.0  # the cgroup's anonymous memory over its limit, at the last check
        if self.cgroup.limit is not None:
            planned = config.workers * (config.queue.worker_max_bytes + WORKER_OVERHEAD)
            if planned > self.cgroup.limit:
                log.warning("workers x (queue.worker_max_bytes + ~60 MiB) = %d MiB exceeds the cgroup's memory "
                            "limit of %d MiB: memory-pressure shedding (overload.memory_watermark) will bound the "
                            "queues first", planned >> 20, self.cgroup.limit >> 20,
                            extra={"event": "memory_limit_below_queues"})
        self.started_at = time.time()
        self.restarts_total = 0
        self.memory_recycles = 0
        self._next_memory_check = 0.0
        self._to_roll: list[int] = []
        self._stopping = False
        self._exit_code = 0
        self._checks: asyncio.Task[None] | None = None

    def close(self) -> None:
        self.table.close()
        for fd in self._tls_fds:
            os.close(fd)
        self._tls_fds = []
        if self._port_claim is not None:
            self._port_claim.close()
            self._port_claim = None
        if self._wal_claim >= 0:
            os.close(self._wal_claim)
            self._wal_claim = -1

    # --- worker processes ---------------------------------------------------------------------

    def spawn(self, handle: WorkerHandle) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}  # no admin token
        env[CONFIG_ENV] = orjson.dumps(replace(self.config, tls=self._worker_tls).for_workers()).decode()
        # The worker starts with SIGINT blocked (a mask survives fork and exec) and ignores it once running: a
        # Ctrl-C at the terminal, sent to the whole process group, is the supervisor's alone, which stops the
        # workers in order; an interpreter still starting would otherwise die of it with a traceback. The
        # workers stay in the supervisor's process group, so `kill -9 -PGID` takes them all. A SIGINT that
        # comes meanwhile is delivered to the supervisor when its mask is restored, not lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            handle.process = subprocess.Popen(
                [sys.executable, "-m", "distributor.workers", "--slot", str(handle.slot), "--table", self.table.name],
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=self._tls_fds,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        handle.config = self.config
        handle.spawned_at = time.monotonic()
        handle.ready = handle.retiring = False
        handle.kill_reason = ""
        handle.stop_deadline = float("inf")
        handle.fresh_rss = 0
        log.info("worker %d spawned (pid %d)", handle.slot, handle.process.pid)

    def _row(self, handle: WorkerHandle, cell: int) -> int:
        return self.table.worker_value(handle.slot, cell)

    def reap(self) -> None:
        """Collect exited workers (with the CPU they used), count boot failures, respawn (unless stopping)."""
        for handle in self.workers:
            process = handle.process
            if process is None:
                continue
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            if process.poll() is None:
                continue
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            handle.cpu_base += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            code = process.returncode
            handle.exits.append(code)
            handle.process = None
            if self._stopping:
                continue
            planned = handle.retiring and handle.ready
            if not handle.ready and (code > 0 or handle.kill_reason.startswith("not ready")):
                handle.boot_failures += 1
                log.error("worker %d failed to boot (%s), %d in a row", handle.slot,
                          handle.kill_reason or f"exit {code}", handle.boot_failures)
                if handle.boot_failures >= MAX_BOOT_FAILURES:
                    log.critical("worker %d failed to boot %d times in a row; stopping", handle.slot,
                                 handle.boot_failures)
                    self._exit_code = BOOT_FAILURE_EXIT
                    self._stopping = True
                    continue
            elif planned:
                log.info("worker %d (pid %d) stopped (%s); starting its replacement", handle.slot, process.pid,
                         handle.kill_reason)
            else:
                reason = handle.kill_reason or (f"signal {-code}" if code < 0 else f"exit code {code}")
                log.error("worker %d (pid %d) died: %s; respawning", handle.slot, process.pid, reason)
            handle.restarts += 1
            self.restarts_total += 1
            self.spawn(handle)

    def _kill(self, handle: WorkerHandle, reason: str) -> None:
        assert handle.process is not None
        handle.kill_reason = reason
        log.error("worker %d (pid %d): %s; killing", handle.slot, handle.process.pid, reason)
        handle.process.kill()

    def watch(self) -> None:
        """Mark booted workers ready; kill those that do not boot, stall, or outstay their stop deadline."""
        now = time.monotonic()
        for handle in self.workers:
            process = handle.process
            if process is None or not handle.alive or handle.kill_reason.startswith(("not ready", "event loop")):
                continue
            timeout = self.config.worker_timeout
            if self._row(handle, W_PID) != process.pid:
                if not handle.ready and now - handle.spawned_at > timeout:
                    self._kill(handle, f"not ready within worker_timeout={timeout:g}s")
                continue
            if not handle.ready:
                if self._row(handle, W_STATE) == W_READY:
                    handle.ready = True
                    handle.boot_failures = 0
                    handle.fresh_rss = self._row(handle, W_READY_RSS)
                    self._warn_limit_below_fresh_rss(handle)
                elif now - handle.spawned_at > timeout:
                    self._kill(handle, f"not ready within worker_timeout={timeout:g}s")
                    continue
            heartbeat = self.table.floats[self.table.worker_base(handle.slot) + W_HEARTBEAT]
            if handle.ready and now - heartbeat > timeout:
                self._kill(handle, f"event loop stalled for {now - heartbeat:.1f}s")
            elif now > handle.stop_deadline:
                self._kill(handle, "did not stop within graceful_timeout")

    def _retire(self, handle: WorkerHandle, reason: str) -> None:
        """Ask one worker to stop gracefully; its replacement starts when it has exited."""
        assert handle.process is not None and handle.config is not None
        handle.retiring = True
        handle.kill_reason = reason
        handle.stop_deadline = time.monotonic() + handle.config.graceful_timeout + STOP_MARGIN
        handle.process.send_signal(signal.SIGTERM)

    def _replacing(self) -> bool:
        """A worker is being replaced: another replacement waits (the port never loses two at once)."""
        return any(h.retiring or (h.alive and not h.ready) for h in self.workers)

    def check_memory(self) -> None:
        """Memory pressure of the cgroup, published for the workers at every tick (queues filling at tens of MB/s
        outrun a check once a second: the watermark leaves 15% of the limit); replace, gracefully and one at a
        time, a worker whose RSS is above max_worker_memory_mb (sampled once a second)."""
        self._publish_pressure()
        now = time.monotonic()
        if now < self._next_memory_check:
            return
        self._next_memory_check = now + MEMORY_CHECK_INTERVAL
        limit_mb = self.config.max_worker_memory_mb
        limit = limit_mb * (1 << 20)
        for handle in self.workers:
            if not limit or not handle.alive or not handle.ready or handle.retiring:
                continue
            assert handle.process is not None
            try:
                rss = psutil.Process(handle.process.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit and handle.fresh_rss <= limit and not self._replacing():
                reason = f"RSS {rss / (1 << 20):.1f} MB above max_worker_memory_mb={limit_mb:g}"
                log.warning("worker %d (pid %d): %s; replacing it gracefully", handle.slot, handle.process.pid,
                            reason)
                self.memory_recycles += 1
                self._retire(handle, reason)

    def _warn_limit_below_fresh_rss(self, handle: WorkerHandle) -> None:
        """A limit below what a worker is before its first packet can never be met: it is not recycled for it
        (every replacement would be over it at once), and the operator is told."""
        limit_mb = self.config.max_worker_memory_mb
        if limit_mb and handle.fresh_rss > limit_mb * (1 << 20):
            log.warning("max_worker_memory_mb=%g is below a fresh worker's RSS (%.1f MB): worker %d will not be "
                        "recycled for memory; raise the limit", limit_mb, handle.fresh_rss / (1 << 20), handle.slot,
                        extra={"event": "memory_limit_below_fresh_rss"})

    def _publish_pressure(self) -> None:
        """Above overload.memory_watermark of the cgroup's limit (anonymous memory) the workers' queues stop
        growing: 503 instead of an OOM kill that would take every packet a worker holds."""
        limit = self.cgroup.limit
        if limit is None:
            return
        self.memory_ratio = ratio = self.cgroup.anonymous() / limit
        watermark = self.config.overload.memory_watermark
        ints = self.table.ints
        pressed = under_pressure(ratio, watermark, bool(ints[H_MEMORY_PRESSURE]))
        if pressed and not ints[H_MEMORY_PRESSURE]:
            ints[H_MEMORY_PRESSURE] = 1
            log.warning("memory pressure: %.0f%% of the cgroup's %d MiB limit in use; queues stop growing (503)",
                        ratio * 100, limit >> 20, extra={"event": "memory_pressure", "ratio": ratio})
        elif not pressed and ints[H_MEMORY_PRESSURE]:
            ints[H_MEMORY_PRESSURE] = 0
            log.info("memory pressure over: %.0f%% of the cgroup's limit", ratio * 100,
                     extra={"event": "memory_pressure_over", "ratio": ratio})

    def roll(self) -> None:
        """Restart the workers a reload left with old settings, one at a time."""
        while self._to_roll and not self._replacing():
            handle = self.workers[self._to_roll.pop(0)]
            if handle.alive and handle.config is not self.config:
                self._retire(handle, "rolled to apply reloaded settings")
                return

    def serving(self) -> list[WorkerHandle]:
        """Workers that accept packets now: ready, not stopping or being replaced, their loop alive (a fresh
        heartbeat), their log (if on) writable."""
        fresh = time.monotonic() - STALE_HEARTBEAT
        floats = self.table.floats
        return [h for h in self.workers if h.alive and h.ready and not h.retiring
                and self._row(h, W_STATE) == W_READY
                and floats[self.table.worker_base(h.slot) + W_HEARTBEAT] > fresh
                and (not self.config.wal.dir or self._row(h, W_WAL_STATE) == WAL_AVAILABLE)]

    def all_ready(self) -> bool:
        return all(h.ready for h in self.workers)

    # --- reload -------------------------------------------------------------------------------------

    def reload(self) -> None:
        """All or nothing: a new config is validated and planned completely, then applied everywhere."""
        if self._reload_config is None:
            return
        try:
            new = self._reload_config()
            self.analyzers.install(new)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc,
                      extra={"event": "reload_rejected"})
            return
        except Exception as exc:  # whatever a file can do to a parser: rejected, never the end of the supervisor
            log.exception("reload rejected, keeping the running configuration: %s: %s", exc.__class__.__name__, exc,
                          extra={"event": "reload_rejected"})
            return
        old = self.config
        restart_only = [key for key in RESTART_SETTINGS if getattr(new, key) != getattr(old, key)]
        if restart_only:
            log.warning("reload: %s take effect at the next start only", ", ".join(restart_only),
                        extra={"event": "reload_needs_restart", "keys": restart_only})
        self.config = replace(new, **{key: getattr(old, key) for key in RESTART_SETTINGS})
        rolled = changed_settings(old, self.config, WORKER_SETTINGS)
        applied = changed_settings(old, self.config, SUPERVISOR_SETTINGS)
        if applied:
            log.info("reload: applied now: %s", ", ".join(applied), extra={"event": "reload_applied", "keys": applied})
        if "max_worker_memory_mb" in applied:
            for handle in self.workers:
                if handle.ready:
                    self._warn_limit_below_fresh_rss(handle)
        if rolled:
            log.info("reload: rolling %d workers one at a time to apply %s", len(self.workers), ", ".join(rolled),
                     extra={"event": "reload_rolling", "keys": rolled})
            self._to_roll = [h.slot for h in self.workers]
        log.info("reloaded: %s", ", ".join(f"{a.name}@{a.weight:g}" for a in self.analyzers.definitions.values()),
                 extra={"event": "reloaded"})

    # --- the main loop ------------------------------------------------------------------------------

    def tick(self) -> None:
        """One pass of the arbiter's duties; each step's failure is contained."""
        for step in (self.reap, self.watch, self.check_memory, self.roll, self.analyzers.collect_ejections,
                     self.analyzers.publish, self._watch_checks):
            self._contained(step)

    @staticmethod
    def _contained(step: Callable[[], object]) -> None:
        try:
            step()
        except Exception:
            log.exception("supervisor step %s failed; continuing", getattr(step, "__name__", step),
                          extra={"event": "supervisor_step_failed"})

    def _watch_checks(self) -> None:
        """The health checker runs for the supervisor's whole life; restart it if it ever ends."""
        if self._checks is not None and not self._checks.done():
            return
        if self._checks is not None:
            error = None if self._checks.cancelled() else self._checks.exception()
            log.error("health checker ended (%r); restarting it", error, extra={"event": "health_checker_restarted"})
        self._checks = asyncio.get_running_loop().create_task(self.analyzers.check_forever())

    async def run(self, inbox: SignalInbox | None = None, on_ready: Callable[[], None] | None = None) -> int:
        queue = (inbox or SignalInbox()).attach(asyncio.get_running_loop())
        try:
            await self._serve(queue, on_ready)
            await self.stop_workers(queue)
        finally:
            self.kill_workers()
            self.close()
        return self._exit_code

    async def _serve(self, queue: asyncio.Queue[int], on_ready: Callable[[], None] | None) -> None:
        early = [queue.get_nowait() for _ in range(queue.qsize())]  # signals that came while starting
        if signal.SIGTERM in early or signal.SIGINT in early:
            log.info("stopped before the workers started")
            return
        for handle in self.workers:
            self.spawn(handle)
        if signal.SIGHUP in early:
            self._contained(self.reload)
        announced = False
        try:
            while not self._stopping:
                try:
                    sig: int | None = await asyncio.wait_for(queue.get(), TICK)
                except asyncio.TimeoutError:
                    sig = None
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("received %s: stopping gracefully", signal.Signals(sig).name)
                    return
                if sig == signal.SIGHUP:
                    self._contained(self.reload)
                self.tick()
                if not announced and self.all_ready():
                    announced = True
                    log.info("%d workers ready on %s", len(self.workers), self.config.listen)
                    if on_ready:
                        on_ready()
        finally:
            if self._checks is not None:
                self._checks.cancel()

    async def stop_workers(self, queue: asyncio.Queue[int]) -> None:
        """TERM every worker and wait for each one's graceful_timeout (+ a margin), then KILL.

        A second TERM/INT meanwhile passes a second TERM on (workers stop at once, counting what
        they drop); SIGHUP is ignored while stopping.
        """
        self._stopping = True
        for handle in self.workers:
            if handle.alive and not handle.retiring:  # a retiring worker has its TERM: a second one would hurry it
                assert handle.process is not None and handle.config is not None
                handle.process.send_signal(signal.SIGTERM)
                handle.stop_deadline = min(handle.stop_deadline,
                                           time.monotonic() + handle.config.graceful_timeout + STOP_MARGIN)
        hurried = False
        while any(h.alive for h in self.workers):
            try:
                sig = await asyncio.wait_for(queue.get(), TICK)
            except asyncio.TimeoutError:
                sig = None
            if sig in (signal.SIGTERM, signal.SIGINT) and not hurried:
                hurried = True
                log.warning("second %s: stopping the workers now", signal.Signals(sig).name)
                for handle in self.workers:
                    if handle.alive:
                        assert handle.process is not None
                        handle.process.send_signal(signal.SIGTERM)
                        handle.stop_deadline = min(handle.stop_deadline, time.monotonic() + STOP_MARGIN)
            self.reap()
            now = time.monotonic()
            for handle in self.workers:
                if handle.alive and now > handle.stop_deadline:
                    self._kill(handle, "did not stop within graceful_timeout")
        self.reap()

    def kill_workers(self) -> None:
        for handle in self.workers:
            process = handle.process
            if process and process.poll() is None:
                log.error("worker %d (pid %d) did not stop in time; killing", handle.slot, process.pid)
                process.kill()
                process.wait()


def changed_settings(old: Config, new: Config, keys: tuple[str, ...]) -> list[str]:
    """Dotted names of the settings among ``keys`` that differ, e.g. ["rate_limit.rate", "worker_timeout"]."""
    before, after = old.to_dict(), new.to_dict()
    changed = []
    for key in keys:
        if isinstance(before[key], dict):
            changed += [f"{key}.{k}" for k in before[key] if before[key][k] != after[key][k]]
        elif before[key] != after[key]:
            changed.append(key)
    return changed
