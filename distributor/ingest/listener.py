"""The data port's sockets: every worker's SO_REUSEPORT listener, and the supervisor's claim on the port.

SO_REUSEPORT lets every worker bind the same address, and the kernel spreads
connections over their listeners. It also lets a *second* distributor bind it
by mistake (same user), and then the two silently split the traffic between
their analyzer sets. ``claim_port`` refuses that, twice over: an exclusive
``flock`` on a lock file named after the port, held for the supervisor's life
(it covers two instances starting at the same moment, and the moments when
none of an instance's workers listens, e.g. while one is respawned); and a
probe bound without SO_REUSEPORT, which fails while any other process listens
on the port (another distributor in a container that does not share the lock
directory, or any other program). A deliberate second instance (a blue-green
switch on one host) sets ``allow_shared_port``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from distributor.config import Address


class PortInUse(OSError):
    """Another process already listens on the data port."""


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)


def bind_reuseport(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening socket on the data port that every worker can bind (SO_REUSEPORT)."""
    sock = _socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


LOCK_DIR = Path("/dev/shm")  # where the shared-memory segments live too: shared by every process of the host


class PortClaim:
    """Held for the supervisor's life; ``close`` releases the port for the next instance."""

    def __init__(self, lock_fd: int) -> None:
        self._lock_fd = lock_fd

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def claim_port(address: Address, allow_shared: bool) -> PortClaim:
    """Refuse to start on a port another distributor or program holds, unless allowed. Raises PortInUse."""
    if allow_shared:
        return PortClaim(-1)
    fd = os.open(LOCK_DIR / f"log-distributor-port-{address.port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PortInUse(errno.EADDRINUSE, f"data port {address.port} is claimed by another distributor on this "
                        "host (a second one would silently split the traffic); stop it, or set allow_shared_port "
                        "= true for a deliberate blue-green switch") from None
    probe = _socket(address.host)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no owner
    try:
        probe.bind((address.host, address.port))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(errno.EADDRINUSE, f"data port {address} is already in use by another process; stop "
                            "it, or set allow_shared_port = true for a deliberate blue-green switch") from None
        raise
    finally:
        probe.close()
    return PortClaim(fd)
