"""Message-weighted routing of whole packets.

The scheme is NGINX's smooth weighted round-robin generalised from requests to
messages. With normalised weights ``w_i`` and ``R_i`` messages routed to
analyzer ``i`` in the current epoch (``T = sum R``), a packet of ``n`` messages
goes to the analyzer with room that is furthest behind its exact share once the
packet is counted::

    argmax_i  w_i * (T + n) - R_i

Error bound (with every analyzer eligible): no analyzer ever runs ahead of its
exact share ``w_i * T`` by ``n_max`` (the largest packet) or more. The deficits
sum to zero, so the one furthest behind trails by at most the others' excess;
in property tests (tests/test_routing.py) that stays within about one ``n_max``.
A full queue only narrows the candidates: the packet spills to the next best
analyzer with room.

Only routable analyzers (active, warming, saturated) take part, with their
*effective* weights (slow start and saturation scale the configured weight),
renormalised among themselves. Routed totals are *net*: a packet that fails
over from A to B counts for B only.

Epochs: whenever the analyzer set or an effective weight changes, the supervisor records
every analyzer's global routed total as its baseline, so the split follows the
new weights from that moment on, with no catch-up burst toward an analyzer that
was missing.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from distributor.shared_table import C_NET_ROUTED_MESSAGES, H_GENERATION, AnalyzerRow, SharedTable

NO_ANALYZER = -1


def _scores(routed: Sequence[int], weights: Sequence[float], messages: int) -> list[float]:
    total = sum(routed) + messages
    return [weight * total - value for weight, value in zip(weights, routed)]


def pick(routed: Sequence[int], weights: Sequence[float], messages: int, has_room: Callable[[int], bool],
         slots: Sequence[int] | None = None) -> int:
    """The analyzer that should take ``messages``; NO_ANALYZER if none has room.

    ``weights`` must be normalised (sum 1) over the candidates. The best score wins (the first
    of equals); only when it has no room are the others asked, best first. Analyzers are named
    by ``slots`` (parallel to ``routed`` and ``weights``; by default their indexes), both to
    ``has_room`` and in the result.
    """
    scores = _scores(routed, weights, messages)
    if not scores:
        return NO_ANALYZER
    names = range(len(scores)) if slots is None else slots
    best = scores.index(max(scores))
    if has_room(names[best]):
        return names[best]
    for index in sorted(range(len(scores)), key=scores.__getitem__, reverse=True):
        if index != best and has_room(names[index]):
            return names[index]
    return NO_ANALYZER


def best_index(counters: Sequence[int], cells: list[int], offsets: list[int], weights: list[float],
               messages: int) -> int:
    """The index ``pick`` prefers, with analyzer i's routed total ``counters[cells[i]] + offsets[i]``.

    The reference for the compiled ``_weighted_pick.best`` (the same index, computed the same way),
    which ``Router.choose`` runs for every packet.
    """
    scores = _scores([counters[cell] + offset for cell, offset in zip(cells, offsets)], weights, messages)
    return scores.index(max(scores)) if scores else NO_ANALYZER


_best: Callable[[Sequence[int], list[int], list[int], list[float], int], int]
try:  # compiled (setup.py); without it the reference runs
    from distributor.delivery._weighted_pick import best as _best
except ImportError:  # pragma: no cover - a machine without a C compiler
    _best = best_index


class Router:
    """One worker's view of the global split.

    Routed totals are global: this worker's own counters (exact, read from its
    row) plus every other worker's, summed from the shared table at most every
    ``refresh_interval`` seconds, so the split holds even when workers see very
    different traffic. A new analyzer generation is noticed by the next packet
    (one shared-memory read each): a packet accepted after an admin change's
    answer is routed by it, never to an analyzer just removed or drained.
    """

    def __init__(
        self,
        table: SharedTable,
        worker_slot: int,
        refresh_interval: float,
        on_new_generation: Callable[[], None] = lambda: None,
    ) -> None:
        self._table = table
        self._on_new_generation = on_new_generation
        self.generation = -1
        self._ints = table.ints
        self._worker = worker_slot
        self._refresh_interval = refresh_interval
        self._next_refresh = 0.0
        self.slots: list[int] = []
        self._weights: list[float] = []
        self._base: list[int] = []
        self._own: list[int] = []  # this worker's net routed cell per analyzer (exact, read per packet)
        self._offsets: list[int] = []  # the other workers' totals minus the epoch's base (refreshed)

    def set_analyzers(self, generation: int, rows: Sequence[AnalyzerRow]) -> None:
        """Adopt a new analyzer set / epoch (from SharedTable.read_analyzers)."""
        self.generation = generation
        active = [row for row in rows if row.routable]
        total_weight = sum(row.effective_weight for row in active)
        self.slots = [row.slot for row in active]
        self._weights = [row.effective_weight / total_weight for row in active]
        self._base = [row.base_messages for row in active]
        self._own = [self._table.counter_index(self._worker, row.slot, C_NET_ROUTED_MESSAGES) for row in active]
        self._next_refresh = 0.0

    def refresh(self) -> None:
        """Re-read the other workers' totals; hand a new analyzer generation to the owner first."""
        if self._table.generation != self.generation:
            self._on_new_generation()
        totals = self._table.global_counters(C_NET_ROUTED_MESSAGES, exclude_worker=self._worker)
        self._offsets = [totals[slot] - base for slot, base in zip(self.slots, self._base)]
        self._next_refresh = time.monotonic() + self._refresh_interval

    def choose(self, messages: int, has_room: Callable[[int], bool]) -> int:
        """Analyzer slot for a packet of ``messages``, or NO_ANALYZER.

        ``has_room`` is asked with an analyzer *slot*.
        """
        ints = self._ints
        if ints[H_GENERATION] != self.generation or time.monotonic() >= self._next_refresh:
            self.refresh()
        index = _best(ints, self._own, self._offsets, self._weights, messages)
        if index == NO_ANALYZER:
            return NO_ANALYZER
        slot = self.slots[index]
        if has_room(slot):
            return slot
        routed = [ints[cell] + offset for cell, offset in zip(self._own, self._offsets)]  # spill-over: rare
        return pick(routed, self._weights, messages, has_room, self.slots)

    def weights(self) -> dict[int, float]:
        """Normalised weight per eligible analyzer slot (the target split)."""
        return dict(zip(self.slots, self._weights))
