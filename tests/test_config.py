"""Configuration: precedence, validation, and the CLI's exit 2 with one clear line."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from distributor.config import (
    MAX_ANALYZERS,
    NAME_BYTES,
    URL_BYTES,
    Config,
    ConfigError,
    from_dict,
    load_toml,
    resolve,
)
from distributor.shared_table import NAME_CELLS, URL_CELLS, SharedTable

REPO = Path(__file__).resolve().parent.parent
ONE = {"analyzers": [{"name": "a", "url": "http://127.0.0.1:9001", "weight": 1}]}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distributor", *args], capture_output=True, text=True, timeout=60)


def test_example_file_is_valid_and_matches_defaults() -> None:
    config = load_toml(REPO / "distributor.toml").validate()
    defaults = Config()
    assert [a.name for a in config.analyzers] == ["a1", "a2", "a3", "a4"]
    assert config.analyzers[3].mode == "packet"
    for section in ("ingest", "queue", "sender", "health", "outlier", "overload", "rate_limit"):
        assert getattr(config, section) == getattr(defaults, section), f"[{section}] in distributor.toml"
    assert config.max_worker_memory_mb == defaults.max_worker_memory_mb
    assert config.listen == defaults.listen and config.admin_listen == defaults.admin_listen


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('workers = 3\n[queue]\nmax_packets = 10\nmax_bytes = 2000000\n'
                    '[[analyzers]]\nname = "a"\nurl = "http://127.0.0.1:1"\nweight = 2\n')
    config = resolve(str(path), {"DISTRIBUTOR_QUEUE_MAX_PACKETS": "20", "DISTRIBUTOR_WORKERS": "5"},
                     {"workers": 7}, {})
    assert config.workers == 7
    assert config.queue.max_packets == 20
    assert config.queue.max_bytes == 2_000_000
    assert config.analyzers[0].weight == 2.0


@pytest.mark.parametrize("text,value", [("false", False), ("OFF", False), ("0", False), ("true", True), ("yes", True)])
def test_flags_from_the_environment(text: str, value: bool) -> None:
    config = resolve(None, {"DISTRIBUTOR_OUTLIER_ABORT_INFLIGHT_ON_DOWN": text}, ONE, {})
    assert config.outlier.abort_inflight_on_down is value


def test_round_trip_for_workers() -> None:
    config = resolve(None, {}, ONE, {"sender": {"max_inflight": "9"}})
    assert from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "top,sections,field",
    [
        ({}, {}, "analyzers"),
        ({"analyzers": [{"name": "a", "url": "http://x:1", "weight": 0}]}, {}, "analyzers[0].weight"),
        ({"analyzers": [{"name": "a", "url": "http://x:1", "weight": float("nan")}]}, {}, "analyzers[0].weight"),
        ({"analyzers": [{"name": "a", "url": "http://x:1", "weight": float("inf")}]}, {}, "analyzers[0].weight"),
        ({"analyzers": [{"name": "a", "url": "ftp://x:1", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://x:99999", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://x:1", "weight": 1, "mode": "bulk"}]}, {}, "analyzers[0].mode"),
        ({"analyzers": [{"name": "a", "url": "http://x:1", "weight": 1}] * 2}, {}, "analyzers[1].name"),
        ({"analyzers": [{"name": "a b", "url": "http://x:1", "weight": 1}]}, {}, "analyzers[0].name"),
        ({"analyzers": [{"name": "a", "weight": 1}]}, {}, "analyzers[0].url"),
        ({**ONE, "workers": 0}, {}, "workers"),
        ({**ONE, "listen": "nowhere"}, {}, "listen"),
        (ONE, {"queue": {"max_packets": -1}}, "queue.max_packets"),
        (ONE, {"queue": {"max_bytes": 10}}, "queue.max_bytes"),
        (ONE, {"ingest": {"header_timeout": "soon"}}, "ingest.header_timeout"),
        (ONE, {"sender": {"request_timeout": 0}}, "sender.request_timeout"),
        (ONE, {"sender": {"unknown_key": 1}}, "sender.unknown_key"),
        (ONE, {"outlier": {"abort_inflight_on_down": "maybe"}}, "outlier.abort_inflight_on_down"),
        (ONE, {"outlier": {"abort_inflight_on_down": 1}}, "outlier.abort_inflight_on_down"),
        # what the shared table cannot hold: bytes, not characters
        ({"analyzers": [{"name": "é" * 33, "url": "http://x:1", "weight": 1}]}, {}, "analyzers[0].name"),
        ({"analyzers": [{"name": "a", "url": "http://x:1/" + "p" * (URL_BYTES - 10), "weight": 1}]}, {},
         "analyzers[0].url"),
        ({"analyzers": [{"name": f"a{i}", "url": "http://x:1", "weight": 1} for i in range(MAX_ANALYZERS + 1)]}, {},
         "analyzers"),
        ({"analyzers": [{"name": "a\nb", "url": "http://x:1", "weight": 1}]}, {}, "analyzers[0].name"),
        ({"analyzers": [{"name": "a\x1b[31m", "url": "http://x:1", "weight": 1}]}, {}, "analyzers[0].name"),
        # the stored URL string: no credentials, no control characters or spaces, no other notations of an address
        ({"analyzers": [{"name": "a", "url": "http://user:pass@x:1", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://x:1/\r\nX-Forged: 1", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://x:1\n", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://x:1/a b", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://[::1:1", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://2852039166:80", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://x:0", "weight": 1}]}, {}, "analyzers[0].url"),
        # this distributor's own ports, and cloud metadata
        ({"analyzers": [{"name": "a", "url": "http://127.0.0.1:9091", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://localhost:9091/x", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://127.0.0.1:8080", "weight": 1}]}, {}, "analyzers[0].url"),
        ({**ONE, "admin_listen": "0.0.0.0:7000", "analyzers": [{"name": "a", "url": "http://[::1]:7000", "weight": 1}]},
         {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://169.254.169.254:80", "weight": 1}]}, {}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://[::ffff:169.254.169.254]:80", "weight": 1}]}, {},
         "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://[fe80::1]:80", "weight": 1}]}, {}, "analyzers[0].url"),
        # admin.allowed_analyzer_networks
        (ONE, {"admin": {"allowed_analyzer_networks": ["10.0.0.1/8"]}}, "admin.allowed_analyzer_networks[0]"),
        (ONE, {"admin": {"allowed_analyzer_networks": "10.0.0.0/8,nowhere"}}, "admin.allowed_analyzer_networks[1]"),
        (ONE, {"admin": {"allowed_analyzer_networks": [10]}}, "admin.allowed_analyzer_networks"),
        (ONE, {"admin": {"allowed_analyzer_networks": ["10.0.0.0/8"]}}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://analyzer.internal:1", "weight": 1}]},
         {"admin": {"allowed_analyzer_networks": ["0.0.0.0/0"]}}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://169.254.169.254:80", "weight": 1}]},
         {"admin": {"allowed_analyzer_networks": ["0.0.0.0/0"]}}, "analyzers[0].url"),
        ({"analyzers": [{"name": "a", "url": "http://localhost:1", "weight": 1}]},
         {"admin": {"allowed_analyzer_networks": ["10.0.0.0/8"]}}, "analyzers[0].url"),
        (ONE, {"admin": {"token": 5}}, "admin.token"),
        # rate_limit.overrides must be a table of tables
        (ONE, {"rate_limit": {"overrides": ["agent-17"]}}, "rate_limit.overrides"),
        (ONE, {"rate_limit": {"overrides": "agent-17"}}, "rate_limit.overrides"),
        (ONE, {"rate_limit": {"overrides": {"agent-17": 10}}}, "rate_limit.overrides.agent-17"),
        (ONE, {"rate_limit": {"overrides": {"agent-17": {"rate": 1, "brust": 2}}}}, "rate_limit.overrides.agent-17.brust"),
    ],
)
def test_invalid_config_names_the_field(top: dict, sections: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(None, {}, top, sections)
    assert str(info.value).startswith(field + ":")


@pytest.mark.parametrize(
    "flag,field",
    [
        ("a=http://127.0.0.1:9001@nan", "analyzers[0].weight"),
        ("a=http://127.0.0.1:9001@-1", "analyzers[0].weight"),
        ("a=http://127.0.0.1:9001@heavy", "--analyzer a"),
        ("justaname", "--analyzer"),
    ],
)
def test_serve_exits_2_with_one_line(flag: str, field: str) -> None:
    result = run_cli("serve", "--analyzer", flag, "--admin-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], result.stderr


def test_serve_without_analyzers_exits_2() -> None:
    result = run_cli("serve", "--listen", "127.0.0.1:0")
    assert result.returncode == 2 and "analyzers" in result.stderr


def test_check_config(tmp_path: Path) -> None:
    ok = run_cli("check-config", str(REPO / "distributor.toml"))
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[analyzers]]\nname = "a"\nurl = "http://x:1"\nweight = -2\n')
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2 and "analyzers[0].weight" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("this is = = not toml")
    assert run_cli("check-config", str(broken)).returncode == 2


@pytest.mark.parametrize(
    "analyzer,admin",
    [
        ({"name": "é" * (NAME_BYTES // 2), "url": "http://x:1"}, {}),
        ({"name": "a", "url": "http://x:1/" + "p" * (URL_BYTES - len("http://x:1/"))}, {}),
        ({"name": "a", "url": "http://[::1]:9001"}, {}),
        ({"name": "a", "url": "http://analyzer-1.svc.cluster.local:9001/v1"}, {}),
        ({"name": "a", "url": "http://127.0.0.1:9092"}, {}),
        ({"name": "a", "url": "http://10.1.2.3:80"}, {"allowed_analyzer_networks": ["10.0.0.0/8"]}),
        ({"name": "a", "url": "http://localhost:9001"}, {"allowed_analyzer_networks": ["127.0.0.0/8"]}),
        ({"name": "a", "url": "http://169.254.169.254:80"}, {"allowed_analyzer_networks": ["169.254.169.254/32"]}),
    ],
)
def test_valid_analyzers_are_accepted(analyzer: dict, admin: dict) -> None:
    config = resolve(None, {}, {"analyzers": [{**analyzer, "weight": 1}]}, {"admin": admin})
    assert config.analyzers[0].url == analyzer["url"]


def test_limits_follow_the_shared_table() -> None:
    """config.py cannot import shared_table.py (same layer), so this keeps the two in step."""
    assert (NAME_BYTES, URL_BYTES) == (NAME_CELLS * 8, URL_CELLS * 8)
    assert MAX_ANALYZERS == inspect.signature(SharedTable.create).parameters["max_analyzers"].default


def test_as_many_analyzers_as_the_shared_table_holds() -> None:
    analyzers = [{"name": f"a{i}", "url": f"http://127.0.0.1:{10000 + i}", "weight": 1} for i in range(MAX_ANALYZERS)]
    assert len(resolve(None, {}, {"analyzers": analyzers}, {}).analyzers) == MAX_ANALYZERS


def test_allowed_networks_from_the_environment_round_trip_to_workers() -> None:
    environ = {"DISTRIBUTOR_ADMIN_ALLOWED_ANALYZER_NETWORKS": "127.0.0.0/8, 10.0.0.0/8"}
    config = resolve(None, environ, ONE, {})
    assert config.admin.allowed_analyzer_networks == ("127.0.0.0/8", "10.0.0.0/8")
    assert from_dict(config.to_dict()) == config


LINE = "distributor: invalid configuration: "
GOOD = '[[analyzers]]\nname = "a"\nurl = "http://127.0.0.1:9001"\nweight = 1\n'


@pytest.mark.parametrize(
    "content,field",
    [
        (b'# caf\xe9\n' + GOOD.encode(), "--config"),  # Latin-1
        (b'[rate_limit]\noverrides = ["agent-17"]\n' + GOOD.encode(), "rate_limit.overrides"),
        (b'[rate_limit]\noverrides = "agent-17"\n' + GOOD.encode(), "rate_limit.overrides"),
        (b'[rate_limit.overrides]\n"agent-17" = 10\n' + GOOD.encode(), "rate_limit.overrides.agent-17"),
        (GOOD.replace('"a"', '"' + "é" * 33 + '"').encode(), "analyzers[0].name"),
        ("".join(GOOD.replace('"a"', f'"a{i}"') for i in range(MAX_ANALYZERS + 1)).encode(), "analyzers"),
        (GOOD.replace("http://", "http://user:secret@").encode(), "analyzers[0].url"),
        (GOOD.replace(':9001"', ':9001\\r\\nX: y"').encode(), "analyzers[0].url"),
        (b'admin_listen = "127.0.0.1:9001"\n' + GOOD.encode(), "analyzers[0].url"),
        (GOOD.replace("127.0.0.1", "169.254.169.254").encode(), "analyzers[0].url"),
        (b'[admin]\nallowed_analyzer_networks = ["10.0.0.0/8"]\n' + GOOD.encode(), "analyzers[0].url"),
        (b'[sender]\n"max\\ninflight" = 1\n' + GOOD.encode(), "sender.max\\ninflight"),
    ],
)
def test_check_config_and_serve_reject_what_the_runtime_cannot_hold(tmp_path: Path, content: bytes, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        result = run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith(f"{LINE}{field}: "), (args, lines)


@pytest.mark.parametrize(
    "state,field",
    [
        ("[]", "admin.state_file"),
        ('{"drained": "a1a2"}', "admin.state_file"),
        ('{"weights": {"a": -1}}', "admin.state_file"),
        ('{"added": [{"name": "x\\n\\u001b[31m", "url": "file:///etc/passwd", "weight": 1}]}', "admin.state_file"),
        ('{"removed": ["a"]}', "admin.state_file"),
    ],
)
def test_check_config_and_serve_validate_the_state_file(tmp_path: Path, state: str, field: str) -> None:
    (tmp_path / "state.json").write_text(state)
    path = tmp_path / "c.toml"
    path.write_text(f'[admin]\nstate_file = "{tmp_path / "state.json"}"\n' + GOOD)
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        result = run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith(f"{LINE}{field}: "), (args, lines)


def test_serve_refuses_a_state_file_it_cannot_write(tmp_path: Path) -> None:
    result = run_cli("serve", "--analyzer", "a=http://127.0.0.1:9001", "--listen", "127.0.0.1:0",
                     "--admin-listen", "127.0.0.1:0", "--set", f"admin.state_file={tmp_path / 'missing' / 's.json'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{LINE}admin.state_file: "), lines
