"""Is a run right? Delivery, the client's view and the message split, checked after a drain.

Which checks apply depends on the target (distributor, nginx proxy, bare floor) and the sinks (Python
analyzers count exactly; nginx sinks only log what the distributor declared per batch): see the
README's "checks" table.
"""

from __future__ import annotations

from typing import Any

from loadtest.bench.cluster import WEIGHTS
from loadtest.free_sinks import SinkCount
from loadtest.generators import SIZES, RunResult

Totals = dict[str, SinkCount]


def split_error_points(messages_by_analyzer: dict[str, int]) -> float:
    """Largest |actual - target| message share over the analyzers, in percentage points."""
    messages = sum(messages_by_analyzer.values())
    weight_sum = sum(w for _, w in WEIGHTS)
    if messages == 0:
        return 0.0
    return max(abs(messages_by_analyzer.get(name, 0) / messages - w / weight_sum) for name, w in WEIGHTS) * 100


def handler_p99_bound_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Upper bucket bound (ms) under which 99% of this run's ingest handler times fell (parse -> enqueue).

    Why: the client's latency includes the kernel, the scheduler and the
    generator; this is the part spent in the distributor's own code.
    """
    buckets = sorted((float(key[len("handler_le_"):]), after[key] - before.get(key, 0.0))
                     for key in after if key.startswith("handler_le_"))
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    return next(bound * 1e3 for bound, count in buckets if count >= 0.99 * total)


def messages_per_packet(sizes: str) -> int | None:
    """Messages in every packet for a fixed-size load (None when sizes vary)."""
    mix = SIZES[sizes]
    return int(mix[0][0]) if len(mix) == 1 else None


def check_run(sinks: str, target: str, sizes: str, result: RunResult, delta: Totals, m0: dict[str, float],
              m1: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    """The checks of one run against ``sinks`` (python or nginx); ``m0``/``m1``: the distributor's counters."""
    check: dict[str, Any] = {"client_accepted_packets": result.accepted_packets,
                             "client_accepted_messages": result.accepted_messages}
    if target == "floor":  # nothing behind it: only the client's view
        check["applied"] = ["client: 2xx answers > 0 and no unexpected status"]
        check["passed"] = result.accepted_packets > 0 and not result.by_status.get("other")
        return check
    # requests in flight when the generator stopped: one per connection (wrk), or per lost connection
    # (emitter), each with all the packets of a request
    tolerance = (result.connections if result.generator == "wrk" else result.errors) * result.packets_per_request
    received_packets = sum(c.packets for c in delta.values())
    per_packet = messages_per_packet(sizes)
    delivered = {name: int(m1.get(f"messages.delivered.{name}", 0) - m0.get(f"messages.delivered.{name}", 0))
                 for name, _ in WEIGHTS}
    delivered_packets = int(m1.get("packets_delivered", 0) - m0.get("packets_delivered", 0))
    resends = sum(int(m1.get(k, 0) - m0.get(k, 0)) for k in ("send_retries", "send_failures", "failover_packets"))
    # nginx sinks log a resent batch (timeout, retry, failover) once per attempt and cannot deduplicate:
    # then the distributor's delivered counters are the only duplicate-free count of what arrived
    sink_has_resends = sinks == "nginx" and target == "distributor" and resends > 0
    arrived_packets = delivered_packets if sink_has_resends else received_packets
    uncounted = arrived_packets - result.accepted_packets
    # messages per analyzer, from the best source available for this sink kind and load
    by_analyzer: dict[str, int] | None = None
    source = ""
    if sink_has_resends:
        by_analyzer, source = delivered, "distributor counters (delivered messages; the sink log has resends)"
    elif all(c.known_messages is not None for c in delta.values()):
        by_analyzer = {name: c.messages for name, c in delta.items()}
        source = "analyzers (parsed, deduplicated)" if sinks == "python" else "sink access log (X-Messages)"
    elif per_packet is not None:
        by_analyzer = {name: c.packets * per_packet for name, c in delta.items()}
        source = f"sink access log (declared packets x {per_packet} messages)"
    elif target == "distributor":
        by_analyzer, source = delivered, "distributor counters (delivered messages)"
    received_messages = sum(by_analyzer.values()) if by_analyzer is not None else None
    split = split_error_points(by_analyzer) if by_analyzer is not None else None
    check.update({
        "sinks": sinks,
        "received_packets": received_packets,
        "received_messages": received_messages,
        "messages_source": source or None,
        "received_by_analyzer": {n: {"packets": c.packets, "messages": (by_analyzer or {}).get(n),
                                     "requests": c.requests} for n, c in delta.items()},
        # accepted by the server but never seen answered by the client: requests in flight when
        # wrk stopped (wrk does not wait for them), or connections the emitter lost/aborted
        "uncounted_by_client": uncounted,
        "uncounted_tolerance": tolerance,
        "client_within_tolerance": 0 <= uncounted <= tolerance,
        "split_error_points": split,
        "split_within_1_point": None if split is None else split < 1.0,
    })
    if sinks == "nginx":  # the bodies' bytes on the wire, from the sinks' access log (Content-Length)
        check["received_body_bytes"] = sum(c.bytes for c in delta.values())
    if extra.get("analyzers_stalled"):
        # every queue full: packets spill to whichever analyzer has room, by design (README,
        # "Full queues spill over"), so the split of this window says nothing about routing
        check["split_within_1_point"] = None
        check["split_not_checked"] = "analyzers stalled: queues full, spill-over by design"
    if target != "distributor":  # the nginx proxy: nothing to compare with but its answers; its split is a finding
        check["applied"] = ["client 2xx vs sinks' count within the requests in flight"]
        check["passed"] = check["client_within_tolerance"]
        return check
    accepted = int(m1.get("accepted", 0) - m0.get("accepted", 0))
    check.update({
        "distributor_accepted_packets": accepted,
        "distributor_delivered_packets": delivered_packets,
        "distributor_delivered_messages": sum(delivered.values()),
        "distributor_routed_messages": int(m1.get("routed", 0) - m0.get("routed", 0)),  # info: a failed-over packet counts twice
        "distributor_failed_over_messages": int(m1.get("failed_over", 0) - m0.get("failed_over", 0)),
        "distributor_resends": resends,
        "delivered_eq_accepted": delivered_packets == accepted,
    })
    if sinks == "python":
        check["exact_vs_distributor"] = accepted == received_packets and check["delivered_eq_accepted"]
        check["applied"] = ["analyzers' packets == distributor accepted (exact)",
                            "distributor delivered == accepted", "client 202 within requests in flight",
                            "client messages == analyzers' messages (when the client saw every answer)",
                            "split < 1 point (analyzers' messages)"]
    else:
        # nginx cannot count NDJSON lines: its log holds what the distributor declared per batch
        # (X-Packet-Count). A resent batch (timeout, retry, failover) may be logged twice.
        check["sink_log_packets"] = received_packets
        check["sink_log_eq_delivered"] = received_packets == delivered_packets
        sink_ok = received_packets == delivered_packets or (resends > 0 and received_packets > delivered_packets)
        if not check["sink_log_eq_delivered"] and sink_ok:
            check["sink_log_extra_packets"] = received_packets - delivered_packets  # resent batches
        check["exact_vs_distributor"] = check["delivered_eq_accepted"] and sink_ok
        check["applied"] = ["distributor delivered == accepted (its own counters)",
                            "sink log's declared packets == distributor delivered (>= when batches were resent)",
                            "client 202 within requests in flight",
                            "client messages == distributor delivered messages (when the client saw every "
                            "answer)", f"split < 1 point ({source})"]
    client_messages_comparable = (result.generator == "emitter"
                                  or (result.accepted_messages is not None and uncounted == 0))
    if client_messages_comparable and received_messages is not None:
        check["exact_vs_client_messages"] = result.accepted_messages == received_messages
    check["passed"] = bool(check["exact_vs_distributor"] and check["client_within_tolerance"]
                           and check["split_within_1_point"] is not False
                           and check.get("exact_vs_client_messages", True))
    return check
