"""The bare floor: the least a Python server on the distributor's stack can do per packet.

N processes of uvloop + httptools + orjson share one port with SO_REUSEPORT
(as the distributor's workers do). Each parses the request with httptools,
parses the packet body with ``orjson.loads`` and answers
``202 {"status":"accepted","packet_id":...}`` (the distributor's 202 body,
so wrk_ingest.lua counts accepted messages the same way); a body that is not
a JSON object with a ``packet_id`` gets 400. Nothing else: no validation, no
routing, no queue, no sender, no metrics. The distributor does all of that on
top, so its packets/s can approach this figure but not pass it; the benchmark
reports distributor / floor per round.

    python -m loadtest.bare_floor --listen 127.0.0.1:8090 --processes 2

Each serving process prints ``ready`` on stdout once it listens (the benchmark
waits for that line from every process).
"""

from __future__ import annotations

import argparse
import asyncio
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httptools
import orjson
import uvloop

from distributor.tools.localcluster import free_port

HEAD_202 = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
BODY_400 = b'{"error":"invalid_packet"}'
ANSWER_400 = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(BODY_400), BODY_400))
ACCEPTED = b'{"status":"accepted","packet_id":'


class FloorProtocol(asyncio.Protocol):
    """One connection: httptools callbacks gather the body; the answer is written when the request completes."""

    __slots__ = ("transport", "parser", "chunks")

    def __init__(self) -> None:
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.chunks: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(ANSWER_400)
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        try:
            answer = ACCEPTED + orjson.dumps(orjson.loads(body)["packet_id"]) + b"}"
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            self.transport.write(ANSWER_400)
            self.transport.close()
            return
        self.transport.write(HEAD_202 % len(answer) + answer)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FloorProtocol, sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


class BareFloor:
    """Context manager: ``processes`` floor servers on one free 127.0.0.1 port, stopped by PID."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def __enter__(self) -> "BareFloor":
        try:
            for _ in range(self.processes):
                proc = subprocess.Popen([sys.executable, "-m", "loadtest.bare_floor", "--listen",
                                         f"127.0.0.1:{self.port}", "--processes", "1"],
                                        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
                self.procs.append(proc)
                assert proc.stdout is not None
                deadline = time.monotonic() + 20
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"bare floor exited {proc.returncode} before listening")
                    ready, _, _ = select.select([proc.stdout], [], [], 0.2)
                    if ready and proc.stdout.readline().strip() == b"ready":
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError("bare floor did not listen within 20 s")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bare_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:8090", help="host:port (default 127.0.0.1:8090)")
    parser.add_argument("--processes", type=int, default=1, help="serving processes sharing the port")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if args.processes <= 1:
        uvloop.run(serve(host, int(port)))
        return 0
    children = [subprocess.Popen([sys.executable, "-m", "loadtest.bare_floor", "--listen", args.listen,
                                  "--processes", "1"]) for _ in range(args.processes)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max((child.wait() for child in children), default=0)


if __name__ == "__main__":
    sys.exit(main())
