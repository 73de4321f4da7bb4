"""Write the seed corpora of the fuzz targets: tests/fuzz/corpus/<target>/ (run from the repository root).

``.venv/bin/python tests/fuzz/make_corpus.py [TARGET...]`` rewrites the seeds of those targets (all
without arguments); the files are checked in, so this only runs when a format changes. WAL seeds are written by the real writer (``WorkerLog``), then
damaged the ways a crash or a bad disk does (torn tail, zero-filled tail, flipped bits).
"""

from __future__ import annotations

import asyncio
import gzip
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import orjson
from backports import zstd
from google.protobuf import json_format
from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_INFO

from distributor.wal.log import WorkerLog

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
sys.path.insert(0, str(ROOT / "tests"))  # run as a script: the helpers shared with the suite
from otlp_messages import export, otlp_json, record, resource_logs  # noqa: E402


def packet(packet_id: str = "p-1", messages: int = 2, emitter: str = "agent-1", **extra: object) -> bytes:
    body = {"emitter_id": emitter, "packet_id": packet_id,
            "messages": [{"timestamp": 1764172800123 + i, "level": "INFO", "message": f"event {i}",
                          "metadata": {"service": "auth"}} for i in range(messages)], **extra}
    return orjson.dumps(body)


def message(timestamp: object, **extra: object) -> bytes:
    return orjson.dumps({"emitter_id": "e", "packet_id": "p",
                         "messages": [{"timestamp": timestamp, "level": "WARN", "message": "m", **extra}]})


def contract() -> dict[str, bytes]:
    rng = random.Random(3339)
    structured = {f"structured-{i}": b"\x01" + bytes(rng.randrange(256) for _ in range(rng.randrange(16, 120)))
                  for i in range(6)}
    raw = {
        "valid": packet(),
        "valid-pretty": orjson.dumps(orjson.loads(packet()), option=orjson.OPT_INDENT_2),
        "priority-high": packet(priority="high"),
        "priority-bad": packet(priority="urgent"),
        "rfc3339-z": message("2025-11-26T12:00:00.123Z"),
        "rfc3339-offset-lower": message("2024-02-29t23:59:59.123456789+05:30"),
        "rfc3339-leap-second": message("2016-12-31T23:59:60Z"),
        "rfc3339-year-zero": message("0000-01-01 00:00:00z"),
        "rfc3339-bad-day": message("2025-02-29T00:00:00Z"),
        "ms-max": message(253402300799999),
        "ms-over": message(253402300800000),
        "ms-float": message(1.5e3),
        "ms-negative": message(-1),
        "metadata-null": message(1, metadata=None),
        "metadata-list": message(1, metadata=[1]),
        "id-256": packet(emitter="e" * 256),
        "many-messages": packet(messages=5),
        "not-object": b"[1, 2, 3]",
        "missing-messages": b'{"emitter_id": "e", "packet_id": "p"}',
        "truncated": packet()[:40],
    }
    return {**{name: b"\x00" + body for name, body in raw.items()}, **structured}  # see fuzz_contract.check


def batch() -> dict[str, bytes]:
    lines = [packet(f"b-{i}", 1 + i % 3) for i in range(5)]
    return {
        "plain": b"\x00" + b"\n".join(lines) + b"\n",
        "crlf-blank-invalid": b"\x01" + lines[0] + b"\r\n\r\n{bad\n  \n" + lines[1] + b"\r",
        "refusals": b"\x1b" + b"\n".join(lines),
        "too-many-small-limit": b"\x80" + b"\n".join(lines),
        "too-many-messages": b"\x40" + packet("big", 5) + b"\n" + lines[0],
        # X-Emitter-Id lines: not UTF-8, empty, repeated (see fuzz_batch.CLAIMS)
        "emitter-not-utf8": b"\x10" + lines[2] + b"\n",
        "emitter-empty": b"\x20" + lines[2] + b"\n",
        "emitter-repeated": b"\x30" + lines[2] + b"\n" + lines[3],
    }


