"""``sync = always``: no 202 leaves before the fsync that covers its packet, observed on the real process.

One worker is traced with strace (every thread: the event loop writes, the log's fsync thread syncs) while one
client sends packets strictly one at a time. For every 202 written to the client's socket there must have
been, since the previous 202, a write to the segment file and then an fsync of that file that started after
the write returned and returned before the 202 was sent. The same check on ``sync = none`` must fail: it
proves the check can see a missing fsync.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from distributor.tools.localcluster import wait_until
from wal_e2e_support import Client, Harness, accepted_keys, harness, missing, packet, report, sets

__all__ = ["harness"]  # the fixture, imported for pytest

PACKETS = 40
TRACED = "write,pwrite64,writev,fsync,fdatasync,sendto,sendmsg"
_LINE = re.compile(r"^(\d+)\s+(\d\d):(\d\d):(\d\d\.\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$")
_DURATION = re.compile(r"<(\d+\.\d+)>\s*$")
_FD_PATH = re.compile(r"^\d+<(.*?)>(?:[,)\s]|$)")


@dataclass
class Syscall:
    pid: int
    name: str
    start: float  # seconds of the day, strace's -tt clock
    end: float
    path: str  # what the first argument's descriptor names (-yy): a file path or TCP:[...]
    text: str  # arguments and result as strace printed them


def _seconds(hours: str, minutes: str, seconds: str) -> float:
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def parse_strace(text: str) -> list[Syscall]:
    """Complete calls (with -T's duration) and ``<unfinished ...>`` / ``<... resumed>`` pairs, in start order."""
    calls: list[Syscall] = []
    unfinished: dict[tuple[int, str], tuple[float, str]] = {}
    for line in text.splitlines():
        found = _LINE.match(line)
        if found is None:
            continue
        pid, at, rest = int(found.group(1)), _seconds(*found.group(2, 3, 4)), found.group(5)
        if rest.startswith(("+++", "---")):
            continue
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            name = resumed.group(1)
            if (pid, name) not in unfinished:
                continue  # began before strace attached
            start, head = unfinished.pop((pid, name))
            calls.append(_syscall(pid, name, start, at, head + resumed.group(2)))
            continue
        call = _CALL.match(rest)
        if call is None:
            continue
        name, args = call.group(1), call.group(2)
        if args.endswith("<unfinished ...>"):
            unfinished[(pid, name)] = (at, args[: -len("<unfinished ...>")].rstrip())
            continue
        duration = _DURATION.search(args)
        calls.append(_syscall(pid, name, at, at + (float(duration.group(1)) if duration else 0.0), args))
    return sorted(calls, key=lambda c: c.start)


def _syscall(pid: int, name: str, start: float, end: float, text: str) -> Syscall:
    fd = _FD_PATH.match(text)
    return Syscall(pid, name, start, end, fd.group(1) if fd else "", text)


SENDS = ("write", "writev", "sendto", "sendmsg")
FSYNCS = ("fsync", "fdatasync")


def unfsynced_answers(calls: list[Syscall]) -> tuple[int, list[str]]:
    """(202s sent, the ones not preceded since the previous 202 by a segment write and then an fsync of that
    segment that started after the write returned and returned before the 202 was sent)."""
    answers = [c for c in calls if c.name in SENDS and c.path.startswith("TCP:") and "HTTP/1.1 202" in c.text]
    problems = []
    previous = float("-inf")
    for answer in answers:
        writes = [c for c in calls if c.name in ("write", "writev", "pwrite64") and c.path.endswith(".wal")
                  and previous < c.start and c.end <= answer.start]
        covered = any(f.name in FSYNCS and f.path == w.path and f.start >= w.end and f.end <= answer.start
                      for w in writes for f in calls)
        if not writes:
            problems.append(f"202 at {answer.start:.6f}: no write to a segment since the previous 202")
        elif not covered:
            problems.append(f"202 at {answer.start:.6f}: no fsync of {writes[-1].path} between its write "
                            f"(returned {writes[-1].end:.6f}) and the answer")
        previous = answer.start
    return len(answers), problems


def _strace() -> str:
    found = shutil.which("strace")
    if found:
        return found
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "strace"], capture_output=True, timeout=300, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"strace is not installed and apt-get could not install it: {exc}")
    found = shutil.which("strace")
    if not found:
        pytest.skip("strace is not installed and apt-get did not provide it")
    return found


