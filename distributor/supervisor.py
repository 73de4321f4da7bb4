"""The supervisor: owns the shared table, the worker pool and the control plane.

Modelled on gunicorn's arbiter: signal handlers only enqueue; one main loop
reaps, respawns and kills. Graceful stop is TERM -> ``graceful_timeout`` ->
KILL. A worker slot that fails to boot ``MAX_BOOT_FAILURES`` times in a row
stops the supervisor with one error line instead of a restart loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import orjson
import psutil

from distributor.delivery.analyzer_set import AnalyzerSet
from distributor.config import Config, ConfigError
from distributor.shared_table import (
    W_HEARTBEAT,
    W_PID,
    W_READY,
    W_STATE,
    SharedTable,
)
from distributor.workers.ingest_worker import CONFIG_ENV

log = logging.getLogger("distributor.supervisor")
MAX_BOOT_FAILURES = 3
BOOT_FAILURE_EXIT = 3
TICK = 0.1
MEMORY_CHECK_INTERVAL = 1.0


@dataclass
class WorkerHandle:
    """What the supervisor knows of one worker slot."""

    slot: int
    process: subprocess.Popen[bytes] | None = None
    spawned_at: float = 0.0
    ready: bool = False
    restarts: int = 0
    boot_failures: int = 0
    kill_reason: str = ""
    exits: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.table = SharedTable.create(max_workers=config.workers, rate_limit_slots=config.rate_limit.slots)
        self.workers = [WorkerHandle(slot) for slot in range(config.workers)]
        self.analyzers = AnalyzerSet(self.table, config)
        self.started_at = time.time()
        self.restarts_total = 0
        self.memory_recycles = 0
        self._next_memory_check = 0.0
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._stopping = False
        self._exit_code = 0

    # --- worker processes ---------------------------------------------------------------------

    def spawn(self, handle: WorkerHandle) -> None:
        env = dict(os.environ)
        env[CONFIG_ENV] = orjson.dumps(self.config.for_workers()).decode()
        handle.process = subprocess.Popen(
            [sys.executable, "-m", "distributor.workers.ingest_worker", "--slot", str(handle.slot),
             "--table", self.table.name],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        handle.spawned_at = time.monotonic()
        handle.ready = False
        handle.kill_reason = ""
        log.info("worker %d spawned (pid %d)", handle.slot, handle.process.pid)

    def _row(self, handle: WorkerHandle, cell: int) -> int:
        return self.table.worker_value(handle.slot, cell)

    def reap(self) -> None:
        """Collect exited workers, count boot failures, respawn (unless stopping)."""
        for handle in self.workers:
            process = handle.process
            if process is None or process.poll() is None:
                continue
            code = process.returncode
            handle.exits.append(code)
            handle.process = None
            if self._stopping:
                continue
            if not handle.ready:
                handle.boot_failures += 1
                log.error("worker %d failed to boot (exit %d), %d in a row", handle.slot, code, handle.boot_failures)
                if handle.boot_failures >= MAX_BOOT_FAILURES:
                    log.critical("worker %d failed to boot %d times in a row; stopping", handle.slot,
                                 handle.boot_failures)
                    self._exit_code = BOOT_FAILURE_EXIT
                    self._stopping = True
                    continue
            else:
                reason = handle.kill_reason or f"exit code {code}"
                log.error("worker %d (pid %d) died: %s; respawning", handle.slot, process.pid, reason)
            handle.restarts += 1
            self.restarts_total += 1
            self.spawn(handle)

    def watch(self) -> None:
        """Mark booted workers ready; kill those whose event loop stopped stamping heartbeats."""
        now = time.monotonic()
        for handle in self.workers:
            process = handle.process
            if process is None or process.returncode is not None:
                continue
            if self._row(handle, W_PID) != process.pid:
                continue
            if not handle.ready and self._row(handle, W_STATE) == W_READY:
                handle.ready = True
                handle.boot_failures = 0
            heartbeat = self.table.floats[self.table.worker_base(handle.slot) + W_HEARTBEAT]
            if handle.ready and now - heartbeat > self.config.worker_timeout and not handle.kill_reason:
                handle.kill_reason = f"event loop stalled for {now - heartbeat:.1f}s"
                log.error("worker %d (pid %d): %s; killing", handle.slot, process.pid, handle.kill_reason)
                process.kill()

    def check_memory(self) -> None:
        """Replace, gracefully (queues flushed first), a worker whose RSS is above max_worker_memory_mb."""
        limit_mb = self.config.max_worker_memory_mb
        now = time.monotonic()
        if not limit_mb or now < self._next_memory_check:
            return
        self._next_memory_check = now + MEMORY_CHECK_INTERVAL
        for handle in self.workers:
            process = handle.process
            if process is None or not handle.ready or handle.kill_reason:
                continue
            try:
                rss = psutil.Process(process.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit_mb * (1 << 20):
                handle.kill_reason = f"RSS {rss / (1 << 20):.1f} MB above max_worker_memory_mb={limit_mb:g}"
                log.warning("worker %d (pid %d): %s; replacing it gracefully", handle.slot, process.pid,
                            handle.kill_reason)
                self.memory_recycles += 1
                process.send_signal(signal.SIGTERM)

    def all_ready(self) -> bool:
        return all(h.ready for h in self.workers)

    # --- signals and the main loop --------------------------------------------------------------

    def reload(self) -> None:
        if self._reload_config is None:
            return
        try:
            new = self._reload_config()
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        if new.workers != self.config.workers or new.listen != self.config.listen:
            log.warning("reload: workers and listen take effect at the next start only")
        try:
            self.analyzers.install(new)
        except ConfigError as exc:
            log.error("reload rejected: %s", exc)
            return
        self.config = replace(new, workers=self.config.workers, listen=self.config.listen)
        log.info("reloaded: %s", ", ".join(f"{a.name}@{a.weight:g}" for a in new.analyzers))

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(handled, self._signals.put_nowait, handled)
        for handle in self.workers:
            self.spawn(handle)
        checks = asyncio.create_task(self.analyzers.check_forever())
        announced = False
        try:
            while not self._stopping:
                sig: int | None
                try:
                    sig = await asyncio.wait_for(self._signals.get(), TICK)
                except asyncio.TimeoutError:
                    sig = None
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("received %s: stopping gracefully", signal.Signals(sig).name)
                    break
                if sig == signal.SIGHUP:
                    self.reload()
                self.reap()
                self.watch()
                self.check_memory()
                self.analyzers.collect_ejections()
                self.analyzers.publish()
                if not announced and self.all_ready():
                    announced = True
                    log.info("%d workers ready on %s", len(self.workers), self.config.listen)
                    if on_ready:
                        on_ready()
            checks.cancel()
            await self.stop_workers()
        finally:
            self.kill_workers()
            self.table.close()
        return self._exit_code

    async def stop_workers(self) -> None:
        """TERM every worker, wait up to graceful_timeout (+ a margin) for them to flush, then KILL."""
        self._stopping = True
        for handle in self.workers:
            if handle.process and handle.process.poll() is None:
                handle.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.graceful_timeout + 5
        while time.monotonic() < deadline:
            if all(h.process is None or h.process.poll() is not None for h in self.workers):
                break
            await asyncio.sleep(TICK)
        self.kill_workers()

    def kill_workers(self) -> None:
        for handle in self.workers:
            process = handle.process
            if process and process.poll() is None:
                log.error("worker %d (pid %d) did not stop in time; killing", handle.slot, process.pid)
                process.kill()
                process.wait()
