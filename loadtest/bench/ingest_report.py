"""The ingest scenario's summary, its target and its table: per variant over the rounds, and ratios of
variants measured in the same round (the least and the most flattering round both kept)."""

from __future__ import annotations

import statistics
from typing import Any

BATCH_TARGET = 5.0  # issue 13: batch ingest >= 5x the messages/s of single-packet ingest on the same cores
# (variant, reference): ratios computed round by round
PAIRS = (("batch", "single"), ("gzip", "batch"), ("otlp", "batch"), ("tls", "single"), ("trace", "single"),
         ("to-gzip", "single"), ("to-zstd", "single"))


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_round": values}


def _row(record: dict[str, Any]) -> dict[str, Any]:
    cpu, per = record["cpu"], record["cpu_us_per_message"]
    wall = max(cpu["wall_s"], 1e-9)
    return {
        "run": record["run"], "round": record["round"], "messages_per_s": record["messages_per_s"],
        "packets_per_s": record["packets_per_s"], "requests_per_s": record["requests_per_s"],
        "ratio_503": record["ratio_503"], "cpu_us_per_message": per,
        "sut_cores": cpu["groups_s"].get("sut", 0.0) / wall, "generator_cores": cpu["generator_s"] / wall,
        "sinks_cores": cpu["groups_s"].get("sinks", 0.0) / wall, "other_s": cpu["other_s"],
        "body_bytes_per_message_to_analyzers": record["body_bytes_per_message_to_analyzers"],
        "analyzer_requests_per_message": (sum(a["requests"] for a in record["check"]["received_by_analyzer"].values())
                                          / max(record["check"].get("received_messages") or 0, 1)),
        "loadavg": record["loadavg"], "passed": record["check"]["passed"],
        **({"tracing": record["tracing"]} if "tracing" in record else {}),
    }


