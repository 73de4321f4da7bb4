"""The built-in emitter load generator against a real aiohttp server started by each test."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator

import orjson
import pytest
import uvloop
from aiohttp import web

from distributor.tools.emitter import LatencyHistogram, LoadSpec, LoadStats, PacketFactory, main, run_load


class IngestServer:
    """A small real HTTP server in a background thread that records what it received and answered.

    fail_every: every Nth request gets 503 + Retry-After: 1; close_every: every Nth 202 carries
    ``Connection: close`` and the connection is closed; abort_every: every Nth request is dropped
    without an answer; delay: seconds before answering; hang: never answer (until stopped).
    """

    def __init__(self, fail_every: int = 0, close_every: int = 0, abort_every: int = 0,
                 delay: float = 0.0, hang: bool = False, always_503: bool = False) -> None:
        self.fail_every, self.close_every, self.abort_every = fail_every, close_every, abort_every
        self.delay, self.hang, self.always_503 = delay, hang, always_503
        self.requests = 0
        self.packets: list[dict[str, Any]] = []  # every packet received, parsed
        self.accepted: list[tuple[str, str, int]] = []  # answered 202
        self.statuses: Counter[int] = Counter()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        n = self.requests
        body = await request.read()
        if self.hang:
            await self.release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.abort_every and n % self.abort_every == 0:
            assert request.transport is not None
            request.transport.abort()
            raise web.HTTPServiceUnavailable()  # never reaches the client
        packet = orjson.loads(body)
        self.packets.append(packet)
        if self.always_503 or (self.fail_every and n % self.fail_every == 0):
            self.statuses[503] += 1
            return web.Response(status=503, headers={"Retry-After": "1"})
        self.accepted.append((packet["emitter_id"], packet["packet_id"], len(packet["messages"])))
        self.statuses[202] += 1
        response = web.json_response({"status": "accepted"}, status=202)
        if self.close_every and len(self.accepted) % self.close_every == 0:
            response.force_close()
        return response

    async def _start(self) -> None:
        self.release = asyncio.Event()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/ingest", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    def start(self) -> IngestServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.release.set)
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def make_server() -> Iterator[Callable[..., IngestServer]]:
    servers: list[IngestServer] = []

    def factory(**kwargs: Any) -> IngestServer:
        server = IngestServer(**kwargs)
        servers.append(server)
        return server.start()

    yield factory
    for server in servers:
        server.stop()


def load(server: IngestServer, duration: float, **spec: Any) -> LoadStats:
    return uvloop.run(run_load(LoadSpec(url=server.url, duration=duration, **spec)))


# --------------------------------------------------------------------------- histogram


def test_histogram_percentiles_on_known_data() -> None:
    hist = LatencyHistogram()
    for ms in range(1, 1001):
        hist.record(ms / 1000)
    assert hist.count == 1000
    assert hist.percentile(50) == pytest.approx(0.500, rel=0.02)
    assert hist.percentile(99) == pytest.approx(0.990, rel=0.02)
    assert hist.percentile(99.9) == pytest.approx(0.999, rel=0.02)
    assert hist.percentile(100) == pytest.approx(1.0, rel=0.001)
    assert hist.percentile(0) == pytest.approx(0.001, rel=0.02)
    # microseconds and the 60 s ceiling
    small = LatencyHistogram()
    for us in range(1, 101):
        small.record(us / 1e6)
    assert small.percentile(50) == pytest.approx(50e-6, rel=0.02)
    small.record(3600.0)
    assert small.percentile(100) <= 3600.0
    # merge = recording everything in one
    a, b = LatencyHistogram(), LatencyHistogram()
    for ms in range(1, 1001):
        (a if ms % 2 else b).record(ms / 1000)
    a.merge(b)
    assert a.count == 1000 and a.counts == hist.counts
    assert a.percentile(50) == hist.percentile(50)
    assert LatencyHistogram().percentile(99) == 0.0


def test_factory_bodies_priorities_and_unique_ids() -> None:
    plain = PacketFactory(((3, 1.0),), emitters=5)
    bodies = [orjson.loads(plain.next()[0]) for _ in range(50)]
    assert all("priority" not in b for b in bodies)
    assert len({b["packet_id"] for b in bodies}) == 50
    assert {b["emitter_id"] for b in bodies} == {f"agent-{i}" for i in range(5)}
    weighted = PacketFactory(((1, 1.0),), emitters=10, priorities=(("high", 0.2), ("normal", 0.6), ("low", 0.2)))
    seen = Counter(orjson.loads(weighted.next()[0])["priority"] for _ in range(4000))
    assert set(seen) == {"high", "normal", "low"}
    assert 0.5 < seen["normal"] / 4000 < 0.7
    # two runs never reuse a packet id (analyzers deduplicate across runs)
    assert orjson.loads(PacketFactory(((1, 1.0),), 1).next()[0])["packet_id"] != \
        orjson.loads(PacketFactory(((1, 1.0),), 1).next()[0])["packet_id"]
    with pytest.raises(ValueError):
        PacketFactory((), emitters=1)


# --------------------------------------------------------------------------- against a server


def test_packets_follow_the_contract_and_size_distribution(make_server: Callable[..., IngestServer]) -> None:
    server = make_server()
    stats = LoadStats()
    spec = LoadSpec(url=server.url, duration=0.5, connections=8, emitters=50)
    deadline = time.monotonic() + 15
    while len(server.packets) < 1000 and time.monotonic() < deadline:
        uvloop.run(run_load(spec, stats))
    packets = server.packets
    assert len(packets) >= 1000
    ids = [p["packet_id"] for p in packets]
    assert len(set(ids)) == len(ids)
    levels: Counter[str] = Counter()
    for p in packets:
        assert set(p) == {"emitter_id", "packet_id", "messages"}
        assert p["emitter_id"].startswith("agent-") and p["packet_id"].startswith(p["emitter_id"] + "-")
        for m in p["messages"]:
            assert isinstance(m["timestamp"], int) and isinstance(m["message"], str) and m["message"]
            assert set(m["metadata"]) == {"service", "host", "request_id"}
            levels[m["level"]] += 1
    sizes = Counter(len(p["messages"]) for p in packets)
    assert set(sizes) == {5, 20}
    assert 0.35 < sizes[5] / len(packets) < 0.65
    assert set(levels) == {"DEBUG", "INFO", "WARN", "ERROR"}
    assert levels.most_common(1)[0][0] == "INFO"
    assert len({p["emitter_id"] for p in packets}) == 50


def test_counts_match_the_server_and_503s_are_counted(make_server: Callable[..., IngestServer]) -> None:
    server = make_server(fail_every=7)
    stats = load(server, 1.0, connections=8, record_accepted=True, priorities=(("high", 0.5), ("low", 0.5)))
    assert stats.errors == 0
    assert stats.accepted_packets == len(server.accepted) > 100
    assert stats.accepted_messages == sum(n for *_, n in server.accepted)
    assert stats.by_status == dict(server.statuses)
    assert stats.by_status[503] == server.requests // 7
    assert stats.sent == server.requests == sum(stats.by_status.values())
    assert sorted(stats.accepted) == sorted(server.accepted)
    assert stats.latency.count == server.requests
    assert {p["priority"] for p in server.packets} == {"high", "low"}
    snap = stats.snapshot()
    assert snap["accepted_packets"] == stats.accepted_packets and snap["latency_ms"]["p50"] > 0
    json.dumps(snap)


def test_retry_after_is_honoured_per_connection(make_server: Callable[..., IngestServer]) -> None:
    server = make_server(always_503=True)
    stats = load(server, 1.0, connections=4, honour_retry_after=True)
    assert stats.by_status == {503: 4}  # each connection waited the (1 s) Retry-After till the end
    unpaced = load(server, 0.3, connections=4)
    assert unpaced.by_status[503] > 20


def test_open_loop_rate_is_roughly_honoured(make_server: Callable[..., IngestServer]) -> None:
    server = make_server()
    stats = load(server, 1.0, connections=8, rate=400)
    assert 300 <= stats.sent <= 400
    assert stats.accepted_packets == len(server.accepted)


def test_open_loop_latency_counts_from_the_scheduled_time(make_server: Callable[..., IngestServer]) -> None:
    """One connection, 50 ms per answer, 100 packets/s offered: the queue shows up as latency."""
    server = make_server(delay=0.05)
    stats = load(server, 1.0, connections=1, rate=100)
    assert 5 <= stats.sent <= 25
    assert stats.latency.percentile(50) > 0.15  # a closed-loop client would report ~0.05
    assert stats.latency.max > 0.4


def test_run_stops_by_itself(make_server: Callable[..., IngestServer]) -> None:
    server = make_server()
    started = time.monotonic()
    stats = load(server, 0.5, connections=16)
    assert time.monotonic() - started < 0.5 + 2.0
    assert stats.accepted_packets > 0 and stats.errors == 0


def test_unanswered_requests_time_out(make_server: Callable[..., IngestServer]) -> None:
    server = make_server(hang=True)
    started = time.monotonic()
    stats = load(server, 0.2, connections=2)
    elapsed = time.monotonic() - started
    assert 4.5 < elapsed < 8.0
    assert stats.sent == 2 and stats.timeouts == 2 and stats.errors == 2 and not stats.by_status


def test_reconnects_when_the_server_closes_connections(make_server: Callable[..., IngestServer]) -> None:
    server = make_server(close_every=10)
    stats = load(server, 1.0, connections=4, record_accepted=True)
    assert stats.errors == 0  # "Connection: close" is seen before the next request
    assert stats.reconnects >= stats.accepted_packets // 10 - 4 > 10
    assert sorted(stats.accepted) == sorted(server.accepted)


def test_connections_dropped_mid_request_are_errors_and_the_run_goes_on(
        make_server: Callable[..., IngestServer]) -> None:
    server = make_server(abort_every=25)
    stats = load(server, 1.0, connections=4, record_accepted=True)
    assert stats.errors == server.requests // 25 > 0
    assert stats.reconnects >= stats.errors - 4
    assert stats.accepted_packets == len(server.accepted) > stats.errors
    assert sorted(stats.accepted) == sorted(server.accepted)


def test_connection_refused_counts_errors_and_ends(make_server: Callable[..., IngestServer]) -> None:
    server = make_server()
    url = server.url
    server.stop()
    started = time.monotonic()
    stats = uvloop.run(run_load(LoadSpec(url=url, duration=0.3, connections=2)))
    assert time.monotonic() - started < 3.0
    assert stats.errors > 0 and stats.sent == 0


def test_cli_prints_a_json_summary(make_server: Callable[..., IngestServer], capsys: pytest.CaptureFixture[str]) -> None:
    server = make_server()
    assert main(["--url", server.url, "--duration", "0.5", "--connections", "4", "--sizes", "2:1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accepted_packets"] == len(server.accepted) > 0
    assert result["accepted_messages"] == 2 * result["accepted_packets"]
    assert result["by_status"] == {"202": result["accepted_packets"]}
    assert result["packets_per_s"] > 0 and result["latency_ms"]["p99"] >= result["latency_ms"]["p50"]
    assert main(["--url", server.url, "--duration", "0.2", "--connections", "2"]) == 0
    assert "packets/s" in capsys.readouterr().out


@pytest.mark.parametrize("encoding", ["", "gzip", "zstd"])
def test_batch_mode_counts_the_lines_a_real_distributor_took(make_cluster: Callable[..., Any], encoding: str) -> None:
    """--batch N posts N packets per request to /ingest/batch; accepted = lines minus the rejected ones."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), distributor_args=["--set", "rate_limit.rate=200",
                                                                       "--set", "rate_limit.burst=200"])
    spec = LoadSpec(url=cluster.ingest_url, duration=1.0, connections=2, batch=25, encoding=encoding, emitters=1,
                    record_accepted=True)
    stats = uvloop.run(run_load(spec))
    assert stats.by_status.get(200, 0) >= 1
    assert 0 < stats.accepted_packets < 25 * sum(stats.by_status.values()), "the rate limit refused some lines"
    cluster.wait_drained()
    received = set(cluster.analyzer_procs[0].packet_keys())
    assert {(emitter, pid) for emitter, pid, _ in stats.accepted} == received
