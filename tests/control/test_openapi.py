"""schemathesis against the running service: no 5xx and no schema violations, on both ports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from distributor.control.client import http_json
from distributor.tools.localcluster import LocalCluster

TOKEN = "schema-token"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance," \
         "response_headers_conformance"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def run_schemathesis(schema_url: str, base_url: str, paths: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCHEMATHESIS), "run", schema_url, "--url", base_url, "--include-path-regex", paths, "--checks", CHECKS,
         "--max-examples", "40", "--generation-deterministic", "--request-timeout", "10", "--workers", "1",
         "--suppress-health-check", "all", *extra],
        capture_output=True, text=True, timeout=600,
    )


@pytest.mark.timeout(900)
def test_both_ports_conform_to_the_openapi_document(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1, distributor_args=["--set", f"admin.token={TOKEN}"])
    status, document = http_json(cluster.admin_url + "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.")
    schema = cluster.admin_url + "/openapi.json"
    control = run_schemathesis(schema, cluster.admin_url, "^/(health|ready|metrics|openapi.json|admin/.*)$",
                               "--header", f"Authorization: Bearer {TOKEN}")
    assert control.returncode == 0, control.stdout[-6000:]
    data = run_schemathesis(schema, f"http://127.0.0.1:{cluster.data_port}", "^/(ingest|ingest/batch|healthz)$")
    assert data.returncode == 0, data.stdout[-6000:]
    for output in (control.stdout, data.stdout):
        assert "passed" in output.lower()
    assert json.loads(json.dumps(document))  # the served document is plain JSON
