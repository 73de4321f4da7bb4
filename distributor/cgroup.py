"""The memory limit of the distributor's cgroup (v2 or v1), and how much of it anonymous memory uses.

Anonymous memory is what the kernel cannot reclaim (no swap): when it nears
the limit the OOM killer takes a worker and every packet in its memory. Page
cache (the write-ahead log's files, for one) counts toward the cgroup's usage
too but is reclaimed first, so it is left out of the ratio.

Memory a process frees is not necessarily given back: glibc keeps freed heap
chunks for reuse, so after a worker's queues drain its RSS (and the cgroup's
anonymous memory) can stay at their high-water mark. ``release_free_memory``
hands those pages back.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge number


def _mounted(mountinfo: Path, fstype: str, path: str, wanted: str) -> Path | None:
    """Where the cgroup ``path`` is, with its file ``wanted``, under a mount of ``fstype`` ("cgroup2", or "cgroup"
    with the memory controller), from the mount's root: a container without its own cgroup namespace sees
    /docker/<id> in /proc/self/cgroup and that directory itself mounted on /sys/fs/cgroup/memory. Later mounts
    hide earlier ones on the same point: they are tried first."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if len(fields) < dash + 4 or fields[dash + 1] != fstype:
            continue
        if fstype == "cgroup" and "memory" not in fields[dash + 3].split(","):
            continue
        mount_root, point = fields[3].rstrip("/"), Path(fields[4].replace("\\040", " "))
        if path == mount_root or path.startswith(mount_root + "/"):
            base = point / path[len(mount_root):].lstrip("/")
            if (base / wanted).exists():
                return base
    return None


class CgroupMemory:
    """Reads the limit and anonymous usage of the cgroup this process is in; ``limit`` is None without one."""

    def __init__(self, proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = ROOT,
                 mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
        self.limit: int | None = None
        self._stat: Path | None = None
        self._anon_key = b""
        try:
            lines = proc_cgroup.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            relative = path.lstrip("/")
            if hierarchy == "0" and controllers == "":  # v2 (unified)
                base = root / relative
                if not (base / "memory.max").exists():
                    base = _mounted(mountinfo, "cgroup2", path, "memory.max") or base
                self._adopt_nearest(base, "memory.max", b"anon")
            elif "memory" in controllers.split(","):  # v1
                base = root / "memory" / relative
                if not (base / "memory.limit_in_bytes").exists():
                    base = _mounted(mountinfo, "cgroup", path, "memory.limit_in_bytes") or base
                self._adopt_nearest(base, "memory.limit_in_bytes", b"total_rss")

    def _adopt_nearest(self, base: Path, limit_name: str, anon_key: bytes) -> None:
        """The smallest limit of ``base`` and of its ancestors (as far as the mount shows them), measured against
        the anonymous memory of the cgroup that has it: a limit on a parent (a systemd slice, a pod, a delegated
        subtree) binds the processes below it as much as their own, which is often "max"."""
        for directory in (base, *base.parents):
            if not (directory / limit_name).exists():
                break
            self._adopt(directory / limit_name, directory / "memory.stat", anon_key)

    def _adopt(self, limit_file: Path, stat_file: Path, anon_key: bytes) -> None:
        try:
            text = limit_file.read_text().strip()
        except OSError:
            return
        if text == "max" or not text.isdigit() or int(text) >= UNLIMITED:
            return
        if self.limit is None or int(text) < self.limit:
            self.limit, self._stat, self._anon_key = int(text), stat_file, anon_key

    def anonymous(self) -> int:
        """Bytes of anonymous memory charged to the cgroup now (0 when unknown)."""
        if self._stat is None:
            return 0
        try:
            for line in self._stat.read_bytes().splitlines():
                key, _, value = line.partition(b" ")
                if key == self._anon_key:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0


PRESSURE_HYSTERESIS = 0.05  # pressure ends this far under the watermark (half of it, for a watermark < 0.1)


def under_pressure(ratio: float, watermark: float, pressed: bool) -> bool:
    """Whether memory is under pressure now: above the watermark it starts, and it ends only clearly under it,
    so that a ratio hovering at the watermark does not flap. The margin is never more than half the
    watermark: a low watermark (0.03) would otherwise need a negative ratio to end."""
    if ratio > watermark:
        return True
    if ratio < watermark - min(PRESSURE_HYSTERESIS, watermark / 2):
        return False
    return pressed


def _find_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; other C libraries have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim(0)``); False where that is unknown.

    It blocks for about a millisecond per MiB it releases (plus a few for the walk): call it in steps.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
