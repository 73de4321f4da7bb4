"""An independent model of the packet contract as the README states it, for differential fuzzing.

Written from the README's rules, not from ``distributor/ingest/contract.py``: the targets compare
the product's decision (accept, or the status and field it names) with this model's.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import orjson

MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
# RFC 3339 section 5.6: DIGIT is ASCII 0-9 (RFC 5234 core rules); "T" and "Z" may be lower case,
# a space may separate date and time (section 5.6 NOTE); the README: up to 9 fraction digits
_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))"
)


class Verdict(NamedTuple):
    status: int  # 0: accepted
    field: str  # the field at fault; for an accepted packet, ""
    info: tuple[str, str, int, str] | None  # emitter_id, packet_id, messages, priority


def _refused(status: int, field: str) -> Verdict:
    return Verdict(status, field, None)


def valid_date_time(text: str) -> bool:
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    if not 1 <= month <= 12:
        return False
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1]
    if not 1 <= day <= days or hour > 23 or minute > 59 or second > 60:
        return False
    return match[7] is None or (int(match[7]) <= 23 and int(match[8]) <= 59)


def _identifier(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 256


def verdict(body: bytes, max_messages: int) -> Verdict:
    """What the contract says about ``body``: accepted with its info, or the status and field at fault."""
    try:
        packet = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _refused(400, "body")
    if not isinstance(packet, dict):
        return _refused(400, "body")
    for name in ("emitter_id", "packet_id"):
        if not _identifier(packet.get(name)):
            return _refused(400, name)
    priority = packet["priority"] if "priority" in packet else "normal"
    if not (isinstance(priority, str) and priority in ("high", "normal", "low")):
        return _refused(400, "priority")
    messages = packet.get("messages")
    if not isinstance(messages, list) or not messages:
        return _refused(400, "messages")
    if len(messages) > max_messages:
        return _refused(413, "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return _refused(400, where)
        if not isinstance(message.get("message"), str):
            return _refused(400, where + ".message")
        level = message.get("level")
        if not isinstance(level, str) or not level:
            return _refused(400, where + ".level")
        timestamp = message.get("timestamp")
        if isinstance(timestamp, bool) or not (
            (isinstance(timestamp, int) and 0 <= timestamp <= MAX_MS)
            or (isinstance(timestamp, str) and valid_date_time(timestamp))
        ):
            return _refused(400, where + ".timestamp")
        metadata = message.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):  # the product treats null as absent
            return _refused(400, where + ".metadata")
    return Verdict(0, "", (packet["emitter_id"], packet["packet_id"], len(messages), priority))
