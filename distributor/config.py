"""One typed, validated configuration object.

Precedence, lowest first: built-in defaults (the dataclass fields below, which
are the single documented source of defaults), the TOML file, environment
variables ``DISTRIBUTOR_<SECTION>_<KEY>`` / ``DISTRIBUTOR_<KEY>``, then CLI
flags. Every error names the offending field so ``serve`` can exit 2 with one
clear line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import stat
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

ENV_PREFIX = "DISTRIBUTOR_"
AnalyzerMode = Literal["batch", "packet"]
MODES: tuple[str, ...] = ("batch", "packet")
COMPRESSIONS: tuple[str, ...] = ("none", "gzip", "zstd")
LOG_FORMATS: tuple[str, ...] = ("json", "text")
# weights are normalised; these bounds keep sums and ratios finite and meaningful
MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e6
# what one shared-table analyzer row holds (UTF-8 bytes), and how many rows SharedTable.create makes;
# the base modules do not import each other, so tests/test_config.py checks these follow shared_table.py
NAME_BYTES, URL_BYTES = 64, 256
MAX_ANALYZERS = 64
# the shared table holds a row per worker and RL_CELLS cells per rate-limit slot in every row: keep it sane
MAX_WORKERS = 256
MAX_RATE_LIMIT_SLOTS = 1 << 20
# the largest integer setting: the supervisor hands the configuration to its workers as JSON, which orjson
# writes only for 64-bit integers (a larger one made it raise TypeError when a worker was spawned)
MAX_INT = (1 << 63) - 1
ANALYZER_KEYS = ("name", "url", "weight", "mode", "compression")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# cloud metadata services live here: refused unless a listed network inside this range allows them
LINK_LOCAL: dict[int, IPNetwork] = {4: ipaddress.ip_network("169.254.0.0/16"), 6: ipaddress.ip_network("fe80::/10")}
_HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
# WHATWG URL: a host whose last label is a number is an IPv4 address in another notation (127.1, 0x7f.1, 2130706433)
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> "Address":
        host, sep, port = text.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AnalyzerConfig:
    """One analyzer: where it listens, its share of messages, and its protocol."""

    name: str
    url: str
    weight: float
    mode: AnalyzerMode = "batch"
    compression: str = "none"  # of request bodies sent to it: none, gzip or zstd

    @classmethod
    def parse_flag(cls, text: str) -> "AnalyzerConfig":
        """Parse ``NAME=URL@WEIGHT`` (``@WEIGHT`` optional, default 1)."""
        name, sep, rest = text.partition("=")
        if not sep:
            raise ConfigError(f"--analyzer: expected NAME=URL@WEIGHT, got {text!r}")
        url, at, weight_text = rest.rpartition("@")
        if not at:
            url, weight_text = rest, "1"
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(f"--analyzer {name}: weight must be a number, got {weight_text!r}") from None
        return cls(name=name, url=url, weight=weight)


def _optional(default: float) -> Any:
    """A field where 0 means off (validated as >= 0 instead of > 0)."""
    return field(default=default, metadata={"zero_allowed": True})


def _fraction(default: float) -> Any:
    """A field in (0, 1]."""
    return field(default=default, metadata={"fraction": True})


def _flag(default: bool) -> Any:
    """A true/false field."""
    return field(default=default, metadata={"flag": True})


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """Limits of the data port (per worker)."""

    max_body_bytes: int = 1 << 20
    max_messages_per_packet: int = 10_000
    max_header_bytes: int = 16 << 10
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_connections: int = 10_000
    retry_after: float = 1.0
    max_loop_lag: float = _optional(0.025)  # event-loop lag above which new packets get 503 at once (0 = off)
    max_batch_packets: int = 1000  # packets (lines) per POST /ingest/batch; 413 above
    max_otlp_records: int = 10_000  # log records per POST /v1/logs; 413 above


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Bound of each per-analyzer sender queue, in every worker."""

    max_packets: int = 10_000
    max_bytes: int = 64 << 20
    worker_max_bytes: int = 256 << 20  # all analyzers together, per worker: the basis of overload shedding


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """How a worker ships queued packets to one analyzer."""

    batch_max_packets: int = 256
    batch_max_bytes: int = 1 << 20
    batch_linger: float = _optional(0.05)  # seconds a non-full batch waits for more packets (0 = at once)
    max_inflight: int = 4
    connect_timeout: float = 2.0
    request_timeout: float = 10.0
    retry_initial_backoff: float = 0.05
    retry_max_backoff: float = 2.0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active health checks from the supervisor (HAProxy's inter/rise/fall) and saturation thresholds."""

    interval: float = 1.0
    timeout: float = 0.5
    fall: int = 3
    rise: int = 2
    max_inflight: int = _optional(0)        # analyzer /health inflight above this -> saturated (0 = ignore)
    max_queue_depth: int = _optional(64)     # analyzer /health queue_depth above this -> saturated (0 = ignore)
    max_latency_ms: float = _optional(500.0)  # analyzer /health latency_ms.p99 above this -> saturated (0 = ignore)
    saturated_weight: float = _fraction(0.25)  # effective weight factor while saturated


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive detection in every worker, ejection backoff, slow start, retry budget (after Envoy)."""

    consecutive_failures: int = 5
    base_ejection_time: float = 5.0
    max_ejection_time: float = 300.0
    flap_window: float = 60.0
    slow_start: float = 10.0
    slow_start_min_weight: float = _fraction(0.1)
    retry_budget: float = _fraction(0.2)
    abort_inflight_on_down: bool = _flag(True)  # HAProxy's on-marked-down shutdown-sessions


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    """Priority shedding by how full a worker's queues are (fraction of queue.worker_max_bytes)."""

    low_priority_watermark: float = _fraction(0.7)
    normal_priority_watermark: float = _fraction(0.9)
    max_retry_after: float = 30.0
    memory_watermark: float = _fraction(0.85)  # of the cgroup's memory limit: above it queues stop growing


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float
    burst: float


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Per emitter_id token-bucket limit, held across workers (0 = off)."""

    rate: float = _optional(0.0)
    burst: float = _optional(0.0)  # 0 = same as rate
    slots: int = 16384
    overrides: tuple[tuple[str, RateLimit], ...] = ()

    def limit_for(self, emitter_id: str) -> RateLimit | None:
        for name, limit in self.overrides:
            if name == emitter_id:
                return limit
        return RateLimit(self.rate, self.burst or self.rate) if self.rate else None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Mutating admin endpoints: bearer token (or DISTRIBUTOR_ADMIN_TOKEN), where API changes persist,
    and where an analyzer may point (so an admin token cannot aim the distributor at arbitrary hosts)."""

    token: str = ""       # empty: mutating endpoints answer 403
    state_file: str = ""  # empty: API changes last until the next reload
    allowed_analyzer_networks: tuple[str, ...] = ()  # CIDRs; empty: any address except link-local


WAL_SYNC_MODES: tuple[str, ...] = ("none", "interval", "always")


@dataclass(frozen=True, slots=True)
class WalConfig:
    """The write-ahead log that makes a 202 survive process crashes (empty ``dir``: off).

    ``sync``: ``none`` = written to the OS before the 202 (survives any process crash, not a power
    loss); ``interval`` = also fsynced at most ``sync_interval`` later; ``always`` = the 202 leaves
    only after an fsync that covers the packet (group commit: one fsync for every answer pending).
    """

    dir: str = ""
    sync: str = "interval"
    sync_interval: float = 0.2
    segment_bytes: int = 64 << 20
    max_bytes: int = 1 << 30  # per worker slot


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry spans for a sampled fraction of ingest requests, sent to an OTLP/HTTP collector.

    Off unless both are set: a ratio of 0 traces nothing, not even requests whose ``traceparent`` is sampled.
    """

    sample_ratio: float = field(default=0.0, metadata={"zero_allowed": True, "fraction": True})
    endpoint: str = ""  # the collector's base URL, checked like an analyzer's; spans go to {endpoint}/v1/traces


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS on the data port and the control plane (``cert_file`` and ``key_file`` set: on), optionally
    requiring emitters' client certificates, and the trust toward ``https://`` analyzers."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""      # set: emitters must present a certificate it signed (data port only)
    analyzer_ca_file: str = ""    # trust for https:// analyzers (empty: the system's CA bundle)
    analyzer_cert_file: str = ""  # client certificate toward analyzers (with analyzer_key_file)
    analyzer_key_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address = Address("0.0.0.0", 8080)
    admin_listen: Address = Address("127.0.0.1", 9091)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    graceful_timeout: float = 30.0
    worker_timeout: float = 30.0
    routing_refresh_interval: float = 0.005
    max_worker_memory_mb: float = 0.0
    log_format: str = "json"
    allow_shared_port: bool = False  # start even if another process holds the data port (blue-green on one host)
    analyzers: tuple[AnalyzerConfig, ...] = ()
    ingest: IngestConfig = IngestConfig()
    queue: QueueConfig = QueueConfig()
    sender: SenderConfig = SenderConfig()
    health: HealthConfig = HealthConfig()
    outlier: OutlierConfig = OutlierConfig()
    overload: OverloadConfig = OverloadConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    admin: AdminConfig = AdminConfig()
    wal: WalConfig = WalConfig()
    tracing: TracingConfig = TracingConfig()
    tls: TlsConfig = TlsConfig()

    def validate(self) -> "Config":
        """Return self, or raise ConfigError naming the first bad field."""
        _check_positive_int("workers", self.workers)
        if self.workers > MAX_WORKERS:
            raise ConfigError(f"workers: at most {MAX_WORKERS}, got {self.workers}")
        if not isinstance(self.allow_shared_port, bool):
            raise ConfigError(f"allow_shared_port: must be true or false, got {self.allow_shared_port!r}")
        for name in ("graceful_timeout", "worker_timeout", "routing_refresh_interval"):
            _check_positive_number(name, getattr(self, name))
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format: must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.max_worker_memory_mb != 0:
            _check_positive_number("max_worker_memory_mb", self.max_worker_memory_mb)
        for section in SECTIONS:
            for f in fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if f.type == "str" and not isinstance(value, str):
                    raise ConfigError(f"{section}.{f.name}: must be a string, got {value!r}")
                if f.type in ("int", "float", "bool"):  # the other types are checked on their own below
                    _check_field(f"{section}.{f.name}", value, f.metadata)
        for name, limit in self.rate_limit.overrides:
            _check_positive_number(f"rate_limit.overrides.{name}.rate", limit.rate)
            _check_positive_number(f"rate_limit.overrides.{name}.burst", limit.burst)
        if self.rate_limit.slots > MAX_RATE_LIMIT_SLOTS:
            raise ConfigError(f"rate_limit.slots: at most {MAX_RATE_LIMIT_SLOTS}, got {self.rate_limit.slots}")
        if self.overload.normal_priority_watermark < self.overload.low_priority_watermark:
            raise ConfigError("overload.normal_priority_watermark: must be >= overload.low_priority_watermark")
        if self.health.timeout > self.health.interval:
            raise ConfigError("health.timeout: must be <= health.interval")
        if self.queue.max_bytes < self.ingest.max_body_bytes:
            raise ConfigError("queue.max_bytes: must be >= ingest.max_body_bytes, or a largest packet never fits")
        if self.wal.sync not in WAL_SYNC_MODES:
            raise ConfigError(f"wal.sync: must be one of {', '.join(WAL_SYNC_MODES)}, got {self.wal.sync!r}")
        if self.wal.dir and self.wal.max_bytes < 2 * self.wal.segment_bytes:
            raise ConfigError("wal.max_bytes: must be at least 2 x wal.segment_bytes (the active segment and "
                              "the next one)")
        if self.wal.dir and self.wal.segment_bytes < self.ingest.max_body_bytes + 64:
            raise ConfigError("wal.segment_bytes: must hold at least one largest packet (ingest.max_body_bytes)")
        if self.sender.retry_max_backoff < self.sender.retry_initial_backoff:
            raise ConfigError("sender.retry_max_backoff: must be >= sender.retry_initial_backoff")
        if not self.analyzers:
            raise ConfigError("analyzers: at least one analyzer is required")
        if len(self.analyzers) > MAX_ANALYZERS:
            raise ConfigError(f"analyzers: at most {MAX_ANALYZERS} analyzers, got {len(self.analyzers)}")
        rules = self.analyzer_rules
        tls = self.tls
        for cert, key, what in ((tls.cert_file, tls.key_file, "tls"), (tls.analyzer_cert_file, tls.analyzer_key_file,
                                                                         "tls.analyzer")):
            if bool(cert) != bool(key):
                raise ConfigError(f"{what}: cert_file and key_file go together" if what == "tls" else
                                  "tls.analyzer_cert_file and tls.analyzer_key_file go together")
        if tls.client_ca_file and not tls.enabled:
            raise ConfigError("tls.client_ca_file: needs tls.cert_file and tls.key_file (TLS on the data port)")
        if self.tracing.endpoint:
            _check_url("tracing.endpoint", self.tracing.endpoint, rules)
        elif self.tracing.sample_ratio:
            raise ConfigError("tracing.endpoint: required when tracing.sample_ratio > 0 (the OTLP/HTTP collector "
                              "that receives the spans)")
        seen: set[str] = set()
        for i, analyzer in enumerate(self.analyzers):
            validate_analyzer(f"analyzers[{i}]", analyzer, rules)
            if analyzer.name in seen:
                raise ConfigError(f"analyzers[{i}].name: duplicate analyzer name {analyzer.name!r}")
            seen.add(analyzer.name)
        return self

    @property
    def analyzer_rules(self) -> "AnalyzerRules":
        """What an analyzer may be under this configuration: never one of its own ports, only allowed networks."""
        return AnalyzerRules(
            own=(("listen", self.listen), ("admin_listen", self.admin_listen)),
            allowed_networks=parse_networks("admin.allowed_analyzer_networks", self.admin.allowed_analyzer_networks),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["listen"] = str(self.listen)
        data["admin_listen"] = str(self.admin_listen)
        data["analyzers"] = [dataclasses.asdict(a) for a in self.analyzers]
        data["rate_limit"]["overrides"] = {name: dataclasses.asdict(limit) for name, limit in self.rate_limit.overrides}
        return data

    def for_workers(self) -> dict[str, Any]:
        """to_dict without secrets: workers never need the admin token."""
        data = self.to_dict()
        data["admin"]["token"] = ""
        return data


SECTIONS = ("ingest", "queue", "sender", "health", "outlier", "overload", "rate_limit", "admin", "wal",
            "tracing", "tls")


def _check_field(name: str, value: object, metadata: Mapping[str, Any]) -> None:
    if metadata.get("flag"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return
    if metadata.get("zero_allowed") and value == 0:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        _check_positive_int(name, value)
    else:
        _check_positive_number(name, value)
    if metadata.get("fraction") and value > 1:  # type: ignore[operator]
        raise ConfigError(f"{name}: must be in (0, 1], got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}: must be a positive integer, got {_shown(value)}")
    if value > MAX_INT:
        raise ConfigError(f"{name}: at most {MAX_INT}, got {_shown(value)}")


def _check_positive_number(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name}: must be a positive finite number, got {value!r}")


def _shown(value: object) -> str:
    """repr for an error message, cut short: the value may be a megabyte from an admin request."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_name(where: str, name: object) -> str:
    """An analyzer name as the shared table, logs and label values can hold it: no control characters."""
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}: must be a non-empty name of letters, digits, '-', '_' and '.', got {_shown(name)}")
    size = len(name.encode())
    if size > NAME_BYTES:
        raise ConfigError(f"{where}: at most {NAME_BYTES} bytes in UTF-8, got {size}")
    return name


