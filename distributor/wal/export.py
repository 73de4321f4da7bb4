"""Copies a worker log's figures into the worker's row of the shared table (from its heartbeat).

Counters restart at zero in every process, but a slot keeps its counters across
respawns (Prometheus counters never go back): they are written as the row's
value at the process's start plus this process's own count.
"""

from __future__ import annotations

from distributor.shared_table import (
    W_WAL_APPENDED,
    W_WAL_BYTES,
    W_WAL_BYTES_WRITTEN,
    W_WAL_CORRUPT,
    W_WAL_DAMAGED_ACKS,
    W_WAL_FSYNC_BUCKETS,
    W_WAL_FSYNC_SUM_NS,
    W_WAL_FSYNCS,
    W_WAL_OWN_BYTES,
    W_WAL_OLDEST_MS,
    W_WAL_ORPHAN_SLOTS,
    W_WAL_POSSIBLE_DUPLICATES,
    W_WAL_REPLAY_REMAINING_BYTES,
    W_WAL_REPLAYED,
    W_WAL_SEGMENTS,
    W_WAL_SET_ASIDE,
    W_WAL_STATE,
    W_WAL_TORN_TAILS,
    W_WAL_UNACKED_MESSAGES,
    W_WAL_UNACKED_PACKETS,
    W_WAL_WRITE_ERRORS,
    WAL_AVAILABLE,
    WAL_FSYNC_BUCKETS,
    WAL_UNAVAILABLE,
    SharedTable,
)
from distributor.wal.log import WorkerLog

# WalStats attribute -> cumulative cell
COUNTER_CELLS = {
    "appended_packets": W_WAL_APPENDED,
    "bytes_written": W_WAL_BYTES_WRITTEN,
    "fsyncs": W_WAL_FSYNCS,
    "replayed_packets": W_WAL_REPLAYED,
    "possible_duplicates": W_WAL_POSSIBLE_DUPLICATES,
    "corrupt_records": W_WAL_CORRUPT,
    "torn_tails": W_WAL_TORN_TAILS,
    "damaged_acks": W_WAL_DAMAGED_ACKS,
    "write_errors": W_WAL_WRITE_ERRORS,
    "set_aside": W_WAL_SET_ASIDE,
}
CUMULATIVE = (*COUNTER_CELLS.values(), W_WAL_FSYNC_SUM_NS,
              *range(W_WAL_FSYNC_BUCKETS, W_WAL_FSYNC_BUCKETS + len(WAL_FSYNC_BUCKETS)))


class WalExport:
    def __init__(self, table: SharedTable, worker_slot: int, log: WorkerLog) -> None:
        self._ints = table.ints
        self._row = table.worker_base(worker_slot)
        self._log = log
        self._base = {cell: self._ints[self._row + cell] for cell in CUMULATIVE}

    def publish(self) -> None:
        ints, row, log = self._ints, self._row, self._log
        stats = log.stats
        ints[row + W_WAL_STATE] = WAL_AVAILABLE if log.available else WAL_UNAVAILABLE
        ints[row + W_WAL_BYTES] = stats.bytes
        ints[row + W_WAL_OWN_BYTES] = stats.own_bytes
        ints[row + W_WAL_SEGMENTS] = stats.segments
        ints[row + W_WAL_UNACKED_PACKETS] = stats.unacked_packets
        ints[row + W_WAL_UNACKED_MESSAGES] = stats.unacked_messages
        ints[row + W_WAL_OLDEST_MS] = log.oldest_unacked_ms() or 0
        ints[row + W_WAL_REPLAY_REMAINING_BYTES] = stats.replay_remaining_bytes
        ints[row + W_WAL_ORPHAN_SLOTS] = stats.orphan_slots
        base = self._base
        for name, cell in COUNTER_CELLS.items():
            ints[row + cell] = base[cell] + getattr(stats, name)
        histogram = stats.fsync_seconds
        ints[row + W_WAL_FSYNC_SUM_NS] = base[W_WAL_FSYNC_SUM_NS] + int(histogram.sum * 1e9)
        for i, count in enumerate(histogram.counts):
            cell = W_WAL_FSYNC_BUCKETS + i
            ints[row + cell] = base[cell] + count
