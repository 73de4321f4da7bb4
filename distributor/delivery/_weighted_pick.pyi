"""Types of the compiled routing arithmetic (_weighted_pick.c)."""

from typing import Sequence

def best(counters: Sequence[int], cells: list[int], offsets: list[int], weights: list[float], messages: int,
         /) -> int: ...
