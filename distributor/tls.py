"""TLS contexts from ``[tls]``: the data port's and the control plane's server side, the analyzers' client side.

Built once per process (the supervisor checks them at start, so a bad file exits 2 with one line
instead of a worker crash loop). Modern defaults: TLS 1.2 and up, the ssl module's default ciphers.
"""

from __future__ import annotations

import ssl

from distributor.config import ConfigError, TlsConfig


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
