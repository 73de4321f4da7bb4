"""Types of the compiled fast path (_packet_scan.c)."""

from typing import TypeVar

_T = TypeVar("_T", bound=tuple[str, str, int, str])

def scan(body: object, max_messages: object, result_type: type[_T], /) -> _T | None: ...
