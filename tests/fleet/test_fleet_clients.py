"""Emitters of a sharded fleet send ``X-Emitter-Id``: the built-in emitter (single and batch), locust.

No namespaces here: a recording HTTP server on 127.0.0.1 (its own thread and event loop) keeps every
request's header and body, and the checks compare the header with the packets' emitter_id.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import subprocess
import sys
import threading
from contextlib import redirect_stdout
from pathlib import Path
from typing import Iterator

import orjson
import pytest
from aiohttp import web

from distributor.tools import emitter
from distributor.tools.localcluster import LocalCluster
from support import Client, packet

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """POST /ingest -> 202, POST /ingest/batch -> 200 with every line accepted; keeps (path, header, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None, bytes]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, request.headers.get("X-Emitter-Id"), body))
        if request.path.endswith("/batch"):
            lines = [line for line in body.split(b"\n") if line.strip()]
            return web.json_response({"accepted": len(lines), "rejected": []})
        return web.json_response({"status": "accepted"}, status=202)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self._handle)
        app.router.add_post("/ingest/batch", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    def __enter__(self) -> "Recorder":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder() as server:
        yield server


def packets_of(body: bytes) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in body.split(b"\n") if line.strip()]


def run_emitter(*argv: str) -> dict[str, object]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert emitter.main([*argv, "--json"]) == 0
    result: dict[str, object] = json.loads(out.getvalue())
    return result


@pytest.mark.parametrize("batch", [0, 5])
def test_builtin_emitter_sends_the_packets_emitter_id(recorder: Recorder, batch: int) -> None:
    run_emitter("--url", recorder.url, "--duration", "0.5", "--connections", "4", "--emitters", "7",
                "--batch", str(batch), "--emitter-header")
    assert len(recorder.requests) > 20
    seen_emitters, packet_ids = set(), []
    for path, header, body in recorder.requests:
        assert path == ("/ingest/batch" if batch else "/ingest")
        packets = packets_of(body)
        assert len(packets) == (batch or 1)
        assert header is not None and {p["emitter_id"] for p in packets} == {header}, (header, packets[:2])
        seen_emitters.add(header)
        packet_ids += [p["packet_id"] for p in packets]
    assert seen_emitters == {f"agent-{i}" for i in range(7)}
    assert len(set(packet_ids)) == len(packet_ids), "packet ids stay unique per emitter"


def test_builtin_emitter_without_the_flag_sends_no_header(recorder: Recorder) -> None:
    run_emitter("--url", recorder.url, "--duration", "0.3", "--connections", "2", "--batch", "3")
    assert recorder.requests and all(header is None for _, header, _ in recorder.requests)
    # as before: a batch mixes emitters
    assert any(len({p["emitter_id"] for p in packets_of(body)}) > 1 for _, _, body in recorder.requests)


@pytest.mark.timeout(90)
def test_locust_emitters_send_their_emitter_id(recorder: Recorder, tmp_path: Path) -> None:
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust not installed: pip install -e '.[load]'")
    argv = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
            "-u", "6", "-r", "6", "-t", "3s", "--host", f"http://127.0.0.1:{recorder.port}", "--only-summary",
            "--summary-json", str(tmp_path / "summary.json")]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert recorder.requests
    for _, header, body in recorder.requests:
        (p,) = packets_of(body)
        assert header == p["emitter_id"]


def test_a_header_that_does_not_match_the_packets_is_refused(make_cluster: object) -> None:
    """The distributor's side of sharding: a header that names another emitter is refused, never routed."""
    cluster: LocalCluster = make_cluster(analyzers=(("a1", 1.0),), workers=1)  # type: ignore[operator]
    client = Client(cluster.data_port)
    try:
        status, _, body = client.post(packet("agent-1", "x-1"), headers={"X-Emitter-Id": "agent-2"})
        assert status == 400, body
        status, _, body = client.post(packet("agent-1", "x-1"), headers={"X-Emitter-Id": "agent-1"})
        assert status == 202, body
        lines = packet("agent-1", "x-2") + b"\n" + packet("agent-3", "x-3")
        status, _, body = client.post(lines, path="/ingest/batch", headers={"X-Emitter-Id": "agent-1"})
        assert status == 400 or (status == 200 and [r["line"] for r in body["rejected"]] == [1]
                                 and body["rejected"][0]["status"] == 400), body
        otlp = {"resourceLogs": [{"resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "checkout"}}]},
            "scopeLogs": [{"logRecords": [{"body": {"stringValue": "hello"}}]}]}]}
        status, _, body = client.post(json.dumps(otlp).encode(), path="/v1/logs", headers={"X-Emitter-Id": "other"})
        # OTLP: the export is answered, every record refused (partial success), or the request as a whole
        assert status == 400 or (status == 200 and body["partialSuccess"]["rejectedLogRecords"] in ("1", 1)
                                 and "X-Emitter-Id" in body["partialSuccess"]["errorMessage"]), body
        status, _, body = client.post(json.dumps(otlp).encode(), path="/v1/logs", headers={"X-Emitter-Id": "checkout"})
        assert status == 200 and not body.get("partialSuccess"), body
    finally:
        client.close()
