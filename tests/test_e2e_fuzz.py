"""The end-to-end property, fuzzed with hypothesis against a real distributor.

A request either gets 202 (or, in a batch, a line is counted accepted) and its packet reaches an
analyzer exactly once and byte-identical, or it gets an error (a rejected line) and nothing of it is
delivered. Byte-identical means: in ``packet`` mode the analyzer's request body is the packet as the
emitter sent it (after Content-Encoding is undone); in ``batch`` mode the packet is one NDJSON line
with the documented rule applied, a literal newline inside the packet sent as a space (README,
"The packet contract"); a batch line loses its trailing CR.

The analyzers are a small recording HTTP server started here (the real analyzer's /stats/packets
gives keys, not bytes), in two slots of one distributor: ``p`` in packet mode without compression,
``b`` in batch mode with zstd, so every packet may go either way. Packets are drawn near the edges:
JSON with random insignificant whitespace (literal CR, LF, tab inside the packet), any Unicode in the
strings, escapes, some broken on purpose (bad JSON, missing fields, bad timestamps, too many
messages), sent as single packets or batches, identity, gzip or zstd. Every packet carries a nonce,
so what reaches the sink is matched to what was sent.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import itertools
import threading
from collections.abc import Iterator

import orjson
import pytest
from aiohttp import web
from backports import zstd
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from distributor.tools.localcluster import LocalCluster, free_port, wait_until

MAX_MESSAGES = 20
MAX_BODY = 256 << 10
WHITESPACE = (b"", b"", b"", b" ", b"\n", b"\r\n", b"\t", b"\n  ")
_nonces = itertools.count()


class Sink:
    """Records every packet the distributor sends: packet-mode bodies and batch-mode lines, decoded."""

    def __init__(self) -> None:
        self.port = free_port()
        self.packet_bodies: list[bytes] = []  # POST /p/ingest
        self.batch_lines: list[bytes] = []  # POST /b/ingest/batch, split on LF
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    def start(self) -> "Sink":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/{slot}/health", self._health)
        app.router.add_post("/p/ingest", self._packet)
        app.router.add_post("/b/ingest/batch", self._batch)
        # bodies as the distributor sent them: Content-Encoding is undone here, not by aiohttp
        self.runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @staticmethod
    async def _body(request: web.Request) -> bytes:
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "zstd":
            return zstd.decompress(body)
        assert not encoding, encoding
        return body

    async def _packet(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        with self.lock:
            self.packet_bodies.append(body)
        return web.json_response({"status": "accepted"}, status=202)

    async def _batch(self, request: web.Request) -> web.Response:
        lines = (await self._body(request)).split(b"\n")
        with self.lock:
            self.batch_lines.extend(lines)
        return web.json_response({"accepted": len(lines)})

    def carrying(self, nonce: bytes) -> list[tuple[str, bytes]]:
        """Every delivered packet that holds ``nonce``: ("p", body) or ("b", line)."""
        with self.lock:
            return [("p", body) for body in self.packet_bodies if nonce in body] + \
                   [("b", line) for line in self.batch_lines if nonce in line]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Sink]]:
    sink = Sink().start()
    config = tmp_path_factory.mktemp("e2e-fuzz") / "distributor.toml"
    config.write_text(
        f"workers = 1\n[ingest]\nmax_messages_per_packet = {MAX_MESSAGES}\nmax_body_bytes = {MAX_BODY}\n"
        "max_loop_lag = 0\n[sender]\nbatch_linger = 0.005\n[health]\ninterval = 0.5\ntimeout = 0.4\n"
        f'[[analyzers]]\nname = "p"\nurl = "http://127.0.0.1:{sink.port}/p"\nweight = 1\nmode = "packet"\n'
        f'[[analyzers]]\nname = "b"\nurl = "http://127.0.0.1:{sink.port}/b"\nweight = 1\nmode = "batch"\n'
        'compression = "zstd"\n')
    cluster = LocalCluster(analyzers=(), analyzer_flags=False, distributor_args=["--config", str(config)])
    try:
        cluster.start()
        yield cluster, sink
    finally:
        cluster.stop()
        sink.stop()


# ---- packets near the edges ----------------------------------------------------------------------


def render(value: object, draw: st.DrawFn, newlines: bool) -> bytes:
    """JSON text of ``value`` with random insignificant whitespace between tokens (the nonce never escaped)."""

    def gap() -> bytes:
        space = draw(st.sampled_from(WHITESPACE))
        return space if newlines else space.replace(b"\n", b" ")

    if isinstance(value, dict):
        items = [gap() + orjson.dumps(str(k)) + gap() + b":" + render(v, draw, newlines) for k, v in value.items()]
        return gap() + b"{" + b",".join(items) + gap() + b"}" + gap()
    if isinstance(value, list):
        return gap() + b"[" + b",".join(render(v, draw, newlines) for v in value) + gap() + b"]" + gap()
    if isinstance(value, str) and "x" not in value and draw(st.integers(0, 4)) == 0:  # every character escaped
        return gap() + b'"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in value).encode(
            "utf-8", "surrogatepass") + b'"' + gap()
    return gap() + orjson.dumps(value) + gap()


@st.composite
def packets(draw: st.DrawFn, newlines: bool = True) -> tuple[bytes, bytes]:
    """(packet bytes, its nonce); most are valid, some broken on purpose."""
    nonce = b"n%06dx" % next(_nonces)
    text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="x"), max_size=12)
    messages: list[dict[str, object]] = [
        {"timestamp": draw(st.one_of(st.integers(0, 253402300799999),
                                     st.sampled_from(["2025-11-26T12:00:00.123Z", "2016-12-31t23:59:60+05:30",
                                                      "0000-01-01 00:00:00z"]))),
         "level": draw(st.sampled_from(["INFO", "WARN", "é"])), "message": draw(text) + nonce.decode(),
         **({"metadata": {draw(text): draw(text)}} if draw(st.booleans()) else {})}
        for _ in range(draw(st.integers(1, 4)))]
    packet: dict[str, object] = {"emitter_id": "e2e-" + draw(text), "packet_id": nonce.decode(), "messages": messages}
    if draw(st.booleans()):
        packet["priority"] = draw(st.sampled_from(["high", "normal", "low"]))
    breakage = draw(st.sampled_from(["none"] * 6 + ["no-messages", "bad-timestamp", "too-many", "not-json",
                                                    "no-emitter"]))
    if breakage == "no-messages":
        del packet["messages"]
    elif breakage == "bad-timestamp":
        messages[0]["timestamp"] = "2025-02-29T00:00:00Z"
    elif breakage == "too-many":
        packet["messages"] = messages * (MAX_MESSAGES // len(messages) + 1)
    elif breakage == "no-emitter":
        del packet["emitter_id"]
    raw = render(packet, draw, newlines)
    if breakage == "not-json":
        raw = raw[:-1 - len(raw) // 3] if len(raw) > 3 else b"{" + nonce
    return raw, nonce


def encoded(body: bytes, encoding: str) -> tuple[bytes, dict[str, str]]:
    if encoding == "gzip":
        return gzip.compress(body), {"Content-Encoding": "gzip"}
    if encoding == "zstd":
        return zstd.compress(body), {"Content-Encoding": "zstd"}
    return body, {}


# ---- the property ----------------------------------------------------------------------------------


def expected_forms(packet: bytes) -> set[tuple[str, bytes]]:
    """What the sink may record for an accepted packet: as sent (packet mode), or one line with LF -> space."""
    return {("p", packet), ("b", packet.replace(b"\n", b" "))}


def assert_delivered_once(sink: Sink, packet: bytes, nonce: bytes) -> None:
    got = wait_until(lambda: sink.carrying(nonce), 15, f"packet {nonce.decode()} at the analyzer")
    assert len(got) == 1, f"{nonce.decode()} delivered {len(got)} times: {got}"
    assert got[0] in expected_forms(packet), f"delivered as {got[0]!r}, sent {packet!r}"


class Emitter:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        self.sent: list[tuple[bytes, bytes, bool]] = []  # (packet, nonce, accepted), for the final check

    def post(self, path: str, body: bytes, encoding: str) -> tuple[int, object]:
        data, headers = encoded(body, encoding)
        self.conn.request("POST", path, body=data, headers=headers)
        response = self.conn.getresponse()
        return response.status, orjson.loads(response.read())


@pytest.fixture(scope="module")
def emitter(system: tuple[LocalCluster, Sink]) -> Iterator[Emitter]:
    emitter = Emitter(system[0].data_port)
    yield emitter
    emitter.conn.close()
    cluster, sink = system
    cluster.wait_drained()

    def settled() -> bool:
        """The sink holds exactly what the distributor counts delivered, and no attempt failed (one whose
        request may still land later): nothing more can arrive."""
        rows = cluster.admin("/admin/analyzers")["analyzers"]
        assert all(row["failed_attempts"] == 0 for row in rows), rows
        with sink.lock:
            recorded = len(sink.packet_bodies) + len(sink.batch_lines)
        return recorded == sum(row["delivered_packets"] for row in rows)

    wait_until(settled, 15, "the sink to hold every packet delivered")
    for packet, nonce, accepted in emitter.sent:  # late deliveries and duplicates show up here
        got = sink.carrying(nonce)
        assert got == [] if not accepted else (len(got) == 1 and got[0] in expected_forms(packet)), (nonce, got)
    taken = sum(accepted for _, _, accepted in emitter.sent)
    assert taken >= 50 and len(emitter.sent) - taken >= 10, f"{taken} of {len(emitter.sent)} taken: too one-sided"
    with sink.lock:
        assert sink.packet_bodies and any(b"\r" in line for line in sink.batch_lines), "both modes, CRs inside"


# no shrinking: a failing example waits out delivery timeouts, and shrinking would repeat that for minutes
SETTINGS = settings(max_examples=70, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.mark.timeout(120)
@SETTINGS
@given(item=packets(), encoding=st.sampled_from(["identity", "identity", "gzip", "zstd"]))
def test_a_packet_is_delivered_byte_identical_iff_it_gets_202(
        system: tuple[LocalCluster, Sink], emitter: Emitter, item: tuple[bytes, bytes], encoding: str) -> None:
    _, sink = system
    packet, nonce = item
    status, answer = emitter.post("/ingest", packet, encoding)
    assert status in (202, 400, 413, 503), (status, answer)
    emitter.sent.append((packet, nonce, status == 202))
    if status == 202:
        assert_delivered_once(sink, packet, nonce)
    else:
        assert sink.carrying(nonce) == [], f"{status} {answer}, but delivered"


@pytest.mark.timeout(120)
@SETTINGS
@given(items=st.lists(packets(newlines=False), min_size=1, max_size=5),
       blank=st.booleans(), crlf=st.booleans(), encoding=st.sampled_from(["identity", "gzip", "zstd"]))
def test_each_batch_line_is_delivered_byte_identical_iff_accepted(
        system: tuple[LocalCluster, Sink], emitter: Emitter, items: list[tuple[bytes, bytes]], blank: bool,
        crlf: bool, encoding: str) -> None:
    _, sink = system
    lines = [packet + (b"\r" if crlf else b"") for packet, _ in items]
    if blank:
        lines.insert(len(lines) // 2, b"  ")
    status, answer = emitter.post("/ingest/batch", b"\n".join(lines) + b"\n", encoding)
    assert status in (200, 503), (status, answer)
    assert isinstance(answer, dict)
    rejected = {item["line"] for item in answer.get("rejected", [])} if status == 200 else set(range(len(lines)))
    index = {nonce: lines.index(packet + (b"\r" if crlf else b"")) for packet, nonce in items}
    if status == 200:
        assert answer["accepted"] + len(answer["rejected"]) == len(items), answer
    for packet, nonce in items:  # a trailing CR is removed from a line before anything else
        accepted = index[nonce] not in rejected
        emitter.sent.append((packet, nonce, accepted))
        if accepted:
            assert_delivered_once(sink, packet, nonce)
        else:
            assert sink.carrying(nonce) == [], f"line {index[nonce]} rejected ({answer}), but delivered"


def test_the_sink_sees_what_a_plain_packet_looks_like(system: tuple[LocalCluster, Sink], emitter: Emitter) -> None:
    """The control: one ordinary packet, with a literal newline in its JSON, goes through as the README says."""
    _, sink = system
    nonce = b"control%dx" % next(_nonces)
    packet = (b'{"emitter_id": "e2e", "packet_id": "%s",\n "messages": [{"timestamp": 1, "level": "I", '
              b'"message": "m"}]}' % nonce)
    assert emitter.post("/ingest", packet, "identity")[0] == 202
    emitter.sent.append((packet, nonce, True))
    assert_delivered_once(sink, packet, nonce)
