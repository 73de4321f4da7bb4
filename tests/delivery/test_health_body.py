"""The supervisor reads an analyzer's ``/health`` body within 64 KiB (``delivery/health.MAX_HEALTH_BODY``).

Regression test for defect 11 of the review of issues 16/17: a huge body (here 32 MiB of valid JSON: an
object and then whitespace) was read whole into the supervisor's memory, on its event loop, at every health
check, and the analyzer was judged healthy. Now the check fails once the body passes 64 KiB, the rest is
never read, and the analyzer goes down like any analyzer whose checks fail.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, Iterator

import pytest

from distributor.tools.localcluster import LocalCluster, wait_until

LIMIT = 64 << 10
SIZE = 32 << 20  # bytes of whitespace after the JSON object: far more than the kernel's socket buffers hold


class FatHealthAnalyzer:
    """A raw-socket analyzer: ``GET /health`` answers 200 with ``{"status":"ok"}`` followed by SIZE spaces, sent
    as fast as the reader takes them; anything else answers 200 ``{}``. Remembers how many body bytes each
    /health answer got out before the reader closed the connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sent: list[int] = []  # body bytes written, per finished /health answer
        self.lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            if not head.startswith(b"GET /health "):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\n{}")
                return
            prefix = b'{"status":"ok"}'
            sent = 0
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(prefix) + SIZE, prefix))
                sent = len(prefix)
                chunk = b" " * (1 << 20)
                while sent < len(prefix) + SIZE and not self.closing:
                    conn.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass  # the reader closed the connection
            with self.lock:
                self.sent.append(sent)

    def answers(self) -> list[int]:
        with self.lock:
            return list(self.sent)

    def close(self) -> None:
        self.closing = True
        self.listener.close()


@pytest.fixture
def fat_health() -> Iterator[FatHealthAnalyzer]:
    analyzer = FatHealthAnalyzer()
    yield analyzer
    analyzer.close()


@pytest.mark.timeout(60)
def test_a_health_body_above_64_kib_fails_the_check_unread(
    make_cluster: Callable[..., LocalCluster], fat_health: FatHealthAnalyzer,
) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1, distributor_args=[
        "--analyzer", f"fat={fat_health.url}@1",
        "--set", "health.interval=1", "--set", "health.timeout=1", "--set", "health.fall=2"])

    def rows() -> dict[str, dict[str, Any]]:
        return {a["name"]: a for a in cluster.admin("/admin/analyzers")["analyzers"]}

    try:
        wait_until(lambda: rows()["fat"]["state"] == "down" and len(fat_health.answers()) >= 2, 10,
                   "the analyzer with a 32 MiB /health body to be marked down")
    except TimeoutError:
        fat = rows()["fat"]
        pytest.fail(f"fat is {fat['state']} (last check: {fat['last_check']!r}) after {len(fat_health.answers())} "
                    f"checks that read {fat_health.answers()} body bytes each")
    assert f"more than {LIMIT} bytes" in rows()["fat"]["last_check"]
    for sent in fat_health.answers():
        assert sent < SIZE // 2, f"the supervisor read {sent} bytes of one /health body"
    assert rows()["a1"]["state"] == "active"
