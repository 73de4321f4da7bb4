"""Deploy and observability artefacts: deploy/, docs/runbook.md.

* promtool checks the alert rules and the Prometheus config, and runs the alert unit tests
  (deploy/prometheus/alerts_test.yml).
* A real Prometheus on 127.0.0.1 scrapes a real distributor (write-ahead log on, as in compose and
  Kubernetes) every second with the repository's alerts.yml loaded: every rule evaluates without
  error, every dashboard and alert expression parses, every distributor_wal_* name they use is
  exported, a packet shows up in distributor_packets_total and goes through the log, no WAL alert
  selects anything on a healthy log, and killing a worker fires DistributorWorkerRestarted.
* Every Kubernetes manifest validates offline against the bundled Kubernetes schemas
  (kubernetes-validate); the KEDA ScaledObject, the compose file, the Dockerfile, Grafana's
  provisioning and the dashboard are checked structurally, and against each other: the WAL volume
  (compose named volume, StatefulSet PersistentVolumeClaim) is mounted where the configuration's
  wal.dir points, and the claim is sized for workers x wal.max_bytes.

* HAProxy (deploy/haproxy/haproxy.cfg and its Kubernetes twin deploy/k8s/haproxy.yaml): ``haproxy -c``
  validates both; they shard by ``X-Emitter-Id`` with consistent hashing, check the data port's
  /healthz, observe layer 7, and differ only in their server lines (tests/fleet runs the file for real).

Tools: Debian's ``prometheus`` and ``haproxy`` packages (promtool, prometheus, haproxy); PyPI
``kubernetes-validate`` and ``pyyaml``. Outside CI a missing tool skips its tests; with ``CI`` set it fails them.
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
    "distributor_cgroup_memory_limit_bytes", "distributor_cgroup_memory_ratio", "distributor_memory_pressure",
}
HISTOGRAMS = {"distributor_ingest_latency_seconds"}
# The write-ahead log's families (labelled {worker}; the histogram has no labels), exported only while
# wal.dir is set. test_wal_metrics_are_exported compares this list with a real scrape, both ways.
WAL_COUNTERS = {
    "distributor_wal_replayed_packets", "distributor_wal_possible_duplicates", "distributor_wal_corrupt_records",
    "distributor_wal_torn_tails", "distributor_wal_damaged_acks", "distributor_wal_write_errors",
    "distributor_wal_set_aside", "distributor_wal_appended_packets", "distributor_wal_bytes_written",
    "distributor_wal_fsyncs",
}
WAL_GAUGES = {
    "distributor_wal_bytes", "distributor_wal_own_bytes", "distributor_wal_max_bytes", "distributor_wal_segments",
    "distributor_wal_unacked_packets", "distributor_wal_unacked_messages",
    "distributor_wal_oldest_unacked_age_seconds", "distributor_wal_replay_remaining_bytes",
    "distributor_wal_orphan_slots",
    "distributor_wal_available",
}
WAL_HISTOGRAMS = {"distributor_wal_fsync_seconds"}
COUNTERS |= WAL_COUNTERS
GAUGES |= WAL_GAUGES
HISTOGRAMS |= WAL_HISTOGRAMS
WAL_METRIC_NAMES = (
    {f"{name}_total" for name in WAL_COUNTERS}
    | WAL_GAUGES
    | {f"{name}{suffix}" for name in WAL_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
METRIC_NAMES = (
    {f"{name}_total" for name in COUNTERS}
    | GAUGES
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
LABEL_VALUES = {
    "outcome": {"accepted", "invalid", "unavailable", "shed", "loop_lag", "rate_limited", "wal_unavailable", "routed",
                "delivered", "rejected", "dropped_shutdown", "lost_worker_crash"},
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


WAL_ALERTS = {
    "DistributorWalUnavailable", "DistributorWalNearFull", "DistributorWalOldestUnackedHigh",
    "DistributorWalWriteErrors", "DistributorWalCorruption", "DistributorWalLongReplay", "DistributorWalFsyncSlow",
}


def alert_exprs() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


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
    } | WAL_ALERTS <= names
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
    # the write-ahead log
    wal = {name: by_name[name] for name in WAL_ALERTS}
    assert wal["DistributorWalUnavailable"]["for"] == "1m"
    assert wal["DistributorWalUnavailable"]["labels"]["severity"] == "critical"
    assert re.fullmatch(r"\s*distributor_wal_available\s*==\s*0\s*", wal["DistributorWalUnavailable"]["expr"])
    near_full = wal["DistributorWalNearFull"]["expr"]
    assert "distributor_wal_own_bytes" in near_full and "distributor_wal_max_bytes > 0" in near_full
    assert float(re.findall(r">\s*([0-9.]+)\s*$", near_full.strip())[0]) == 0.8
    assert "distributor_wal_oldest_unacked_age_seconds > 600" in wal["DistributorWalOldestUnackedHigh"]["expr"]
    for name, counters in (("DistributorWalWriteErrors", ["distributor_wal_write_errors_total"]),
                           ("DistributorWalCorruption", ["distributor_wal_corrupt_records_total",
                                                         "distributor_wal_set_aside_total"])):
        expr = wal[name]["expr"]
        for counter in counters:  # counted while running, and before the series' first scrape
            assert f"increase({counter}[10m]) > 0" in expr, name
            assert f"({counter} > 0 unless {counter} offset 10m)" in expr, name
        # what every crash leaves (repaired by the log itself) is not corruption
        assert "torn_tails" not in expr and "damaged_acks" not in expr, name
    assert wal["DistributorWalLongReplay"]["for"] == "10m"
    assert "distributor_wal_replay_remaining_bytes > 0" in wal["DistributorWalLongReplay"]["expr"]
    fsync = wal["DistributorWalFsyncSlow"]
    assert fsync["for"] == "10m"
    assert "histogram_quantile(0.99" in fsync["expr"] and "distributor_wal_fsync_seconds_bucket" in fsync["expr"]
    assert fsync["expr"].strip().endswith("> 0.5")


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
        # the write-ahead log row
        "distributor_wal_available", "distributor_wal_bytes", "distributor_wal_max_bytes",
        "distributor_wal_unacked_packets", "distributor_wal_oldest_unacked_age_seconds",
        "distributor_wal_fsync_seconds_bucket", "distributor_wal_write_errors_total",
        "distributor_wal_corrupt_records_total", "distributor_wal_set_aside_total",
        "distributor_wal_replayed_packets_total", "distributor_wal_replay_remaining_bytes",
    ):
        assert required in used, f"the dashboard shows nothing of {required}"
    assert any("histogram_quantile(0.99" in expr for _, expr in exprs)
    fsync_exprs = [expr for _, expr in exprs if "distributor_wal_fsync_seconds_bucket" in expr]
    assert any("histogram_quantile(0.99," in expr for expr in fsync_exprs), "fsync p99"
    assert any("histogram_quantile(0.5," in expr for expr in fsync_exprs), "fsync p50"
    assert any(p["type"] == "row" and p["title"] == "Write-ahead log" for p in dashboard["panels"])
    grid = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    assert all(0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0 and g["y"] >= 0 for _, g in grid)
    for i, (title_a, a) in enumerate(grid):  # no two panels share a grid cell
        for title_b, b in grid[i + 1:]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"panels {title_a!r} and {title_b!r} overlap: {a} {b}"
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
    assert f"write-ahead log {config['wal']['dir']}: clean" in result.stdout  # check-config verified wal.dir


WAL_SYNC_MODES = ("none", "interval", "always")


def check_wal_config(config: dict[str, Any], where: str) -> str:
    """The WAL is on, in an absolute directory, with a valid sync mode; returns wal.dir."""
    wal = config.get("wal", {})
    directory = wal.get("dir", "")
    assert directory, f"{where}: the write-ahead log is off ([wal] dir is empty)"
    assert directory.startswith("/") and not directory.endswith("/"), f"{where}: wal.dir {directory!r}"
    assert wal.get("sync", "interval") in WAL_SYNC_MODES, f"{where}: wal.sync {wal.get('sync')!r}"
    return str(directory)


def test_compose_wal_volume() -> None:
    """The compose config turns the WAL on, and its directory is a named volume (it survives the container)."""
    spec = compose()
    config = tomllib.loads((DEPLOY / "distributor.compose.toml").read_text())
    wal_dir = check_wal_config(config, "distributor.compose.toml")
    mounts = [str(v).split(":") for v in spec["services"]["distributor"]["volumes"]]
    (mount,) = [m for m in mounts if m[1] == wal_dir]
    source = mount[0]
    assert not source.startswith((".", "/")), f"the WAL at {wal_dir} must be a named volume, not {source}"
    assert source in (spec.get("volumes") or {}), f"named volume {source} is not declared"
    assert "ro" not in mount[2:], "the WAL volume must be writable"
    # only the distributor writes it (two processes on one directory would fight over the slot locks)
    for name, service in spec["services"].items():
        if name != "distributor":
            assert all(str(v).split(":")[0] != source for v in service.get("volumes", [])), name
    # the image prepares the mount point for the non-root user, so a new named volume is writable
    final = dockerfile_instructions()
    final = final[max(i for i, (op, _) in enumerate(final) if op == "FROM"):]
    user = [arg for op, arg in final if op == "USER"][-1]
    runs = " ".join(arg for op, arg in final if op == "RUN")
    assert re.search(rf"mkdir -p [^&]*{re.escape(wal_dir)}(\s|$)", runs), f"the image does not create {wal_dir}"
    assert re.search(rf"chown {re.escape(user)} {re.escape(wal_dir)}(\s|$)", runs), \
        f"{wal_dir} must belong to the runtime user {user}"
    assert not any(op == "VOLUME" for op, _ in final), "no VOLUME: it makes an anonymous volume per container"


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
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for op, arg in instructions:
        if op == "COPY" and "--from" not in arg:
            *sources, _ = shlex.split(arg)
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
                assert f"!{source}" in ignore or f"!{source}/**" in ignore, \
                    f"COPY source {source} is left out of the build context by Dockerfile.dockerignore"


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
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "ScaledObject"} <= kinds


WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port)


def test_k8s_distributor_statefulset() -> None:
    statefulset = find("StatefulSet", "distributor")
    assert not [d for _, d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "distributor"]
    pod = statefulset["spec"]["template"]["spec"]
    c = container(statefulset)
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


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity (4Gi, 5G, 1073741824) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity))
    assert match, f"unsupported quantity {quantity!r}"
    factor = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
              "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2)]
    return int(float(match.group(1)) * factor)


def cpu_count(quantity: str | int) -> int:
    """limits.cpu as the Downward API gives it with divisor 1: rounded up (1500m -> 2)."""
    text = str(quantity)
    return -(-int(text[:-1]) // 1000) if text.endswith("m") else -(-int(float(text) * 1000) // 1000)


def test_k8s_statefulset_wal_volume() -> None:
    """Each pod's write-ahead log is a PersistentVolumeClaim mounted where the ConfigMap's wal.dir points."""
    statefulset = find("StatefulSet", "distributor")
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    c = container(statefulset)
    config = tomllib.loads(find("ConfigMap", "distributor-config")["data"]["distributor.toml"])
    wal_dir = check_wal_config(config, "ConfigMap distributor-config")
    # the claim template, mounted read-write at wal.dir
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == wal_dir]
    assert not mount.get("readOnly", False) and not mount.get("subPath")
    claims = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
    assert mount["name"] in claims, f"{wal_dir} is mounted from {mount['name']}, not from a volumeClaimTemplate"
    assert mount["name"] not in {v["name"] for v in pod.get("volumes", [])}, "a pod volume would shadow the claim"
    claim = claims[mount["name"]]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"], "one pod, one log: never shared between pods"
    assert claim.get("volumeMode", "Filesystem") == "Filesystem"
    # sized for every worker's wal.max_bytes, with headroom for what max_bytes does not count
    workers = cpu_count(c["resources"]["limits"]["cpu"])
    max_bytes = int(config["wal"].get("max_bytes", 1 << 30))
    storage = quantity_bytes(claim["resources"]["requests"]["storage"])
    assert storage >= 1.25 * workers * max_bytes, (
        f"claim {claim['resources']['requests']['storage']} < 1.25 x {workers} workers x wal.max_bytes {max_bytes}")
    assert max_bytes >= 2 * int(config["wal"].get("segment_bytes", 64 << 20))
    # the non-root user can write the volume: the pod's fsGroup owns it
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security.get("runAsUser", 0) != 0
    assert security.get("fsGroup") == security.get("runAsGroup"), "fsGroup makes the volume writable for the user"
    assert security.get("fsGroupChangePolicy") == "OnRootMismatch", "no recursive chown of the log at every start"
    # the claims outlive pods, scale-downs and the StatefulSet itself: they hold packets answered 202
    retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
    assert retention.get("whenDeleted", "Retain") == "Retain" and retention.get("whenScaled", "Retain") == "Retain"
    # the governing Service is headless and selects these pods
    service = find("Service", spec["serviceName"])
    assert service["spec"].get("clusterIP") == "None", f"Service {spec['serviceName']} must be headless"
    assert selects(service["spec"]["selector"], statefulset)
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec.get("podManagementPolicy") == "Parallel"
    assert spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"


def test_k8s_configmap_is_a_valid_distributor_config(tmp_path: Path) -> None:
    config_file = tmp_path / "distributor.toml"
    config_file.write_text(find("ConfigMap", "distributor-config")["data"]["distributor.toml"])
    result = run([sys.executable, "-m", "distributor", "check-config", str(config_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_services_pdb_and_analyzers_line_up() -> None:
    docs = [doc for _, doc in k8s_docs()]
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    deployments = [d for d in workloads if d["kind"] == "Deployment"]
    for service in (d for d in docs if d["kind"] == "Service"):
        targets = [d for d in workloads if selects(service["spec"]["selector"], d)]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        for port in service["spec"]["ports"]:
            port_number(container(targets[0]), port["targetPort"])  # raises if the named port is missing
    statefulset = find("StatefulSet", "distributor")
    assert {s["metadata"]["name"] for s in docs if s["kind"] == "Service"
            and selects(s["spec"]["selector"], statefulset)} == {"distributor", "distributor-admin",
                                                                  "distributor-headless"}
    pdb = find("PodDisruptionBudget", "distributor")
    assert pdb["spec"]["selector"]["matchLabels"] == statefulset["spec"]["selector"]["matchLabels"]
    assert [(d["kind"], d["metadata"]["name"]) for d in workloads
            if selects(pdb["spec"]["selector"]["matchLabels"], d)] == [("StatefulSet", "distributor")]
    assert statefulset["spec"]["replicas"] > pdb["spec"].get("maxUnavailable", 0)
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
    """A distributor with the write-ahead log on (as compose and Kubernetes run it), scraped every second."""
    binary = tool("prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
    cluster = LocalCluster(analyzers=(("a1", 1.0),), workers=1,
                           distributor_args=["--set", f"wal.dir={workdir / 'wal'}"])
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


def scraped_names(prometheus: Prometheus) -> set[str]:
    response = prometheus.get("/api/v1/label/__name__/values", **{"match[]": '{job="distributor"}'})
    assert response["status"] == "success", response
    return set(response["data"])


def test_wal_metrics_are_exported(live: tuple[LocalCluster, Prometheus]) -> None:
    """Every distributor_wal_* name the alerts and the dashboard use comes from a real distributor with the WAL on."""
    _, prometheus = live
    used = set().union(*(promql_metric_names(expr) for _, expr in dashboard_exprs() + alert_exprs()))
    wal_used = {name for name in used if name.startswith("distributor_wal_")}
    assert {"distributor_wal_available", "distributor_wal_bytes", "distributor_wal_max_bytes",
            "distributor_wal_oldest_unacked_age_seconds", "distributor_wal_replay_remaining_bytes",
            "distributor_wal_write_errors_total", "distributor_wal_corrupt_records_total",
            "distributor_wal_set_aside_total", "distributor_wal_fsync_seconds_bucket"} <= wal_used
    names = poll(lambda: (found := scraped_names(prometheus)) >= {"distributor_wal_available"} and found, 30,
                 "distributor_wal_* series in Prometheus")
    missing = wal_used - names
    assert not missing, f"used in alerts/dashboard but not exported by a distributor with the WAL on: {sorted(missing)}"
    exported = {name for name in names if name.startswith("distributor_wal_")}
    assert exported == WAL_METRIC_NAMES, (
        f"update WAL_* in this file: not exported {sorted(WAL_METRIC_NAMES - exported)}, "
        f"unknown here {sorted(exported - WAL_METRIC_NAMES)}")
    assert scalar_values(prometheus.query('distributor_packets_total{outcome="wal_unavailable"}')) == [0.0]
    # one series per worker slot (workers=1: slot 0), the fsync histogram without labels of its own
    for name in WAL_GAUGES | {f"{c}_total" for c in WAL_COUNTERS}:
        series = prometheus.query(name)["data"]["result"]
        assert [s["metric"].get("worker") for s in series] == ["0"], f"{name}: {series}"
    assert scalar_values(prometheus.query("distributor_wal_max_bytes")) == [float(1 << 30)]  # wal.max_bytes default


def test_wal_healthy_log_is_quiet(live: tuple[LocalCluster, Prometheus]) -> None:
    """A packet goes through the log and is acknowledged; on a healthy log no WAL alert selects anything."""
    cluster, prometheus = live
    appended = "sum(distributor_wal_appended_packets_total)"
    before = poll(lambda: scalar_values(prometheus.query(appended)), 30, f"{appended} scraped")[0]
    assert post_packet(cluster, "wal-1") == 202
    poll(lambda: scalar_values(prometheus.query(appended)) == [before + 1], 30, "the packet appended to the log")
    # delivered (a 2xx from a1) -> acknowledged -> no longer in the log
    poll(lambda: scalar_values(prometheus.query("distributor_wal_unacked_packets")) == [0.0], 30,
         "the packet acknowledged in the log")
    assert scalar_values(prometheus.query("distributor_wal_available")) == [1.0]
    for name, expr in alert_exprs():
        if "distributor_wal_" in expr:
            assert scalar_values(prometheus.query(expr)) == [], f"{name} selects series on a healthy log"


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


# --- HAProxy: sharding by emitter (deploy/haproxy, deploy/k8s/haproxy.yaml) ------------------------

HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
HAPROXY_HINT = "apt-get install -y --no-install-recommends haproxy"


def haproxy_binary() -> str:
    path = shutil.which("haproxy")
    if path is None:
        need("`haproxy` (Debian package haproxy)", HAPROXY_HINT)
    return path  # type: ignore[return-value]


def haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    return run([haproxy_binary(), "-c", "-f", str(path)])


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """'global' / 'defaults' / 'frontend NAME' / 'backend NAME' / 'resolvers NAME' -> its directive lines."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip() if not raw.lstrip().startswith("log-format") else raw.rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            assert current is not None, f"a directive outside any section: {raw!r}"
            current.append(" ".join(line.split()))
    return sections


