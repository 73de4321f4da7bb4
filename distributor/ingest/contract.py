"""The emitter -> distributor packet contract.

Validation reads the orjson-parsed packet once and returns only what routing
needs (ids, message count, priority); the raw bytes are what gets forwarded, so
nothing here ever re-serializes a packet.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, NamedTuple

import orjson

PRIORITIES = ("high", "normal", "low")
MAX_ID_LENGTH = 256
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)


class ContractError(ValueError):
    """The packet violates the contract; ``field`` names the offending part."""

    def __init__(self, field: str, detail: str, status: int = 400) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail
        self.status = status


class PacketInfo(NamedTuple):
    emitter_id: str
    packet_id: str
    messages: int
    priority: str


def parse_packet(body: bytes, max_messages: int) -> PacketInfo:
    """Parse and validate one packet; raise ContractError naming the field at fault."""
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
        if timestamp < 0:
            raise ContractError(f"messages[{index}].timestamp", "must not be negative")
    elif type(timestamp) is str:
        if not _RFC3339.fullmatch(timestamp) or not _valid_datetime(timestamp):
            raise ContractError(f"messages[{index}].timestamp", "not an RFC 3339 date-time")
    else:
        raise ContractError(
            f"messages[{index}].timestamp", "missing, or neither integer milliseconds nor an RFC 3339 string"
        )
    metadata = message.get("metadata")
    if metadata is not None and type(metadata) is not dict:
        raise ContractError(f"messages[{index}].metadata", "must be an object when present")


def _valid_datetime(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return False
    return True
