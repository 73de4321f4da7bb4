"""Reloads and admin changes that must never cost the supervisor, a pending removal or a graceful drain.

Regression tests for the review of issues 16/17 (fixed in 48f75a3), each failing on the tree before it:
a SIGHUP of a file the parser cannot take (a non-ASCII digit in a port, nesting 3,000 deep, a FIFO) ended
the supervisor or blocked it; an add or a weight change cancelled a pending removal's drain; one SIGTERM
during a rolling reload made the worker being rolled drop its queue; a reloaded ``worker_timeout`` did not
apply to running workers. Real processes, real signals and a real configuration file (``--config`` only:
command-line flags would win over the file at every reload).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from cluster_helpers import STALL_TOLERANT, ConfigFileCluster, log_lines, log_text, sighup_and_wait, workers
from distributor.control.client import http_json
from distributor.tools.localcluster import LocalCluster, wait_until
from support import Client, packet

TOKEN = "reload-t0ken"
EXIT_CONFIG = 2  # distributor.cli.EXIT_CONFIG
FileClusterFactory = Callable[..., ConfigFileCluster]  # conftest's file_cluster: every setting in one TOML file


def post_packets(port: int, count: int, prefix: str, per_connection: int = 1) -> list[str]:
    """``count`` packets, each answered 202, on a new connection every ``per_connection`` (so the kernel spreads
    them over the workers); returns their ids."""
    ids: list[str] = []
    client = Client(port)
    try:
        for i in range(count):
            if i and i % per_connection == 0:
                client.close()
                client = Client(port)
            packet_id = f"{prefix}-{i}"
            status, _, body = client.post(packet(packet_id=packet_id))
            assert status == 202, (packet_id, status, body)
            ids.append(packet_id)
    finally:
        client.close()
    return ids


def admin_call(cluster: LocalCluster, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """(status, JSON answer) of an admin API call with the token."""
    request = urllib.request.Request(cluster.admin_url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def dropped_at_shutdown(log_text: str) -> int:
    """Packets the workers logged as not delivered by their shutdown deadline."""
    dropped = 0
    for line in log_text.splitlines():
        if line.startswith("{") and '"dropped_shutdown"' in line:
            dropped += int(json.loads(line).get("packets", 0))
    return dropped


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


# --- defect 1: a file the parser cannot take ---------------------------------------------------------------

UNPARSABLE = ["admin-port-superscript-digit", "nested-3000-deep", "fifo"]
# what the rejection names, per variant (the log is JSON: only ASCII is matched)
REJECTION = {"admin-port-superscript-digit": "admin_listen: expected HOST:PORT",
             "nested-3000-deep": "nests tables or arrays too deeply", "fifo": "is not a regular file"}


def make_unparsable(path: Path, good: str, variant: str) -> None:
    """Replace the file at ``path`` (whose good text is ``good``) by the ``variant`` the parser cannot take."""
    if variant == "admin-port-superscript-digit":
        lines = [line if not line.startswith("admin_listen") else 'admin_listen = "127.0.0.1:\u00b2"'
                 for line in good.splitlines()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif variant == "nested-3000-deep":
        path.write_text("x = " + "[" * 3000 + "]" * 3000 + "\n" + good)
    else:
        path.unlink()
        os.mkfifo(path)


def release_fifo_reader(path: Path) -> None:
    """A process blocked opening the FIFO for reading gets an empty file (never blocks this test)."""
    try:
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waits on it (ENXIO), or it is gone


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", UNPARSABLE)
def test_sighup_with_a_file_the_parser_cannot_take_is_rejected_and_serving_goes_on(
    file_cluster: FileClusterFactory, variant: str,
) -> None:
    """Defect 1: the supervisor died (ValueError, RecursionError) and its workers with it, or blocked on a FIFO."""
    cluster = file_cluster(workers=2, settings={"admin.token": TOKEN})
    pids = sorted(w["pid"] for w in workers(cluster))
    good = cluster.config_path.read_text()
    make_unparsable(cluster.config_path, good, variant)
    try:
        line = sighup_and_wait(cluster, "reload rejected")
    finally:
        release_fifo_reader(cluster.config_path)
    assert REJECTION[variant] in line, line
    assert sorted(w["pid"] for w in workers(cluster)) == pids
    assert all(w["state"] == "ready" for w in workers(cluster))
    assert http_json(cluster.admin_url + "/ready")[0] == 200
    post_packets(cluster.data_port, 5, f"after-{variant}")
    # the running configuration is kept, and a good file is taken again
    cluster.config_path.unlink()
    cluster.config_path.write_text(good)
    sighup_and_wait(cluster, "reloaded: ")
    assert sorted(w["pid"] for w in workers(cluster)) == pids


@pytest.mark.parametrize("variant", UNPARSABLE)
def test_check_config_reports_a_file_the_parser_cannot_take_in_one_line(tmp_path: Path, variant: str) -> None:
    """Defect 1: check-config exited 1 with a traceback (or blocked on a FIFO)."""
    path = tmp_path / "distributor.toml"
    good = ('listen = "127.0.0.1:18080"\nadmin_listen = "127.0.0.1:18081"\n'
            '[[analyzers]]\nname = "a1"\nurl = "http://127.0.0.1:9"\nweight = 1.0\n')
    path.write_text(good)
    make_unparsable(path, good, variant)
    try:
        result = subprocess.run([sys.executable, "-m", "distributor", "check-config", str(path)],
                                capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"check-config of a {variant} did not end within 15 s")
    finally:
        release_fifo_reader(path)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, f"check-config printed a traceback:\n{result.stderr[-800:]}"
    assert result.returncode == EXIT_CONFIG, (result.returncode, result.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("distributor: invalid configuration: "), result.stderr
    assert REJECTION[variant] in lines[0], lines[0]


# --- defect 2: a pending removal keeps draining through other admin changes -----------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", ["add", "weight"])
def test_admin_change_during_a_pending_removal_keeps_it_draining(
    make_cluster: Callable[..., LocalCluster], change: str,
) -> None:
    """Defect 2: the add or weight change republished a1 as not draining: it took new packets again and its
    removal never completed."""
    flags = ["--set", f"admin.token={TOKEN}"]
    for key, value in STALL_TOLERANT.items():
        flags += ["--set", f"{key}={value}"]
    cluster = make_cluster(analyzers=(("a1", 1.0), ("a2", 1.0)), workers=1, distributor_args=flags)
    a1 = cluster.analyzer("a1")
    a3 = cluster.start_analyzer("a3")  # not configured: the add variant adds it
    wait_until(lambda: cluster._analyzer_up(a3), 10, "analyzer a3")

    def a1_row() -> dict[str, Any]:
        rows = [a for a in cluster.admin("/admin/analyzers")["analyzers"] if a["name"] == "a1"]
        return rows[0] if rows else {"state": "absent"}

    a1.control(stall=True)  # a1's sends wait: its queue cannot empty, so its removal stays pending
    try:
        accepted = post_packets(cluster.data_port, 20, "before")
        wait_until(lambda: a1_row()["queue_packets"] > 0, 10, "a1 to hold packets")
        assert admin_call(cluster, "DELETE", "/admin/analyzers/a1")[0] == 202
        assert a1_row()["state"] == "draining"
        if change == "add":
            status, body = admin_call(cluster, "POST", "/admin/analyzers", {"name": "a3", "url": a3.url, "weight": 1})
            assert status == 201, body
        else:
            status, body = admin_call(cluster, "PUT", "/admin/analyzers/a2", {"weight": 2})
            assert status == 200, body
        routed = a1_row()["routed_messages"]
        accepted += post_packets(cluster.data_port, 40, "after")
        row = a1_row()
        assert row["state"] == "draining", f"the pending removal of a1 stopped draining after the {change}: {row}"
        assert row["routed_messages"] == routed, \
            f"a1, being removed, took {row['routed_messages'] - routed} new messages after the {change}"
    finally:
        a1.control(stall=False)
    wait_until(lambda: a1_row()["state"] in ("removed", "absent"), 20, "a1's removal to complete once drained")
    cluster.wait_drained()
    received = sorted(pid for proc in cluster.analyzer_procs for _, pid in proc.packet_keys())
    assert received == sorted(accepted)


# --- defect 4: one SIGTERM during a rolling reload ----------------------------------------------------------


@pytest.mark.timeout(90)
def test_sigterm_during_a_rolling_reload_lets_the_worker_being_rolled_flush_its_queue(
    file_cluster: FileClusterFactory,
) -> None:
    """Defect 4: the worker being rolled already had its SIGTERM; the supervisor's stop sent it a second one,
    which a worker takes as 'hurry': it dropped its queue at once instead of flushing it."""
    cluster = file_cluster(workers=2, settings={"admin.token": TOKEN, "graceful_timeout": 30.0, **STALL_TOLERANT,
                                                "ingest.retry_after": 1.0})
    analyzer = cluster.analyzer("a1")
    distributor = cluster.distributor
    assert distributor is not None and distributor.process is not None
    analyzer.control(stall=True)  # every packet waits in its worker's queue
    try:
        accepted = post_packets(cluster.data_port, 40, "roll")
        wait_until(lambda: all(w["queued_packets"] > 0 for w in workers(cluster)), 10, "both workers to hold packets")
        cluster.write({"ingest.retry_after": 2.0})  # a worker setting: the reload rolls worker 0 first
        distributor.signal(signal.SIGHUP)
        wait_until(lambda: [w["state"] for w in workers(cluster)] == ["stopping", "ready"], 15,
                   "the roll to stop worker 0")
        distributor.signal(signal.SIGTERM)  # one operator SIGTERM: a graceful stop for every worker
        wait_until(lambda: all(w["state"] != "ready" for w in workers(cluster)), 15, "every worker stopping")
    finally:
        analyzer.control(stall=False)
    assert distributor.process.wait(60) == 0
    dropped = dropped_at_shutdown(log_text(cluster))
    assert dropped == 0, f"{dropped} packets dropped at shutdown by one SIGTERM with graceful_timeout = 30"
    assert sorted(pid for _, pid in analyzer.packet_keys()) == sorted(accepted)


# --- defect 9: a reloaded worker_timeout applies to running workers -------------------------------------------


@pytest.mark.timeout(60)
def test_reloaded_worker_timeout_applies_to_running_workers_and_is_logged(file_cluster: FileClusterFactory) -> None:
    """Defect 9: the watchdog judged each worker by the worker_timeout it was spawned with (30 s here)."""
    cluster = file_cluster(workers=2, settings={"admin.token": TOKEN, "worker_timeout": 30.0})
    cluster.write({"worker_timeout": 2.0})
    line = sighup_and_wait(cluster, "reloaded: ")
    victim = workers(cluster)[0]["pid"]
    os.kill(victim, signal.SIGSTOP)  # its event loop stops stamping the heartbeat
    try:
        # 2 s of silence and the watchdog's look: well within 12 s; the old 30 s would not be
        replaced = wait_until(lambda: (w := workers(cluster)[0])["state"] == "ready" and w["pid"] != victim and w,
                              12, "the stopped worker to be replaced after the reloaded worker_timeout = 2")
        assert not alive(victim)
    finally:
        if alive(victim):
            os.kill(victim, signal.SIGCONT)
    assert replaced["restarts"] == 1
    assert workers(cluster)[1]["restarts"] == 0
    applied = log_lines(cluster, "reload: applied now")
    assert applied and "worker_timeout" in applied[-1], f"the reload did not log worker_timeout as applied: {line}"
