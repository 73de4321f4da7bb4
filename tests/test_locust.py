"""Locust headless against a real distributor: exit codes, backpressure naming, delivery."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from distributor.tools.localcluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"

# find, never import: locust monkeypatches the process with gevent
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust not installed: pip install -e '.[load]'", allow_module_level=True)
pytestmark = pytest.mark.timeout(90)


def locust(cluster: LocalCluster, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    summary = tmp_path / "summary.json"
    port = cluster.ingest_url.split(":")[2].split("/")[0]
    run_time = [] if "-t" in extra else ["-t", "5s"]
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "20", "-r", "20",
            *run_time, "--host", f"http://127.0.0.1:{port}", "--only-summary",
            "--csv", str(tmp_path / "run"), "--summary-json", str(summary), *extra]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=80)
    return done, json.loads(summary.read_text()) if summary.exists() else None


def test_steady_run_passes_and_delivers(make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    cluster = make_cluster(workers=1, analyzer_args={n: ["--sink"] for n in ("a1", "a2", "a3", "a4")})
    done, summary = locust(cluster, tmp_path, "--max-fail-ratio", "0.01")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["passed"] and summary["accepted"] > 0 and summary["failures"] == 0
    assert (tmp_path / "run_stats.csv").exists()
    cluster.wait_drained(timeout=30)
    received = sum(t["packets"] for t in cluster.analyzer_totals().values())
    # every 202 locust saw arrived; locust stops users mid-request, so a few more may have been accepted
    assert summary["accepted"] <= received <= summary["accepted"] + 25
    assert received == int(next(line.split()[1] for line in _metrics(cluster)
                                if line.startswith('distributor_packets_total{outcome="accepted"}')).split(".")[0])


def test_p95_threshold_fails_the_run(make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    cluster = make_cluster(workers=1, analyzer_args={n: ["--sink"] for n in ("a1", "a2", "a3", "a4")})
    done, summary = locust(cluster, tmp_path, "--max-p95-ms", "0.001")
    assert done.returncode != 0
    assert summary and not summary["passed"] and "p95" in summary["problems"][0]
    assert "verdict: FAIL" in done.stdout + done.stderr


def test_backpressure_is_named_and_not_a_failure(make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    """Stalled analyzers with tiny queues: 503s are counted as backpressure, the run still passes."""
    cluster = make_cluster(workers=1, analyzer_args={n: ["--stall", "--sink"] for n in ("a1", "a2", "a3", "a4")},
                           distributor_args=["--set", "queue.max_packets=20", "--set", "graceful_timeout=1"])
    done, summary = locust(cluster, tmp_path, "AbusiveEmitter", "SteadyEmitter")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["503"] > 0 and summary["failures"] == 0
    stats = (tmp_path / "run_stats.csv").read_text()
    assert "/ingest 503 backpressure" in stats


def _metrics(cluster: LocalCluster) -> list[str]:
    import urllib.request

    return urllib.request.urlopen(cluster.admin_url + "/metrics", timeout=10).read().decode().splitlines()




def test_stress_shape_reports_the_knee(make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    """Analyzers that take ~80 packets/s in all: the ramp passes 1% 503s after a few steps, the knee is before."""
    slow = ["--sink", "--delay-ms", "50", "--concurrency", "1"]
    cluster = make_cluster(workers=1, analyzer_args={n: slow for n in ("a1", "a2", "a3", "a4")},
                           distributor_args=["--set", "sender.batch_max_packets=1", "--set", "sender.max_inflight=1",
                                             "--set", "queue.max_packets=10", "--set", "graceful_timeout=2"])
    done, summary = locust(cluster, tmp_path, "SteadyEmitter", "--stress", "--stress-step-users", "5",
                           "--stress-step-seconds", "2", "--stress-hold-seconds", "1", "-t", "40s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = summary["stress_steps"]
    assert summary["knee_reached"] and summary["503"] > 0 and summary["failures"] == 0, steps
    over = next(s for s in steps if s["ratio_503"] >= 0.01)
    knee = summary["knee"]
    assert knee is not None and knee["ratio_503"] < 0.01 and knee["users"] < over["users"], steps
    assert f"knee: {knee['users']} users" in done.stdout
