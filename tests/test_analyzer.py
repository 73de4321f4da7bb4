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

import psutil
import pytest

from distributor.tools.localcluster import AnalyzerProcess

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

    def stats_bytes(self) -> bytes:
        """The raw /stats body, to check its size."""
        with urllib.request.urlopen(self.base + "/stats", timeout=10) as resp:
            return bytes(resp.read())

    def pages(self, limit: int | None = None, between: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Every /stats/packets page, following ``next`` while ``more``; ``between`` runs after each page."""
        pages: list[dict[str, Any]] = []
        query = f"?limit={limit}" if limit else ""
        while True:
            status, page = self.get("/stats/packets" + query)
            assert status == 200, page
            pages.append(page)
            if between:
                between()
            if not page["more"]:
                return pages
            query = f"?after={page['next']}" + (f"&limit={limit}" if limit else "")

    def keys(self) -> list[tuple[str, str]]:
        return [(e, p) for page in self.pages() for e, p in page["packets"]]

    def rss_mb(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20


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
    assert an.get("/stats/packets")[1]["packets"] == []


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


def test_stats_packets_lists_received_keys(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    an.batch([packet("a", "1"), packet("b", "2")], count=2)
    an.ingest(packet("a", "1"))
    status, body = an.get("/stats/packets")
    assert status == 200
    assert body["packets"] == [["a", "1"], ["b", "2"]]  # arrival order; the duplicate is not listed again
    assert (body["more"], body["recorded"], body["not_recorded"]) == (False, 2, 0)


def test_dedup_window_eviction(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--dedup-window", "2", "--record-packets", "10")
    for pid in ("1", "2", "3"):
        assert an.ingest(packet("e", pid))[1]["accepted"] == 1
    assert an.stats()["dedup_window"] == {"capacity": 2, "size": 2}
    assert an.ingest(packet("e", "3")) == (200, {"accepted": 0, "duplicates": 1})
    # "1" was evicted, so it is accepted (and counted) again, and listed again.
    assert an.ingest(packet("e", "1")) == (200, {"accepted": 1, "duplicates": 0})
    assert an.stats()["packets"] == 4
    assert an.keys() == [("e", "1"), ("e", "2"), ("e", "3"), ("e", "1")]


def test_record_packets_defaults_to_dedup_window(start_analyzer: Callable[..., Analyzer]) -> None:
    """--dedup-window alone bounds every key the analyzer holds, as it did before keys were logged."""
    an = start_analyzer("--dedup-window", "2")
    for pid in ("1", "2", "3"):
        an.ingest(packet("e", pid))
    assert an.stats()["packet_log"] == {"limit": 2, "recorded": 2, "not_recorded": 1}


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
     ["--listen", "127.0.0.1:1", "--concurrency", "0"], ["--listen", "127.0.0.1:1", "--delay-ms", "-5"], [],
     ["--listen", "127.0.0.1:1", "--max-levels", "-1"], ["--listen", "127.0.0.1:1", "--max-tracked-emitters", "x"],
     ["--listen", "127.0.0.1:1", "--record-packets", "-1"]],
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


# ------------------------------------------------ bounded tables and paging


def send_distinct(an: Analyzer, count: int, start: int = 0, id_chars: int = 16, level: str | None = None,
                  chunk: int = 2000) -> None:
    """``count`` packets from distinct emitters (one message each), in batches; ``level=None``: a distinct level each."""
    for lo in range(start, start + count, chunk):
        pkts = [packet(f"e{i}-".ljust(id_chars, "x"), "p", (level or f"L{i}",))
                for i in range(lo, min(start + count, lo + chunk))]
        status, body = an.batch(pkts, count=len(pkts))
        assert status == 200 and body["accepted"] == len(pkts), body


def test_emitter_table_limit_folds_into_overflow(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--max-tracked-emitters", "100")
    send_distinct(an, 1000, level="INFO")
    an.ingest(packet("e0-".ljust(16, "x"), "again", ("INFO", "INFO")))  # tracked: counted in the table
    an.ingest(packet("e999-".ljust(16, "x"), "again", ("INFO",)))  # folded before: folded again
    s = an.stats()
    table = s["tables"]["emitters"]
    assert table == {"limit": 100, "tracked": 100, "shown": 100, "truncated": False,
                     "overflow": 901, "folded": 901, "total": 1003}
    assert sum(s["emitters"].values()) + table["overflow"] == s["messages"] == 1003
    assert s["emitters"]["e0-".ljust(16, "x")] == 3
    assert "e999-".ljust(16, "x") not in s["emitters"]
    assert s["tables"]["levels"]["total"] == 1003 and s["levels"] == {"INFO": 1003}


def test_level_table_limit_and_long_levels(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--max-levels", "3")
    an.ingest(packet("a", "1", ("INFO", "WARN", "ERROR", "DEBUG", "TRACE", "INFO")))
    an.ingest(packet("a", "2", ("DEBUG", "WARN")))
    s = an.stats()
    assert s["levels"] == {"INFO": 2, "WARN": 2, "ERROR": 1}
    assert s["tables"]["levels"] == {"limit": 3, "tracked": 3, "shown": 3, "truncated": False,
                                     "overflow": 3, "folded": 3, "total": 8}
    # A level longer than 256 characters is never stored, even with room in the table.
    an2 = start_analyzer()
    an2.ingest(packet("a", "1", ("X" * 257, "X" * 256)))
    s2 = an2.stats()
    assert s2["levels"] == {"X" * 256: 1}
    assert (s2["tables"]["levels"]["overflow"], s2["tables"]["levels"]["total"]) == (1, 2)


def test_ids_longer_than_the_contract_are_rejected(start_analyzer: Callable[..., Analyzer]) -> None:
    """The dedup window and the key log hold every id, so an id's size is bounded like the distributor's contract."""
    for args in ((), ("--sink",)):
        an = start_analyzer(*args)
        status, body = an.ingest(packet("e", "p" * 257))
        assert status == 400 and body["error"] == "invalid_packet"
        status, _ = an.batch([packet("e", "ok"), packet("e" * 257, "p")], count=2)
        assert status == 400
        assert an.ingest(packet("e" * 256, "p" * 256)) == (200, {"accepted": 1, "duplicates": 0})
        s = an.stats()
        assert (s["packets"], s["rejected_requests"]) == (1, 2)
        assert an.keys() == [("e" * 256, "p" * 256)]


def test_stats_body_stays_small_with_many_keys(start_analyzer: Callable[..., Analyzer]) -> None:
    """/stats shows the 100 largest entries per table with exact totals, whatever the number of keys."""
    an = start_analyzer()
    send_distinct(an, 20_000, id_chars=200)  # 20k emitters and 20k levels, all distinct
    busy = "e5-".ljust(200, "x")
    an.ingest(packet(busy, "again", ("L5",) * 50))
    raw = an.stats_bytes()
    assert len(raw) < 64 * 1024, len(raw)
    s = json.loads(raw)
    emitters, levels = s["tables"]["emitters"], s["tables"]["levels"]
    assert emitters == {"limit": 10_000, "tracked": 10_000, "shown": 100, "truncated": True,
                        "overflow": 10_000, "folded": 10_000, "total": 20_050}
    assert levels == {"limit": 256, "tracked": 256, "shown": 100, "truncated": True,
                      "overflow": 19_744, "folded": 19_744, "total": 20_050}
    assert len(s["emitters"]) == len(s["levels"]) == 100
    assert list(s["emitters"].items())[0] == (busy, 51) and list(s["levels"].items())[0] == ("L5", 51)


def test_paging_returns_every_key_once_while_packets_arrive(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer()
    send_distinct(an, 2500)
    arrived = iter(range(2500, 10_000, 700))

    def more_packets() -> None:
        start = next(arrived, None)
        if start is not None:
            send_distinct(an, 700, start=start)

    pages = an.pages(limit=1000, between=more_packets)
    keys = [(e, p) for page in pages for e, p in page["packets"]]
    sent = 2500 + 700 * len(pages)  # one arrival after each page, including the last
    expected = [(f"e{i}-".ljust(16, "x"), "p") for i in range(sent)]
    assert keys == expected[:len(keys)]  # exactly once each, in arrival order
    assert all(len(page["packets"]) == 1000 for page in pages[:-1])
    # The last page's cursor picks up exactly what arrived after it.
    status, rest = an.get(f"/stats/packets?after={pages[-1]['next']}")
    assert status == 200 and not rest["more"]
    assert keys + [(e, p) for e, p in rest["packets"]] == expected
    assert an.get(f"/stats/packets?after={rest['next']}")[1]["packets"] == []


def test_paging_default_and_max_limit(start_analyzer: Callable[..., Analyzer]) -> None:
    an = start_analyzer("--sink")
    send_distinct(an, 10_050, chunk=10_050)
    first = an.get("/stats/packets")[1]
    assert (len(first["packets"]), first["more"], first["recorded"]) == (10_000, True, 10_050)
    assert len(an.get("/stats/packets?limit=10000")[1]["packets"]) == 10_000
    for bad in ("0", "10001", "-1", "x", ""):
        status, body = an.get(f"/stats/packets?limit={bad}")
        assert status == 400 and body["error"] == "invalid_limit", bad
    for bad in ("", "x", "0", first["next"].split(".")[0] + ".10051", "deadbeef.5", first["next"] + "x"):
        status, body = an.get(f"/stats/packets?after={bad}")
        assert status == 400 and body["error"] == "invalid_cursor", bad
    # localcluster's packet_keys() (used by the end-to-end and chaos checks) follows the pages.
    proc = AnalyzerProcess("t1", [], Path(os.devnull), port=int(an.base.rsplit(":", 1)[1]))
    assert proc.packet_keys() == [(f"e{i}-".ljust(16, "x"), "p") for i in range(10_050)]


def test_pages_are_cut_by_size_with_long_ids(start_analyzer: Callable[..., Analyzer]) -> None:
    """Pages hold about 1M characters of ids at most, so 256-character ids give ~1 MB pages, not 5 MB."""
    an = start_analyzer("--sink")
    pkts = [packet(f"e{i}-".ljust(256, "x"), f"p{i}-".ljust(256, "y")) for i in range(5000)]
    assert an.batch(pkts, count=len(pkts))[0] == 200
    pages = an.pages()
    assert [len(p["packets"]) for p in pages] == [1953, 1953, 1094]  # 1,000,000 // 512 keys per page
    assert [(e, p) for page in pages for e, p in page["packets"]] == [
        (pkt["emitter_id"], pkt["packet_id"]) for pkt in pkts]


def test_record_log_overflow_is_reported(start_analyzer: Callable[..., Analyzer]) -> None:
    """A full key log says so, and packet_keys() refuses to return a truncated list."""
    an = start_analyzer("--record-packets", "5")
    send_distinct(an, 8)
    page = an.get("/stats/packets")[1]
    assert (len(page["packets"]), page["recorded"], page["not_recorded"], page["record_limit"]) == (5, 5, 3, 5)
    assert an.stats()["packets"] == 8
    proc = AnalyzerProcess("t1", [], Path(os.devnull), port=int(an.base.rsplit(":", 1)[1]))
    with pytest.raises(RuntimeError, match="did not record 3 packet keys"):
        proc.packet_keys()


@pytest.mark.timeout(180)
def test_memory_flat_with_distinct_emitters_and_levels(start_analyzer: Callable[..., Analyzer]) -> None:
    """RSS grows by less than 20 MB from 1k to 100k distinct 256-character emitters and levels.

    With small limits every structure is full after the first 1k packets: the
    growth measured here is about 3 MB, where the unbounded tables grew by 46 MB
    over the same traffic. The bound is generous (allocator noise, aiohttp
    buffers); nothing here depends on speed.
    """
    an = start_analyzer("--dedup-window", "1000", "--max-tracked-emitters", "1000")
    send_distinct(an, 1000, id_chars=256)
    before = an.rss_mb()
    send_distinct(an, 99_000, start=1000, id_chars=256)
    grown = an.rss_mb() - before
    s = an.stats()
    assert s["packets"] == 100_000 and s["tables"]["emitters"]["overflow"] == 99_000
    assert s["packet_log"] == {"limit": 1000, "recorded": 1000, "not_recorded": 99_000}
    assert grown < 20, f"RSS grew {grown:.1f} MB"
