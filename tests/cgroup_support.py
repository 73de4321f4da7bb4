"""A child memory cgroup for a test: created under this process's own memory cgroup, removed at teardown.

``memory_cgroup`` (the fixture) makes one with a memory limit, v2 when this process's cgroup is on the unified
hierarchy with the memory controller and a child can get it, v1 otherwise; it skips, naming the reason, only
when neither can be had (no memory controller, a read-only cgroupfs, a v2 parent that cannot delegate memory).
A process enters it before it allocates anything: ``MemoryCgroup.wrap(argv)`` is ``argv`` behind a shell that
writes its own PID into ``cgroup.procs`` and then ``exec``s ``argv`` (same PID), so a supervisor started that
way and every worker it forks are charged to the cgroup from their first page.

Paths come from ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` at run time (the mount's root is taken
into account, as in a container whose cgroupfs shows only its own subtree). Teardown waits (with a deadline)
for the cgroup's processes to exit, moves any that did not into the parent cgroup, and removes the directory.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

MiB = 1 << 20
SWAP_FILES = {1: "memory.memsw.limit_in_bytes", 2: "memory.swap.max"}


@dataclass(frozen=True)
class Mount:
    root: str  # the cgroup path the mount point shows (field 4 of mountinfo)
    point: Path
    fstype: str
    options: frozenset[str]  # super options: the v1 controllers


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Mount]:
    found = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        dash = fields.index("-")
        fstype = fields[dash + 1]
        if fstype in ("cgroup", "cgroup2"):
            options = frozenset(fields[dash + 3].split(",")) if len(fields) > dash + 3 else frozenset()
            found.append(Mount(fields[3], Path(fields[4].replace("\\040", " ")), fstype, options))
    return found


def own_cgroups(proc_cgroup: Path = Path("/proc/self/cgroup")) -> dict[str, str]:
    """``{"v2": path}`` for the unified line, ``{"memory": path}`` for a v1 hierarchy with the memory controller."""
    found: dict[str, str] = {}
    for line in proc_cgroup.read_text().splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            found["v2"] = path
        elif "memory" in controllers.split(","):
            found["memory"] = path
    return found


def directory(mount: Mount, path: str) -> Path | None:
    """Where the cgroup ``path`` (as /proc/self/cgroup names it) is under ``mount``; None outside the mount."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    return mount.point / path[len(root):].lstrip("/")


