"""The data port's sockets: every worker's SO_REUSEPORT listener, and the supervisor's claim on the port.

SO_REUSEPORT lets every worker bind the same address, and the kernel spreads
connections over their listeners. It also lets a *second* distributor bind it
by mistake (same user), and then the two silently split the traffic between
their analyzer sets. ``claim_port`` refuses that: a probe bound without
SO_REUSEPORT fails with EADDRINUSE while anybody holds the port; the
supervisor then keeps a bound (never listening) SO_REUSEPORT socket for its
whole life, so the port stays claimed even while every worker is being
replaced. A deliberate second instance (a blue-green switch on one host) sets
``allow_shared_port``.
"""

from __future__ import annotations

import errno
import socket

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


def claim_port(address: Address, allow_shared: bool) -> socket.socket | None:
    """Refuse to start on a port someone else holds (unless allowed); return the claim to keep open.

    The claim is bound with SO_REUSEPORT but never listens, so it receives no connections.
    Raises PortInUse with a message for the operator.
    """
    if not allow_shared:
        probe = _socket(address.host)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no owner
        try:
            probe.bind((address.host, address.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(errno.EADDRINUSE, f"data port {address} is already in use (another distributor "
                                "on it would silently split the traffic); stop it, or set allow_shared_port = true "
                                "for a deliberate blue-green switch") from None
            raise
        finally:
            probe.close()
    claim = _socket(address.host)
    claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        claim.bind((address.host, address.port))
    except OSError:
        claim.close()
        return None  # the workers' own bind reports the reason
    return claim