def directive(lines: list[str], keyword: str) -> list[str]:
    return [line for line in lines if line.split()[0] == keyword]


def default_server_settings(line: str) -> dict[str, str]:
    words = line.split()[1:]
    flags = {"check"}
    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        if words[i] in flags:
            settings[words[i]] = ""
            i += 1
        else:
            settings[words[i]] = words[i + 1]
            i += 2
    return settings


def seconds(value: str) -> float:
    return float(value[:-2]) / 1000 if value.endswith("ms") else float(value.rstrip("s"))


def test_haproxy_config_is_valid() -> None:
    result = haproxy_check(HAPROXY_CFG)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Configuration file is valid" in output and "WARNING" not in output, output


def test_haproxy_config_shards_by_emitter_with_health_checks() -> None:
    """Consistent hashing on X-Emitter-Id (round robin without it), checks on /healthz, layer 7 observation."""
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    backend = sections["backend distributors"]
    assert directive(backend, "balance") == ["balance hdr(X-Emitter-Id)"]  # roundrobin when the header is absent
    assert directive(backend, "hash-type") == ["hash-type consistent"]  # only a lost server's emitters move
    text = HAPROXY_CFG.read_text()
    for moving in ("hash-balance-factor", "slowstart", "prefer-last-server"):  # each would move emitters
        assert moving not in "\n".join(line for lines in sections.values() for line in lines), moving
    assert "option httpchk" in backend
    (send,) = directive(backend, "http-check")[:1]
    assert re.search(r"\bmeth GET uri /healthz\b", send), send  # the data port's health endpoint
    assert "http-check expect status 200" in backend
    (default_server,) = directive(backend, "default-server")
    settings = default_server_settings(default_server)
    assert "check" in settings and settings["observe"] == "layer7"
    assert seconds(settings["inter"]) <= 2 and seconds(settings["fastinter"]) < seconds(settings["inter"])
    assert 2 <= int(settings["fall"]) <= 3 and 2 <= int(settings["rise"]) <= 5
    # an overloaded distributor answers 503 + Retry-After and passes its checks: errors on live traffic
    # may speed the checks up, never count as failed checks (fail-check, sudden-death, mark-down would)
    assert settings.get("on-error") == "fastinter", "overload (503s) must not take servers out one after the other"
    assert settings["on-marked-down"] == "shutdown-sessions"
    # servers: the distributors' data port, explicit unique ids (the hash tree is built from them)
    listen_port = int(tomllib.loads((REPO / "distributor.toml").read_text())["listen"].rsplit(":", 1)[1])
    servers = [line.split() for line in directive(backend, "server")]
    assert len(servers) >= 2
    assert all(int(words[2].rsplit(":", 1)[1]) == listen_port for words in servers)
    ids = [words[words.index("id") + 1] for words in servers]
    assert len(set(ids)) == len(ids) == len(servers)
    assert len({words[1] for words in servers}) == len(servers)
    # timeouts and retries of connection failures only
    defaults = sections["defaults"]
    for name in ("connect", "client", "server", "http-request", "check"):
        assert any(d.startswith(f"timeout {name} ") for d in defaults), f"no timeout {name}"
    keep_alive = next(d for d in defaults if d.startswith("timeout http-keep-alive "))
    idle = tomllib.loads((REPO / "distributor.toml").read_text()).get("ingest", {}).get("idle_timeout", 75.0)
    assert seconds(keep_alive.split()[-1]) < idle, "HAProxy must close idle connections before the distributor does"
    assert "option redispatch 1" in defaults and not directive(defaults, "retry-on")
    frontend = sections["frontend ingest"]
    assert "default_backend distributors" in frontend
    assert "capture request header X-Emitter-Id len 64" in frontend
    assert "emitter=%[capture.req.hdr(0)]" in text and "%b/%s" in text


