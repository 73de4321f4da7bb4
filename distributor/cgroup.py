"""The memory limit of the distributor's cgroup (v2 or v1), and how much of it anonymous memory uses.

Anonymous memory is what the kernel cannot reclaim (no swap): when it nears
the limit the OOM killer takes a worker and every packet in its memory. Page
cache (the write-ahead log's files, for one) counts toward the cgroup's usage
too but is reclaimed first, so it is left out of the ratio.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge number


class CgroupMemory:
    """Reads the limit and anonymous usage of the cgroup this process is in; ``limit`` is None without one."""

    def __init__(self, proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = ROOT) -> None:
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
                if (base / "memory.max").exists():
                    self._adopt(base / "memory.max", base / "memory.stat", b"anon")
            elif "memory" in controllers.split(","):  # v1
                base = root / "memory" / relative
                if (base / "memory.limit_in_bytes").exists():
                    self._adopt(base / "memory.limit_in_bytes", base / "memory.stat", b"total_rss")

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
