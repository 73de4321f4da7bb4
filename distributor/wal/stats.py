"""The log's figures for metrics: plain numbers the worker's heartbeat copies, never a call on the data path."""

from __future__ import annotations

from bisect import bisect_left

from distributor.shared_table import WAL_FSYNC_BUCKETS

FSYNC_BUCKETS = WAL_FSYNC_BUCKETS[:-1]  # the shared table's buckets, without the +Inf bound


class Histogram:
    """Fixed buckets: ``counts[i]`` observations <= ``bounds[i]`` (not cumulative), the last one +Inf."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = FSYNC_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class WalStats:
    """Gauges and counters of one worker's log (its own slot and what it adopted)."""

    __slots__ = ("bytes", "own_bytes", "segments", "unacked_packets", "unacked_messages", "appended_packets",
                 "bytes_written", "fsyncs", "fsync_seconds", "replayed_packets", "possible_duplicates",
                 "replay_remaining_bytes", "corrupt_records", "torn_tails", "damaged_acks", "write_errors",
                 "set_aside", "orphan_slots")

    def __init__(self) -> None:
        self.bytes = 0  # gauge: bytes of every segment file held, adopted ones included
        self.own_bytes = 0  # gauge: the part in this worker's own slot directory (what max_bytes bounds)
        self.segments = 0  # gauge: segment files held (the active one and the pre-created spare included)
        self.unacked_packets = 0  # gauge: appended or replayed, not yet acknowledged DONE
        self.unacked_messages = 0
        self.appended_packets = 0  # counter: records written by this process
        self.bytes_written = 0  # counter: segment bytes written (headers included)
        self.fsyncs = 0  # counter: fsync rounds (one round may cover several files)
        self.fsync_seconds = Histogram()
        self.replayed_packets = 0  # counter: not-DONE records handed out by replay
        self.possible_duplicates = 0  # counter: replayed records that may have reached an analyzer already
        self.replay_remaining_bytes = 0  # gauge: segment bytes replay has not read yet
        self.corrupt_records = 0  # counter: records lost to damage (failed checks, gaps in indices)
        self.torn_tails = 0  # counter: segments cut back to their last whole record (a crash mid-write)
        self.damaged_acks = 0  # counter: ack sidecars with unreadable parts (their packets replay as duplicates)
        self.write_errors = 0  # counter: failed writes and fsyncs
        self.set_aside = 0  # counter: segment files renamed .corrupt-<time> for the operator
        self.orphan_slots = 0  # gauge: slot directories to adopt that a live process still holds