def _traced_run(harness: Harness, tmp_path: Path, sync: str) -> tuple[int, list[str], int]:
    """One worker with ``wal.sync = sync``, traced while one client sends PACKETS packets one at a time;
    (202s on the wire, problems found, fsyncs of segment files seen)."""
    strace = _strace()
    analyzers = harness.analyzers()
    distributor = harness.distributor(analyzers, tmp_path / f"wal-{sync}", 1, sets(wal__sync=sync))
    distributor.start()
    pid = distributor.workers()[0]["pid"]
    out, err = tmp_path / f"strace-{sync}.txt", tmp_path / f"strace-{sync}.err"
    with open(err, "wb") as errors:
        tracer = subprocess.Popen([strace, "-f", "-tt", "-T", "-yy", "-s", "48", "-e", f"trace={TRACED}",
                                   "-o", str(out), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=errors)
    accepted: set[tuple[str, str]] = set()
    try:
        wait_until(lambda: "attached" in err.read_text() or tracer.poll() is not None, 30, "strace to attach")
        assert tracer.poll() is None, f"strace exited: {err.read_text()}"
        client = Client(distributor.port)
        try:
            for n in range(PACKETS):
                status, _, body = client.post(packet("traced", f"{sync}-{n}"))
                assert status == 202, body
                accepted.add(("traced", f"{sync}-{n}"))
        finally:
            client.close()
    finally:
        if tracer.poll() is None:
            tracer.send_signal(signal.SIGINT)  # detaches from the worker, which carries on
        try:
            tracer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    distributor.wait_delivered()
    lost = missing(accepted, analyzers.keys())
    assert not lost, lost
    calls = parse_strace(out.read_text())
    answers, problems = unfsynced_answers(calls)
    fsyncs = sum(1 for c in calls if c.name in FSYNCS and c.path.endswith(".wal"))
    return answers, problems, fsyncs


@pytest.mark.timeout(120)
def test_sync_always_sends_no_202_before_the_fsync_that_covers_it(harness: Harness, tmp_path: Path) -> None:
    answers, problems, fsyncs = _traced_run(harness, tmp_path, "always")
    assert answers == PACKETS, f"{answers} 202s seen on the wire for {PACKETS} packets"
    assert not problems, "\n".join(problems)
    report("sync=always under strace", {"answers_202": answers, "segment_fsyncs": fsyncs})


@pytest.mark.timeout(120)
def test_the_fsync_check_fails_on_sync_none(harness: Harness, tmp_path: Path) -> None:
    """Negative control: with ``sync = none`` the same trace and check find every 202 without its fsync."""
    answers, problems, fsyncs = _traced_run(harness, tmp_path, "none")
    assert answers == PACKETS
    assert len(problems) == PACKETS, problems
    assert fsyncs == 0
    report("sync=none under strace (negative control)", {"answers_202": answers, "unfsynced_202s": len(problems)})


def test_the_fsync_check_reads_unfinished_and_resumed_calls_and_catches_a_late_fsync() -> None:
    """The parser and the check on a hand-written trace: an fsync that returns after the 202 does not cover it,
    nor does an fsync of another file."""
    segment, acks, sock = "/w/worker-0/0000000000000000.wal", "/w/worker-0/0000000000000000.ack", \
        "TCP:[127.0.0.1:8080->127.0.0.1:40000]"
    trace = "\n".join([
        f'100  10:00:00.000100 write(5<{segment}>, "\\376WR\\377"..., 600) = 600 <0.000010>',
        f"101  10:00:00.000200 fdatasync(5<{segment}> <unfinished ...>",
        "100  10:00:00.000300 +++ a line strace may print +++",
        "101  10:00:00.000900 <... fdatasync resumed>) = 0 <0.000700>",
        f'100  10:00:00.001000 write(9<{sock}>, "HTTP/1.1 202 Accepted\\r\\n"..., 158) = 158 <0.000010>',
        f'100  10:00:00.002000 write(5<{segment}>, "\\376WR\\377"..., 600) = 600 <0.000010>',
        f"101  10:00:00.002100 fdatasync(5<{segment}> <unfinished ...>",
        f'100  10:00:00.002200 write(9<{sock}>, "HTTP/1.1 202 Accepted\\r\\n"..., 158 <unfinished ...>',
        "100  10:00:00.002300 <... write resumed>) = 158 <0.000100>",
        "101  10:00:00.002500 <... fdatasync resumed>) = 0 <0.000400>",
        f'100  10:00:00.003000 write(5<{segment}>, "\\376WR\\377"..., 600) = 600 <0.000010>',
        f"101  10:00:00.003100 fdatasync(7<{acks}>) = 0 <0.000100>",
        f'100  10:00:00.003500 writev(9<{sock}>, [{{iov_base="HTTP/1.1 202 Accepted\\r\\n"...}}], 1) = 158 <0.000010>',
    ])
    calls = parse_strace(trace)
    assert [c.name for c in calls].count("fdatasync") == 3
    answers, problems = unfsynced_answers(calls)
    assert answers == 3
    assert len(problems) == 2 and "10.002200" not in problems[0] and "no fsync" in problems[0], problems
