"""Latency histogram of the load tools: HDR-style log-linear buckets, O(1) record, mergeable."""

from __future__ import annotations


class LatencyHistogram:
    """Log-linear histogram of seconds: 1 µs .. 60 s, < 0.8% bucket width, O(1) record, mergeable.

    HDR-style: values are integer microseconds; below 256 µs every value has its
    own bucket, above that each power of two is split into 128 linear buckets,
    so the relative bucket width is at most 1/128 whatever the magnitude.
    """

    SUB = 128
    LINEAR = 2 * SUB
    MAX_US = 60_000_000
    __slots__ = ("counts", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (self._index(self.MAX_US) + 1)
        self.count = 0
        self.total = 0.0
        self.min = float("inf")
        self.max = 0.0

    @classmethod
    def _index(cls, us: int) -> int:
        if us < cls.LINEAR:
            return us
        shift = us.bit_length() - 8
        return cls.LINEAR + (shift - 1) * cls.SUB + (us >> shift) - cls.SUB

    @classmethod
    def _bounds(cls, index: int) -> tuple[int, int]:
        """[low, high) in µs of a bucket."""
        if index < cls.LINEAR:
            return index, index + 1
        j = index - cls.LINEAR
        shift = j // cls.SUB + 1
        mantissa = j % cls.SUB + cls.SUB
        return mantissa << shift, (mantissa + 1) << shift

    def record(self, seconds: float) -> None:
        us = int(seconds * 1e6)
        if us > self.MAX_US:
            us = self.MAX_US
        elif us < 1:
            us = 1
        if us < 256:
            self.counts[us] += 1
        else:
            shift = us.bit_length() - 8
            self.counts[shift * 128 + (us >> shift)] += 1  # == _index(us), inlined
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds
        if seconds < self.min:
            self.min = seconds

    def percentile(self, q: float) -> float:
        """Value (seconds) at or below which q percent of the recorded values fall; 0.0 if empty."""
        if self.count == 0:
            return 0.0
        rank = max(1, min(self.count, -int(-q * self.count // 100)))  # ceil(q% of count)
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                low, high = self._bounds(index)
                value = (low + high) / 2e6
                return min(max(value, self.min), self.max)
        return self.max

    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def summary_ms(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean() * 1e3, "p50": self.percentile(50) * 1e3,
                "p90": self.percentile(90) * 1e3, "p99": self.percentile(99) * 1e3,
                "p99.9": self.percentile(99.9) * 1e3, "max": self.max * 1e3}

    def merge(self, other: LatencyHistogram) -> None:
        """Add other's values into this one (e.g. histograms of several runs or processes)."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