def check_weight(where: str, weight: object) -> float:
    """A weight from any source: a number (not a bool or a string) from MIN_WEIGHT to MAX_WEIGHT, never NaN."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise ConfigError(f"{where}: must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, got {_shown(weight)}")
    return float(weight)


def parse_networks(where: str, texts: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """CIDRs such as ``10.0.0.0/8``; host bits set is an error (``10.0.0.1/8`` is probably a typo)."""
    networks: list[IPNetwork] = []
    for i, text in enumerate(texts):
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:
            raise ConfigError(f"{where}[{i}]: {exc}") from None
    return tuple(networks)


def _ip_literal(host: str) -> IPAddress | None:
    """The address a host string denotes literally (IPv4-mapped IPv6 as IPv4), or None for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _local(host: str, address: IPAddress | None) -> bool:
    """Reaches this machine whatever it is bound to: loopback, the unspecified address, localhost."""
    return host == "localhost" if address is None else address.is_loopback or address.is_unspecified


@dataclass(frozen=True, slots=True)
class AnalyzerRules:
    """Where an analyzer may point, from the configuration (``Config.analyzer_rules``).

    Host names are never resolved here: the admin path must not block on DNS, and a name may resolve
    differently later; so a non-empty ``allowed_networks`` admits IP literals only (and ``localhost``
    when it allows 127.0.0.1).
    """

    own: tuple[tuple[str, Address], ...] = ()  # this distributor's ports: an analyzer there loops or gets 404
    allowed_networks: tuple[IPNetwork, ...] = ()  # empty: any address except link-local

    def allows(self, address: IPAddress) -> bool:
        """Link-local addresses (cloud metadata) need a listed network inside the link-local range."""
        link_local = LINK_LOCAL[address.version]
        if not self.allowed_networks:
            return address not in link_local
        return any(
            address in network
            and (address not in link_local or (network[0] in link_local and network[-1] in link_local))
            for network in self.allowed_networks
        )


