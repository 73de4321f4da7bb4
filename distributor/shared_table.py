"""Shared-memory table: analyzer definitions, routing epochs and per-worker counters.

Layout (every cell is 8 bytes, viewed both as int64 and float64):

* header: magic, layout version, sizes, the analyzer-set generation (a seqlock:
  odd while the supervisor rewrites analyzer rows), the supervisor pid;
* one row per analyzer slot, written by the supervisor only: state, weight,
  mode, epoch baseline of routed messages, name and URL;
* one row per worker slot, written by that worker only: pid, heartbeat, loop
  lag, ingest counters, and per analyzer slot its routed / delivered / dropped
  counters and queue depth.

One writer per cell means no locks on the hot path: a reader may see one
counter a few packets old, never a torn 8-byte value.

The segment lives in /dev/shm under a name that embeds the supervisor pid (for
humans only). We map the file directly instead of using
``multiprocessing.shared_memory``, whose ``resource_tracker`` (Python < 3.13)
unlinks a segment when *any* attached process exits; the supervisor alone
creates and unlinks. It holds an exclusive ``flock`` on its segment for its
whole life, so segments left behind by a supervisor that no longer exists are
recognised by the lock, not by a pid that may belong to another pid namespace
(sidecar containers sharing /dev/shm).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "log-distributor-"
MAGIC = 0x4C4F47444953_5452  # "LOGDISTR"
LAYOUT_VERSION = 10

# header cells
(
    H_MAGIC,
    H_VERSION,
    H_MAX_ANALYZERS,
    H_MAX_WORKERS,
    H_GENERATION,
    H_SUPERVISOR_PID,
    H_CREATED,
    H_RL_SLOTS,
    H_MEMORY_PRESSURE,  # 1 while the cgroup's anonymous memory is above overload.memory_watermark (supervisor)
) = range(9)
HEADER_CELLS = 16

# analyzer row cells
(
    A_STATE,
    A_WEIGHT,
    A_MODE,
    A_BASE_MESSAGES,
    A_NAME_LEN,
    A_URL_LEN,
    A_EFFECTIVE_WEIGHT,
    A_ADMISSIONS,
    A_INCARNATION,  # bumped whenever the slot gets a new analyzer or a new url/mode: workers rebuild its sender
    A_DRAIN,        # the operator's drain, a fact apart from health: NOT_DRAINING, DRAINING or DRAINED
    A_COMPRESSION,  # of the bodies sent to it: COMPRESSION_CODES
) = range(11)
A_NAME = 11
NAME_CELLS = 8
NAME_BYTES = NAME_CELLS * 8  # 64: config validation refuses longer (UTF-8) names
A_URL = A_NAME + NAME_CELLS
URL_CELLS = 32
URL_BYTES = URL_CELLS * 8  # 256
MAX_ANALYZERS = 64  # analyzer slots per table: config validation refuses more
ANALYZER_CELLS = A_URL + URL_CELLS

# analyzer health states; the routable ones share traffic by effective weight (unless drained)
EMPTY, ACTIVE, REMOVED, DOWN, EJECTED, WARMING, SATURATED = range(7)
STATE_NAMES = {
    EMPTY: "empty",
    ACTIVE: "active",
    REMOVED: "removed",
    DOWN: "down",
    EJECTED: "ejected",
    WARMING: "warming",
    SATURATED: "saturated",
}
ROUTABLE = frozenset((ACTIVE, WARMING, SATURATED))
# the operator's drain: no new packets, but a healthy analyzer's queues keep flushing to it
NOT_DRAINING, DRAINING, DRAINED = range(3)
DRAIN_NAMES = {DRAINING: "draining", DRAINED: "drained"}
MODE_CODES = {"batch": 0, "packet": 1}
MODE_NAMES = {code: name for name, code in MODE_CODES.items()}
COMPRESSION_CODES = {"none": 0, "gzip": 1, "zstd": 2}
COMPRESSION_NAMES = {code: name for name, code in COMPRESSION_CODES.items()}

# worker row cells (worker-level)
(
    W_PID,
    W_STATE,
    W_STARTED,
    W_HEARTBEAT,
    W_LOOP_LAG,
    W_REQUESTS,
    W_ACCEPTED,
    W_REJECTED_INVALID,
    W_REJECTED_UNAVAILABLE,
    W_CONNECTIONS,
    W_QUEUED_PACKETS,
    W_QUEUED_BYTES,
    W_GENERATION,
    W_LATENCY_SUM_NS,
    W_CONNECTIONS_TOTAL,
    W_CONNECTIONS_REJECTED,
    W_HTTP_BAD_REQUESTS,
    W_HTTP_TOO_LARGE,
    W_HTTP_HEADER_TIMEOUTS,
    W_HTTP_BODY_TIMEOUTS,
    W_HTTP_IDLE_CLOSED,
    W_SHED,
    W_RATE_LIMITED,
    W_LAG_SHED,  # answered 503 because the event loop lagged (CPU saturated)
    W_READY_RSS,  # the worker's RSS (bytes) just before it started listening: what max_worker_memory_mb compares with
) = range(25)
# HttpStats attribute -> worker cell, copied by the worker's heartbeat
HTTP_STAT_CELLS = {
    "connections_total": W_CONNECTIONS_TOTAL,
    "connections_rejected": W_CONNECTIONS_REJECTED,
    "bad_requests": W_HTTP_BAD_REQUESTS,
    "too_large": W_HTTP_TOO_LARGE,
    "header_timeouts": W_HTTP_HEADER_TIMEOUTS,
    "body_timeouts": W_HTTP_BODY_TIMEOUTS,
    "idle_closed": W_HTTP_IDLE_CLOSED,
}
# ingest handler latency histogram: one cell per upper bound, the last is +Inf
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, float("inf"))
W_LATENCY_BUCKETS = W_READY_RSS + 1
# the worker's write-ahead log (all zero while it is off)
(
    W_WAL_STATE,  # WAL_OFF, WAL_AVAILABLE, WAL_UNAVAILABLE
    W_WAL_BYTES,
    W_WAL_OWN_BYTES,  # the part in the worker's own slot directory: what wal.max_bytes bounds
    W_WAL_SEGMENTS,
    W_WAL_UNACKED_PACKETS,
    W_WAL_UNACKED_MESSAGES,
    W_WAL_OLDEST_MS,  # accepted time (unix ms) of the oldest unacknowledged packet, 0 when none
    W_WAL_REPLAY_REMAINING_BYTES,
    W_WAL_UNAVAILABLE_PACKETS,  # answered 503 wal_unavailable (bumped on the hot path)
    W_WAL_APPENDED,
    W_WAL_BYTES_WRITTEN,
    W_WAL_FSYNCS,
    W_WAL_FSYNC_SUM_NS,
    W_WAL_REPLAYED,
    W_WAL_POSSIBLE_DUPLICATES,
    W_WAL_CORRUPT,
    W_WAL_TORN_TAILS,
    W_WAL_DAMAGED_ACKS,
    W_WAL_WRITE_ERRORS,
    W_WAL_SET_ASIDE,
    W_WAL_ORPHAN_SLOTS,  # slot directories to adopt that a live process still holds (their backlog is unseen)
) = range(W_LATENCY_BUCKETS + len(LATENCY_BUCKETS), W_LATENCY_BUCKETS + len(LATENCY_BUCKETS) + 21)
WAL_OFF, WAL_AVAILABLE, WAL_UNAVAILABLE = range(3)
# fsync duration histogram: one cell per upper bound, the last is +Inf
WAL_FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))
W_WAL_FSYNC_BUCKETS = W_WAL_ORPHAN_SLOTS + 1
WORKER_HEAD_CELLS = W_WAL_FSYNC_BUCKETS + len(WAL_FSYNC_BUCKETS)
# worker states
W_FREE, W_BOOTING, W_READY, W_STOPPING = 0, 1, 2, 3

# per-analyzer counters inside a worker row
(
    C_ROUTED_MESSAGES,
    C_ROUTED_PACKETS,
    C_DELIVERED_MESSAGES,
    C_DELIVERED_PACKETS,
    C_FAILED_ATTEMPTS,
    C_REJECTED_MESSAGES,
    C_REJECTED_PACKETS,
    C_SHUTDOWN_DROPPED_MESSAGES,
    C_SHUTDOWN_DROPPED_PACKETS,
    C_QUEUE_PACKETS,
    C_QUEUE_BYTES,
    C_QUEUE_MESSAGES,
    C_LOST_PACKETS,
    C_LOST_MESSAGES,
    C_NET_ROUTED_MESSAGES,
    C_FAILOVER_PACKETS,
    C_FAILOVER_MESSAGES,
    C_RETRIES,
    C_EJECTION_REPORTS,
    C_POSSIBLE_DUPLICATES,
) = range(20)
COUNTER_CELLS = 20
COUNTER_NAMES = (
    "routed_messages",
    "routed_packets",
    "delivered_messages",
    "delivered_packets",
    "failed_attempts",
    "rejected_messages",
    "rejected_packets",
    "shutdown_dropped_messages",
    "shutdown_dropped_packets",
    "queue_packets",
    "queue_bytes",
    "queue_messages",
    "lost_packets",
    "lost_messages",
    "net_routed_messages",
    "failover_packets",
    "failover_messages",
    "retries",
    "ejection_reports",
    "possible_duplicates",
)
RL_CELLS = 3  # per rate-limit slot in a worker's region: window id, count in it, count in the previous one


@dataclass(frozen=True, slots=True)
class AnalyzerRow:
    slot: int
    name: str
    url: str
    weight: float
    mode: str
    compression: str
    state: int
    base_messages: int
    effective_weight: float
    admissions: int
    incarnation: int
    drain: int

    @property
    def routable(self) -> bool:
        """Takes new packets."""
        return self.state in ROUTABLE and self.drain == NOT_DRAINING and self.effective_weight > 0

    @property
    def deliverable(self) -> bool:
        """Its queues may send to it: healthy, whether or not the operator drains it."""
        return self.state in ROUTABLE

    @property
    def display_state(self) -> str:
        """One word for views: a failure wins over a drain, a drain over the health state."""
        if self.drain != NOT_DRAINING and self.state in ROUTABLE:
            return DRAIN_NAMES[self.drain]
        return STATE_NAMES[self.state]


class SharedTable:
    """A mapped table; ``create`` in the supervisor, ``attach`` in workers."""

    def __init__(self, path: Path, mm: mmap.mmap, owner: bool, lock_fd: int = -1) -> None:
        self.path = path
        self._mm = mm
        self.owner = owner
        self._lock_fd = lock_fd  # the owner's flock on the segment: held until close
        self.ints = memoryview(mm).cast("q")
        self.floats = memoryview(mm).cast("d")
        if self.ints[H_MAGIC] != MAGIC or self.ints[H_VERSION] != LAYOUT_VERSION:
            raise RuntimeError(f"{path}: not a log-distributor table of layout {LAYOUT_VERSION}")
        self.max_analyzers = self.ints[H_MAX_ANALYZERS]
        self.max_workers = self.ints[H_MAX_WORKERS]
        self.worker_cells = WORKER_HEAD_CELLS + self.max_analyzers * COUNTER_CELLS
        self.rl_slots = self.ints[H_RL_SLOTS]
        self._rl_base = HEADER_CELLS + self.max_analyzers * ANALYZER_CELLS + self.max_workers * self.worker_cells

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def create(cls, max_workers: int, max_analyzers: int = MAX_ANALYZERS, rate_limit_slots: int = 0) -> "SharedTable":
        """A new segment, locked before it gets its final name so no cleanup can ever see it unlocked."""
        remove_stale_segments()
        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        path = SHM_DIR / name
        building = SHM_DIR / f".{name}"  # outside the NAME_PREFIX glob until locked
        cells = HEADER_CELLS + max_analyzers * ANALYZER_CELLS + max_workers * (
            WORKER_HEAD_CELLS + max_analyzers * COUNTER_CELLS + rate_limit_slots * RL_CELLS
        )
        fd = os.open(building, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, cells * 8)
            mm = mmap.mmap(fd, cells * 8)
            os.rename(building, path)
        except BaseException:
            os.close(fd)
            building.unlink(missing_ok=True)
            raise
        header = memoryview(mm).cast("q")
        header[H_MAGIC] = MAGIC
        header[H_VERSION] = LAYOUT_VERSION
        header[H_MAX_ANALYZERS] = max_analyzers
        header[H_MAX_WORKERS] = max_workers
        header[H_SUPERVISOR_PID] = os.getpid()
        header[H_CREATED] = int(time.time())
        header[H_RL_SLOTS] = rate_limit_slots
        header.release()
        return cls(path, mm, owner=True, lock_fd=fd)

    @classmethod
    def attach(cls, name: str) -> "SharedTable":
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls(path, mm, owner=False)

    @property
    def name(self) -> str:
        return self.path.name

    def close(self) -> None:
        self.ints.release()
        self.floats.release()
        self._mm.close()
        if self.owner:
            self.path.unlink(missing_ok=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock, after the unlink
            self._lock_fd = -1

    # --- analyzer rows (supervisor writes) -----------------------------------------------------

    def _arow(self, slot: int) -> int:
        return HEADER_CELLS + slot * ANALYZER_CELLS

    @property
    def generation(self) -> int:
        return self.ints[H_GENERATION]

    def begin_update(self) -> None:
        """Seqlock: an odd generation tells readers the analyzer rows are being rewritten."""
        self.ints[H_GENERATION] += 1

    def end_update(self) -> None:
        self.ints[H_GENERATION] += 1

    def write_analyzer(self, slot: int, name: str, url: str, weight: float, mode: str, incarnation: int,
                       compression: str = "none") -> None:
        """An analyzer's definition (supervisor only; inside begin/end_update, followed by set_effective).

        The caller validated the byte lengths (config.validate_analyzer): a ValueError here is a bug.
        """
        base = self._arow(slot)
        name_b, url_b = name.encode(), url.encode()
        if len(name_b) > NAME_BYTES or len(url_b) > URL_BYTES:
            raise ValueError(f"analyzer {name!r}: name or url too long for the shared table")
        self.ints[base + A_INCARNATION] = incarnation
        self.floats[base + A_WEIGHT] = weight
        self.ints[base + A_MODE] = MODE_CODES[mode]
        self.ints[base + A_COMPRESSION] = COMPRESSION_CODES[compression]
        self.ints[base + A_NAME_LEN] = len(name_b)
        self.ints[base + A_URL_LEN] = len(url_b)
        start = base * 8
        self._mm[start + A_NAME * 8 : start + A_NAME * 8 + len(name_b)] = name_b
        self._mm[start + A_URL * 8 : start + A_URL * 8 + len(url_b)] = url_b

    def set_effective(self, slot: int, state: int, effective_weight: float, admissions: int,
                      drain: int = NOT_DRAINING) -> None:
        """Health outcome and drain of one analyzer (supervisor only; inside begin/end_update)."""
        base = self._arow(slot)
        self.ints[base + A_STATE] = state
        self.ints[base + A_DRAIN] = drain
        self.floats[base + A_EFFECTIVE_WEIGHT] = effective_weight
        self.ints[base + A_ADMISSIONS] = admissions

    def start_epoch(self) -> None:
        """Rebase routing: from now on every analyzer starts from equal footing.

        Called (inside begin/end_update) whenever weights or the analyzer set change, so the
        split follows the new weights from that moment with no catch-up burst.
        """
        totals = self.global_counters(C_NET_ROUTED_MESSAGES)
        for slot in range(self.max_analyzers):
            self.ints[self._arow(slot) + A_BASE_MESSAGES] = totals[slot]

    def read_analyzers(self) -> tuple[int, list[AnalyzerRow]]:
        """Consistent snapshot of the analyzer rows (retries while the supervisor writes)."""
        while True:
            before = self.ints[H_GENERATION]
            if before % 2 == 0:
                rows = [row for slot in range(self.max_analyzers) if (row := self._read_row(slot))]
                if self.ints[H_GENERATION] == before:
                    return before, rows
            time.sleep(0.0005)

    def _read_row(self, slot: int) -> AnalyzerRow | None:
        base = self._arow(slot)
        state = self.ints[base + A_STATE]
        if state == EMPTY:
            return None
        start = base * 8
        name_len, url_len = self.ints[base + A_NAME_LEN], self.ints[base + A_URL_LEN]
        return AnalyzerRow(
            slot=slot,
            name=bytes(self._mm[start + A_NAME * 8 : start + A_NAME * 8 + name_len]).decode(),
            url=bytes(self._mm[start + A_URL * 8 : start + A_URL * 8 + url_len]).decode(),
            weight=self.floats[base + A_WEIGHT],
            mode=MODE_NAMES[self.ints[base + A_MODE]],
            compression=COMPRESSION_NAMES[self.ints[base + A_COMPRESSION]],
            state=state,
            base_messages=self.ints[base + A_BASE_MESSAGES],
            effective_weight=self.floats[base + A_EFFECTIVE_WEIGHT],
            admissions=self.ints[base + A_ADMISSIONS],
            incarnation=self.ints[base + A_INCARNATION],
            drain=self.ints[base + A_DRAIN],
        )

    # --- worker rows (each worker writes its own) ---------------------------------------------

    def worker_base(self, slot: int) -> int:
        """Index of a worker row's first cell; counters of analyzer a start at base+16+a*10."""
        return HEADER_CELLS + self.max_analyzers * ANALYZER_CELLS + slot * self.worker_cells

    def counter_index(self, worker: int, analyzer: int, counter: int) -> int:
        return self.worker_base(worker) + WORKER_HEAD_CELLS + analyzer * COUNTER_CELLS + counter

    def worker_value(self, worker: int, cell: int) -> int:
        return self.ints[self.worker_base(worker) + cell]

    def global_counters(self, counter: int, exclude_worker: int = -1) -> list[int]:
        """Per analyzer slot, ``counter`` summed over worker rows (optionally all but one)."""
        ints = self.ints
        totals = [0] * self.max_analyzers
        for worker in range(self.max_workers):
            if worker == exclude_worker:
                continue
            start = self.worker_base(worker) + WORKER_HEAD_CELLS + counter
            column = ints[start : start + self.max_analyzers * COUNTER_CELLS : COUNTER_CELLS]
            totals = [a + b for a, b in zip(totals, column)]
        return totals

    def rate_limit_base(self, worker: int) -> int:
        """First cell of a worker's rate-limit region (RL_CELLS per slot)."""
        return self._rl_base + worker * self.rl_slots * RL_CELLS


def remove_stale_segments() -> list[Path]:
    """Unlink segments whose supervisor is gone: nobody holds their flock any more.

    A live supervisor holds an exclusive flock on its segment from before the
    segment gets its name until after it is unlinked, whatever pid namespace it
    runs in; so a lock we can take means nobody uses the segment.
    """
    removed = []
    for path in SHM_DIR.glob(f"{NAME_PREFIX}*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live supervisor holds it
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
