"""TLS contexts from ``[tls]``: the data port's and the control plane's server side, the analyzers' client side.

Built once per process (the supervisor checks them at start, so a bad file exits 2 with one line
instead of a worker crash loop). Modern defaults: TLS 1.2 and up, the ssl module's default ciphers.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import replace

from distributor.config import ConfigError, TlsConfig

FILES = ("cert_file", "key_file", "client_ca_file", "analyzer_ca_file", "analyzer_cert_file", "analyzer_key_file")


def server_context(tls: TlsConfig, verify_clients: bool) -> ssl.SSLContext | None:
    """The data port's (``verify_clients``: require certificates signed by client_ca_file) or the control
    plane's context; None when TLS is off."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if verify_clients and tls.client_ca_file:
            context.load_verify_locations(tls.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load {tls.cert_file} / {tls.key_file} / {tls.client_ca_file}: {exc}") from None
    return context


def analyzer_context(tls: TlsConfig) -> ssl.SSLContext:
    """How senders and health checks talk to https:// analyzers (the system's CAs unless analyzer_ca_file)."""
    try:
        context = ssl.create_default_context(cafile=tls.analyzer_ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.analyzer_cert_file:
            context.load_cert_chain(tls.analyzer_cert_file, tls.analyzer_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load the analyzer trust or client certificate: {exc}") from None
    return context


def pin_files(tls: TlsConfig) -> tuple[TlsConfig, list[int]]:
    """The ``[tls]`` files as they are now, copied into memory files (memfd) the supervisor keeps open and passes
    to every worker it starts (``pass_fds``), with the paths that read them (``/proc/self/fd/N``) and the fds.

    Workers started later (a crash, a memory recycle, a stalled loop) then load what the others serve, as the
    README promises (changing the files needs a restart), not a file rotated in place since: a key rotated
    before its certificate failed every replacement's boot, and three failures stopped the whole distributor.
    Where memfd is missing the paths are left as they are.
    """
    if not tls.enabled and not tls.analyzer_ca_file and not tls.analyzer_cert_file:
        return tls, []
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return tls, []
    fds: list[int] = []
    pinned: dict[str, str] = {}
    for name in FILES:
        path = getattr(tls, name)
        if not path:
            continue
        try:
            with open(path, "rb") as source:
                data = source.read()
        except OSError:
            continue  # reported by server_context / analyzer_context
        fd = memfd_create(f"distributor-tls-{name}", os.MFD_CLOEXEC)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fds.append(fd)
        pinned[name] = f"/proc/self/fd/{fd}"
    return replace(tls, **pinned), fds
