"""The emitter -> distributor packet contract.

Validation reads the orjson-parsed packet once and returns only what routing
needs (ids, message count, priority); the raw bytes are what gets forwarded, so
nothing here ever re-serializes a packet.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Callable, NamedTuple

import orjson

_scan: Callable[[bytes, int, type[PacketInfo]], PacketInfo | None] | None
try:  # the compiled fast path (setup.py); without it the Python path below answers alone, the same way
    from distributor.ingest._packet_scan import scan as _scan
except ImportError:  # pragma: no cover - a machine without a C compiler
    _scan = None

PRIORITIES = ("high", "normal", "low")
MAX_ID_LENGTH = 256
# One valid range for both timestamp forms: years 0000-9999. Integer milliseconds since the epoch
# cannot go below 0; 9999-12-31T23:59:59.999Z is the largest. RFC 3339 strings may carry a leap
# second (:60), accepted as written: the leap-second table is not consulted.
MAX_TIMESTAMP_MS = 253_402_300_799_999
_MS_RANGE = f"integer milliseconds out of range 0..{MAX_TIMESTAMP_MS}"
# the hot path: field ranges in the pattern, the calendar (days per month) by datetime.fromisoformat.
# re.ASCII: RFC 3339 digits are 0-9, not any Unicode decimal digit (which \d and int() would take)
_RFC3339 = re.compile(
    r"\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])[Tt ](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,9})?"
    r"(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    re.ASCII,
)
# the error path (and the leap second, year 0000): the shape alone, each field checked to name what is wrong
_RFC3339_SHAPE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?(?:[Zz]|[+-](\d{2}):(\d{2}))",
    re.ASCII,
)
_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


class ContractError(ValueError):
    """The packet violates the contract; ``field`` names the offending part."""

    def __init__(self, field: str, detail: str, status: int = 400) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail
        self.status = status


EMITTER_HEADER = b"x-emitter-id"


def claimed_emitter(value: bytes | None) -> str | None:
    """The emitter a request says it comes from (``X-Emitter-Id``, which a load balancer may shard on), or None.

    ``value`` is the header as ``Request.header`` gives it, repeated lines combined ("a, b"): a balancer
    hashed the first, so the request must not pass on the last alone. Empty is no claim, as HAProxy hashes
    it. Bytes that are not UTF-8 become lone surrogates, which no emitter_id can hold: such a request is
    refused, not guessed at.
    """
    if not value:
        return None
    return value.decode("utf-8", "surrogateescape")


class PacketInfo(NamedTuple):
    emitter_id: str
    packet_id: str
    messages: int
    priority: str


def parse_packet(body: bytes, max_messages: int) -> PacketInfo:
    """Parse and validate one packet; raise ContractError naming the field at fault.

    The usual valid packet is read by the compiled scanner without building its objects; it
    hands anything else (every error, every unusual shape) to the orjson path, which decides.
    """
    if _scan is not None:
        info: PacketInfo | None = _scan(body, max_messages, PacketInfo)
        if info is not None:
            return info
    return parse_packet_python(body, max_messages)


def parse_packet_python(body: bytes, max_messages: int) -> PacketInfo:
    """The reference: orjson, then the contract field by field (the fast path may only agree with it)."""
    try:
        packet = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ContractError("body", f"invalid JSON: {exc}") from None
    if not isinstance(packet, dict):
        raise ContractError("body", "a packet must be a JSON object")
    emitter_id = _identifier(packet, "emitter_id")
    packet_id = _identifier(packet, "packet_id")
    priority = packet.get("priority", "normal")
    if priority not in PRIORITIES:
        raise ContractError("priority", f"must be one of {', '.join(PRIORITIES)}")
    messages = packet.get("messages")
    if not isinstance(messages, list):
        raise ContractError("messages", "missing or not an array")
    count = len(messages)
    if count == 0:
        raise ContractError("messages", "must not be empty")
    if count > max_messages:
        raise ContractError(
            "messages", f"{count} messages exceed max_messages_per_packet={max_messages}", status=413
        )
    for index, message in enumerate(messages):
        # the usual message, checked inline (a call per message costs as much as the checks); any other
        # (a string timestamp, an error) goes through _check_message, which names what is wrong
        if type(message) is dict:
            timestamp = message.get("timestamp")
            level = message.get("level")
            metadata = message.get("metadata")
            if (type(timestamp) is int and 0 <= timestamp <= MAX_TIMESTAMP_MS and type(level) is str and level
                    and type(message.get("message")) is str and (metadata is None or type(metadata) is dict)):
                continue
        _check_message(index, message)
    return PacketInfo(emitter_id, packet_id, count, priority)


def _identifier(packet: dict[str, Any], name: str) -> str:
    value = packet.get(name)
    if not isinstance(value, str) or not value:
        raise ContractError(name, "missing or not a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise ContractError(name, f"longer than {MAX_ID_LENGTH} characters")
    return value


def _check_message(index: int, message: object) -> None:
    if type(message) is not dict:
        raise ContractError(f"messages[{index}]", "must be an object")
    text = message.get("message")
    if type(text) is not str:
        raise ContractError(f"messages[{index}].message", "missing or not a string")
    level = message.get("level")
    if type(level) is not str or not level:
        raise ContractError(f"messages[{index}].level", "missing or not a non-empty string")
    timestamp = message.get("timestamp")
    if type(timestamp) is int:
        if not 0 <= timestamp <= MAX_TIMESTAMP_MS:
            raise ContractError(f"messages[{index}].timestamp", _MS_RANGE)
    elif type(timestamp) is str:
        if not (_RFC3339.fullmatch(timestamp) and _calendar_date(timestamp)):
            problem = _date_time_problem(timestamp)
            if problem:
                raise ContractError(f"messages[{index}].timestamp", problem)
    elif type(timestamp) is float:  # orjson reads integers beyond 64 bits as floats
        raise ContractError(f"messages[{index}].timestamp", _float_problem(timestamp))
    else:
        raise ContractError(
            f"messages[{index}].timestamp", "missing, or neither integer milliseconds nor an RFC 3339 string"
        )
    metadata = message.get("metadata")
    if metadata is not None and type(metadata) is not dict:
        raise ContractError(f"messages[{index}].metadata", "must be an object when present")


def _calendar_date(text: str) -> bool:
    """Fast check of a string that has the RFC 3339 shape and field ranges (years 0001-9999, no leap second)."""
    try:
        datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return False
    return True


def _date_time_problem(text: str) -> str:
    """What is wrong with a timestamp string; empty when it is valid (a leap second or year 0000)."""
    match = _RFC3339_SHAPE.fullmatch(text)
    if match is None:
        return "not an RFC 3339 date-time such as 2025-11-26T12:00:00.123Z (Z or a +hh:mm offset is required)"
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    if not 1 <= month <= 12:
        return f"month {match[2]} out of range 01-12"
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days = 29 if month == 2 and leap else _DAYS[month - 1]
    if not 1 <= day <= days:
        return f"day {match[3]} out of range 01-{days} for {match[1]}-{match[2]}"
    if hour > 23:
        return f"hour {match[4]} out of range 00-23"
    if minute > 59:
        return f"minute {match[5]} out of range 00-59"
    if second > 60:
        return f"second {match[6]} out of range 00-60"
    if match[7] is not None and (int(match[7]) > 23 or int(match[8]) > 59):
        return f"offset {text[-6:]} out of range -23:59..+23:59"
    return ""


def _float_problem(value: float) -> str:
    """Why a number with a fraction or exponent, or an integer beyond 64 bits (a float from orjson), is refused."""
    if value.is_integer() and not 0 <= value <= MAX_TIMESTAMP_MS:
        return _MS_RANGE
    if value.is_integer():
        return "integer milliseconds must be written without a fraction or an exponent"
    return "milliseconds must be an integer, not a fraction"
