"""Certificates the TLS tests make with the openssl command: one CA and what it signs, in one directory."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

# name -> the X.509 extension it is issued with
ISSUED = {
    "server": "subjectAltName=IP:127.0.0.1",  # what a distributor or an analyzer on 127.0.0.1 serves
    "other": "subjectAltName=IP:127.0.0.1",  # another server certificate: its key does not match server.pem
    "emitter": "extendedKeyUsage=clientAuth",  # an emitter's client certificate (mTLS)
    "distributor-client": "extendedKeyUsage=clientAuth",  # the distributor's, toward https analyzers
}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Path:
    """``ca.pem``/``ca.key`` and, for each name of ``ISSUED``, ``<name>.pem``/``<name>.key`` signed by that CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=directory)
    for name, extension in ISSUED.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)
        (directory / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)
    return directory
