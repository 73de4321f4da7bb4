"""A small JSON-over-HTTP client for the control plane (and the analyzers' /stats), stdlib only.

Shared by ``distributor status`` and the local cluster, so the CLI
has no dependency beyond the standard library.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def http_json(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON body) of a request; errors with a body are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        return exc.code, json.loads(payload) if payload else None
