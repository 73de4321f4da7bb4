"""What the ingest scenario starts around the distributor: a TLS certificate (and a cluster that speaks
https), and an OTLP/HTTP trace receiver for the spans of ``tracing.sample_ratio``."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import ssl
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from distributor.tools.localcluster import LocalCluster


def make_certificate(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1 (openssl, RSA 2048): (cert, key); None without openssl."""
    if shutil.which("openssl") is None:
        return None
    cert, key = directory / "server.pem", directory / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class TlsCluster(LocalCluster):
    """A local cluster whose data port and control plane speak https (``[tls]`` serves both)."""

    @property
    def ingest_url(self) -> str:
        return f"https://127.0.0.1:{self.data_port}/ingest"

    @property
    def admin_url(self) -> str:
        return f"https://127.0.0.1:{self.admin_port}"


@contextlib.contextmanager
def local_https() -> Iterator[None]:
    """While it lasts, urllib in this process accepts the self-signed certificate of our own cluster.

    Why: LocalCluster's readiness and admin reads and the bench's /metrics reads use plain urlopen;
    this benchmark talks only to processes it started on 127.0.0.1, so it skips verification rather
    than threading a context through every call. Restored to urllib's default afterwards.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.HTTPSHandler(context=context)))
    try:
        yield
    finally:
        urllib.request.install_opener(None)  # None: urlopen builds its default again


class TraceReceiver(ThreadingHTTPServer):
    """An OTLP/HTTP collector on 127.0.0.1 (protobuf, optionally gzip): counts the spans it receives."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TraceHandler)
        self.spans = 0
        self.spans_by_name: dict[str, int] = {}
        self.requests = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, body: bytes) -> None:
        export = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.requests += 1
            for resource_spans in export.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans += 1
                        name = "send" if span.name == "send" else "admit" if span.name == "admit" else "ingest"
                        self.spans_by_name[name] = self.spans_by_name.get(name, 0) + 1

    def __enter__(self) -> "TraceReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.thread.join()
        self.server_close()


class _TraceHandler(BaseHTTPRequestHandler):
    server: TraceReceiver

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            self.server.record(body)
            status = 200
        except DecodeError:  # not an export request
            status = 400
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet: the bench prints its own progress
        pass
