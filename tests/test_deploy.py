"""Deploy and observability artefacts: deploy/, docs/runbook.md.

* promtool checks the alert rules and the Prometheus config, and runs the alert unit tests
  (deploy/prometheus/alerts_test.yml).
* A real Prometheus on 127.0.0.1 scrapes a real distributor every second with the repository's
  alerts.yml loaded: every rule evaluates without error, every dashboard and alert expression
  parses, a packet shows up in distributor_packets_total, and killing a worker fires
  DistributorWorkerRestarted.
* Every Kubernetes manifest validates offline against the bundled Kubernetes schemas
  (kubernetes-validate); the KEDA ScaledObject, the compose file, the Dockerfile, Grafana's
  provisioning and the dashboard are checked structurally.

Tools: Debian's ``prometheus`` package (promtool, prometheus); PyPI ``kubernetes-validate`` and
``pyyaml``. Outside CI a missing tool skips its tests; with ``CI`` set it fails them.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from distributor.tools.localcluster import LocalCluster, free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "distributor.json"
K8S_DIR = DEPLOY / "k8s"
RUNBOOK = REPO / "docs" / "runbook.md"
K8S_VERSION = "1.30"  # oldest Kubernetes minor the manifests must validate against

APT_HINT = "apt-get install -y --no-install-recommends prometheus"
PIP_HINT = ".venv/bin/pip install kubernetes-validate pyyaml"

# --- the distributor's metrics -------------------------------------------------------------------

COUNTERS = {
    "distributor_packets", "distributor_messages", "distributor_analyzer_packets",
    "distributor_send_failures", "distributor_worker_cpu_seconds", "distributor_worker_restarts",
    "distributor_worker_memory_recycles", "distributor_http_events", "distributor_analyzer_ejections",
}
GAUGES = {
    "distributor_queue_depth", "distributor_queue_bytes", "distributor_analyzer_weight",
    "distributor_analyzer_target_share", "distributor_analyzer_share", "distributor_worker_memory_bytes",
    "distributor_event_loop_lag_seconds", "distributor_worker_connections", "distributor_analyzer_up",
    "distributor_analyzer_state", "distributor_analyzer_backoff_seconds",
    "distributor_queue_capacity_packets", "distributor_worker_memory_limit_bytes",
}
HISTOGRAMS = {"distributor_ingest_latency_seconds"}
METRIC_NAMES = (
    {f"{name}_total" for name in COUNTERS}
    | GAUGES
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
LABEL_VALUES = {
    "outcome": {"accepted", "invalid", "unavailable", "shed", "rate_limited", "routed", "delivered",
                "rejected", "dropped_shutdown", "lost_worker_crash"},
    "state": {"active", "down", "ejected", "saturated", "draining", "drained", "warming"},
    "kind": {"rss", "uss"},
    "event": {"connections_total", "connections_rejected", "bad_requests", "too_large", "header_timeouts",
              "body_timeouts", "idle_closed"},
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                "bool", "offset", "inf", "nan"}

# --- helpers --------------------------------------------------------------------------------------


def need(thing: str, hint: str) -> None:
    """A missing tool: a failure in CI (where the install step must provide it), a skip elsewhere."""
    message = f"{thing} is not available; install it with: {hint}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        need(f"`{name}` (Debian package prometheus)", APT_HINT)
    return path  # type: ignore[return-value]


def yaml_module() -> Any:
    try:
        import yaml
    except ImportError:
        need("the Python package pyyaml", PIP_HINT)
    return yaml


def load_yaml(path: Path) -> Any:
    return yaml_module().safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml_module().safe_load_all(path.read_text()) if doc]


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana's $variables tolerated)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)   # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(match.group(0))
    return names


def check_promql(expr: str, where: str, extra_names: frozenset[str] = frozenset()) -> None:
    names = promql_metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - METRIC_NAMES - extra_names
    assert not unknown, f"{where}: unknown metric(s) {sorted(unknown)} in {expr!r}"
    for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
        if label in LABEL_VALUES:
            values = value.split("|") if op in ("=~", "!~") else [value]
            bad = set(values) - LABEL_VALUES[label]
            assert not bad, f"{where}: {label} value(s) {sorted(bad)} are not exported, in {expr!r}"


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"]]
    for row in list(panels):
        panels.extend(row.get("panels", []))
    return [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
            for p in panels for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def github_anchors(markdown: str) -> set[str]:
    anchors = set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', markdown))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def run(argv: list[str], cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = predicate()
        except (OSError, urllib.error.URLError, ValueError) as exc:
            result, last = None, exc
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")
        time.sleep(interval)


# --- promtool ------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    result = run([tool("promtool"), "check", "config", str(PROM_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr  # alerts.yml resolved beside it


def test_promtool_alert_unit_tests() -> None:
    """Each alert fires on synthetic series (including the metrics of the next change) and stays quiet otherwise."""
    result = run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROM_DIR / "alerts_test.yml").read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert needs a unit test"


# --- alert rules and runbook ---------------------------------------------------------------------


def test_alert_rules_are_complete_and_link_the_runbook() -> None:
    rules = alert_rules()
    anchors = github_anchors(RUNBOOK.read_text())
    names = {rule["alert"] for rule in rules}
    assert {
        "DistributorQueueNearFull", "DistributorHigh503Rate", "DistributorAnalyzerFlapping",
        "DistributorAnalyzerDown", "DistributorWorkerMemoryNearLimit", "DistributorWorkerRestarted",
    } <= names
    for rule in rules:
        where = f"alert {rule['alert']}"
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{where}: missing annotation {key}"
        url = annotations["runbook_url"]
        assert url.startswith("docs/runbook.md#") or "/docs/runbook.md#" in url, f"{where}: {url}"
        anchor = url.split("#", 1)[1]
        assert anchor in anchors, f"{where}: no anchor #{anchor} in docs/runbook.md"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), where
        check_promql(rule["expr"], where, extra_names=frozenset({"up"}))
    by_name = {rule["alert"]: rule for rule in rules}
    assert by_name["DistributorQueueNearFull"]["for"] == "1m"
    assert "distributor_queue_capacity_packets" in by_name["DistributorQueueNearFull"]["expr"]
    assert by_name["DistributorHigh503Rate"]["for"] == "2m"
    assert by_name["DistributorAnalyzerDown"]["for"] == "1m"
    assert "changes(distributor_analyzer_up[10m])" in by_name["DistributorAnalyzerFlapping"]["expr"]
    assert "distributor_worker_memory_limit_bytes > 0" in by_name["DistributorWorkerMemoryNearLimit"]["expr"]
    assert "[10m]" in by_name["DistributorWorkerRestarted"]["expr"]


# --- Grafana -------------------------------------------------------------------------------------


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for where, expr in exprs:
        check_promql(expr, where)
    used = set().union(*(promql_metric_names(expr) for _, expr in exprs))
    for required in (
        "distributor_packets_total", "distributor_http_events_total", "distributor_messages_total",
        "distributor_analyzer_target_share", "distributor_analyzer_share", "distributor_queue_depth",
        "distributor_analyzer_state", "distributor_analyzer_up", "distributor_worker_memory_bytes",
        "distributor_worker_cpu_seconds_total", "distributor_event_loop_lag_seconds",
        "distributor_ingest_latency_seconds_bucket",
    ):
        assert required in used, f"the dashboard shows nothing of {required}"
    assert any("histogram_quantile(0.99" in expr for _, expr in exprs)
    grid = [p["gridPos"] for p in dashboard["panels"]]
    assert all(0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0 for g in grid)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_grafana_provisioning_matches_dashboard_and_compose() -> None:
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    uid = datasources[0]["uid"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if ds:
                assert ds == {"type": "prometheus", "uid": uid}, panel["title"]
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/distributor.yml")["providers"][0]
    mounts = {
        target: source
        for source, target, *_ in (v.split(":") for v in compose()["services"]["grafana"]["volumes"])
    }
    assert (DEPLOY / mounts[provider["options"]["path"]] / DASHBOARD.name).is_file()


# --- docker compose and Dockerfile ---------------------------------------------------------------


def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "docker-compose.yml")


def test_compose_structure() -> None:
    spec = compose()
    services = spec["services"]
    analyzers = {f"analyzer-a{i}" for i in range(1, 5)}
    assert {"distributor", "prometheus", "grafana"} | analyzers <= set(services)
    named_volumes = set(spec.get("volumes") or {})
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name}: neither image nor build"
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == REPO, f"{name}: build context must be the repository root"
            assert (context / service["build"]["dockerfile"]).is_file()
        for port in service.get("ports", []):
            parts = str(port).split(":")
            assert 2 <= len(parts) <= 3 and all(p.isdigit() for p in parts[-2:]), f"{name}: port {port}"
            if len(parts) == 3:
                assert parts[0] in ("127.0.0.1", "0.0.0.0"), f"{name}: port {port}"
        depends = service.get("depends_on", [])
        for dependency in depends:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            assert target.startswith("/"), f"{name}: volume {volume}"
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: volume source {source} missing in the repo"
            else:
                assert source in named_volumes, f"{name}: undeclared named volume {source}"
    distributor = services["distributor"]
    assert set(distributor["depends_on"]) == analyzers
    assert {str(p).split(":")[-1] for p in distributor["ports"]} == {"8080", "9091"}
    assert "/etc/distributor/distributor.toml" in [v.split(":")[1] for v in distributor["volumes"]]
    grace = int(str(distributor["stop_grace_period"]).rstrip("s"))
    config = tomllib.loads((DEPLOY / "distributor.compose.toml").read_text())
    assert grace > config.get("graceful_timeout", 30.0)
    # analyzers: same image, the analyzer command, names and hostnames as in the distributor's config
    image = distributor["image"]
    hosts = {urllib.parse.urlsplit(a["url"]).hostname: a for a in config["analyzers"]}
    assert set(hosts) == analyzers
    assert sorted(a["weight"] for a in config["analyzers"]) == [0.1, 0.2, 0.3, 0.4]
    for name in analyzers:
        service = services[name]
        assert service["image"] == image
        command = service["command"]
        assert command[0] == "analyzer" and command[command.index("--name") + 1] == hosts[name]["name"]
        listen = command[command.index("--listen") + 1]
        assert listen.startswith("0.0.0.0:") and listen.endswith(f":{urllib.parse.urlsplit(hosts[name]['url']).port}")
    # Prometheus mounts the repo's files and scrapes the distributor's control plane
    prometheus_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prometheus_mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert prometheus_mounts["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    scrape = load_yaml(PROM_DIR / "prometheus.yml")["scrape_configs"]
    targets = [t for job in scrape for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert f"distributor:{config['admin_listen'].rsplit(':', 1)[1]}" in targets


def test_compose_config_is_valid_and_scrapable() -> None:
    path = DEPLOY / "distributor.compose.toml"
    config = tomllib.loads(path.read_text())
    assert config["admin_listen"] == "0.0.0.0:9091"  # Prometheus scrapes it from another container
    comment = path.read_text().split("admin_listen =")[0].rsplit("\n\n", 1)[-1]
    assert "Prometheus" in comment, "say why admin_listen is 0.0.0.0 in a comment above it"
    result = run([sys.executable, "-m", "distributor", "check-config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_dockerfile_static() -> None:
    instructions = dockerfile_instructions()
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert stages and all(stage.split()[0] == "python:3.11-slim" for stage in stages)
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as non-root"
    exposed = {p for op, arg in final if op == "EXPOSE" for p in arg.split()}
    assert {"8080", "9091"} <= exposed
    healthcheck = next(arg for op, arg in final if op == "HEALTHCHECK")
    assert "http://127.0.0.1:9091/health" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
    cmd = json.loads(next(arg for op, arg in final if op == "CMD"))
    assert cmd == ["distributor", "serve", "--config", "/etc/distributor/distributor.toml"]
    assert any(op == "RUN" and "pip install" in arg for op, arg in instructions)
    for op, arg in instructions:
        if op == "COPY" and "--from" not in arg:
            *sources, _ = shlex.split(arg)
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!distributor/**" in ignore and "!analyzer/**" in ignore


def healthcheck_argv(port: int) -> list[str]:
    healthcheck = next(arg for op, arg in dockerfile_instructions() if op == "HEALTHCHECK")
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    argv = [sys.executable if exec_form[0] == "python" else exec_form[0], *exec_form[1:]]
    return [part.replace("127.0.0.1:9091", f"127.0.0.1:{port}") for part in argv]


# --- Kubernetes ----------------------------------------------------------------------------------


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    files = sorted(K8S_DIR.glob("*.yaml"))
    assert files, "no manifests in deploy/k8s"
    return [(path.name, doc) for path in files for doc in load_yaml_all(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in k8s_docs() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_k8s_manifests_validate_against_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        need("the Python package kubernetes-validate", PIP_HINT)
    kinds = set()
    for filename, doc in k8s_docs():
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked in test_keda_scaled_object
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{filename} {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ScaledObject"} <= kinds


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port)


def test_k8s_distributor_deployment() -> None:
    deployment = find("Deployment", "distributor")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    configmap = find("ConfigMap", "distributor-config")
    config = tomllib.loads(configmap["data"]["distributor.toml"])
    admin_port = int(config["admin_listen"].rsplit(":", 1)[1])
    assert config["admin_listen"].startswith("0.0.0.0:"), "probes and scrapes come from outside the pod"
    assert "workers" not in config, "workers come from the CPU limit (DISTRIBUTOR_WORKERS)"
    # workers = CPU limit
    env = {e["name"]: e for e in c.get("env", [])}
    field = env["DISTRIBUTOR_WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu" and str(field.get("divisor", "1")) == "1"
    assert "cpu" in c["resources"]["limits"]
    # probes on the admin port
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert port_number(c, c[probe]["httpGet"]["port"]) == admin_port
    assert port_number(c, "http") == int(config["listen"].rsplit(":", 1)[1])
    # graceful drain: grace period > preStop delay + graceful_timeout
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    sleep = re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(command))
    assert sleep, command
    delay = float(sleep.group(1))
    graceful = float(config.get("graceful_timeout", 30.0))
    assert pod["terminationGracePeriodSeconds"] > delay + graceful
    # the ConfigMap is mounted where the command reads it
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == "distributor-config"
    config_path = c["args"][c["args"].index("--config") + 1]
    assert config_path == f"{mount['mountPath']}/distributor.toml"
    assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]), "the shared table needs /dev/shm"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_configmap_is_a_valid_distributor_config(tmp_path: Path) -> None:
    config_file = tmp_path / "distributor.toml"
    config_file.write_text(find("ConfigMap", "distributor-config")["data"]["distributor.toml"])
    result = run([sys.executable, "-m", "distributor", "check-config", str(config_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_services_pdb_and_analyzers_line_up() -> None:
    docs = [doc for _, doc in k8s_docs()]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    for service in (d for d in docs if d["kind"] == "Service"):
        targets = [d for d in deployments if selects(service["spec"]["selector"], d)]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} deployments"
        for port in service["spec"]["ports"]:
            port_number(container(targets[0]), port["targetPort"])  # raises if the named port is missing
    pdb = find("PodDisruptionBudget", "distributor")
    assert selects(pdb["spec"]["selector"]["matchLabels"], find("Deployment", "distributor"))
    assert find("Deployment", "distributor")["spec"]["replicas"] > pdb["spec"].get("maxUnavailable", 0)
    # every analyzer of the ConfigMap is a Service in front of an analyzer Deployment
    config = tomllib.loads(find("ConfigMap", "distributor-config")["data"]["distributor.toml"])
    for analyzer in config["analyzers"]:
        url = urllib.parse.urlsplit(analyzer["url"])
        service = find("Service", url.hostname)
        assert url.port in [p["port"] for p in service["spec"]["ports"]]
        deployment = next(d for d in deployments if selects(service["spec"]["selector"], d))
        args = container(deployment)["args"]
        assert args[0] == "analyzer" and args[args.index("--name") + 1] == analyzer["name"]


def test_keda_scaled_object() -> None:
    """KEDA's CRD is not in kubernetes-validate's schemas: check the fields KEDA needs ourselves."""
    objects = [doc for _, doc in k8s_docs() if doc["kind"] == "ScaledObject"]
    assert objects
    config = tomllib.loads(find("ConfigMap", "distributor-config")["data"]["distributor.toml"])
    analyzer_names = {a["name"] for a in config["analyzers"]}
    for obj in objects:
        where = f"ScaledObject/{obj['metadata']['name']}"
        assert obj["apiVersion"] == "keda.sh/v1alpha1", where
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, where
        spec = obj["spec"]
        allowed = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
                   "idleReplicaCount", "initialCooldownPeriod", "advanced", "triggers", "fallback"}
        assert set(spec) <= allowed, f"{where}: unknown spec fields {set(spec) - allowed}"
        target = spec["scaleTargetRef"]
        assert target.get("apiVersion", "apps/v1") == "apps/v1" and target.get("kind", "Deployment") == "Deployment"
        container(find("Deployment", target["name"]))
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], where
        for key in ("pollingInterval", "cooldownPeriod"):
            assert isinstance(spec.get(key, 1), int), f"{where}: {key}"
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior:  # passed through to the HPA KEDA creates: validate it with the HPA schema
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                   "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                            "maxReplicas": 2, "behavior": behavior}}
            try:
                import kubernetes_validate
            except ImportError:
                need("the Python package kubernetes-validate", PIP_HINT)
            kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
        triggers = spec["triggers"]
        assert triggers and all(t["type"] == "prometheus" for t in triggers), where
        for trigger in triggers:
            meta = trigger["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), f"{where}: trigger metadata values are strings"
            assert urllib.parse.urlsplit(meta["serverAddress"]).scheme in ("http", "https")
            float(meta["threshold"])
            check_promql(meta["query"], where)
            assert "distributor_queue_depth" in meta["query"]
            assert set(re.findall(r'analyzer="([^"]+)"', meta["query"])) <= analyzer_names


# --- a real Prometheus scraping a real distributor ------------------------------------------------


class Prometheus:
    def __init__(self, binary: str, scrape_target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "distributor", "static_configs": [{"targets": [scrape_target]}]}],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
        with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
            return response.status == 200

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[LocalCluster, Prometheus]]:
    binary = tool("prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
    cluster = LocalCluster(analyzers=(("a1", 1.0),), workers=1)
    prometheus: Prometheus | None = None
    with cluster:
        try:
            prometheus = Prometheus(binary, f"127.0.0.1:{cluster.admin_port}", workdir)
            poll(prometheus.ready, 30, "prometheus /-/ready")
            yield cluster, prometheus
        finally:
            if prometheus is not None:
                prometheus.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def scalar_values(response: dict[str, Any]) -> list[float]:
    assert response["status"] == "success", response
    return [float(sample["value"][1]) for sample in response["data"]["result"]]


def post_packet(cluster: LocalCluster, packet_id: str) -> int:
    body = json.dumps({"emitter_id": "e", "packet_id": packet_id,
                       "messages": [{"timestamp": 1, "level": "INFO", "message": "m"}]}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", cluster.data_port, timeout=5)
    try:
        connection.request("POST", urllib.parse.urlsplit(cluster.ingest_url).path, body,
                           {"Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_prometheus_scrapes_distributor_and_evaluates_alerts(live: tuple[LocalCluster, Prometheus]) -> None:
    cluster, prometheus = live
    accepted = 'distributor_packets_total{outcome="accepted"}'
    # a sample before the packet, so that rate() over the scrapes sees the packet arrive
    poll(lambda: scalar_values(prometheus.query(accepted)) == [0.0], 30, f"{accepted} == 0 scraped")
    assert post_packet(cluster, "p1") == 202
    poll(lambda: scalar_values(prometheus.query(accepted)) == [1.0], 30, f"{accepted} == 1 in Prometheus")
    assert scalar_values(prometheus.query('up{job="distributor"}')) == [1.0]

    # every rule of the repository's alerts.yml is loaded and evaluates without error on real data
    def rules_evaluated() -> list[dict[str, Any]]:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            return rules
        return []

    rules = poll(rules_evaluated, 30, "every alert rule evaluated")
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    errors = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not errors, errors

    # one alert expression through the query API: its ratio is 0 (a packet, no 503), so the alert
    # selects nothing
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    high_503 = exprs["DistributorHigh503Rate"].strip()
    parts = re.fullmatch(r"(.*\))\s*>\s*([0-9.]+)", high_503, flags=re.S)
    assert parts, high_503
    ratio, threshold = parts.groups()
    assert float(threshold) == 0.05
    assert poll(lambda: scalar_values(prometheus.query(ratio)), 30, "503 ratio over real traffic") == [0.0]
    assert scalar_values(prometheus.query(high_503)) == []

    # every dashboard and alert expression parses in Prometheus itself
    for where, expr in dashboard_exprs() + [(f"alert {name}", e) for name, e in exprs.items()]:
        response = prometheus.query(expr.replace("$__rate_interval", "1m"))
        assert response["status"] == "success", f"{where}: {response.get('error')}"


def test_worker_restart_fires_alert(live: tuple[LocalCluster, Prometheus]) -> None:
    cluster, prometheus = live
    restarts = "distributor_worker_restarts_total"
    poll(lambda: scalar_values(prometheus.query(restarts)) == [0.0], 30, f"{restarts} == 0 scraped")
    (worker,) = cluster.admin("/admin/workers")["workers"]
    os.kill(worker["pid"], signal.SIGKILL)  # a worker of the distributor this test started
    poll(lambda: cluster.admin("/admin/workers")["workers"][0]["state"] == "ready"
         and cluster.admin("/admin/workers")["workers"][0]["pid"] != worker["pid"], 30, "worker respawned")
    expr = next(rule["expr"] for rule in alert_rules() if rule["alert"] == "DistributorWorkerRestarted")
    values = poll(lambda: scalar_values(prometheus.query(expr)), 30, "the restart alert expression to select a series")
    assert values and values[0] > 0

    def firing() -> list[dict[str, Any]]:
        alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "DistributorWorkerRestarted"
                and a["state"] == "firing"]

    (alert,) = poll(firing, 30, "DistributorWorkerRestarted firing")
    assert alert["annotations"]["runbook_url"].endswith("#distributorworkerrestarted")
    assert post_packet(cluster, "p2") == 202  # the respawned worker serves


def test_dockerfile_healthcheck_command(make_cluster: Callable[..., LocalCluster]) -> None:
    """The image's HEALTHCHECK command, pointed at a live control plane, then at a closed port."""
    cluster = make_cluster(analyzers=(("a1", 1.0),), workers=1)
    ok = run(healthcheck_argv(cluster.admin_port), timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    down = run(healthcheck_argv(free_port()), timeout=30)
    assert down.returncode != 0
