"""The ingest scenario end to end, tiny: every variant once (single packets, NDJSON batches, gzip, OTLP
protobuf, TLS, tracing sampled, analyzer compression gzip/zstd) on one worker with free analyzers; and the
throughput scenario in batch mode (wrk) against the Python analyzers, which count every packet exactly:
structure and checks of the report, never speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

from loadtest.bench.payloads import write_pool
from loadtest.generators import WrkPool, run_wrk
from test_bench import ROOT, needs_nginx_and_wrk

VARIANTS = ["single", "batch", "gzip", "otlp", "tls", "trace", "to-gzip", "to-zstd"]


def bench(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    # OTEL_BSP_SCHEDULE_DELAY (the SDK's standard variable): traced workers export their spans every 200 ms
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--duration", "1", "--workers", "1", "--connections", "8",
         "--wrk-threads", "1", "--output", str(out), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=110, env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return done, json.loads(out.read_text())


@pytest.mark.timeout(120)
def test_bench_ingest_every_variant(tmp_path: Path) -> None:
    needs_nginx_and_wrk()
    done, report = bench(tmp_path, "--sinks", "nginx", "--scenarios", "ingest", "--rounds", "1",
                         "--ingest-warm-up", "0")
    assert report["check"]["passed"] is True and report["generator"].startswith("wrk")
    ingest_runs = report["runs"]
    assert [r["variant"] for r in ingest_runs] == VARIANTS
    assert [r["scenario"] for r in ingest_runs] == [f"ingest:{v}" for v in VARIANTS]
    for r in ingest_runs:
        c = r["check"]
        assert c["passed"] and c["delivered_eq_accepted"] and c["exact_vs_distributor"], (r["variant"], c)
        assert c["received_messages"] == 10 * c["received_packets"] > 0
        assert r["cpu_us_per_message"]["sut"] > 0 and r["body_bytes_per_message_to_analyzers"] > 0
        assert r["packets_per_request"] == (1 if r["variant"] in ("single", "tls", "trace", "to-gzip", "to-zstd")
                                            else 100)
    by_variant = {r["variant"]: r for r in ingest_runs}
    assert by_variant["tls"]["url"].startswith("https://127.0.0.1:")
    assert by_variant["otlp"]["content_type"] == "application/x-protobuf" and by_variant["otlp"]["url"].endswith(
        "/v1/logs")
    assert by_variant["gzip"]["content_encoding"] == "gzip"
    assert by_variant["trace"]["tracing"]["spans"] > 0 and by_variant["trace"]["check"]["spans_received"] is True
    assert by_variant["to-gzip"]["analyzer_compression"] == "gzip"
    ingest = report["ingest"]
    assert set(ingest["variants"]) == set(VARIANTS) and ingest["sinks"] == "nginx"
    for entry in ingest["variants"].values():
        assert entry["messages_per_s"]["median"] > 0 and entry["cpu_us_per_message_sut"]["median"] > 0
    comparisons = ingest["comparisons"]
    # the analyzers' compression shrinks what goes to them; the clients' side is the same load
    for name in ("to-gzip/single", "to-zstd/single"):
        assert comparisons[name]["body_bytes_to_analyzers"]["max"] < 0.5, comparisons[name]
    target = report["targets"]["ingest_batch_messages_per_s_ge_5x_single"]
    assert isinstance(target["met"], bool) and target["value"] > 0
    assert "batch >= 5x single" in done.stdout and "ingest (" in done.stdout


@pytest.mark.timeout(90)
def test_bench_throughput_in_batch_mode_is_exact_at_the_analyzers(tmp_path: Path) -> None:
    needs_nginx_and_wrk()
    _, report = bench(tmp_path, "--scenarios", "throughput", "--batch", "20", "--generator", "wrk")
    assert report["check"]["passed"] is True and report["config"]["batch"] == 20
    for run in report["runs"]:
        assert run["batch"] == 20 and run["packets_per_request"] == 20 and run["generator"] == "wrk"
        check = run["check"]
        # unique packet ids in every line (the Python analyzers deduplicate), counted from the batch answers
        assert check["exact_vs_distributor"] and check["received_packets"] >= check["client_accepted_packets"] > 0
        # a request in flight per connection (halved while 503s are above 1%), 20 packets each
        assert check["uncounted_tolerance"] == run["connections"] * 20 and check["client_within_tolerance"]
        assert check["received_messages"] == 10 * check["received_packets"]


class _PartialAnswers(BaseHTTPRequestHandler):
    """Takes part of every request: an OTLP partial_success of 20 records, a batch refusing 3 lines."""

    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/logs":
            answer = ExportLogsServiceResponse()
            answer.partial_success.rejected_log_records = 20
            answer.partial_success.error_message = "resource_logs[3]: overloaded"
            body = answer.SerializeToString()
        else:
            body = json.dumps({"accepted": 97, "rejected": [{"line": i, "status": 503, "error": "overloaded",
                                                             "detail": "-"} for i in range(3)]},
                              separators=(",", ":")).encode()  # as the distributor writes it (orjson)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # wrk resets its connections at the end
        pass


@pytest.mark.timeout(60)
def test_wrk_counts_what_partial_answers_took(tmp_path: Path) -> None:
    """wrk_ingest.lua reads the packets taken from batch and OTLP answers, partial ones included."""
    needs_nginx_and_wrk()
    server = _QuietServer(("127.0.0.1", 0), _PartialAnswers)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        pool = write_pool(tmp_path / "pool", [b"x" * 100, b"y" * 200])
        for path, answer in (("/v1/logs", "otlp"), ("/ingest/batch", "batch")):
            result = run_wrk(base + path, 1, 2, "fixed", "t", lambda: "", threads=1,
                             pool=WrkPool(pool, packets=100, messages=10, answer=answer))
            answered = result.by_status["2xx_other"]
            taken = 98 if answer == "otlp" else 97  # 20 records = 2 whole packets; 3 lines
            assert answered > 0 and result.packets_per_request == 100
            assert result.accepted_packets == taken * answered and result.accepted_messages == taken * 10 * answered
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
