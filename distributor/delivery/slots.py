"""Analyzer slots of the shared table: which name holds which row, and when a row may be reused.

A slot is a row of the shared table (its definition, state and epoch base) and
a column of every worker's counters. The supervisor assigns slots; workers
follow the ``incarnation`` cell: a new incarnation means "a different analyzer
(or a new url, mode or compression) from now on", so they reset what they knew of the slot
(ejection, consecutive failures) and point its sender at the new address.

A removed analyzer's slot is reused only once nothing refers to it: no worker
holds a queued or in-flight packet for it, and every running worker has
applied the table generation that removed it. Its cumulative counters are then
taken as the new owner's baseline, so views and metrics of the new name start
at zero (Prometheus sees a new series, never a decreasing one).

Counters follow names, never go back: a name that comes back in another slot
(its old one was not reusable yet) carries its old slot's counters with it,
and that old slot is no longer shown; a removed name whose slot another name
took keeps its counters aside (the last ``REMEMBERED_NAMES`` such names) for
when it comes back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

from distributor.config import AnalyzerConfig, ConfigError
from distributor.shared_table import (
    C_QUEUE_BYTES,
    C_QUEUE_MESSAGES,
    C_QUEUE_PACKETS,
    COUNTER_NAMES,
    W_GENERATION,
    W_PID,
    SharedTable,
)

class SlotsBusy(ConfigError):
    """No free slot now, but removed analyzers' slots free up once every worker has caught up."""


REMEMBERED_NAMES = 1024  # removed names whose counters are kept after their slot went to another name
# gauges, not counters: never rebased
GAUGES = frozenset((C_QUEUE_PACKETS, C_QUEUE_BYTES, C_QUEUE_MESSAGES))


@dataclass(slots=True)
class Slot:
    index: int
    name: str
    url: str
    mode: str
    compression: str
    incarnation: int
    live: bool = True
    removed_generation: int = -1  # table generation that published its removal (-1: not yet published)
    baseline: list[int] = field(default_factory=lambda: [0] * len(COUNTER_NAMES))  # a former owner's totals
    carried: list[int] = field(default_factory=lambda: [0] * len(COUNTER_NAMES))  # the name's own, from another slot
    superseded: bool = False  # released, and its name lives in another slot now: not shown


