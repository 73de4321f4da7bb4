"""Structured logs: one JSON object per line (or plain text), tagged with the process role.

Fields: ``ts``, ``level``, ``role`` (``supervisor`` or ``worker``), ``worker`` (slot),
``pid``, ``logger``, ``event`` and ``msg``, plus whatever a call passes in
``extra`` (``analyzer``, counts...). Events that could repeat per packet go
through ``sender.RateLimitedLog`` so an overload cannot become a log flood.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str, worker: int | None) -> None:
        super().__init__()
        self._role = role
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self._role,
            "worker": self._worker,
            "pid": record.process,
            "logger": record.name,
            "event": getattr(record, "event", record.name.rsplit(".", 1)[-1]),
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k != "event"})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(log_format: str, role: str, worker: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(role, worker))
    else:
        name = role if worker is None else f"{role}[{worker}]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name} %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class RateLimitedLog:
    """At most one line per ``interval`` per source, with a count of what was suppressed (no log floods)."""

    def __init__(self, logger: logging.Logger, analyzer: str, interval: float = 1.0) -> None:
        self._logger = logger
        self._analyzer = analyzer
        self._prefix = f"analyzer {analyzer}"
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, event: str = "send_failed") -> None:
        self._emit(logging.WARNING, message, event)

    def error(self, message: str, event: str) -> None:
        self._emit(logging.ERROR, message, event)

    def _emit(self, level: int, message: str, event: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more suppressed)" if self._suppressed else ""
        self._logger.log(level, "%s: %s%s", self._prefix, message, more,
                         extra={"event": event, "analyzer": self._analyzer, "suppressed": self._suppressed})
        self._suppressed = 0
        self._next = now + self._interval