def summarize(records: list[dict[str, Any]], variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: every round's row and the median/min/max of what is compared; ratios by round."""
    out: dict[str, Any] = {"variants": {}, "comparisons": {}}
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        rows.setdefault(record["variant"], {})[record["round"]] = _row(record)
    for variant in variants:
        found = rows.get(variant["name"])
        if not found:
            continue
        entry: dict[str, Any] = {**variant, "rounds": list(found.values())}
        for key in ("messages_per_s", "packets_per_s", "requests_per_s", "ratio_503", "sut_cores",
                    "generator_cores"):
            entry[key] = _spread([row[key] for row in found.values()])
        for party in ("sut", "sinks", "generator"):
            entry[f"cpu_us_per_message_{party}"] = _spread([row["cpu_us_per_message"].get(party) or 0.0
                                                            for row in found.values()])
        wire = [row["body_bytes_per_message_to_analyzers"] for row in found.values()]
        if all(w is not None for w in wire):
            entry["body_bytes_per_message_to_analyzers"] = _spread([float(w) for w in wire if w is not None])
        out["variants"][variant["name"]] = entry
    for name, reference in PAIRS:
        this, base = rows.get(name, {}), rows.get(reference, {})
        common = sorted(set(this) & set(base))
        if not common:
            continue
        comparison = {
            "messages_per_s": _spread([this[r]["messages_per_s"] / max(base[r]["messages_per_s"], 1e-9)
                                       for r in common]),
            # distributor CPU per message of this variant over the reference's: < 1 cheaper, > 1 dearer
            "cpu_us_per_message_sut": _spread([(this[r]["cpu_us_per_message"].get("sut") or 0.0)
                                               / max(base[r]["cpu_us_per_message"].get("sut") or 0.0, 1e-9)
                                               for r in common]),
        }
        wire = [(this[r]["body_bytes_per_message_to_analyzers"], base[r]["body_bytes_per_message_to_analyzers"])
                for r in common]
        if all(a is not None and b for a, b in wire):
            comparison["body_bytes_to_analyzers"] = _spread([a / b for a, b in wire if a is not None and b])
        out["comparisons"][f"{name}/{reference}"] = comparison
    return out


def ingest_targets(ingest: dict[str, Any]) -> dict[str, Any]:
    """Issue 13: batch >= 5x single in messages/s, judged on the least flattering round."""
    ratio = (ingest.get("comparisons") or {}).get("batch/single", {}).get("messages_per_s")
    if not ratio:
        return {}
    return {"ingest_batch_messages_per_s_ge_5x_single": {
        "value": ratio["min"], "max": ratio["max"], "met": ratio["min"] >= BATCH_TARGET,
        "judged_on": "least flattering round"}}


def _k(value: float) -> str:
    return f"{value / 1e3:.0f}k" if value >= 10e3 else f"{value:.0f}"


def print_ingest(ingest: dict[str, Any] | None) -> None:
    if not ingest:
        return
    if ingest.get("skipped"):
        print(f"\ningest skipped: {ingest['skipped']}")
        return
    conns = ingest["connections"]
    print(f"\ningest ({ingest['generator']} closed loop, {ingest['workers']} workers, free nginx sinks, "
          f"{ingest['duration_s']:.0f} s x {ingest['rounds']} rounds alternating; {conns['single_packet']} connections "
          f"for single packets, {conns['batch']} for 100-packet requests; median [least - most] over the rounds)")
    print(f"  {'variant':<9}{'what':<41}{'msgs/s':>22}{'pkts/s':>9}{'req/s':>8}{'503':>7}"
          f"{'µs/msg dist':>20}{'sinks':>7}{'gen':>6}{'dist cores':>11}{'B/msg out':>10}")
    for name, v in ingest["variants"].items():
        msgs, sut = v["messages_per_s"], v["cpu_us_per_message_sut"]
        wire = v.get("body_bytes_per_message_to_analyzers")
        msgs_cell = f"{_k(msgs['median'])} [{_k(msgs['min'])}-{_k(msgs['max'])}]"
        sut_cell = f"{sut['median']:.2f} [{sut['min']:.2f}-{sut['max']:.2f}]"
        wire_cell = "-" if wire is None else f"{wire['median']:.1f}"
        print(f"  {name:<9}{v['label']:<41}{msgs_cell:>22}{_k(v['packets_per_s']['median']):>9}"
              f"{_k(v['requests_per_s']['median']):>8}{v['ratio_503']['median']:>7.1%}{sut_cell:>20}"
              f"{v['cpu_us_per_message_sinks']['median']:>7.2f}{v['cpu_us_per_message_generator']['median']:>6.2f}"
              f"{v['sut_cores']['median']:>11.2f}{wire_cell:>10}")
    trace = next((row["tracing"] for row in ingest["variants"].get("trace", {}).get("rounds", [])
                  if "tracing" in row), None)
    for key, c in ingest["comparisons"].items():
        msgs, cpu = c["messages_per_s"], c["cpu_us_per_message_sut"]
        line = (f"  {key}: messages/s x{msgs['min']:.2f} to x{msgs['max']:.2f}; distributor CPU per message "
                f"x{cpu['min']:.2f} to x{cpu['max']:.2f}")
        if "body_bytes_to_analyzers" in c:
            wire = c["body_bytes_to_analyzers"]
            line += f"; bytes to the analyzers x{wire['min']:.3f} to x{wire['max']:.3f}"
        if key == "batch/single":
            line += f" -> batch >= {BATCH_TARGET:.0f}x single: {'met' if msgs['min'] >= BATCH_TARGET else 'MISSED'}"
        print(line)
    if trace:
        print(f"  trace: sample_ratio {trace['sample_ratio']}, {trace['spans']} spans received "
              f"({trace['ingest_spans']} ingest, {trace['send_spans']} send: "
              f"{trace['ingest_spans_per_request']:.4f} ingest spans per request) in the last round")
    for name, why in (ingest.get("skipped_variants") or {}).items():
        print(f"  {name} skipped: {why}")
