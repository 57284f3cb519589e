"""Distributions in stats snapshots: fixed-bucket histograms kept by the piece that observes the values.

A counter can be read at any time from a snapshot, but a distribution (a latency, a
confidence, a batch size) has to be counted when each value is seen. The piece that
sees the values keeps a `Histogram` next to its other counters and hands out a frozen
`HistogramSnapshot` in its stats, so readers (metrics, status lines, tests) still have
one source of truth. Buckets are fixed at construction, as Prometheus histograms are.

Not thread-safe: observe and snapshot on one thread, or under the owner's lock.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Seconds: from half a millisecond (an edge answer) to ten seconds (a cloud call at its deadline).
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Row counts (batch sizes): powers of two up to 65,536.
ROWS_BUCKETS = tuple(float(2**power) for power in range(17))


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Counts of observed values per bucket: counts[i] those <= bounds[i] and above the bound before;
    the last count those above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float  # the sum of the observed values

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, values at or below it) per bucket, the last bound infinite, as Prometheus has them."""
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


# Up to this many values, counting them one by one costs less than NumPy's calls for a batch.
_FEW = 16


class Histogram:
    """Counts values into buckets whose upper bounds are `bounds` (ascending), plus one above them all."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(bound) for bound in bounds)
        if not self.bounds or any(a >= b for a, b in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError(f"histogram bounds must be ascending and distinct: {bounds}")
        self._counts = [0] * (len(self.bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        """Count one value; a NaN is not counted (it belongs in no bucket, and it would spoil the sum)."""
        if math.isnan(value):
            return
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._total += value

    def observe_many(self, values: npt.ArrayLike) -> None:
        """Count many values at once (a batch's row confidences); NaNs are not counted."""
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.size <= _FEW:
            for value in array.tolist():
                self.observe(value)
            return
        array = array[~np.isnan(array)]
        if array.size == 0:
            return
        buckets = np.bincount(np.searchsorted(self.bounds, array, side="left"), minlength=len(self._counts))
        for index, count in enumerate(buckets.tolist()):
            self._counts[index] += count
        self._total += float(array.sum())

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts), self._total)
