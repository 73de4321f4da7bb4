"""Requests that are malformed whatever came before them on the connection: each gets 400 and a close.

Shared by the HTTP state machine (tests/ingest/test_http_stateful.py) and the pipeline fuzz target
(tests/fuzz/targets/fuzz_http_pipeline.py), which adds tails answered otherwise (505, 501).
"""

from __future__ import annotations

MALFORMED = (
    b"\x00\x01\x02 garbage\r\n\r\n",
    b"POST /ingest HTTP/1.1 extra\r\nHost: t\r\n\r\n",
    b"POST /ingest HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
    b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /ingest HTTP/1.1\r\nContent-Length: 1\r\n\r\na",  # no Host
    b"POST /ingest HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n",
    b"POST /ingest HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /ingest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
)
