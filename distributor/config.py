"""One typed, validated configuration object.

Precedence, lowest first: built-in defaults (the dataclass fields below, which
are the single documented source of defaults), the TOML file, environment
variables ``DISTRIBUTOR_<SECTION>_<KEY>`` / ``DISTRIBUTOR_<KEY>``, then CLI
flags. Every error names the offending field so ``serve`` can exit 2 with one
clear line.
"""

from __future__ import annotations

import dataclasses
import math
import os
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


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> "Address":
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
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


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Bound of each per-analyzer sender queue, in every worker."""

    max_packets: int = 10_000
    max_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """How a worker ships queued packets to one analyzer."""

    batch_max_packets: int = 256
    batch_max_bytes: int = 1 << 20
    max_inflight: int = 4
    connect_timeout: float = 2.0
    request_timeout: float = 10.0
    retry_initial_backoff: float = 0.05
    retry_max_backoff: float = 2.0


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address = Address("0.0.0.0", 8080)
    admin_listen: Address = Address("127.0.0.1", 9091)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    graceful_timeout: float = 30.0
    worker_timeout: float = 30.0
    routing_refresh_interval: float = 0.005
    max_worker_memory_mb: float = 0.0
    analyzers: tuple[AnalyzerConfig, ...] = ()
    ingest: IngestConfig = IngestConfig()
    queue: QueueConfig = QueueConfig()
    sender: SenderConfig = SenderConfig()

    def validate(self) -> "Config":
        """Return self, or raise ConfigError naming the first bad field."""
        _check_positive_int("workers", self.workers)
        for name in ("graceful_timeout", "worker_timeout", "routing_refresh_interval"):
            _check_positive_number(name, getattr(self, name))
        if self.max_worker_memory_mb != 0:
            _check_positive_number("max_worker_memory_mb", self.max_worker_memory_mb)
        for section in ("ingest", "queue", "sender"):
            for f in fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                checker = _check_positive_int if isinstance(value, int) else _check_positive_number
                checker(f"{section}.{f.name}", value)
        if self.queue.max_bytes < self.ingest.max_body_bytes:
            raise ConfigError("queue.max_bytes: must be >= ingest.max_body_bytes, or a largest packet never fits")
        if self.sender.retry_max_backoff < self.sender.retry_initial_backoff:
            raise ConfigError("sender.retry_max_backoff: must be >= sender.retry_initial_backoff")
        if not self.analyzers:
            raise ConfigError("analyzers: at least one analyzer is required")
        seen: set[str] = set()
        for i, analyzer in enumerate(self.analyzers):
            _validate_analyzer(f"analyzers[{i}]", analyzer)
            if analyzer.name in seen:
                raise ConfigError(f"analyzers[{i}].name: duplicate analyzer name {analyzer.name!r}")
            seen.add(analyzer.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["listen"] = str(self.listen)
        data["admin_listen"] = str(self.admin_listen)
        data["analyzers"] = [dataclasses.asdict(a) for a in self.analyzers]
        return data


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")


def _check_positive_number(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name}: must be a positive finite number, got {value!r}")


def _validate_analyzer(where: str, analyzer: AnalyzerConfig) -> None:
    if not isinstance(analyzer.name, str) or not analyzer.name or len(analyzer.name) > 64:
        raise ConfigError(f"{where}.name: must be a non-empty string of at most 64 characters")
    if not analyzer.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}.name: only letters, digits, '-', '_' and '.' allowed, got {analyzer.name!r}")
    _check_positive_number(f"{where}.weight", analyzer.weight)
    parts = urlsplit(analyzer.url) if isinstance(analyzer.url, str) else None
    if parts is None or parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{where}.url: expected http://HOST:PORT[/path], got {analyzer.url!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{where}.url: bad port in {analyzer.url!r}") from None
    if len(analyzer.url) > 200:
        raise ConfigError(f"{where}.url: longer than 200 characters")
    if analyzer.mode not in MODES:
        raise ConfigError(f"{where}.mode: must be one of {', '.join(MODES)}, got {analyzer.mode!r}")


# --- loading -------------------------------------------------------------------------------


def _coerce(where: str, annotation: Any, value: Any) -> Any:
    """Convert a TOML/env value to the field's declared type, or raise naming the field."""
    if annotation is Address:
        if isinstance(value, Address):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected HOST:PORT string, got {value!r}")
        return Address.parse(value, where)
    if annotation is bool:
        if isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if annotation is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: must be an integer, got {value!r}") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
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
            kwargs[key] = _build(annotation, path, value)
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


def _plain(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    if origin is Literal:
        return str
    return annotation


def load_toml(path: str | Path) -> Config:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    return _build(Config, "", data)


def apply_env(config: Config, environ: Mapping[str, str]) -> Config:
    """Apply ``DISTRIBUTOR_WORKERS=4`` / ``DISTRIBUTOR_QUEUE_MAX_PACKETS=100`` style overrides."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    section_names = {f.name for f in fields(Config) if f.name in ("ingest", "queue", "sender")}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "ADMIN_TOKEN":
            continue
        name = key[len(ENV_PREFIX):].lower()
        section = next((s for s in section_names if name.startswith(s + "_")), None)
        if section:
            sections.setdefault(section, {})[name[len(section) + 1:]] = value
        elif name in {f.name for f in fields(Config)} and name != "analyzers":
            top[name] = value
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
    """Defaults < TOML file < environment < CLI; validated."""
    config = load_toml(config_file) if config_file else Config()
    config = apply_env(config, environ)
    return override(config, top, sections).validate()


def from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a Config sent to a worker as JSON (see Config.to_dict)."""
    return _build(Config, "", data).validate()
