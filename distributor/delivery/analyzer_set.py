"""The supervisor's analyzer set: definitions, health, operator changes, and what workers see.

Every change of an analyzer's state, drain or effective weight is published to
the shared table in one seqlocked update; a new routing epoch starts only when
something routing uses changed (who is routable, effective weights), so the
split follows the new weights from that moment with no catch-up burst, and a
no-op reload changes nothing.

A reload is all-or-nothing: ``install`` reads and validates the state file,
merges it with the configuration and plans every slot before touching anything;
any error leaves the running set as it was.

Operator changes (drain, weight, add, remove) made through the admin API are
kept in ``admin.state_file`` when one is configured (like HAProxy's
server-state file) and re-applied on top of the configuration at every reload
and start; a change is applied only once it is saved. Without a state file the
configuration wins at the next reload.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from typing import Any, Mapping, NamedTuple

import aiohttp

from distributor.config import AnalyzerConfig, Config, ConfigError, validate_analyzer
from distributor.delivery.health import AnalyzerHealth, CheckResult, check
from distributor.delivery.slots import SlotAllocator
from distributor.delivery.state_file import AdminState, check_writable, load_state, save_state
from distributor.tls import analyzer_context
from distributor.shared_table import (
    C_EJECTION_REPORTS,
    C_QUEUE_PACKETS,
    COUNTER_NAMES,
    DRAINED,
    DRAINING,
    NOT_DRAINING,
    REMOVED,
    SharedTable,
)

log = logging.getLogger("distributor.analyzers")

# effective weights closer than this (relative) are not worth a new epoch
WEIGHT_EPSILON = 0.02


class UnknownAnalyzer(KeyError):
    pass


class StateNotSaved(RuntimeError):
    """The admin state file could not be written: the change was not applied."""


class Target(NamedTuple):
    """What the table shows of one slot."""

    state: int
    weight: float
    admissions: int
    drain: int


class AnalyzerSet:
    def __init__(self, table: SharedTable, config: Config) -> None:
        self.table = table
        self.config = config
        self.slots = SlotAllocator(table)
        self.definitions: dict[str, AnalyzerConfig] = {}
        self.health: dict[str, AnalyzerHealth] = {}
        self.retired: dict[str, AnalyzerHealth] = {}  # removed names: their counts live on
        self.removing: set[str] = set()
        self.state = AdminState()
        self._published: dict[int, Target] = {}
        self.install(config)

    # --- configuration ----------------------------------------------------------------------------

    def install(self, config: Config) -> None:
        """Adopt the configuration plus the state file's changes, or raise ConfigError and change nothing."""
        if config.admin.state_file != self.config.admin.state_file:
            check_writable(config.admin.state_file)
        state = load_state(config.admin.state_file, config.analyzer_rules)
        definitions = state.apply(config.analyzers)
        if config.admin.state_file and state == AdminState() and self.state != AdminState():
            log.warning("admin.state_file %s is gone or empty: the admin changes it held are dropped, the "
                        "configuration wins", config.admin.state_file, extra={"event": "state_file_missing"})
        plan = self.slots.plan(definitions)
        # validated and planned: from here on nothing can fail
        self.config, self.state = config, state
        if self.removing:
            log.warning("reload: pending removal of %s %s", ", ".join(sorted(self.removing)),
                        "completes now (queued packets fail over)" if config.admin.state_file
                        else "is cancelled: without admin.state_file the configuration wins")
        self.removing = set()
        self._adopt(definitions, plan)

    def _adopt(self, definitions: Mapping[str, AnalyzerConfig], plan: Mapping[str, int]) -> None:
        renewed = self.slots.commit(plan, definitions)
        weights_changed = {plan[n] for n, a in definitions.items() if n in self.definitions
                           and self.definitions[n].weight != a.weight}
        for name in list(self.health):
            if name not in definitions:
                self._retire(name)
        reports = self.table.global_counters(C_EJECTION_REPORTS)
        for name, analyzer in definitions.items():
            slot = plan[name]
            health = self.health.get(name)
            if health is None or slot in renewed:
                past = self.retired.pop(name, None) or health
                health = self.health[name] = AnalyzerHealth(name, analyzer.weight, reports_seen=reports[slot])
                if past is not None:  # a name's ejection and down counts never go back
                    health.ejections, health.downs = past.ejections, past.downs
            health.weight = analyzer.weight
            health.draining = name in self.state.drained or name in self.removing  # a removal drains first
        self.definitions = dict(definitions)
        self.retired = {name: past for name, past in self.retired.items() if self.slots.remembers(name)}
        self._write(renewed | weights_changed)

    # --- operator actions (admin API) ---------------------------------------------------------------

    def _health(self, name: str) -> AnalyzerHealth:
        try:
            return self.health[name]
        except KeyError:
            raise UnknownAnalyzer(name) from None

    def _save(self, state: AdminState) -> None:
        """Persist the state an admin change leads to, before the change is applied."""
        path = self.config.admin.state_file
        if path:
            try:
                save_state(path, state)
            except OSError as exc:
                raise StateNotSaved(f"admin.state_file {path}: {exc.strerror or exc}; nothing was changed") from None
        self.state = state

    def _changed_state(self) -> AdminState:
        return copy.deepcopy(self.state)

    def drain(self, name: str) -> bool:
        """Stop routing new packets to it; its queues keep flushing to it. Returns the old flag."""
        health = self._health(name)
        state = self._changed_state()
        state.record_drain(name, True)
        self._save(state)
        old, health.draining = health.draining, True
        self.publish()
        return old

    def undrain(self, name: str) -> bool:
        health = self._health(name)
        if name in self.removing:
            raise ConfigError(f"analyzers.{name}: being removed; add it again once it is gone")
        state = self._changed_state()
        state.record_drain(name, False)
        self._save(state)
        old = health.draining
        if old:
            health.draining = False
            if health.routable:
                health.admit(time.monotonic(), self.config.outlier)  # ramp back up, no burst
        self.publish()
        return old

    def set_weight(self, name: str, weight: float) -> float:
        health = self._health(name)
        updated = dataclasses.replace(self.definitions[name], weight=weight)
        validate_analyzer(f"analyzers.{name}", updated, self.config.analyzer_rules)
        state = self._changed_state()
        state.record_weight(name, weight)
        self._save(state)
        old = health.weight
        self._adopt({**self.definitions, name: updated}, self.slots.plan({**self.definitions, name: updated}))
        return old

    def add(self, analyzer: AnalyzerConfig) -> None:
        validate_analyzer(f"analyzers.{analyzer.name}", analyzer, self.config.analyzer_rules)
        if analyzer.name in self.health:
            raise ConfigError(f"analyzers.{analyzer.name}: already exists")
        definitions = {**self.definitions, analyzer.name: analyzer}
        plan = self.slots.plan(definitions)
        state = self._changed_state()
        state.record_add(analyzer)
        self._save(state)
        self._adopt(definitions, plan)

    def remove(self, name: str) -> None:
        """Drain, then remove once its queues are empty (see ``publish``)."""
        health = self._health(name)
        if name in self.removing:
            return
        if not set(self.health) - self.removing - {name}:
            raise ConfigError(f"analyzers.{name}: cannot remove the last analyzer")
        state = self._changed_state()
        state.record_remove(name)
        self._save(state)
        health.draining = True
        self.removing.add(name)
        self.publish()

    # --- publishing ---------------------------------------------------------------------------------

    def _targets(self, now: float) -> dict[int, Target]:
        targets = {slot.index: Target(REMOVED, 0.0, 0, NOT_DRAINING) for slot in self.slots.released()}
        queued = self.table.global_counters(C_QUEUE_PACKETS)
        for name, health in self.health.items():
            slot = self.slots.live(name)
            assert slot is not None
            drain = NOT_DRAINING
            if health.draining:
                drain = DRAINED if queued[slot.index] == 0 else DRAINING
            weight = health.effective_weight(now, self.config.health, self.config.outlier)
            targets[slot.index] = Target(health.state, weight, health.admissions, drain)
        return targets

    def _write(self, definition_slots: set[int] = set()) -> bool:
        """Publish definitions and targets in one seqlocked update, if anything changed.

        A new routing epoch starts only when a target changed; a url change alone does not rebase routing.
        """
        targets = self._targets(time.monotonic())
        routing_changed = any(not _same(self._published.get(slot), target) for slot, target in targets.items())
        if not definition_slots and not routing_changed:
            return False
        table = self.table
        table.begin_update()
        try:
            for name, analyzer in self.definitions.items():
                slot = self.slots.live(name)
                assert slot is not None
                if slot.index in definition_slots:
                    table.write_analyzer(slot.index, name, analyzer.url, analyzer.weight, analyzer.mode,
                                         slot.incarnation, analyzer.compression)
            for index, target in targets.items():
                table.set_effective(index, target.state, target.weight, target.admissions, target.drain)
            if routing_changed:
                table.start_epoch()
            self._published = targets
        finally:
            table.end_update()
        self.slots.published(table.generation)
        return True

    def publish(self) -> bool:
        """Advance time-driven states and finish removals; write the table only if something changed."""
        now = time.monotonic()
        for health in self.health.values():
            health.settle(now, self.config.outlier)
        if self.removing:
            targets = self._targets(now)
            for name in sorted(self.removing):
                slot = self.slots.live(name)
                assert slot is not None
                if targets[slot.index].drain == DRAINED:
                    self.removing.discard(name)
                    self._retire(name)
                    del self.definitions[name]
                    self.slots.release(name)
                    log.info("analyzer %s drained and removed", name,
                             extra={"event": "analyzer_removed", "analyzer": name})
        return self._write()

    def collect_ejections(self) -> None:
        """Workers count ejection reports in their rows; any new one ejects the analyzer for all."""
        reports = self.table.global_counters(C_EJECTION_REPORTS)
        now = time.monotonic()
        for name, health in self.health.items():
            slot = self.slots.live(name)
            assert slot is not None
            seen = reports[slot.index]
            if seen > health.reports_seen:
                health.reports_seen = seen
                health.last_check = "ejected by a worker after consecutive send failures"
                health.observe_ejection(now, self.config.outlier)

    # --- active checks ------------------------------------------------------------------------------

    async def run_checks(self, session: aiohttp.ClientSession) -> None:
        """One round of active checks, all analyzers concurrently; a failing check fails only its analyzer."""
        names = list(self.health)
        urls = [self.definitions[n].url for n in names]
        results = await asyncio.gather(*(check(session, url, self.config.health) for url in urls),
                                       return_exceptions=True)
        now = time.monotonic()
        for name, url, result in zip(names, urls, results):
            if isinstance(result, BaseException):
                result = CheckResult(False, False, f"check failed: {result.__class__.__name__}")
            health = self.health.get(name)
            if health is not None and self.definitions[name].url == url:  # not removed or retargeted meanwhile
                health.observe_check(result, now, self.config.health, self.config.outlier)

    async def check_forever(self) -> None:
        """Health rounds every ``health.interval`` until cancelled; an error in one round is logged, not fatal."""
        connector = aiohttp.TCPConnector(ssl=analyzer_context(self.config.tls))
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                started = time.monotonic()
                try:
                    await self.run_checks(session)
                    self.publish()
                except Exception:
                    log.exception("health check round failed; the next round runs as usual",
                                  extra={"event": "health_round_failed"})
                await asyncio.sleep(max(0.0, self.config.health.interval - (time.monotonic() - started)))

    # --- views --------------------------------------------------------------------------------------

    def _retire(self, name: str) -> None:
        """The analyzer leaves: its health ends, its counts stay for its removed row and a later return."""
        self.retired[name] = self.health.pop(name)

    def view(self) -> dict[str, dict[str, Any]]:
        """Health per name, removed ones included (their counts, for their removed rows)."""
        now = time.monotonic()
        return {name: h.view(now) for name, h in (*self.retired.items(), *self.health.items())}

    def counters(self) -> dict[int, dict[str, int]]:
        """Per shown slot, its counters summed over workers, continuing its name's history (never going back)."""
        totals = [self.table.global_counters(c) for c in range(len(COUNTER_NAMES))]
        return {slot.index: self.slots.counters(slot, totals) for slot in self.slots.shown()}


def _same(published: Target | None, target: Target) -> bool:
    if published is None:
        return False
    if (published.state, published.admissions, published.drain) != (target.state, target.admissions, target.drain):
        return False
    if (published.weight == 0) != (target.weight == 0):
        return False
    return abs(target.weight - published.weight) <= WEIGHT_EPSILON * max(published.weight, target.weight)
