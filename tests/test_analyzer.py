"""End-to-end tests for the analyzer service, run as real subprocesses.

Each test starts its own analyzer on a free 127.0.0.1 port so counters never
leak between tests; readiness is polled with a deadline, never slept on.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 15.0

pytestmark = pytest.mark.timeout(60)


# -------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(
    method: str,
    url: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """Return ``(status, parsed JSON body)``; HTTP errors are results, not raises."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        ctype = exc.headers.get("Content-Type", "")
        assert ctype.startswith("application/json"), f"non-JSON error body: {ctype} {raw!r}"
        return exc.code, json.loads(raw)


def packet(emitter: str, pid: str, levels: tuple[str, ...] = ("INFO",)) -> dict[str, Any]:
    return {
        "emitter_id": emitter,
        "packet_id": pid,
        "messages": [
            {"timestamp": 1764172800123 + i, "level": lvl, "message": f"m{i}", "metadata": {"k": i}}
            for i, lvl in enumerate(levels)
        ],
    }


def ndjson(packets: list[dict[str, Any]], trailing: bool = True) -> bytes:
    body = b"\n".join(json.dumps(p).encode() for p in packets)
    return body + b"\n" if trailing else body


@dataclass
class Analyzer:
    proc: subprocess.Popen[bytes]
    base: str
    args: list[str] = field(default_factory=list)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        return http("GET", self.base + path, timeout=timeout)

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> tuple[int, Any]:
        return http("POST", self.base + path, body, headers, timeout)

    def ingest(self, pkt: dict[str, Any]) -> tuple[int, Any]:
        return self.post("/ingest", json.dumps(pkt).encode(), {"Content-Type": "application/json"})

    def batch(self, pkts: list[dict[str, Any]], count: int | None = None, **kw: Any) -> tuple[int, Any]:
        headers = {"Content-Type": "application/x-ndjson"}
        if count is not None:
            headers["X-Packet-Count"] = str(count)
        return self.post("/ingest/batch", ndjson(pkts, **kw), headers)

    def stats(self) -> dict[str, Any]:
        status, body = self.get("/stats")
        assert status == 200
        return body


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def start_analyzer() -> Iterator[Callable[..., Analyzer]]:
    """Factory: start an analyzer with extra CLI args; always stopped by PID afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, ready_path: str = "/health") -> Analyzer:
        port = free_port()
        cmd = [sys.executable, "-m", "analyzer.server", "--listen", f"127.0.0.1:{port}", "--name", "t1", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        an = Analyzer(proc, f"http://127.0.0.1:{port}", list(args))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"analyzer exited early rc={proc.returncode}: {err}")
            try:
                if an.get(ready_path, timeout=1.0)[0] == 200:
                    return an
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("analyzer did not become ready")
            time.sleep(0.02)

    yield start
    for proc in procs:
        _stop(proc)
        if proc.stderr:
            proc.stderr.close()


class Background:
    """Run a blocking request in a thread so the test can observe it pending."""

    def __init__(self, fn: Callable[[], tuple[int, Any]]) -> None:
        self.result: tuple[int, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], tuple[int, Any]]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def wait(self, timeout: float) -> None:
        """Join without asserting the outcome (e.g. the server went away)."""
        self._thread.join(timeout)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float = 10.0) -> tuple[int, Any]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background request did not finish"
        if self.error:
            raise self.error
        assert self.result is not None
        return self.result


# ---------------------------------------------------------------------- tests


def test_single_ingest_counts(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    assert an.ingest(packet("agent-1", "p1", ("INFO", "WARN"))) == (200, {"accepted": 1, "duplicates": 0})
    s = an.stats()
    assert (s["name"], s["packets"], s["messages"], s["requests"], s["batches"]) == ("t1", 1, 2, 1, 0)


def test_batch_with_packet_count(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    pkts = [packet("e", f"p{i}") for i in range(5)]
    assert an.batch(pkts[:3], count=3) == (200, {"accepted": 3, "duplicates": 0})
    # No trailing newline, no header: still fine.
    assert an.batch(pkts[3:], trailing=False) == (200, {"accepted": 2, "duplicates": 0})
    # Empty lines are ignored and do not count towards X-Packet-Count.
    body = b"\n" + json.dumps(packet("e", "p9")).encode() + b"\n\n"
    assert an.post("/ingest/batch", body, {"X-Packet-Count": "1"}) == (200, {"accepted": 1, "duplicates": 0})
    s = an.stats()
    assert (s["packets"], s["messages"], s["batches"], s["requests"]) == (6, 6, 3, 3)


@pytest.mark.parametrize("header", ["2", "4", "abc"])
def test_batch_count_mismatch_400(start_analyzer: Callable[..., Analyzer], header: str) -> None:
    an = start_analyzer()
    status, body = an.post("/ingest/batch", ndjson([packet("e", f"p{i}") for i in range(3)]),
                           {"X-Packet-Count": header})
    assert status == 400 and body["error"] and body["detail"]
    s = an.stats()
    assert (s["packets"], s["rejected_requests"]) == (0, 1)
    assert an.get("/stats/packets") == (200, {"packets": []})


@pytest.mark.parametrize(
    "bad_line",
    [
        b"{not json",
        b'{"packet_id": "x", "messages": []}',
        b'{"emitter_id": "e", "packet_id": 7, "messages": []}',
        b'{"emitter_id": "e", "packet_id": "x", "messages": "nope"}',
        b"[1, 2]",
    ],
)
def test_invalid_line_400_counts_nothing(start_analyzer: Callable[..., Analyzer], bad_line: bytes) -> None:
    an = start_analyzer()
    good = json.dumps(packet("e", "good")).encode()
    status, body = an.post("/ingest/batch", good + b"\n" + bad_line + b"\n", {"X-Packet-Count": "2"})
    assert status == 400 and set(body) == {"error", "detail"}
    status, body = an.post("/ingest", bad_line)
    assert status == 400 and set(body) == {"error", "detail"}
    s = an.stats()
    assert (s["packets"], s["messages"], s["rejected_requests"]) == (0, 0, 2)
    # The good packet from the rejected batch was not remembered either.
    assert an.ingest(packet("e", "good")) == (200, {"accepted": 1, "duplicates": 0})


def test_idempotency_across_endpoints(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    p1, p2 = packet("e", "p1", ("INFO", "INFO")), packet("e", "p2")
    assert an.ingest(p1) == (200, {"accepted": 1, "duplicates": 0})
    assert an.ingest(p1) == (200, {"accepted": 0, "duplicates": 1})
    assert an.batch([p1, p2], count=2) == (200, {"accepted": 1, "duplicates": 1})
    assert an.ingest(p2) == (200, {"accepted": 0, "duplicates": 1})
    # Same packet_id from another emitter is a different packet.
    assert an.ingest(packet("other", "p1")) == (200, {"accepted": 1, "duplicates": 0})
    s = an.stats()
    assert (s["packets"], s["messages"], s["duplicates"]) == (3, 4, 3)


def test_levels_and_emitters(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    an.ingest(packet("a", "1", ("INFO", "ERROR", "INFO")))
    an.batch([packet("b", "1", ("WARN",)), packet("a", "2", ("ERROR",))], count=2)
    an.ingest(packet("a", "2", ("ERROR",)))  # duplicate: must not be counted
    s = an.stats()
    assert s["levels"] == {"INFO": 2, "ERROR": 2, "WARN": 1}
    assert s["emitters"] == {"a": 4, "b": 1}
    assert s["messages"] == 5


def test_stats_packets_lists_window(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    an.batch([packet("a", "1"), packet("b", "2")], count=2)
    an.ingest(packet("a", "1"))
    status, body = an.get("/stats/packets")
    assert status == 200
    assert sorted(map(tuple, body["packets"])) == [("a", "1"), ("b", "2")]


def test_dedup_window_eviction(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--dedup-window", "2")
    for pid in ("1", "2", "3"):
        assert an.ingest(packet("e", pid))[1]["accepted"] == 1
    assert an.get("/stats/packets")[1] == {"packets": [["e", "2"], ["e", "3"]]}
    assert an.ingest(packet("e", "3")) == (200, {"accepted": 0, "duplicates": 1})
    # "1" was evicted, so it is accepted (and counted) again.
    assert an.ingest(packet("e", "1")) == (200, {"accepted": 1, "duplicates": 0})
    assert an.stats()["packets"] == 4


def test_error_rate_one_returns_500_and_counts_nothing(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--error-rate", "1.0")
    for _ in range(3):
        status, body = an.ingest(packet("e", "p"))
        assert status == 500 and body["error"] == "injected"
    status, _ = an.batch([packet("e", "q")], count=1)
    assert status == 500
    s = an.stats()
    assert (s["packets"], s["messages"], s["injected_errors"]) == (0, 0, 4)
    # Switching faults off at runtime restores normal service; nothing was remembered.
    assert an.post("/control", {"error_rate": 0.0})[1]["error_rate"] == 0.0
    assert an.ingest(packet("e", "p")) == (200, {"accepted": 1, "duplicates": 0})


def test_stall_then_unstall_completes_pending(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    assert an.post("/control", {"stall": True}) == (200, {"delay_ms": 0.0, "error_rate": 0.0, "stall": True})
    pending = Background(lambda: an.ingest(packet("e", "stalled")))
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        an.get("/health", timeout=0.5)
    assert not pending.done()
    # /stats and /control stay responsive while stalled; nothing counted yet.
    assert an.stats()["packets"] == 0
    assert an.get("/control")[1]["stall"] is True
    assert an.post("/control", {"stall": False})[1]["stall"] is False
    assert pending.join() == (200, {"accepted": 1, "duplicates": 0})
    assert an.stats()["packets"] == 1
    assert an.get("/health")[0] == 200


def test_stall_flag_at_startup(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--stall", ready_path="/stats")
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        an.post("/ingest", json.dumps(packet("e", "x")).encode(), timeout=0.5)
    assert an.get("/control")[1] == {"delay_ms": 0.0, "error_rate": 0.0, "stall": True}
    an.post("/control", {"stall": False})
    assert an.get("/health")[1]["status"] == "ok"


def test_delay_visible_in_health_latency(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--delay-ms", "120")
    for i in range(3):
        assert an.ingest(packet("e", str(i)))[0] == 200
    lat = an.get("/health")[1]["latency_ms"]
    assert lat["p50"] >= 120 and lat["p99"] >= lat["p50"]
    assert an.post("/control", {"delay_ms": 0})[1]["delay_ms"] == 0


def test_concurrency_one_builds_queue(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--concurrency", "1", "--delay-ms", "400")
    reqs = [Background(functools.partial(an.ingest, packet("e", str(i)))) for i in range(3)]
    seen: dict[str, Any] = {}

    def queued() -> bool:
        seen.update(an.get("/health")[1])
        return seen["queue_depth"] >= 1 and seen["inflight"] == 1

    wait_until(queued, 5.0, "queue_depth >= 1 with one request inflight")
    assert seen["inflight"] <= 1
    assert all(r.join()[0] == 200 for r in reqs)
    h = an.get("/health")[1]
    assert (h["inflight"], h["queue_depth"]) == (0, 0)
    assert an.stats()["packets"] == 3


@pytest.mark.parametrize(
    "update",
    [{"delay_ms": -1}, {"error_rate": 1.5}, {"error_rate": -0.1}, {"stall": "yes"}, {"stall": 1},
     {"delay_ms": True}, {"delay_ms": "10"}, {"bogus": 1}],
)
def test_bad_control_values_400(start_analyzer: Callable[..., Analyzer], update: dict[str, Any]) -> None:
    an = start_analyzer()
    status, body = an.post("/control", update)
    assert status == 400 and set(body) == {"error", "detail"}
    assert an.get("/control")[1] == {"delay_ms": 0.0, "error_rate": 0.0, "stall": False}
    assert an.post("/control", b"[1]")[0] == 400
    assert an.post("/control", b"{oops")[0] == 400


def test_control_partial_update(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    assert an.post("/control", {"delay_ms": 5, "error_rate": 0.25})[1] == {
        "delay_ms": 5.0, "error_rate": 0.25, "stall": False}
    assert an.post("/control", {"error_rate": 0})[1] == {"delay_ms": 5.0, "error_rate": 0.0, "stall": False}


def test_404_and_405_are_json(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    status, body = an.get("/nope")
    assert status == 404 and set(body) == {"error", "detail"}
    status, body = an.get("/ingest")
    assert status == 405 and set(body) == {"error", "detail"}
    status, body = http("DELETE", an.base + "/stats")
    assert status == 405


def test_sigterm_exits_zero_even_with_stalled_request(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    an.post("/control", {"stall": True})
    pending = Background(lambda: an.ingest(packet("e", "x")))
    wait_until(lambda: not pending.done(), 1.0, "request pending")
    an.proc.send_signal(signal.SIGTERM)
    assert an.proc.wait(timeout=8) == 0
    pending.wait(5)  # released with 503 (or a closed connection) rather than hanging shutdown
    assert pending.done()


def test_sigint_exits_zero(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    an.proc.send_signal(signal.SIGINT)
    assert an.proc.wait(timeout=8) == 0


@pytest.mark.parametrize(
    "args",
    [["--listen", "nohostport"], ["--listen", "127.0.0.1:70000"], ["--listen", "127.0.0.1:1", "--error-rate", "2"],
     ["--listen", "127.0.0.1:1", "--concurrency", "0"], ["--listen", "127.0.0.1:1", "--delay-ms", "-5"], []],
)
def test_bad_cli_args_exit_2(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "analyzer.server", *args], cwd=ROOT,
                         capture_output=True, timeout=20)
    assert res.returncode == 2
    assert b"error" in res.stderr


def test_sink_counts_packets_and_messages_only(start_analyzer: Callable[..., Analyzer]) -> None:
    """--sink: same dedup and packet/message totals, no per-level/emitter work, still all-or-nothing."""
    an = start_analyzer("--sink")
    assert an.ingest(packet("a", "1", ("INFO", "ERROR", "INFO"))) == (200, {"accepted": 1, "duplicates": 0})
    assert an.batch([packet("a", "1"), packet("b", "2", ("WARN",) * 4)], count=2) == (
        200, {"accepted": 1, "duplicates": 1})
    status, _ = an.batch([packet("c", "3")], count=2)
    assert status == 400
    status, body = an.post("/ingest/batch", json.dumps(packet("c", "4")).encode() + b"\n{not json\n")
    assert status == 400 and set(body) == {"error", "detail"}
    status, _ = an.post("/ingest", b'{"emitter_id": "e", "packet_id": 7, "messages": []}')
    assert status == 400
    s = an.stats()
    assert (s["packets"], s["messages"], s["duplicates"], s["rejected_requests"]) == (2, 7, 1, 3)
    assert s["levels"] == {} and s["emitters"] == {}
    assert sorted(an.get("/stats/packets")[1]["packets"]) == [["a", "1"], ["b", "2"]]