class MemoryCgroup:
    """One child memory cgroup: its limit, what it holds, its OOM kills."""

    def __init__(self, path: Path, version: int, mount_point: Path) -> None:
        self.path = path
        self.version = version
        self.mount_point = mount_point  # where its hierarchy is mounted

    @property
    def parent(self) -> Path:
        return self.path.parent

    def _file(self, v1: str, v2: str) -> Path:
        return self.path / (v1 if self.version == 1 else v2)

    def set_limit(self, limit: int) -> None:
        """The memory limit, and the same for memory + swap (v1) or no swap at all (v2): anonymous memory that
        could go to swap would hide an OOM instead of causing one."""
        self._file("memory.limit_in_bytes", "memory.max").write_text(str(limit))
        swap = self.path / SWAP_FILES[self.version]
        if swap.exists():
            swap.write_text(str(limit) if self.version == 1 else "0")

    @property
    def limit(self) -> int:
        text = self._file("memory.limit_in_bytes", "memory.max").read_text().strip()
        return -1 if text == "max" else int(text)

    def procs(self) -> list[int]:
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    def stat(self) -> dict[str, int]:
        values: dict[str, int] = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[key] = int(value)
        return values

    def anonymous(self) -> int:
        """Anonymous memory charged now (what the distributor's ratio is made of)."""
        return self.stat()["total_rss" if self.version == 1 else "anon"]

    def usage(self) -> int:
        return int(self._file("memory.usage_in_bytes", "memory.current").read_text())

    def peak(self) -> int | None:
        """The highest usage so far (None where the kernel does not keep it)."""
        peak = self._file("memory.max_usage_in_bytes", "memory.peak")
        return int(peak.read_text()) if peak.exists() else None

    def oom_kills(self) -> int:
        """Processes of this cgroup the OOM killer took (v1 ``memory.oom_control``, v2 ``memory.events``)."""
        for line in self._file("memory.oom_control", "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise RuntimeError(f"{self.path}: the kernel does not count OOM kills here")

    def limit_hits(self) -> int:
        """How often usage reached the limit (v1 ``memory.failcnt``, v2 ``max`` in ``memory.events``)."""
        if self.version == 1:
            return int((self.path / "memory.failcnt").read_text())
        for line in (self.path / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
        return 0

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the cgroup: the shell moves itself in, then becomes ``argv`` (same PID)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def wrap_as_container(self, argv: list[str]) -> list[str]:
        """``argv`` inside the cgroup *and* in a mount namespace of its own where the cgroup's directory is mounted
        on its hierarchy's mount point: what a container without a cgroup namespace (Docker on cgroup v1) sees,
        /proc/self/cgroup naming a path the mounted filesystem does not show. Needs ``unshare -m`` (root)."""
        script = 'echo $$ > "$0/cgroup.procs" && mount --bind "$0" "$1" && shift && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.path),
                str(self.mount_point), *argv]

    def remove(self, timeout: float = 30.0) -> list[int]:
        """Wait for the processes to leave, move any that stay into the parent, remove the directory; returns the
        PIDs that had to be moved (a leak the caller reports)."""
        deadline = time.monotonic() + timeout
        while self.procs() and time.monotonic() < deadline:
            time.sleep(0.1)
        stayed = self.procs()
        for pid in stayed:
            try:
                (self.parent / "cgroup.procs").write_text(str(pid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:  # it exited meanwhile
                    raise
        while True:
            try:
                self.path.rmdir()
                return stayed
            except OSError as exc:  # EBUSY while the kernel lets the last exited task go
                if exc.errno != errno.EBUSY or time.monotonic() > deadline + 10:
                    raise
                time.sleep(0.1)


def _make_child(parent: Path, version: int, mount_point: Path) -> MemoryCgroup | str:
    """A child of ``parent`` with the memory controller, or why there cannot be one."""
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    child = parent / f"distributor-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        child.mkdir()
    except OSError as exc:
        return f"cannot create {child}: {exc.strerror}"
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    if version == 2 and not (child / limit_file).exists():
        try:  # delegate the controller; refused (EBUSY) while the parent holds processes itself
            (parent / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            child.rmdir()
            return f"cannot enable the memory controller for children of {parent}: {exc.strerror}"
    if not (child / limit_file).exists():
        child.rmdir()
        return f"{child} has no {limit_file}"
    return MemoryCgroup(child, version, mount_point)


def create_memory_cgroup() -> MemoryCgroup | str:
    """A new child of this process's memory cgroup (v2 first, then v1), or the reasons there is none."""
    own = own_cgroups()
    reasons = []
    if "v2" in own:
        for mount in mounts():
            base = directory(mount, own["v2"]) if mount.fstype == "cgroup2" else None
            if base is None:
                continue
            controllers = base / "cgroup.controllers"
            if controllers.exists() and "memory" in controllers.read_text().split():
                made = _make_child(base, 2, mount.point)
                if isinstance(made, MemoryCgroup):
                    return made
                reasons.append(f"v2: {made}")
            else:
                reasons.append(f"v2: no memory controller at {base}")
            break
    if "memory" in own:
        for mount in mounts():
            base = directory(mount, own["memory"]) if mount.fstype == "cgroup" and "memory" in mount.options else None
            if base is None:
                continue
            made = _make_child(base, 1, mount.point)
            if isinstance(made, MemoryCgroup):
                return made
            reasons.append(f"v1: {made}")
            break
        else:
            reasons.append("v1: the memory hierarchy is not mounted")
    return "; ".join(reasons) or "this process is in no memory cgroup"


@pytest.fixture
def memory_cgroup() -> Iterator[MemoryCgroup]:
    """A fresh child memory cgroup (no limit yet: ``set_limit``); removed at teardown."""
    made = create_memory_cgroup()
    if isinstance(made, str):
        pytest.skip(f"no writable memory cgroup: {made}")
    try:
        yield made
    finally:
        stayed = made.remove()
        assert not stayed, f"processes {stayed} were still in {made.path} at teardown (moved to its parent)"
