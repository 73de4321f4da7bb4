"""Prometheus export built at scrape time from the shared table.

Nothing on the data path touches prometheus-client: workers bump plain
integers in their rows, and this collector turns the sums into metric families
when /metrics is scraped.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from distributor.shared_table import WAL_FSYNC_BUCKETS

View = Callable[[], list[dict[str, Any]]]

MESSAGE_OUTCOMES = {
    "routed": "routed_messages",
    "failed_over": "failover_messages",
    "delivered": "delivered_messages",
    "rejected": "rejected_messages",
    "dropped_shutdown": "shutdown_dropped_messages",
    "lost_worker_crash": "lost_messages",
}
PACKET_OUTCOMES = {
    "accepted": "accepted_packets",
    "invalid": "rejected_invalid",
    "unavailable": "rejected_unavailable",
    "shed": "shed_packets",
    "loop_lag": "loop_lag_shed_packets",
    "rate_limited": "rate_limited_packets",
    "wal_unavailable": "wal_unavailable_packets",
}
WAL_GAUGES = {
    "bytes": "Bytes of segment files held (adopted slots included)",
    "own_bytes": "Bytes of the worker's own slot directory: what wal.max_bytes bounds",
    "max_bytes": "wal.max_bytes: above it new packets get 503 wal_unavailable until acks free segments",
    "segments": "Segment files held",
    "unacked_packets": "Packets in the log not yet delivered or dropped with a counted reason",
    "unacked_messages": "Messages in the log not yet delivered or dropped with a counted reason",
    "oldest_unacked_age_seconds": "Age of the oldest unacknowledged packet",
    "replay_remaining_bytes": "Segment bytes replay has not read yet",
    "orphan_slots": "Slot directories to adopt (workers shrank) that a live process still holds: backlog not seen",
    "available": "1 while the log takes packets (0: new packets get 503 wal_unavailable)",
}
WAL_COUNTERS = {
    "replayed_packets": "Packets replayed from the log after a restart",
    "possible_duplicates": "Replayed packets that may have reached an analyzer before the crash",
    "corrupt_records": "Records lost to damage (failed checksums, gaps)",
    "torn_tails": "Segments cut back to their last whole record (a crash mid-write)",
    "damaged_acks": "Acknowledgement sidecars with unreadable parts (their packets replay as duplicates)",
    "write_errors": "Failed writes and fsyncs",
    "set_aside": "Damaged segment files renamed for the operator",
    "appended_packets": "Packets written to the log",
    "bytes_written": "Segment bytes written",
    "fsyncs": "fsync rounds",
}
ANALYZER_STATES = ("active", "warming", "saturated", "down", "ejected", "draining", "drained", "removed")


def cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (the last bound +Inf) as Prometheus' cumulative (le, count) pairs."""
    buckets, running = [], 0
    for bound, count in zip(bounds, counts):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return buckets


