"""The benchmark end to end, short: structure and correctness of the report, never speed.

* one throughput run with the built-in emitter and the Python sink analyzers (no wrk needed);
* free (nginx) analyzers with both baselines (nginx proxy, bare floor) and the stress-cpu scenario,
  with tiny durations: which checks apply, exact delivery by the distributor's own counters and the
  sinks' access log, CPU per packet and the load average on every run.
Plus the pieces on their own: the free sinks' answers, the bare floor's answers, merging wrk quantiles.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

import pytest

from loadtest.generators import merge_quantiles
from loadtest.nginx_baseline import ensure_installed

ROOT = Path(__file__).resolve().parents[1]


def needs_nginx_and_wrk() -> None:
    """Install nginx-light and wrk when root with apt-get (as the benchmark does), else skip saying why."""
    missing = ensure_installed(["nginx", "wrk"], allow_install=os.geteuid() == 0 and shutil.which("apt-get") is not None)
    if missing:
        pytest.skip(f"needs {' and '.join(missing)}: apt-get install -y nginx-light wrk")


@pytest.mark.timeout(90)
def test_bench_throughput_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--scenarios", "throughput", "--duration", "2",
         "--generator", "emitter", "--no-install", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=80,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2xx/s" in done.stdout and "[throughput]" in done.stderr  # table + progress
    report = json.loads(out.read_text())
    for key in ("command", "machine", "versions", "generator", "runs", "check", "targets", "max_packets_per_s",
                "git", "loadavg_start", "loadavg_end", "sinks"):
        assert key in report, key
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert {"python", "uvloop", "aiohttp", "orjson", "nginx", "wrk"} <= set(report["versions"])
    assert report["generator"] == "distributor.tools.emitter" and report["sinks"] == "python"
    assert report["check"]["passed"] is True
    run = report["runs"][0]
    assert run["scenario"] == "throughput" and run["packets_per_s"] > 0 and run["run"] == 0
    check = run["check"]
    assert check["exact_vs_distributor"] and check["received_packets"] == check["client_accepted_packets"] > 0
    assert check["delivered_eq_accepted"] and check["applied"]
    assert check["split_error_points"] < 1.0
    assert {"p50", "p99", "p99.9"} <= set(run["latency_ms"])
    # service time runs from the write, the latency from the moment the request was due: never longer
    assert run["service_ms"]["count"] == run["latency_ms"]["count"] > 0
    assert run["service_ms"]["p99"] <= run["latency_ms"]["p99"]
    assert run["handler_p99_le_ms"] is not None and run["handler_p99_le_ms"] > 0  # from the distributor's histogram
    assert_cpu_and_load(run)
    assert "generator" in run["cpu_us_per_2xx"]  # the emitter runs in the harness: counted as the generator


def assert_cpu_and_load(run: dict[str, Any]) -> None:
    cpu = run["cpu"]
    assert cpu["wall_s"] > 0 and cpu["groups_s"]["sut"] > 0, cpu
    assert len(run["loadavg"]["start"]) == 3 and len(run["loadavg"]["end"]) == 3
    assert run["cpu_us_per_2xx"]["sut"] > 0 and run["cpu_us_per_2xx"]["machine"] > 0
    assert 0 <= cpu["machine_busy_fraction"] <= 1.05


@pytest.mark.timeout(120)
def test_bench_free_sinks_baselines_and_stress_cpu(tmp_path: Path) -> None:
    needs_nginx_and_wrk()
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--sinks", "nginx", "--baseline", "nginx", "--rounds", "1",
         "--scenarios", "throughput,stress-cpu", "--duration", "1", "--stress-wrk", "2", "--stress-connections", "32",
         "--wrk-threads", "1", "--connections", "16", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["sinks"] == "nginx" and report["generator"].startswith("wrk")
    assert "location = /health" in report["sinks_nginx_conf"] and "worker_processes 1;" in report["sinks_nginx_conf"]
    assert report["check"]["passed"] is True
    runs = report["runs"]
    assert [r["run"] for r in runs] == list(range(len(runs)))
    kinds = [(r["scenario"], r["target"], r["sizes"]) for r in runs]
    assert kinds == [("throughput", "distributor", "fixed"),
                     ("baseline", "distributor", "fixed"), ("baseline", "nginx", "fixed"), ("baseline", "floor", "fixed"),
                     ("baseline", "distributor", "skewed"), ("baseline", "nginx", "skewed"),
                     ("stress-cpu", "distributor", "fixed"), ("stress-cpu", "floor", "fixed")]
    for r in runs:
        assert r["check"]["passed"], r["check"]
        assert_cpu_and_load(r)
        assert r["latency_is_raw"] and r["latency_corrected_ms"] is not None
        # wrk_ingest.lua undid wrk's coordinated-omission correction: one sample per answer, no more
        assert r["latency_ms"]["count"] <= sum(r["by_status"].values())
        assert r["latency_ms"]["count"] >= sum(r["by_status"].values()) - r["errors"]
        if r["target"] == "distributor":
            c = r["check"]
            # free sinks cannot count NDJSON lines: the distributor's own books, and the batches nginx logged
            assert c["delivered_eq_accepted"] and c["distributor_accepted_packets"] > 0
            assert c["sink_log_eq_delivered"] or c["distributor_resends"] > 0
            assert c["exact_vs_distributor"] and c["client_within_tolerance"]
            assert c["split_within_1_point"] is True
            assert c["messages_source"] == ("distributor counters (delivered messages)" if r["sizes"] == "skewed"
                                            else "sink access log (declared packets x 10 messages)")
            assert "sinks" in r["cpu_us_per_2xx"]
        if r["target"] == "floor":
            assert "sinks" not in r["cpu_us_per_2xx"] and r["by_status"].get("202", 0) > 0
    nginx_fixed = runs[2]["check"]
    assert nginx_fixed["client_within_tolerance"] and nginx_fixed["received_packets"] > 0
    assert runs[5]["check"]["messages_source"] == "sink access log (X-Messages)"  # skewed through the proxy

    baseline = report["baseline"]
    assert baseline["sinks"] == "nginx" and "upstream analyzers" in baseline["nginx_conf"]
    row = baseline["rounds"][0]
    assert row["round"] == 1 and len(row["loadavg"]["start"]) == 3
    for system in ("distributor", "nginx", "floor"):
        assert row[system]["packets_per_s"] > 0 and row[system]["cpu_us_per_2xx"] > 0
    for key in ("distributor_over_nginx", "distributor_over_floor"):
        ratio = baseline["comparison"][key]
        assert ratio["min"] <= ratio["max"] and len(ratio["per_round"]) == 1

    stress = report["stress_cpu"]
    assert stress["connections"] == 64 and stress["wrk_processes"] == 2
    assert set(stress["answers_per_s"]) == {"202", "503", "429", "other", "all"} and stress["answers_per_s"]["all"] > 0
    assert {"p50", "p99", "max", "mean"} <= set(stress["latency_all_answers_ms"])
    assert isinstance(stress["p99_met"], bool) and stress["p99_target_ms"] == 50
    assert 0 <= (stress["status_503_with_retry_after"] or 0) <= stress["status_503"]
    assert stress["event_loop_lag_ms"]["samples"] >= 1 and stress["event_loop_lag_ms"]["max"] >= 0
    assert set(stress["peak_rss_mb"]) == set(stress["peak_queued_mb"]) == {"0", "1"}
    assert stress["rss_within_bound"] is True
    assert stress["floor"]["answers_per_s"] > 0
    targets = report["targets"]
    for name in ("stress_cpu_p99_all_answers_lt_50ms", "stress_cpu_503s_with_retry_after",
                 "2xx_per_s_vs_nginx_proxy_nginx_sinks_ge_1.2x", "2xx_per_s_vs_bare_floor_ge_0.7x"):
        assert isinstance(targets[name]["met"], bool), name
    table = done.stdout
    assert "same run, alternating rounds" in table and "stress-cpu (run 6)" in table
    assert "least flattering" in table and ("met" in table or "MISSED" in table)


def test_free_sinks_answer_like_analyzers() -> None:
    needs_nginx_and_wrk()
    from loadtest.free_sinks import HEALTH_BODY, NginxSinks

    with NginxSinks((("a1", 1.0), ("a2", 1.0))) as sinks:
        (_, url, _), (name2, url2, _) = sinks.urls()
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/json"
            assert json.loads(r.read()) == json.loads(HEALTH_BODY)
        batch = urllib.request.Request(url2 + "/ingest/batch", data=b'{"a":1}\n{"b":2}\n{"c":3}',
                                       headers={"X-Packet-Count": "3", "Content-Type": "application/x-ndjson"})
        with urllib.request.urlopen(batch, timeout=5) as r:
            assert r.status == 200 and json.loads(r.read()) == {"accepted": 3}
        single = urllib.request.Request(url + "/ingest", data=b"{}", headers={"X-Messages": "7"})
        with urllib.request.urlopen(single, timeout=5) as r:
            assert json.loads(r.read()) == {"accepted": 1}
        deadline = time.monotonic() + 5
        while sinks.totals()[name2].packets < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # the access log is flushed every 250 ms
        totals = sinks.totals()
        assert (totals[name2].packets, totals[name2].requests, totals[name2].known_messages) == (3, 1, None)
        assert (totals["a1"].packets, totals["a1"].known_messages) == (1, 7)
        assert sinks.health_requests == 1 and len(sinks.pids()) == 2  # master + one worker


def test_bare_floor_parses_and_answers_202() -> None:
    from loadtest.bare_floor import BareFloor

    with BareFloor(2) as floor:
        assert len(floor.pids()) == 2
        ok = urllib.request.Request(floor.url, data=b'{"packet_id":"p-1","emitter_id":"e","messages":[]}')
        with urllib.request.urlopen(ok, timeout=5) as r:
            assert r.status == 202 and json.loads(r.read()) == {"status": "accepted", "packet_id": "p-1"}
        bad = urllib.request.Request(floor.url, data=b"{not json")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=5)
        assert err.value.code == 400
    assert floor.pids() == []


def test_merge_quantiles_weights_processes_by_answers() -> None:
    one = [(0.5, 10.0), (0.9, 20.0), (0.99, 30.0), (1.0, 40.0)]
    assert merge_quantiles([(100, one)], 0.9) == pytest.approx(20.0)
    # two identical processes: the same distribution
    assert merge_quantiles([(100, one), (300, one)], 0.99) == pytest.approx(30.0)
    # a slow process with few answers moves the merged p50 only a little
    slow = [(q, v * 10) for q, v in one]
    assert 10.0 <= merge_quantiles([(900, one), (100, slow)], 0.5) < 12.0


class _FakeSinks:
    kind = "nginx"


def _nginx_check(sink_packets: dict[str, int], resends: int) -> dict[str, Any]:
    """Bench.check for a distributor run of 100 packets (10 messages each) delivered to free sinks."""
    from loadtest.bench import Bench
    from loadtest.free_sinks import SinkCount, Sinks
    from loadtest.generators import RunResult

    bench = Bench.__new__(Bench)
    bench.sinks = cast(Sinks, _FakeSinks())
    result = RunResult(generator="emitter", duration_s=1.0, connections=4, accepted_packets=100,
                       accepted_messages=1000, by_status={"202": 100})
    delivered = {"a1": 40, "a2": 30, "a3": 20, "a4": 10}
    after = {"accepted": 100.0, "routed": 1000.0, "packets_delivered": 100.0, "send_retries": float(resends),
             **{f"messages.delivered.{n}": p * 10.0 for n, p in delivered.items()}}
    delta = {n: SinkCount(packets=p, messages=0, requests=1, unknown=p) for n, p in sink_packets.items()}
    return bench.check("distributor", "fixed", result, delta, {}, after, {})


def test_free_sinks_check_uses_the_distributors_books() -> None:
    exact = _nginx_check({"a1": 40, "a2": 30, "a3": 20, "a4": 10}, resends=0)
    assert exact["passed"] and exact["sink_log_eq_delivered"] and exact["uncounted_by_client"] == 0
    assert exact["messages_source"] == "sink access log (declared packets x 10 messages)"
    # a resent batch is logged twice by nginx: the distributor's delivered counters are the reference
    resent = _nginx_check({"a1": 50, "a2": 30, "a3": 20, "a4": 10}, resends=1)
    assert resent["passed"] and resent["sink_log_extra_packets"] == 10 and resent["uncounted_by_client"] == 0
    assert resent["messages_source"].startswith("distributor counters") and resent["split_error_points"] < 0.01
    # more in the log than delivered with no resend, or fewer: a real discrepancy
    assert not _nginx_check({"a1": 50, "a2": 30, "a3": 20, "a4": 10}, resends=0)["passed"]
    assert not _nginx_check({"a1": 39, "a2": 30, "a3": 20, "a4": 10}, resends=1)["passed"]