class SlotAllocator:
    """The supervisor's map of slots; ``plan`` has no side effects, ``commit`` applies a plan."""

    def __init__(self, table: SharedTable) -> None:
        self._table = table
        self._slots: list[Slot | None] = [None] * table.max_analyzers
        self._kept: OrderedDict[str, list[int]] = OrderedDict()  # removed names' counters, oldest first

    def live(self, name: str) -> Slot | None:
        return next((s for s in self._slots if s is not None and s.live and s.name == name), None)

    def released(self) -> list[Slot]:
        """Slots whose analyzer was removed and that no new analyzer took yet."""
        return [s for s in self._slots if s is not None and not s.live]

    def shown(self) -> list[Slot]:
        """Slots views show: every live one, and removed ones whose name did not come back elsewhere."""
        return [s for s in self._slots if s is not None and (s.live or not s.superseded)]

    def plan(self, definitions: Mapping[str, AnalyzerConfig]) -> dict[str, int]:
        """Slot per name: names keep theirs; new names take a free or reusable slot. Raises ConfigError."""
        plan = {name: slot.index for name in definitions if (slot := self.live(name)) is not None}
        taken = set(plan.values())
        for name in definitions:
            if name in plan:
                continue
            index = self._free_slot(name, taken)
            if index is None:
                waiting = sum(1 for s in self.released() if not self._reusable(s))
                message = f"analyzers: at most {self._table.max_analyzers} analyzers per run"
                if waiting:
                    raise SlotsBusy(f"{message}; {waiting} removed analyzers still hold queued packets or are not "
                                    "yet forgotten by every worker: retry once they are")
                raise ConfigError(message)
            plan[name] = index
            taken.add(index)
        return plan

    def _free_slot(self, name: str, taken: set[int]) -> int | None:
        """The name's own former slot, else a never used one, else any reusable one."""
        candidates = [s for s in self.released() if s.index not in taken and self._reusable(s)]
        own = next((s.index for s in candidates if s.name == name), None)
        if own is not None:
            return own
        unused = next((i for i, s in enumerate(self._slots) if s is None and i not in taken), None)
        if unused is not None:
            return unused
        return candidates[0].index if candidates else None

    def _reusable(self, slot: Slot) -> bool:
        if slot.live or slot.removed_generation < 0:
            return False
        table = self._table
        for worker in range(table.max_workers):
            if any(table.ints[table.counter_index(worker, slot.index, gauge)] for gauge in GAUGES):
                return False
            if table.worker_value(worker, W_PID) and table.worker_value(worker, W_GENERATION) < slot.removed_generation:
                return False
        return True

    def commit(self, plan: Mapping[str, int], definitions: Mapping[str, AnalyzerConfig]) -> set[int]:
        """Apply a plan; return the slots with a new incarnation (new analyzer, or new url or mode)."""
        renewed: set[int] = set()
        for name in [s.name for s in self._slots if s is not None and s.live and s.name not in plan]:
            self.release(name)
        for name, index in plan.items():
            analyzer = definitions[name]
            slot = self._slots[index]
            if slot is not None and slot.live and slot.name == name:
                if (slot.url, slot.mode, slot.compression) != (analyzer.url, analyzer.mode, analyzer.compression):
                    slot.url, slot.mode, slot.compression = analyzer.url, analyzer.mode, analyzer.compression
                    slot.incarnation += 1
                    renewed.add(index)
                continue
            if slot is None:
                slot = self._slots[index] = Slot(index, name, analyzer.url, analyzer.mode, analyzer.compression,
                                                 incarnation=1)
            else:
                slot.incarnation += 1
                if slot.name != name or slot.superseded:  # its history is another name's, or counted elsewhere
                    if not slot.live and not slot.superseded and slot.name != name:
                        self._keep(slot.name, self._own_totals(slot))
                    slot.baseline = self._totals(index)
                    slot.carried = [0] * len(COUNTER_NAMES)
            self._carry(name, slot)
            slot.name, slot.url, slot.mode, slot.compression = name, analyzer.url, analyzer.mode, analyzer.compression
            slot.live, slot.removed_generation, slot.superseded = True, -1, False
            renewed.add(index)
        return renewed

    def _carry(self, name: str, into: Slot) -> None:
        """The name's counters, from a slot it left (not reusable yet; that row hides) or kept aside, go on in
        ``into``."""
        carried = [self._kept.pop(name, None) or [0] * len(COUNTER_NAMES)]
        for old in self.released():
            if old.name == name and old is not into and not old.superseded:
                carried.append(self._own_totals(old))
                old.superseded = True
        into.carried = [into.carried[c] + sum(part[c] for part in carried) for c in range(len(COUNTER_NAMES))]

    def _own_totals(self, slot: Slot) -> list[int]:
        """The counters the slot shows for its name (its column, net of the baseline, with what it carried)."""
        totals = self._totals(slot.index)
        return [totals[c] - slot.baseline[c] + slot.carried[c] for c in range(len(COUNTER_NAMES))]

    def _keep(self, name: str, counters: list[int]) -> None:
        self._kept[name] = counters
        self._kept.move_to_end(name)
        while len(self._kept) > REMEMBERED_NAMES:
            self._kept.popitem(last=False)

    def remembers(self, name: str) -> bool:
        """Whether a removed name's counters are kept (shown in a removed row, or aside)."""
        return name in self._kept or any(s.name == name and not s.superseded for s in self.released())

    def release(self, name: str) -> None:
        slot = self.live(name)
        if slot is not None:
            slot.live, slot.removed_generation = False, -1

    def published(self, generation: int) -> None:
        """The table now shows every released slot as removed (as of ``generation``)."""
        for slot in self.released():
            if slot.removed_generation < 0:
                slot.removed_generation = generation

    def counters(self, slot: Slot, totals: list[list[int]]) -> dict[str, int]:
        """The slot's counters summed over workers (``totals[counter][slot]``), net of a former owner's and
        with what its name carried from another slot (gauges are the slot's own)."""
        return {name: totals[c][slot.index] - slot.baseline[c] + (0 if c in GAUGES else slot.carried[c])
                for c, name in enumerate(COUNTER_NAMES)}

    def _totals(self, index: int) -> list[int]:
        return [0 if c in GAUGES else self._table.global_counters(c)[index] for c in range(len(COUNTER_NAMES))]