class TableCollector(Collector):
    """Reads the admin views (analyzers, workers) and the restart count at scrape time."""

    def __init__(
        self,
        analyzers: View,
        workers: View,
        restarts: Callable[[], int],
        recycles: Callable[[], int],
        memory_limit: Callable[[], float],
        latency: Callable[[], tuple[list[tuple[str, int]], float]],
        admin_changes: Callable[[], dict[str, int]],
        memory: Callable[[], tuple[int, float, int]],
    ) -> None:
        self._analyzers = analyzers
        self._workers = workers
        self._restarts = restarts
        self._recycles = recycles
        self._memory_limit = memory_limit
        self._latency = latency
        self._admin_changes = admin_changes
        self._memory = memory

    @staticmethod
    def _wal_families(workers: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per worker write-ahead log figures; nothing when the log is off."""
        logs = [(str(w["slot"]), w["wal"]) for w in workers if "wal" in w]
        if not logs:
            return
        for name, help_text in WAL_GAUGES.items():
            family = GaugeMetricFamily(f"distributor_wal_{name}", help_text, labels=["worker"])
            key = "oldest_unacked_age_s" if name == "oldest_unacked_age_seconds" else name
            for slot, wal in logs:
                family.add_metric([slot], float(wal[key]))
            yield family
        for name, help_text in WAL_COUNTERS.items():
            counter = CounterMetricFamily(f"distributor_wal_{name}", help_text, labels=["worker"])
            for slot, wal in logs:
                counter.add_metric([slot], wal[name])
            yield counter
        fsync = HistogramMetricFamily("distributor_wal_fsync_seconds", "Duration of the log's fsync rounds")
        counts = [sum(wal["fsync_buckets"][i] for _, wal in logs) for i in range(len(WAL_FSYNC_BUCKETS))]
        fsync.add_metric([], cumulative(WAL_FSYNC_BUCKETS, counts), sum(wal["fsync_seconds_sum"] for _, wal in logs))
        yield fsync

    def collect(self) -> Iterator[Metric]:
        analyzers = self._analyzers()
        workers = self._workers()

        packets = CounterMetricFamily("distributor_packets", "Ingest packets by outcome", labels=["outcome"])
        for outcome, key in PACKET_OUTCOMES.items():
            packets.add_metric([outcome], sum(w[key] for w in workers))
        yield packets

        messages = CounterMetricFamily(
            "distributor_messages", "Messages per analyzer by outcome", labels=["analyzer", "outcome"]
        )
        analyzer_packets = CounterMetricFamily(
            "distributor_analyzer_packets", "Packets per analyzer by outcome", labels=["analyzer", "outcome"]
        )
        failed = CounterMetricFamily(
            "distributor_send_failures", "Failed send attempts per analyzer", labels=["analyzer"]
        )
        retries = CounterMetricFamily("distributor_send_retries", "Retries within the budget", labels=["analyzer"])
        failovers = CounterMetricFamily(
            "distributor_failover_packets", "Packets moved away from an analyzer", labels=["analyzer"]
        )
        duplicates = CounterMetricFamily(
            "distributor_possible_duplicate_packets",
            "Packets failed over after a timeout: the analyzer may have taken them too", labels=["analyzer"],
        )
        ejections = CounterMetricFamily("distributor_analyzer_ejections", "Passive ejections", labels=["analyzer"])
        up = GaugeMetricFamily("distributor_analyzer_up", "1 when the analyzer takes traffic", labels=["analyzer"])
        state = GaugeMetricFamily("distributor_analyzer_state", "1 for the current state", labels=["analyzer", "state"])
        draining = GaugeMetricFamily("distributor_analyzer_draining",
                                     "1 while the operator drains it (whatever its health)", labels=["analyzer"])
        backoff = GaugeMetricFamily(
            "distributor_analyzer_backoff_seconds", "Current readmission backoff", labels=["analyzer"]
        )
        capacity = GaugeMetricFamily(
            "distributor_queue_capacity_packets", "Queue limit summed over workers", labels=["analyzer"]
        )
        effective = GaugeMetricFamily(
            "distributor_analyzer_effective_weight", "Weight after slow start and saturation", labels=["analyzer"]
        )
        depth = GaugeMetricFamily("distributor_queue_depth", "Queued + in-flight packets", labels=["analyzer"])
        depth_bytes = GaugeMetricFamily("distributor_queue_bytes", "Queued + in-flight bytes", labels=["analyzer"])
        weight = GaugeMetricFamily("distributor_analyzer_weight", "Configured weight", labels=["analyzer"])
        target = GaugeMetricFamily("distributor_analyzer_target_share", "Target message share", labels=["analyzer"])
        share = GaugeMetricFamily("distributor_analyzer_share", "Actual message share", labels=["analyzer"])
        for a in analyzers:
            name = a["name"]
            for outcome, key in MESSAGE_OUTCOMES.items():
                messages.add_metric([name, outcome], a[key])
            for outcome in ("routed", "delivered", "rejected"):
                analyzer_packets.add_metric([name, outcome], a[f"{outcome}_packets"])
            failed.add_metric([name], a["failed_attempts"])
            retries.add_metric([name], a["retries"])
            failovers.add_metric([name], a["failover_packets"])
            duplicates.add_metric([name], a["possible_duplicates"])
            ejections.add_metric([name], a.get("ejections", 0))
            up.add_metric([name], 1.0 if a["effective_weight"] > 0 else 0.0)
            draining.add_metric([name], 1.0 if a.get("draining") else 0.0)
            for candidate in ANALYZER_STATES:
                state.add_metric([name, candidate], 1.0 if a["state"] == candidate else 0.0)
            backoff.add_metric([name], a.get("backoff_s", 0.0))
            capacity.add_metric([name], a["queue_capacity_packets"])
            effective.add_metric([name], a["effective_weight"])
            depth.add_metric([name], a["queue_packets"])
            depth_bytes.add_metric([name], a["queue_bytes"])
            weight.add_metric([name], a["weight"])
            target.add_metric([name], a["target_share"])
            share.add_metric([name], a["share"])
        yield from (messages, analyzer_packets, failed, retries, failovers, duplicates, ejections, up, state, draining,
                    backoff, capacity, effective, depth, depth_bytes, weight, target, share)

        memory = GaugeMetricFamily("distributor_worker_memory_bytes", "Worker memory", labels=["worker", "kind"])
        cpu = CounterMetricFamily("distributor_worker_cpu_seconds", "Worker CPU time", labels=["worker"])
        lag = GaugeMetricFamily("distributor_event_loop_lag_seconds", "Worker event-loop lag", labels=["worker"])
        connections = GaugeMetricFamily("distributor_worker_connections", "Open ingest connections", labels=["worker"])
        for w in workers:
            slot = str(w["slot"])
            lag.add_metric([slot], w["event_loop_lag_s"])
            connections.add_metric([slot], w["connections"])
            cpu.add_metric([slot], w["cpu_seconds"])  # includes the slot's earlier processes: never decreases
            if "rss_bytes" in w:
                memory.add_metric([slot, "rss"], w["rss_bytes"])
                memory.add_metric([slot, "uss"], w["uss_bytes"])
        http = CounterMetricFamily(
            "distributor_http_events", "Ingest connection and protocol events (limits, timeouts, errors)",
            labels=["event"],
        )
        for event in workers[0]["http"] if workers else ():
            http.add_metric([event], sum(w["http"][event] for w in workers))
        yield from (memory, cpu, lag, connections, http)
        yield from self._wal_families(workers)
        restarts = CounterMetricFamily("distributor_worker_restarts", "Worker processes respawned")
        restarts.add_metric([], self._restarts())
        yield restarts
        recycles = CounterMetricFamily(
            "distributor_worker_memory_recycles", "Workers replaced for exceeding max_worker_memory_mb"
        )
        recycles.add_metric([], self._recycles())
        yield recycles
        cgroup_limit, ratio, pressure = self._memory()
        for name, help_text, value in (
            ("distributor_cgroup_memory_limit_bytes", "The cgroup's memory limit (0: none found)", float(cgroup_limit)),
            ("distributor_cgroup_memory_ratio", "The cgroup's anonymous memory over its limit", ratio),
            ("distributor_memory_pressure", "1 while above overload.memory_watermark: queues do not grow", pressure),
        ):
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], value)
            yield gauge
        limit = GaugeMetricFamily("distributor_worker_memory_limit_bytes", "max_worker_memory_mb in bytes (0 = off)")
        limit.add_metric([], self._memory_limit())
        yield limit
        buckets, total = self._latency()
        latency = HistogramMetricFamily(
            "distributor_ingest_latency_seconds", "Time in the ingest handler: parse, validate, route, enqueue"
        )
        latency.add_metric([], buckets, total)
        yield latency
        changes = CounterMetricFamily("distributor_admin_changes", "Changes made through the admin API",
                                      labels=["action"])
        for action, count in sorted(self._admin_changes().items()):
            changes.add_metric([action], count)
        yield changes