def resolvable_copy(text: str, tmp_path: Path) -> Path:
    """The config as written, unless this machine has no name server for parse-resolv-conf to read."""
    resolv = Path("/etc/resolv.conf")
    has_nameserver = resolv.exists() and re.search(r"^\s*nameserver\s", resolv.read_text(), flags=re.M)
    if not has_nameserver:
        text = text.replace("parse-resolv-conf", "nameserver test 127.0.0.1:53")
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return path


def test_k8s_haproxy_matches_the_standalone_config(tmp_path: Path) -> None:
    """deploy/k8s/haproxy.yaml: valid for haproxy -c, the same lines as deploy/haproxy/haproxy.cfg except the
    servers (the StatefulSet's pods by DNS name) and the stats bind, and wired to its Deployment and Service."""
    text = find("ConfigMap", "haproxy-config")["data"]["haproxy.cfg"]
    result = haproxy_check(resolvable_copy(text, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    k8s, standalone = haproxy_sections(text), haproxy_sections(HAPROXY_CFG.read_text())
    assert k8s["defaults"] == standalone["defaults"]
    assert k8s["frontend ingest"] == standalone["frontend ingest"]
    backend, reference = k8s["backend distributors"], standalone["backend distributors"]
    assert [d for d in backend if not d.startswith(("server ", "default-server "))] == \
        [d for d in reference if not d.startswith(("server ", "default-server "))]
    (default_server,) = directive(backend, "default-server")
    (reference_default,) = directive(reference, "default-server")
    assert default_server.startswith(reference_default + " "), "same check settings, plus the resolvers"
    assert "resolvers kube" in default_server and "init-addr none" in default_server
    assert "resolvers kube" in k8s
    # one server per StatefulSet ordinal, by its name under the headless Service, on the data port
    statefulset = find("StatefulSet", "distributor")
    config = tomllib.loads(find("ConfigMap", "distributor-config")["data"]["distributor.toml"])
    port = int(config["listen"].rsplit(":", 1)[1])
    servers = [line.split() for line in directive(backend, "server")]
    assert len(servers) >= statefulset["spec"]["replicas"]
    for ordinal, words in enumerate(servers):
        host, server_port = words[2].rsplit(":", 1)
        assert host.startswith(f"distributor-{ordinal}.{statefulset['spec']['serviceName']}."), host
        assert int(server_port) == port and words[words.index("id") + 1] == str(ordinal + 1)
    # the Deployment reads the ConfigMap where it is mounted; the Service and the probes use its ports
    deployment = find("Deployment", "haproxy")
    c = container(deployment)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == "haproxy-config"
    assert c["args"][c["args"].index("-f") + 1] == f"{mount['mountPath']}/haproxy.cfg"
    assert directive(k8s["frontend ingest"], "bind") == [f"bind :{port_number(c, 'http')}"]
    assert directive(k8s["frontend stats"], "bind") == [f"bind :{port_number(c, c['readinessProbe']['httpGet']['port'])}"]
    assert c["readinessProbe"]["httpGet"]["path"] in [d.split()[1] for d in directive(k8s["frontend stats"],
                                                                                        "monitor-uri")]
    socket_dir = directive(k8s["global"], "stats")[0].split()[2].rsplit("/", 1)[0]
    assert any(m["mountPath"] == socket_dir for m in c["volumeMounts"]), "the runtime socket needs a writable dir"
    service = find("Service", "distributor-sharded")
    assert selects(service["spec"]["selector"], deployment)
    assert [port_number(c, p["targetPort"]) for p in service["spec"]["ports"]] == [port_number(c, "http")]
