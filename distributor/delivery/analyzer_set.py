"""The supervisor's analyzer set: stable slots, health, operator changes, and what workers see.

Every change of an analyzer's state or effective weight is published to the
shared table in one seqlocked update that also starts a new routing epoch, so
the split follows the new effective weights from that moment with no catch-up
burst.

Operator changes (drain, weight, add, remove) made through the admin API are
kept in ``admin.state_file`` when one is configured (like HAProxy's
server-state file) and re-applied on top of the configuration at every reload
and start; without it the configuration file wins at the next reload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import aiohttp

from distributor.config import AnalyzerConfig, Config, ConfigError, validate_analyzer
from distributor.delivery.health import AnalyzerHealth, check
from distributor.shared_table import (
    C_EJECTION_REPORTS,
    C_QUEUE_PACKETS,
    DRAINED,
    DRAINING,
    REMOVED,
    STATE_NAMES,
    SharedTable,
)

log = logging.getLogger("distributor.analyzers")

# effective weights closer than this (relative) are not worth a new epoch
WEIGHT_EPSILON = 0.02


class UnknownAnalyzer(KeyError):
    pass


class AnalyzerSet:
    def __init__(self, table: SharedTable, config: Config) -> None:
        self.table = table
        self.config = config
        self.slots: dict[str, int] = {}
        self.definitions: dict[str, AnalyzerConfig] = {}
        self.health: dict[str, AnalyzerHealth] = {}
        self.removing: set[str] = set()
        self._state: dict[str, Any] = {"weights": {}, "drained": [], "added": [], "removed": []}
        self._published: dict[int, tuple[int, float, int]] = {}
        self.install(config)

    # --- configuration ----------------------------------------------------------------------------

    def install(self, config: Config) -> None:
        """Adopt the configured analyzers (plus the state file's changes); names keep their slot."""
        self.config = config
        self._state = self._load_state()
        definitions = {a.name: a for a in config.analyzers if a.name not in self._state["removed"]}
        for added in self._state["added"]:
            definitions.setdefault(added["name"], AnalyzerConfig(**added))
        for name, weight in self._state["weights"].items():
            if name in definitions:
                definitions[name] = dataclasses.replace(definitions[name], weight=weight)
        if not definitions:
            raise ConfigError("analyzers: the state file removed every analyzer")
        for name in list(self.health):
            if name not in definitions:
                del self.health[name]
        self.definitions = definitions
        with self._publishing():
            for analyzer in definitions.values():
                self._define(analyzer)
                self.health[analyzer.name].draining = analyzer.name in self._state["drained"]

    def _define(self, analyzer: AnalyzerConfig) -> None:
        slot = self.slots.get(analyzer.name)
        if slot is None:
            slot = len(self.slots)
            if slot >= self.table.max_analyzers:
                raise ConfigError(f"analyzers: at most {self.table.max_analyzers} analyzers per run")
            self.slots[analyzer.name] = slot
        self.table.write_analyzer(slot, analyzer.name, analyzer.url, analyzer.weight, analyzer.mode)
        self.definitions[analyzer.name] = analyzer
        if analyzer.name in self.health:
            self.health[analyzer.name].weight = analyzer.weight
        else:
            self.health[analyzer.name] = AnalyzerHealth(analyzer.name, analyzer.weight)

    def _load_state(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"weights": {}, "drained": [], "added": [], "removed": []}
        path = self.config.admin.state_file
        if not path or not os.path.exists(path):
            return empty
        try:
            with open(path, encoding="utf-8") as fh:
                state = json.load(fh)
            return {key: state.get(key, default) for key, default in empty.items()}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"admin.state_file: cannot read {path}: {exc}") from None

    def _save_state(self) -> None:
        path = self.config.admin.state_file
        if not path:
            return
        temporary = Path(path).with_suffix(".tmp")
        temporary.write_text(json.dumps(self._state, indent=2))
        os.replace(temporary, path)

    # --- operator actions (admin API) ---------------------------------------------------------------

    def _health(self, name: str) -> AnalyzerHealth:
        try:
            return self.health[name]
        except KeyError:
            raise UnknownAnalyzer(name) from None

    def drain(self, name: str) -> bool:
        """Stop routing new packets to it; its queues keep flushing to it. Returns the old flag."""
        health = self._health(name)
        old, health.draining = health.draining, True
        self._remember_drain(name, True)
        self.publish()
        return old

    def undrain(self, name: str) -> bool:
        health = self._health(name)
        old = health.draining
        if old:
            health.draining = False
            if health.routable:
                health.admit(time.monotonic(), self.config.outlier)  # ramp back up, no burst
        self.removing.discard(name)
        self._remember_drain(name, False)
        self.publish()
        return old

    def set_weight(self, name: str, weight: float) -> float:
        health = self._health(name)
        updated = dataclasses.replace(self.definitions[name], weight=weight)
        validate_analyzer(f"analyzers.{name}", updated)
        old = health.weight
        with self._publishing():
            self._define(updated)
        self._state["weights"][name] = weight
        self._save_state()
        return old

    def add(self, analyzer: AnalyzerConfig) -> None:
        validate_analyzer(f"analyzers.{analyzer.name}", analyzer)
        if analyzer.name in self.health:
            raise ConfigError(f"analyzers.{analyzer.name}: already exists")
        with self._publishing():
            self._define(analyzer)
        self._state["added"] = [a for a in self._state["added"] if a["name"] != analyzer.name]
        self._state["added"].append(dataclasses.asdict(analyzer))
        if analyzer.name in self._state["removed"]:
            self._state["removed"].remove(analyzer.name)
        self._save_state()

    def remove(self, name: str) -> None:
        """Drain, then remove once its queues are empty (see ``publish``)."""
        self._health(name)
        if not set(self.health) - self.removing - {name}:
            raise ConfigError(f"analyzers.{name}: cannot remove the last analyzer")
        self.drain(name)
        self.removing.add(name)
        self.publish()

    def _remember_drain(self, name: str, drained: bool) -> None:
        names = set(self._state["drained"])
        names.add(name) if drained else names.discard(name)
        self._state["drained"] = sorted(names)
        self._save_state()

    # --- publishing ---------------------------------------------------------------------------------

    def _queued(self) -> list[int]:
        return self.table.global_counters(C_QUEUE_PACKETS)

    def _targets(self, now: float) -> dict[int, tuple[int, float, int]]:
        targets = {slot: (REMOVED, 0.0, 0) for name, slot in self.slots.items() if name not in self.health}
        queued = self._queued()
        for name, health in self.health.items():
            slot = self.slots[name]
            state = health.state
            if health.draining:
                state = DRAINED if queued[slot] == 0 else DRAINING
            weight = health.effective_weight(now, self.config.health, self.config.outlier)
            targets[slot] = (state, weight, health.admissions)
        return targets

    @contextmanager
    def _publishing(self) -> Iterator[None]:
        """Seqlocked table update: the caller's changes, then every analyzer's state and a new epoch."""
        self.table.begin_update()
        try:
            yield
            for slot, (state, weight, admissions) in self._targets(time.monotonic()).items():
                self.table.set_effective(slot, state, weight, admissions)
                self._published[slot] = (state, weight, admissions)
            self.table.start_epoch()
        finally:
            self.table.end_update()

    def publish(self) -> bool:
        """Advance time-driven states and finish removals; write the table only if something changed."""
        now = time.monotonic()
        for health in self.health.values():
            health.settle(now, self.config.outlier)
        targets = self._targets(now)
        for name in list(self.removing):
            if targets[self.slots[name]][0] == DRAINED:
                self.removing.discard(name)
                del self.health[name]
                del self.definitions[name]
                self._state["removed"] = sorted(set(self._state["removed"]) | {name})
                self._state["drained"] = [n for n in self._state["drained"] if n != name]
                self._state["weights"].pop(name, None)
                self._save_state()
                log.info("analyzer %s drained and removed", name)
                targets = self._targets(now)
        if all(_same(self._published.get(slot), target) for slot, target in targets.items()):
            return False
        with self._publishing():
            pass  # nothing to change but the published states themselves
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

    # --- active checks ------------------------------------------------------------------------------

    async def run_checks(self, session: aiohttp.ClientSession) -> None:
        """One round of active checks, all analyzers concurrently."""
        names = list(self.health)
        urls = [self.definitions[n].url for n in names]
        results = await asyncio.gather(*(check(session, url, self.config.health) for url in urls))
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
        return {name: h.view(now) for name, h in self.health.items()}


def _same(published: tuple[int, float, int] | None, target: tuple[int, float, int]) -> bool:
    if published is None:
        return False
    state, weight, admissions = published
    new_state, new_weight, new_admissions = target
    if state != new_state or admissions != new_admissions or (weight == 0) != (new_weight == 0):
        return False
    return abs(new_weight - weight) <= WEIGHT_EPSILON * max(weight, new_weight)
