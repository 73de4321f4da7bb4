"""Per-emitter rate limiting that holds across worker processes.

A token bucket with rate ``r`` and burst ``b`` admits at most ``b + r*t``
packets in any interval ``t``. We enforce the equivalent sliding-window limit:
at most ``b`` packets in any window of ``W = b / r`` seconds (sustained ``r``,
bursts up to ``b``), estimated NGINX/Cloudflare style from the current and the
previous fixed window.

The count must be global, yet the shared table allows one writer per cell: so
every worker counts its own admissions per emitter slot (``crc32(emitter_id)``
modulo ``rate_limit.slots``) in its own region, and a check sums that slot over
all workers (3 cells per worker, no locks). Emitters that collide in a slot
share a budget; the slot count keeps that rare.
"""

from __future__ import annotations

import zlib

from distributor.config import RateLimit, RateLimitConfig
from distributor.shared_table import RL_CELLS, SharedTable

R_WINDOW, R_CURRENT, R_PREVIOUS = range(RL_CELLS)


class RateLimiter:
    def __init__(self, table: SharedTable, worker_slot: int, config: RateLimitConfig) -> None:
        self._config = config
        self._ints = table.ints
        self._slots = table.rl_slots
        self._own = table.rate_limit_base(worker_slot)
        self._regions = [table.rate_limit_base(w) for w in range(table.max_workers)]
        self._limits: dict[str, RateLimit | None] = {}
        self.enabled = bool(table.rl_slots) and bool(config.rate or config.overrides)

    def _limit(self, emitter_id: str) -> RateLimit | None:
        try:
            return self._limits[emitter_id]
        except KeyError:
            if len(self._limits) > 100_000:
                self._limits.clear()
            limit = self._limits[emitter_id] = self._config.limit_for(emitter_id)
            return limit

    def admit(self, emitter_id: str, now: float) -> float:
        """0.0 if the packet may pass (and count it), else the seconds to wait (Retry-After)."""
        limit = self._limit(emitter_id)
        if limit is None:
            return 0.0
        window = limit.burst / limit.rate
        position = now / window
        current = int(position)
        elapsed = position - current
        offset = (zlib.crc32(emitter_id.encode()) % self._slots) * RL_CELLS
        ints = self._ints
        in_current = in_previous = 0
        for region in self._regions:
            cell = region + offset
            seen = ints[cell + R_WINDOW]
            if seen == current:
                in_current += ints[cell + R_CURRENT]
                in_previous += ints[cell + R_PREVIOUS]
            elif seen == current - 1:
                in_previous += ints[cell + R_CURRENT]
        estimate = in_previous * (1.0 - elapsed) + in_current
        if estimate + 1 > limit.burst:
            # the previous window's weight decays linearly; wait until one packet fits
            excess = estimate + 1 - limit.burst
            wait = excess / max(in_previous / window, limit.rate) if in_previous else (1.0 - elapsed) * window
            return max(wait, 1e-3)
        own = self._own + offset
        if ints[own + R_WINDOW] == current:
            ints[own + R_CURRENT] += 1
        else:
            ints[own + R_PREVIOUS] = ints[own + R_CURRENT] if ints[own + R_WINDOW] == current - 1 else 0
            ints[own + R_CURRENT] = 1
            ints[own + R_WINDOW] = current
        return 0.0

