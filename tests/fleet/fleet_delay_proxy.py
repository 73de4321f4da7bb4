"""A userspace delaying TCP proxy: a slow link toward one analyzer (this kernel has no ``tc netem``).

Runs in the analyzer's network namespace, in front of it: ``--listen 0.0.0.0:9002 --upstream
127.0.0.1:9001``. Every chunk of bytes from the client (a distributor) is forwarded ``delay`` seconds
after it arrived, in order, like a one-way link latency; answers flow back at once. A request (one
write by the distributor's HTTP client) therefore takes ``delay`` longer, and a sender limited to
``sender.max_inflight`` requests at a time gets at most ``max_inflight / delay`` requests per second
through. The delay is read from ``--control FILE`` (milliseconds, a number) every 100 ms, so a test
switches the slow link on and off without restarting anything.

    python tests/fleet/fleet_delay_proxy.py --listen 0.0.0.0:9002 --upstream 127.0.0.1:9001 --control /tmp/d
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path


class Delay:
    """The current delay in seconds, re-read from the control file."""

    def __init__(self, control: Path) -> None:
        self.control = control
        self.seconds = 0.0

    def refresh(self) -> None:
        try:
            self.seconds = max(0.0, float(self.control.read_text().strip() or 0) / 1000.0)
        except (OSError, ValueError):
            pass

    async def run(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(0.1)


async def pump_delayed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    """Client -> upstream: each chunk leaves ``delay`` after it arrived, order kept."""
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await chunks.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    releaser = asyncio.create_task(release())
    try:
        while True:
            data = await reader.read(65536)
            chunks.put_nowait((time.monotonic() + delay.seconds, data))
            if not data:
                break
        await releaser
    finally:
        releaser.cancel()


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 upstream: tuple[str, int], delay: Delay) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(pump_delayed(client_reader, up_writer, delay), pump(up_reader, client_writer))
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for w in (up_writer, client_writer):
            w.close()


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def main_async(args: argparse.Namespace) -> None:
    delay = Delay(Path(args.control))
    delay.refresh()
    ticker = asyncio.create_task(delay.run())
    upstream = split(args.upstream)
    host, port = split(args.listen)
    server = await asyncio.start_server(lambda r, w: handle(r, w, upstream, delay), host, port)
    try:
        async with server:
            await server.serve_forever()
    finally:
        ticker.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--control", required=True, help="file holding the delay in milliseconds")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
