"""An analyzer's Retry-After, as a sender takes it: never the end of a batch, never a wait of years.

Regression tests for defect 3 of the review of issues 16/17: ``Retry-After: ²`` passed ``str.isdigit`` and
then failed ``float()``, which killed the batch's task and left its packets on the books forever (202
answered, never delivered); ``Retry-After: 999999999`` parked a batch for 31 years. Now a Retry-After is
delay-seconds in ASCII digits, capped at ``MAX_ANALYZER_RETRY_AFTER`` (30 s); anything else is ignored.

The analyzer here is a small real HTTP server in the test: ``503`` with the given Retry-After for the first
requests, then ``200``; it keeps the packet ids it took.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterator

import pytest

from distributor.config import OutlierConfig, SenderConfig
from distributor.delivery import sender as sender_module
from distributor.delivery.http_client import HttpClient
from distributor.delivery.queue import NO_REF, Packet, PacketQueue, QueueTotals
from distributor.delivery.sender import AnalyzerSender
from distributor.shared_table import COUNTER_CELLS
from distributor.tools.localcluster import LocalCluster, wait_until
from http_sinks import ThreadedServer
from support import Client, packet

CAP = 30.0  # seconds: the most an analyzer's Retry-After may delay a retry (sender.MAX_ANALYZER_RETRY_AFTER)


class BusyAnalyzer:
    """``GET /health`` 200; ``POST /ingest[/batch]``: 503 for the first requests, the n-th with
    ``Retry-After: <retry_after[n]>`` (sent as UTF-8 bytes, as aiohttp and most servers would), then 200."""

    def __init__(self, retry_after: list[str]) -> None:
        self.retry_after = [value.encode("utf-8") for value in retry_after]
        self.requests = 0
        self.refused = 0
        self.packet_ids: list[str] = []
        self.lock = threading.Lock()
        busy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.answer(200, b'{"status": "ok"}')

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with busy.lock:
                    busy.requests += 1
                    refuse = busy.refused < len(busy.retry_after)
                    if refuse:
                        header = b"Retry-After: " + busy.retry_after[busy.refused] + b"\r\n"
                        busy.refused += 1
                    else:
                        busy.packet_ids += [json.loads(line)["packet_id"] for line in body.splitlines() if line]
                if refuse:
                    self.answer(503, b'{"error": "busy"}', header)
                else:
                    self.answer(200, b'{"accepted": 1, "duplicates": 0}')

            def answer(self, status: int, body: bytes, extra: bytes = b"") -> None:
                reason = b"OK" if status == 200 else b"Service Unavailable"
                self.wfile.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                                 % (status, reason, len(body), extra, body))
                self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadedServer(Handler)
        self.url = self.server.url

    def taken(self) -> list[str]:
        with self.lock:
            return list(self.packet_ids)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def busy_analyzer() -> Iterator[Callable[[list[str]], BusyAnalyzer]]:
    started: list[BusyAnalyzer] = []

    def factory(retry_after: list[str]) -> BusyAnalyzer:
        started.append(BusyAnalyzer(retry_after))
        return started[-1]

    yield factory
    for analyzer in started:
        analyzer.close()


@pytest.mark.timeout(60)
def test_a_retry_after_of_non_ascii_digits_is_ignored_and_every_packet_is_delivered(
    make_cluster: Callable[..., LocalCluster], busy_analyzer: Callable[[list[str]], BusyAnalyzer],
) -> None:
    """'²' (SUPERSCRIPT TWO) is a digit to str.isdigit but no number: the retry goes on with its own backoff."""
    analyzer = busy_analyzer(["\u00b2", "\u00b2"])
    cluster = make_cluster(analyzers=(), workers=1, distributor_args=["--analyzer", f"busy={analyzer.url}@1"])
    client = Client(cluster.data_port)
    accepted = []
    for i in range(10):
        status, _, body = client.post(packet(packet_id=f"sup-{i}"))
        assert status == 202, body
        accepted.append(f"sup-{i}")
    client.close()

    def row() -> dict[str, Any]:
        return dict(cluster.admin("/admin/analyzers")["analyzers"][0])

    try:
        wait_until(lambda: len(analyzer.taken()) >= len(accepted) and row()["queue_packets"] == 0, 10,
                   "every accepted packet at the analyzer")
    except TimeoutError:
        view = row()
        pytest.fail(f"{len(analyzer.taken())} of {len(accepted)} packets answered 202 were delivered after "
                    f"{analyzer.refused} answers 503 with Retry-After: \u00b2; {view['queue_packets']} stay queued, "
                    f"delivered_packets={view['delivered_packets']}")
    assert sorted(analyzer.taken()) == sorted(accepted)
    assert analyzer.refused == 2
    view = row()
    assert view["delivered_packets"] == len(accepted) and view["shutdown_dropped_packets"] == 0
    assert cluster.distributor is not None
    assert "Traceback" not in cluster.distributor.log_tail(200)


class NoFailover:
    """The worker, as a sender sees it, with no other analyzer to fail over to."""

    def __init__(self) -> None:
        self.ejected: list[int] = []

    def fail_over(self, slot: int, packets: list[Packet], ambiguous: bool) -> list[Packet]:
        return packets

    def eject(self, slot: int) -> None:
        self.ejected.append(slot)


@pytest.mark.timeout(30)
def test_a_retry_after_is_honoured_up_to_a_cap(
    busy_analyzer: Callable[[list[str]], BusyAnalyzer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real AnalyzerSender against the real server, three 503s in a row: the wait the sender chooses after each
    is recorded (then shortened, so the test need not wait 30 s); the batch is delivered at the fourth attempt."""
    retry_after = ["3", "999999999", "31"]
    analyzer = busy_analyzer(retry_after)
    chosen: list[float] = []
    original = sender_module._retry_delay

    def recorded(backoff: float, header: str | None) -> float:
        chosen.append(original(backoff, header))
        return 0.01

    monkeypatch.setattr(sender_module, "_retry_delay", recorded)

    async def scenario() -> None:
        counters = [0] * COUNTER_CELLS
        queue = PacketQueue(100, 1 << 20, counters, 0, QueueTotals())
        client = HttpClient(2.0, 10.0, ssl.create_default_context(), 4)
        sender = AnalyzerSender(0, "busy", analyzer.url, "batch", queue, SenderConfig(batch_linger=0.0),
                                OutlierConfig(), client, counters, 0, NoFailover())
        sender.start()
        for i in range(3):
            queue.put(packet(packet_id=f"cap-{i}"), 5, NO_REF)
        sender.notify()
        try:
            await sender.drain(10.0)
        finally:
            sender.queue.available = False
            await client.close()

    asyncio.run(scenario())
    assert len(chosen) == len(retry_after), f"{len(chosen)} retries after {len(retry_after)} answers 503"
    for header, delay in zip(retry_after, chosen):
        assert delay <= CAP, f"Retry-After: {header} would park the batch for {delay:.0f} s"
    assert chosen == [3.0, CAP, CAP], "a Retry-After within the cap is honoured, a bigger one capped"
    assert sorted(analyzer.taken()) == [f"cap-{i}" for i in range(3)]
