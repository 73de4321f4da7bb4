"""Helpers for tests that talk to a real distributor."""

from __future__ import annotations

import http.client
import json
from typing import Any


class Client:
    """A keep-alive HTTP/1.1 client for the data port (http.client: a real, independent implementation)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(self, body: bytes, path: str = "/ingest", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        self.conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = self.conn.getresponse()
        payload = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(payload) if payload else None

    def close(self) -> None:
        self.conn.close()


def packet(emitter: str = "agent-1", packet_id: str = "p-1", messages: int = 5, **extra: Any) -> bytes:
    body = {
        "emitter_id": emitter,
        "packet_id": packet_id,
        "messages": [
            {"timestamp": 1764172800123 + i, "level": "INFO", "message": f"event {i}", "metadata": {"service": "auth"}}
            for i in range(messages)
        ],
        **extra,
    }
    return json.dumps(body).encode()
