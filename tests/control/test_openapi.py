"""schemathesis against the running service: no 5xx and no schema violations, on both ports.

The control plane runs every phase (coverage, fuzzing and the stateful phase, which follows the
OpenAPI links of openapi.json from ``POST /admin/analyzers`` to ``PUT``/``DELETE
/admin/analyzers/{name}``, drain and undrain, and between those) with the admin token, plus the
``ignored_auth`` check (the mutating endpoints must refuse a request without the token). A
schemathesis configuration written here binds the new analyzer's ``name`` and ``url`` to small
dictionaries most of the time, so adds succeed and the links have an analyzer to act on; analyzers
outside 127.0.0.1 are refused (``admin.allowed_analyzer_networks``), so whatever schemathesis adds, the
distributor never dials beyond this host.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator
from urllib.request import urlopen

import pytest

from distributor.control.client import http_json
from distributor.tools.localcluster import LocalCluster, free_ports

TOKEN = "schema-token"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance," \
         "response_headers_conformance"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONTROL_EXAMPLES = 100  # per operation and phase (40 before the stateful links)
DATA_EXAMPLES = 40


def run_schemathesis(schema_url: str, base_url: str, paths: str, *extra: str, config: Path | None = None,
                     examples: int = DATA_EXAMPLES, checks: str = CHECKS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCHEMATHESIS), *(["--config-file", str(config)] if config else []), "run", schema_url, "--url", base_url,
         "--include-path-regex", paths, "--checks", checks, "--max-examples", str(examples),
         "--generation-deterministic", "--request-timeout", "10", "--workers", "1", "--suppress-health-check", "all",
         *extra],
        capture_output=True, text=True, timeout=300,
    )


def stateful_config(path: Path) -> Path:
    """Dictionaries for the analyzers schemathesis adds: valid names and URLs (to ports nobody serves)
    most of the time, so the links from a 201 have something to follow; and longer stateful scenarios."""
    urls = [f"http://127.0.0.1:{port}" for port in free_ports(3)] + ["http://localhost:9", "http://127.0.0.1:9/x"]
    path.write_text(
        "[dictionaries.analyzer-urls]\n"
        f"values = {json.dumps(urls)}\n"
        "[dictionaries.analyzer-names]\n"
        'values = ["fz-a", "fz-b", "fz-c", "fz.d", "fz_e"]\n'
        "[parameters]\n"
        '"body.url" = { dictionary = "analyzer-urls", probability = 0.9 }\n'
        '"body.name" = { dictionary = "analyzer-names", probability = 0.6 }\n'
        "[phases.stateful]\n"
        "max-steps = 30\n")
    return path


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(analyzers=(("a1", 1.0),), workers=1, distributor_args=[
        "--set", f"admin.token={TOKEN}", "--set", "admin.allowed_analyzer_networks=127.0.0.1/32"])
    with cluster:
        yield cluster


def test_the_document_is_served(cluster: LocalCluster) -> None:
    status, document = http_json(cluster.admin_url + "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.")
    assert json.loads(json.dumps(document))  # the served document is plain JSON
    links = document["paths"]["/admin/analyzers"]["post"]["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} >= {"setWeight", "removeAnalyzer", "drain", "undrain"}


@pytest.mark.timeout(400)
def test_control_plane_conforms_statefully_with_the_token(cluster: LocalCluster, tmp_path: Path) -> None:
    schema = cluster.admin_url + "/openapi.json"
    control = run_schemathesis(schema, cluster.admin_url, "^/(health|ready|metrics|openapi.json|admin/.*)$",
                               "--header", f"Authorization: Bearer {TOKEN}",
                               config=stateful_config(tmp_path / "schemathesis.toml"), examples=CONTROL_EXAMPLES,
                               checks=CHECKS + ",ignored_auth")
    assert control.returncode == 0, control.stdout[-6000:] + control.stderr[-2000:]
    assert "passed" in control.stdout.lower()
    cases = re.search(r"(\d+) generated", control.stdout)
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", control.stdout)
    print(f"control plane: {cases[1] if cases else '?'} cases, links {links[0] if links else '?'}")
    assert links is not None and int(links[1]) == int(links[2]) > 0, control.stdout[-3000:]
    with urlopen(cluster.admin_url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    changes = {m[1]: float(m[2]) for m in re.finditer(r'^distributor_admin_changes_total\{action="(\w+)"\} (\S+)$',
                                                      metrics, re.MULTILINE)}
    for action in ("add", "weight", "drain", "undrain", "remove"):  # the links had analyzers to act on
        assert changes.get(action, 0) > 0, f"no successful {action} through the admin API: {changes}"


@pytest.mark.timeout(400)
def test_data_port_conforms(make_cluster: Callable[..., LocalCluster]) -> None:
    # a cluster of its own: the control-plane run drains and removes analyzers (then 503 is right here)
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1)
    # no stateful phase: the document's links are all between control-plane operations
    data = run_schemathesis(cluster.admin_url + "/openapi.json", f"http://127.0.0.1:{cluster.data_port}",
                            "^/(ingest|ingest/batch|healthz)$", "--phases", "examples,coverage,fuzzing")
    assert data.returncode == 0, data.stdout[-6000:]
    assert "passed" in data.stdout.lower()
