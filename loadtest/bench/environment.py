"""What was measured where: the machine, the versions of what ran, and the commit (with local changes)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from loadtest import generators
from loadtest.nginx_baseline import nginx_version


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("uvloop", "aiohttp", "orjson", "httptools", "psutil"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["nginx"] = nginx_version()
    found["wrk"] = generators.wrk_version()
    return found


def git_revision() -> dict[str, Any]:
    """The commit measured and whether the tree had local changes (a before/after note needs both)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"commit": head or None, "modified_files": sorted(line[3:] for line in dirty if line.strip())}
    except (OSError, ValueError):
        return {"commit": None, "modified_files": []}
