"""The admin state file: validated like the configuration, written atomically and durably (real files)."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from distributor.config import MAX_ANALYZERS, AdminConfig, AnalyzerConfig, Config, ConfigError
from distributor.delivery.state_file import AdminState, check_writable, load_state, save_state

RULES = Config().analyzer_rules
A3 = AnalyzerConfig("a3", "http://127.0.0.1:9003", 2.0, "packet")
CONFIGURED = (AnalyzerConfig("a1", "http://127.0.0.1:9001", 1.0), AnalyzerConfig("a2", "http://127.0.0.1:9002", 1.0))


def write(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "state.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_no_path_or_no_file_is_an_empty_state(tmp_path: Path) -> None:
    assert load_state("", RULES) == AdminState()
    assert load_state(str(tmp_path / "absent.json"), RULES) == AdminState()


def test_saved_state_loads_back(tmp_path: Path) -> None:
    state = AdminState()
    state.record_weight("a1", 5.0)
    state.record_drain("a2", True)
    state.record_add(A3)
    state.record_remove("a4")
    path = str(tmp_path / "state.json")
    save_state(path, state)
    assert load_state(path, RULES) == state
    assert json.loads(Path(path).read_text()) == {
        "weights": {"a1": 5.0}, "drained": ["a2"], "removed": ["a4"],
        "added": [{"name": "a3", "url": "http://127.0.0.1:9003", "weight": 2.0, "mode": "packet",
                   "compression": "none"}],
    }


ADDED = {"name": "a3", "url": "http://127.0.0.1:9003", "weight": 1}


@pytest.mark.parametrize(
    "content,field",
    [
        ("[]", "expected a JSON object"),
        ('"weights"', "expected a JSON object"),
        ('{"weights": {}, "servers": []}', "unknown key 'servers'"),
        ('{"weights": [1]}', "weights:"),
        ('{"weights": {"a1": "heavy"}}', "weights.a1:"),
        ('{"weights": {"a1": true}}', "weights.a1:"),
        ('{"weights": {"a1": NaN}}', "weights.a1:"),
        ('{"weights": {"a1": -1}}', "weights.a1:"),
        ('{"weights": {"a1": 0, "a2": 0}}', "weights.a1:"),
        ('{"weights": {"a1": 1e400}}', "weights.a1:"),
        ('{"weights": {"a\\u001b[2J": 1}}', "weights:"),
        ('{"drained": "a1a2"}', "drained: expected a list"),
        ('{"drained": ["a1\\nforged log line"]}', "drained[0]:"),
        ('{"removed": "a1"}', "removed: expected a list"),
        ('{"removed": [7]}', "removed[0]:"),
        ('{"added": {}}', "added: expected a list"),
        ('{"added": ["a3"]}', "added[0]: expected an object"),
        (json.dumps({"added": [{**ADDED, "name": "x\n\x1b[31m"}]}), "added[0].name:"),
        (json.dumps({"added": [{**ADDED, "name": "é" * 33}]}), "added[0].name:"),
        (json.dumps({"added": [{**ADDED, "url": "file:///etc/passwd"}]}), "added[0].url:"),
        (json.dumps({"added": [{**ADDED, "url": "http://user:pw@127.0.0.1:9003"}]}), "added[0].url:"),
        (json.dumps({"added": [{**ADDED, "url": "http://127.0.0.1:9003\r\n"}]}), "added[0].url:"),
        (json.dumps({"added": [{**ADDED, "url": "http://127.0.0.1:9091"}]}), "added[0].url:"),  # the control plane
        (json.dumps({"added": [{**ADDED, "url": "http://169.254.169.254"}]}), "added[0].url:"),
        (json.dumps({"added": [{**ADDED, "weight": "1"}]}), "added[0].weight:"),
        (json.dumps({"added": [{**ADDED, "mode": "bulk"}]}), "added[0].mode:"),
        (json.dumps({"added": [{**ADDED, "extra": 1}]}), "added[0]: unknown key 'extra'"),
        (json.dumps({"added": [{"name": "a3", "weight": 1}]}), "added[0].url: missing"),
        (json.dumps({"added": [ADDED, ADDED]}), "added: 'a3' twice"),
        (b'{"drained": ["caf\xe9"]}', "not UTF-8"),
        ('{"weights": ', "not valid JSON"),
    ],
)
def test_invalid_content_names_the_path_and_the_field(tmp_path: Path, content: str | bytes, field: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_state(path, RULES)
    assert str(info.value).startswith(f"admin.state_file: {path}: {field}"), str(info.value)


def test_allowed_networks_apply_to_added_analyzers(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"added": [{**ADDED, "url": "http://192.168.7.7:9003"}]}))
    assert load_state(path, RULES).added[0].url == "http://192.168.7.7:9003"
    with pytest.raises(ConfigError, match=r"added\[0\]\.url: .*outside admin.allowed_analyzer_networks"):
        load_state(path, Config(admin=AdminConfig(allowed_analyzer_networks=("10.0.0.0/8",))).analyzer_rules)


def test_a_removed_name_is_nowhere_else_even_in_files_written_before_that_rule(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"added": [ADDED], "removed": ["a3"], "drained": ["a3"], "weights": {"a3": 2}}))
    assert load_state(path, RULES) == AdminState(removed={"a3"})


def test_added_then_removed_does_not_come_back_and_added_again_does() -> None:
    state = AdminState()
    state.record_add(A3)
    state.record_weight("a3", 4.0)
    state.record_drain("a3", True)
    state.record_remove("a3")
    assert state == AdminState(removed={"a3"})
    assert "a3" not in state.apply(CONFIGURED)
    state.record_add(A3)
    assert state == AdminState(added=[A3])
    assert state.apply(CONFIGURED)["a3"] == A3


def test_apply_puts_the_changes_on_top_of_the_configuration() -> None:
    state = AdminState()
    state.record_remove("a1")
    state.record_weight("a2", 3.0)
    state.record_add(AnalyzerConfig("a2", "http://127.0.0.1:9999", 1.0))  # the configuration's a2 wins
    state.record_weight("a2", 3.0)
    state.record_drain("a2", True)
    definitions = state.apply(CONFIGURED)
    assert list(definitions) == ["a2"]
    assert definitions["a2"] == AnalyzerConfig("a2", "http://127.0.0.1:9002", 3.0)
    state.record_remove("a2")
    with pytest.raises(ConfigError, match="removes every analyzer"):
        state.apply(CONFIGURED)


def test_apply_keeps_within_the_shared_table() -> None:
    state = AdminState()
    for i in range(MAX_ANALYZERS - 1):
        state.record_add(AnalyzerConfig(f"x{i}", f"http://127.0.0.1:{20000 + i}", 1.0))
    with pytest.raises(ConfigError, match=f"at most {MAX_ANALYZERS}"):
        state.apply(CONFIGURED)


def test_a_change_recorded_on_a_copy_leaves_the_original() -> None:
    state = AdminState()
    changed = copy.deepcopy(state)
    changed.record_add(A3)
    assert state == AdminState()


def test_a_target_named_tmp_is_replaced_not_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.tmp"
    path.write_text("{}")
    before = path.stat().st_ino
    state = AdminState(weights={"a1": 2.0})
    save_state(str(path), state)
    assert path.stat().st_ino != before, "written to a new file, then renamed over the target"
    assert os.listdir(tmp_path) == ["state.tmp"]
    assert load_state(str(path), RULES) == state


def test_the_file_and_its_directory_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    synced: list[tuple[str, bool, str]] = []

    def recording_fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        content = "" if is_dir else Path(f"/proc/self/fd/{fd}").read_text()
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), is_dir, content))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "state.json"
    state = AdminState(drained={"a1"})
    save_state(str(path), state)
    [(temporary, file_is_dir, content), (directory, dir_is_dir, _)] = synced
    assert not file_is_dir and dir_is_dir
    assert Path(temporary).parent == tmp_path and temporary != str(path)
    assert json.loads(content) == state.to_json(), "the complete content is on disk before the rename"
    assert directory == str(tmp_path)
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    save_state(str(path), AdminState(weights={"a1": 2.0}))
    old = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        save_state(str(path), AdminState(weights={"a1": 9.0}))
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot create files in; root ignores modes, so then a read-only sysfs one."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    directory = tmp_path / "ro"
    directory.mkdir(mode=0o555)
    yield directory
    directory.chmod(0o755)


def test_a_read_only_directory_fails_the_save_and_the_start_check(read_only_dir: Path) -> None:
    path = str(read_only_dir / "state.json")
    with pytest.raises(OSError):
        save_state(path, AdminState())
    with pytest.raises(ConfigError, match="admin.state_file: cannot write"):
        check_writable(path)


def test_check_writable(tmp_path: Path) -> None:
    check_writable("")
    check_writable(str(tmp_path / "state.json"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ConfigError, match="cannot write"):
        check_writable(str(tmp_path / "missing" / "state.json"))
    with pytest.raises(ConfigError, match="is a directory"):
        check_writable(str(tmp_path))