def http_requests() -> dict[str, bytes]:
    body = packet()
    cl = b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    chunked = (b"POST /ingest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
    expect = b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nabcd"
    http10 = b"POST /ingest HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
    head = b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    get = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    return {  # flags byte, cut-seed byte, stream (see fuzz_http.py)
        "content-length": b"\x00\x00" + cl,
        "pipelined": b"\x00\x07" + cl + chunked + expect + http10 + head + get,
        "pipelined-deferred": b"\x01\x09" + cl + head + cl + http10 + cl,
        "pipelined-backpressure": b"\x03\x0b" + cl * 4 + get,
        "byte-by-byte": b"\x00\xff" + chunked + expect,
        "chunked": b"\x00\x02" + chunked,
        "expect-404-body": b"\x00\x01POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n"
                           b"Expect: 100-continue\r\n\r\n",
        "close": b"\x08\x04" + cl.replace(b"Host: t\r\n", b"Host: t\r\nConnection: close\r\n") + cl,
        "http10-close": b"\x09\x03POST /ingest HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi",
        "absolute-uri": b"\x00\x05POST http://h:1/ingest?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
        "garbage": b"\x00\x06\x00\x01\x02 garbage\r\n\r\n",
        "cl-and-te": b"\x00\x01POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "upgrade": b"\x00\x01GET /ingest HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "http2-preface": b"\x00\x01PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "boom-and-pf": b"\x01\x02" + cl.replace(b"/ingest", b"/boom") + b"POST /pf HTTP/1.1\r\nHost: t\r\n\r\n",
        "small-limits": b"\x20\x03" + cl + b"POST /ingest HTTP/1.1\r\nHost: t\r\nX-Big: " + b"h" * 200 + b"\r\n\r\n",
        "deadlines": b"\x10\x08" + cl + b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\npart",
        "no-write-eof": b"\x04\x02" + b"GET /ingest HTTP/1.1\r\n\r\n",
    }


def http_pipeline() -> dict[str, bytes]:
    rng = random.Random(15)
    return {f"random-{i}": bytes(rng.randrange(256) for _ in range(rng.randrange(8, 200))) for i in range(12)}


MIN_CONFIG = b'[[analyzers]]\nname = "a1"\nurl = "http://127.0.0.1:9001"\nweight = 1\n'


def config() -> dict[str, bytes]:
    return {
        "example": (ROOT / "distributor.toml").read_bytes(),
        "minimal": MIN_CONFIG,
        "two-analyzers": MIN_CONFIG + b'[[analyzers]]\nname = "a2"\nurl = "http://[::1]:9002/x"\nweight = 0.5\n'
                                      b'mode = "packet"\ncompression = "zstd"\n',
        "sections": b'workers = 2\nlisten = "127.0.0.1:8080"\n[ingest]\nmax_body_bytes = 65536\n[queue]\n'
                    b'max_bytes = 1048576\n[rate_limit]\nrate = 10.0\n[rate_limit.overrides]\n'
                    b'"agent-17" = {rate = 100, burst = 200}\n[admin]\ntoken = "t"\n'
                    b'allowed_analyzer_networks = ["127.0.0.0/8"]\n' + MIN_CONFIG,
        "wal-tracing": b'[wal]\ndir = "/tmp/w"\nsync = "always"\nsegment_bytes = 4194304\n'
                       b'max_bytes = 16777216\n[tracing]\nsample_ratio = 0.5\nendpoint = "http://127.0.0.1:4318"\n'
                       + MIN_CONFIG,
        "bad-type": b'workers = "many"\n' + MIN_CONFIG,
        "unknown-key": b"[ingest]\nnope = 1\n" + MIN_CONFIG,
        "not-toml": b"[[analyzers]\nname = \n",
        "link-local": MIN_CONFIG.replace(b"127.0.0.1:9001", b"169.254.169.254"),
    }


async def _write_wal(root: Path) -> None:
    log = await WorkerLog.open(root, 0, sync="none", segment_bytes=2048, max_bytes=1 << 20)
    refs = []
    for i in range(24):
        refs.append(log.append(packet(f"w-{i}", 1 + i % 3), 1 + i % 3))
        if i % 5 == 4:
            await asyncio.sleep(0.01)  # several turns: several writes
    await asyncio.sleep(0.05)
    await log.attempted(refs[:10])
    for ref in refs[:7] + refs[12:14]:
        log.ack(ref)
    await asyncio.sleep(0.05)
    await log.close()


def wal() -> tuple[dict[str, bytes], dict[str, bytes]]:
    root = Path(tempfile.mkdtemp(prefix="fuzz-corpus-wal-"))
    try:
        asyncio.run(_write_wal(root))
        slot = root / "worker-0"
        segments = {p.name: p.read_bytes() for p in sorted(slot.glob("*.wal"))}
        acks = {p.name: p.read_bytes() for p in sorted(slot.glob("*.ack"))}
    finally:
        shutil.rmtree(root)
    first = segments[min(segments)]
    seg = {name.replace(".", "-"): data for name, data in segments.items()}
    seg["torn-tail"] = first[:-17]
    seg["torn-header"] = first[:len(first) // 2][:50]
    seg["zero-tail"] = first + bytes(100)
    seg["flipped-length"] = _flip(first, 32 + 5)
    seg["flipped-payload"] = _flip(first, 32 + 40)
    seg["header-only"] = first[:32]
    ack = acks[min(acks)]  # segment 0: the id fuzz_wal_ack.py expects
    ack_seeds = {"segment-0": ack, "torn": ack[:-3], "flipped": _flip(ack, 24 + 6), "zero-tail": ack + bytes(20),
                 "wrong-header": _flip(ack, 2), "duplicated": ack + ack[24:]}
    return seg, ack_seeds


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def encoding() -> dict[str, bytes]:
    body = packet()
    return {  # encoding selector (see fuzz_encoding.ENCODINGS), limit / 16, body
        "identity": b"\x00\x40" + body,
        "gzip": b"\x01\x40" + gzip.compress(body),
        "gzip-two-members": b"\x01\x40" + gzip.compress(body) + gzip.compress(body),
        "gzip-truncated": b"\x01\x40" + gzip.compress(body)[:-6],
        "gzip-bomb": b"\x05\x04" + gzip.compress(b"0" * 100_000),
        "zstd": b"\x02\x40" + zstd.compress(body),
        "zstd-two-frames": b"\x02\x40" + zstd.compress(body) + zstd.compress(body),
        "zstd-bomb": b"\x02\x04" + zstd.compress(b"0" * 100_000),
        "zstd-truncated": b"\x02\x40" + zstd.compress(body)[:-3],
        "unknown": b"\x06\x40" + body,
    }


def otlp() -> dict[str, bytes]:
    records = [record(severity_number=SEVERITY_NUMBER_INFO, attributes={"k": [1, {"a": b"x"}, 2.5, True]},
                      trace_id=bytes(range(16)), span_id=bytes(range(8))),
               record({"x": 1}, time_unix_nano=0, observed_time_unix_nano=1764172800000000000, severity_text="ERROR"),
               record(None, event_name="login")]
    request = export(resource_logs(records, instance="i-1"), resource_logs(records[:1], service=None))
    protobuf = request.SerializeToString()
    return {  # selector (content type, limits, refusals; see fuzz_otlp.py), body
        "protobuf": b"\x00" + protobuf,
        "protobuf-small-limits": b"\x04" + protobuf,
        "protobuf-refusals": b"\x18" + protobuf,
        "json": b"\x01" + otlp_json(request),
        "json-charset": b"\x02" + otlp_json(request),
        "json-snake-case": b"\x01" + orjson.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)),
        "empty": b"\x00",
        "text-plain": b"\x03{}",
    }


def main(targets: list[str]) -> None:
    builders: dict[str, Callable[[], dict[str, bytes]]] = {
        "contract": contract, "batch": batch, "http": http_requests, "http_pipeline": http_pipeline, "config": config,
        "wal_segment": lambda: wal()[0], "wal_ack": lambda: wal()[1], "encoding": encoding, "otlp": otlp}
    unknown = set(targets) - set(builders)
    if unknown:
        sys.exit(f"make_corpus.py: no target {', '.join(sorted(unknown))}; targets: {' '.join(builders)}")
    for target in targets or builders:
        seeds = builders[target]()
        folder = CORPUS / target
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
