"""The supervisor's analyzer set: stable slots, health state, and what workers see in the table.

Every change of an analyzer's routable state or effective weight is published
to the shared table in one seqlocked update that also starts a new routing
epoch, so the split follows the new effective weights from that moment with no
catch-up burst.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from distributor.config import Config, ConfigError
from distributor.health import AnalyzerHealth, check
from distributor.shared_table import C_EJECTION_REPORTS, REMOVED, STATE_NAMES, SharedTable

# effective weights closer than this (relative) are not worth a new epoch
WEIGHT_EPSILON = 0.02


class AnalyzerSet:
    def __init__(self, table: SharedTable, config: Config) -> None:
        self.table = table
        self.config = config
        self.slots: dict[str, int] = {}
        self.urls: dict[str, str] = {}
        self.health: dict[str, AnalyzerHealth] = {}
        self._published: dict[int, tuple[int, float, int]] = {}
        self.install(config)

    def install(self, config: Config) -> None:
        """Adopt the configured analyzers; names keep their slot (and counters) across reloads."""
        self.config = config
        table = self.table
        wanted = {a.name for a in config.analyzers}
        for name in list(self.health):
            if name not in wanted:
                del self.health[name]
        table.begin_update()
        try:
            for analyzer in config.analyzers:
                slot = self.slots.get(analyzer.name)
                if slot is None:
                    slot = len(self.slots)
                    if slot >= table.max_analyzers:
                        raise ConfigError(f"analyzers: at most {table.max_analyzers} analyzers per run")
                    self.slots[analyzer.name] = slot
                table.write_analyzer(slot, analyzer.name, analyzer.url, analyzer.weight, analyzer.mode)
                self.urls[analyzer.name] = analyzer.url
                if analyzer.name in self.health:
                    self.health[analyzer.name].weight = analyzer.weight
                else:
                    self.health[analyzer.name] = AnalyzerHealth(analyzer.name, analyzer.weight)
            self._write(time.monotonic())
        finally:
            table.end_update()

    def _targets(self, now: float) -> dict[int, tuple[int, float, int]]:
        targets = {slot: (REMOVED, 0.0, 0) for name, slot in self.slots.items() if name not in self.health}
        for name, health in self.health.items():
            weight = health.effective_weight(now, self.config.health, self.config.outlier)
            targets[self.slots[name]] = (health.state, weight, health.admissions)
        return targets

    def _write(self, now: float) -> None:
        for slot, (state, weight, admissions) in self._targets(now).items():
            self.table.set_effective(slot, state, weight, admissions)
            self._published[slot] = (state, weight, admissions)
        self.table.start_epoch()

    def publish(self) -> bool:
        """Advance time-driven states; write the table (new epoch) only if something changed."""
        now = time.monotonic()
        for health in self.health.values():
            health.settle(now, self.config.outlier)
        targets = self._targets(now)
        if all(_same(self._published.get(slot), target) for slot, target in targets.items()):
            return False
        self.table.begin_update()
        try:
            self._write(now)
        finally:
            self.table.end_update()
        return True

    def collect_ejections(self) -> None:
        """Workers count ejection reports in their rows; any new one ejects the analyzer for all."""
        reports = self.table.global_counters(C_EJECTION_REPORTS)
        now = time.monotonic()
        for name, health in self.health.items():
            seen = reports[self.slots[name]]
            if seen > health.reports_seen:
                health.reports_seen = seen
                health.last_check = "ejected by a worker after consecutive send failures"
                health.observe_ejection(now, self.config.outlier)

    async def run_checks(self, session: aiohttp.ClientSession) -> None:
        """One round of active checks, all analyzers concurrently."""
        names = list(self.health)
        results = await asyncio.gather(*(check(session, self.urls[n], self.config.health) for n in names))
        now = time.monotonic()
        for name, result in zip(names, results):
            if name in self.health:
                self.health[name].observe_check(result, now, self.config.health, self.config.outlier)

    async def check_forever(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                started = time.monotonic()
                await self.run_checks(session)
                self.publish()
                await asyncio.sleep(max(0.0, self.config.health.interval - (time.monotonic() - started)))

    def view(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {name: {"state": STATE_NAMES[h.state], **h.view(now)} for name, h in self.health.items()}

    def any_routable(self) -> bool:
        return any(h.routable for h in self.health.values())


def _same(published: tuple[int, float, int] | None, target: tuple[int, float, int]) -> bool:
    if published is None:
        return False
    state, weight, admissions = published
    new_state, new_weight, new_admissions = target
    if state != new_state or admissions != new_admissions or (weight == 0) != (new_weight == 0):
        return False
    return abs(new_weight - weight) <= WEIGHT_EPSILON * max(weight, new_weight)
