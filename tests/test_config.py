"""Configuration: precedence, validation, and the CLI's exit 2 with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distributor.config import Config, ConfigError, from_dict, load_toml, resolve

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
