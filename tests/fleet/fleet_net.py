"""Hosts in network namespaces, joined by veth pairs on one bridge; processes started in them by PID.

Everything lives in namespaces this module creates and deletes: a *switch* namespace holds the
bridge and one end of every veth pair; each host namespace holds the other end (``eth0``, one
address of ``SUBNET``) and its loopback. The root namespace gets no interface, address or route, so
nothing leaks out and two runs can use the same addresses side by side. Names carry a random tag:
``fl<tag>-<host>`` for namespaces, ``v<tag><nn>`` (<= 15 characters) for the switch-side links.

Faults, all undone by ``Topology.heal``:

* ``cut(host)``: the host's switch-side link down (its cable pulled): no packet in or out;
* ``partition(a, b)``: a blackhole route for each other's address in both namespaces, so the two
  hosts cannot talk while each still reaches every other host (no iptables/nft here).

The test process itself stays in the root namespace; ``inside(host)`` moves the calling *thread*
into a host's namespace for the duration of a block (``setns``), so a plain ``http_json`` from the
test reaches addresses that exist only there (including that host's 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from distributor.control.client import http_json
from distributor.tools.localcluster import ManagedProcess

SUBNET = "10.77.0"
# Every process of the fleet runs at this priority: on a machine busy with other work (a shared CI
# runner, other test runs) a starved process misses its health checks, and the balancer or a
# distributor then takes it out with no fault injected. The scenarios test the faults they inject,
# not the machine's load; the processes use well under a core together.
NICE = -10
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(RuntimeError):
    """``ip netns add`` (or a veth or a bridge) is not possible here: not root, no iproute2, a sandbox."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@dataclass
class Host:
    name: str
    ns: str
    address: str
    link: str  # the switch-side end of its veth pair


@dataclass
class Proc(ManagedProcess):
    """A process started in a host's namespace (``ip netns exec`` execs it: the PID is the process's own)."""

    host: str = ""


@dataclass
class Topology:
    hosts: dict[str, Host] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    procs: list[Proc] = field(default_factory=list)
    blackholes: set[tuple[str, str]] = field(default_factory=set)
    down: set[str] = field(default_factory=set)
    created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"fl{self.tag}-sw"

    def create(self, layout: Sequence[tuple[str, int]]) -> "Topology":
        """Hosts ``(name, last octet)`` on one bridge. Raises NetnsUnavailable if namespaces cannot be made."""
        try:
            ip("netns", "add", self.switch)
        except (RuntimeError, OSError) as exc:
            raise NetnsUnavailable(str(exc)) from None
        self.created.append(self.switch)
        try:
            ip("-n", self.switch, "link", "set", "lo", "up")
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except RuntimeError as exc:
            raise NetnsUnavailable(str(exc)) from None
        for index, (name, octet) in enumerate(layout):
            host = Host(name, f"fl{self.tag}-{name}", f"{SUBNET}.{octet}", f"v{self.tag}{index:02d}")
            ip("netns", "add", host.ns)
            self.created.append(host.ns)
            ip("-n", host.ns, "link", "set", "lo", "up")
            ip("-n", self.switch, "link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            ip("-n", self.switch, "link", "set", host.link, "master", "br0", "up")
            ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "up")
            self.hosts[name] = host
        return self

    def destroy(self) -> None:
        """Stop every process started here (by PID), then delete every namespace (the links go with them)."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(timeout=10)
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()

    # --------------------------------------------------------------------- processes

    def start(self, host: str, name: str, argv: Sequence[str], log_path: Path,
              env: dict[str, str] | None = None, cwd: Path | None = None, private_shm: bool = False) -> Proc:
        """Run ``argv`` in ``host``'s namespace. ``private_shm``: with a /dev/shm of its own, as on a host of its own.

        ``ip netns exec`` gives the command a mount namespace of its own (mounts do not propagate back), so
        a tmpfs mounted on /dev/shm there is that host's alone; ``sh`` then execs the command (same PID).
        """
        if private_shm:
            argv = ["sh", "-c", 'mount -t tmpfs -o size=64m,mode=1777 fleet-shm /dev/shm && exec "$@"', "sh", *argv]
        log = open(log_path, "ab")
        try:
            popen = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].ns, "nice", "-n", str(NICE), *argv],
                                     stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, cwd=cwd)
        finally:
            log.close()
        proc = Proc(name, list(argv), log_path, popen, host)
        self.procs.append(proc)
        return proc

    # --------------------------------------------------------------------- the test's own requests

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Run the block with this thread in ``host``'s network namespace (sockets made there stay there)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{self.hosts[host].ns}", os.O_RDONLY)
            try:
                _setns(target)
                try:
                    yield
                finally:
                    _setns(own)
            finally:
                os.close(target)
        finally:
            os.close(own)

    def http_json(self, host: str, url: str, method: str = "GET", body: bytes | None = None,
                  timeout: float = 5.0) -> tuple[int, Any]:
        with self.inside(host):
            return http_json(url, method, body, timeout)

    # --------------------------------------------------------------------- faults

    def cut(self, host: str) -> None:
        ip("-n", self.switch, "link", "set", self.hosts[host].link, "down")
        self.down.add(host)

    def reconnect(self, host: str) -> None:
        ip("-n", self.switch, "link", "set", self.hosts[host].link, "up")
        self.down.discard(host)

    def partition(self, a: str, b: str) -> None:
        for here, there in ((a, b), (b, a)):
            ip("-n", self.hosts[here].ns, "route", "add", "blackhole", f"{self.hosts[there].address}/32")
            self.blackholes.add((here, there))

    def unpartition(self, a: str, b: str) -> None:
        for here, there in ((a, b), (b, a)):
            if (here, there) in self.blackholes:
                ip("-n", self.hosts[here].ns, "route", "del", "blackhole", f"{self.hosts[there].address}/32",
                   check=False)
                self.blackholes.discard((here, there))

    def heal(self) -> None:
        for host in list(self.down):
            self.reconnect(host)
        for here, there in list(self.blackholes):
            self.unpartition(here, there)