def validate_analyzer(where: str, analyzer: AnalyzerConfig, rules: AnalyzerRules = AnalyzerRules()) -> None:
    """The one check of an analyzer definition, wherever it comes from (config file, admin API, state file).

    ``rules`` defaults to those that need no configuration (any address but link-local).
    """
    check_name(f"{where}.name", analyzer.name)
    check_weight(f"{where}.weight", analyzer.weight)
    _check_url(f"{where}.url", analyzer.url, rules)
    if analyzer.mode not in MODES:
        raise ConfigError(f"{where}.mode: must be one of {', '.join(MODES)}, got {_shown(analyzer.mode)}")
    if analyzer.compression not in COMPRESSIONS:
        raise ConfigError(f"{where}.compression: must be one of {', '.join(COMPRESSIONS)}, "
                          f"got {_shown(analyzer.compression)}")


def _check_url(where: str, url: object, rules: AnalyzerRules) -> None:
    """The stored string is what logs, /metrics and the state file show, and what the sender dials."""
    if not isinstance(url, str) or not url or not all("!" <= c <= "~" for c in url):
        raise ConfigError(f"{where}: printable ASCII only, no spaces or control characters (percent-encode the rest), "
                          f"got {_shown(url)}")
    if len(url) > URL_BYTES:
        raise ConfigError(f"{where}: at most {URL_BYTES} bytes, got {len(url)}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} in {_shown(url)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or "?" in url or "#" in url:
        raise ConfigError(f"{where}: expected http[s]://HOST:PORT[/path], got {_shown(url)}")
    if "@" in parts.netloc:
        raise ConfigError(f"{where}: credentials in the URL are refused (they would show in /admin/analyzers, "
                          "logs and the state file)")
    if port == 0:
        raise ConfigError(f"{where}: port 0 in {_shown(url)}")
    host = parts.hostname
    address = _ip_literal(host)
    if address is None:
        labels = host.removesuffix(".").split(".")
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise ConfigError(f"{where}: {_shown(host)} is neither an IP address nor a host name")
        if _NUMERIC_LABEL.fullmatch(labels[-1]):
            raise ConfigError(f"{where}: write an IPv4 address as four decimal numbers, got {_shown(host)}")
    for key, own in rules.own:
        own_host = own.host.lower()
        own_address = _ip_literal(own_host)
        same_host = host == own_host or (address is not None and address == own_address) or (
            _local(host, address) and _local(own_host, own_address))
        if (port or 80) == own.port and same_host:
            raise ConfigError(f"{where}: {_shown(url)} is this distributor's own {key} ({own})")
    if address is None:
        if rules.allowed_networks and not (host == "localhost" and rules.allows(ipaddress.IPv4Address("127.0.0.1"))):
            raise ConfigError(f"{where}: host names are refused while admin.allowed_analyzer_networks is set "
                              f"(they are not resolved): write an IP address, got {_shown(host)}")
    elif not rules.allows(address):
        reason = "outside admin.allowed_analyzer_networks" if rules.allowed_networks else (
            "link-local (cloud metadata); list it in admin.allowed_analyzer_networks to allow it")
        raise ConfigError(f"{where}: {address} is {reason}")


def parse_analyzer(where: str, data: object, rules: AnalyzerRules) -> AnalyzerConfig:
    """An analyzer from JSON (admin API body, state file): exactly its keys, JSON types, then ``validate_analyzer``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object with name, url, weight and optional mode and compression")
    for key in data:
        if key not in ANALYZER_KEYS:
            raise ConfigError(f"{where}: unknown key {_shown(key)}")
    for key in ANALYZER_KEYS[:3]:
        if key not in data:
            raise ConfigError(f"{where}.{key}: missing")
    analyzer = AnalyzerConfig(name=data["name"], url=data["url"], weight=data["weight"], mode=data.get("mode", "batch"),
                              compression=data.get("compression", "none"))
    validate_analyzer(where, analyzer, rules)
    return replace(analyzer, weight=float(analyzer.weight))


# --- loading -------------------------------------------------------------------------------


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _coerce(where: str, annotation: Any, value: Any) -> Any:
    """Convert a TOML/env value to the field's declared type, or raise naming the field."""
    if annotation is Address:
        if isinstance(value, Address):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected HOST:PORT string, got {value!r}")
        return Address.parse(value, where)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: must be an integer, got {value!r}") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if annotation == tuple[str, ...]:
        if isinstance(value, str):  # from the environment or --set: comma-separated
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: must be a number, got {value!r}") from None
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return value


def _build(cls: type, where: str, data: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{path}: unknown key")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation) and annotation is not Address:
            kwargs[key] = _build(typing.cast(type, annotation), path, value)
        elif key == "overrides" and cls is RateLimitConfig:
            kwargs[key] = _overrides(path, value)
        elif key == "analyzers":
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected an array of tables")
            kwargs[key] = tuple(_build(AnalyzerConfig, f"analyzers[{i}]", a) for i, a in enumerate(value))
        else:
            kwargs[key] = _coerce(path, _plain(annotation), value)
    if cls is AnalyzerConfig:
        for required in ("name", "url", "weight"):
            if required not in kwargs:
                raise ConfigError(f"{where}.{required}: missing")
    return cls(**kwargs)


def _overrides(where: str, value: Any) -> tuple[tuple[str, RateLimit], ...]:
    """``[rate_limit.overrides] "agent-17" = {rate = 10, burst = 20}`` (burst optional: the rate)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f'{where}: expected a table such as {{"agent-17" = {{rate = 10, burst = 20}}}}, got {value!r}')
    result = []
    for name, limit in value.items():
        if not isinstance(limit, Mapping) or "rate" not in limit:
            raise ConfigError(f"{where}.{name}: expected {{rate = N, burst = N}}, got {limit!r}")
        for key in limit:
            if key not in ("rate", "burst"):
                raise ConfigError(f"{where}.{name}.{key}: unknown key")
        rate = _coerce(f"{where}.{name}.rate", float, limit["rate"])
        burst = _coerce(f"{where}.{name}.burst", float, limit.get("burst", rate))
        result.append((str(name), RateLimit(rate, burst)))
    return tuple(result)


def _plain(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    if origin is Literal:
        return str
    return annotation


def read_regular_file(path: str | Path, what: str) -> bytes:
    """The bytes of a configuration-like file; a FIFO or a device would block or never end, so it is refused."""
    try:
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ConfigError(f"{what}: {path} is not a regular file")
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None


def load_toml(path: str | Path) -> Config:
    raw = read_regular_file(path, "--config")
    try:
        data = tomllib.loads(raw.decode())
    except RecursionError:
        raise ConfigError(f"--config: {path} nests tables or arrays too deeply") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config: {path} is not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}") \
            from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    return _build(Config, "", data)


def apply_env(config: Config, environ: Mapping[str, str]) -> Config:
    """Apply ``DISTRIBUTOR_WORKERS=4`` / ``DISTRIBUTOR_QUEUE_MAX_PACKETS=100`` style overrides."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    section_names = set(SECTIONS)
    top_names = {f.name for f in fields(Config)} - section_names - {"analyzers"}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        section = next((s for s in section_names if name.startswith(s + "_")), None)
        if name in top_names:
            top[name] = value
        elif section:
            sections.setdefault(section, {})[name[len(section) + 1:]] = value
    return override(config, top, sections)


def override(config: Config, top: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]] = {}) -> Config:
    """Return config with the given top-level values and section values replaced (coerced, not validated)."""
    merged = _build(Config, "", {k: v for k, v in top.items()})
    changes: dict[str, Any] = {k: getattr(merged, k) for k in top}
    for section, values in sections.items():
        current = getattr(config, section)
        built = _build(type(current), section, values)
        changes[section] = replace(current, **{k: getattr(built, k) for k in values})
    return replace(config, **changes)


def resolve(
    config_file: str | None,
    environ: Mapping[str, str],
    top: Mapping[str, Any],
    sections: Mapping[str, Mapping[str, Any]],
) -> Config:
    """Defaults < TOML file < environment < CLI; validated. Any surprise is a ConfigError too, never a traceback."""
    try:
        config = load_toml(config_file) if config_file else Config()
        config = apply_env(config, environ)
        return override(config, top, sections).validate()
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"configuration: {exc.__class__.__name__}: {exc}") from None


def from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a Config sent to a worker as JSON (see Config.to_dict)."""
    return _build(Config, "", data).validate()
