"""The benchmark end to end, short: one throughput run with the built-in emitter (no wrk needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(90)
def test_bench_throughput_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--scenarios", "throughput", "--duration", "2",
         "--generator", "emitter", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=80,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "packets/s" in done.stdout and "[throughput]" in done.stderr  # table + progress
    report = json.loads(out.read_text())
    for key in ("command", "machine", "versions", "generator", "runs", "check", "targets", "max_packets_per_s"):
        assert key in report, key
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert {"python", "uvloop", "aiohttp", "orjson", "nginx", "wrk"} <= set(report["versions"])
    assert report["generator"] == "distributor.tools.emitter"
    assert report["check"]["passed"] is True
    run = report["runs"][0]
    assert run["scenario"] == "throughput" and run["packets_per_s"] > 0
    check = run["check"]
    assert check["exact_vs_distributor"] and check["received_packets"] == check["client_accepted_packets"] > 0
    assert check["split_error_points"] < 1.0
    assert {"p50", "p99", "p99.9"} <= set(run["latency_ms"])
    # service time runs from the write, the latency from the moment the request was due: never longer
    assert run["service_ms"]["count"] == run["latency_ms"]["count"] > 0
    assert run["service_ms"]["p99"] <= run["latency_ms"]["p99"]
    assert run["handler_p99_le_ms"] is not None and run["handler_p99_le_ms"] > 0  # from the distributor's histogram
