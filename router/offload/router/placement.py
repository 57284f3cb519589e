"""Where the edge model runs a batch: inline on the event loop when that costs less than handing it to a
worker thread, else on the worker.

A hand-off (run_in_executor: a queue, a thread woken, a future chained back to the loop, the GIL
passed there and back) costs 0.05-0.1 ms on a quiet device and far more on a busy one: more than a
small model's whole run (the demo's takes 0.03 ms a row). Such a model runs inline and saves it; a
large batch runs on the worker, since inline it would hold every other call for its duration.

So each model's cost is measured (`RunCost`): before it serves (RoutedModel.warm_up, one row) and on every run after,
as the CPU time of the thread that ran it, by batch size (rows rounded up to a power of two). CPU
time rather than the clock: on a worker, the clock also counts the waits for the GIL while the
event loop holds it, which would make a model look dearer the busier the loop is. A batch whose
expected cost is at most `inline_seconds` runs inline (`Placement.AUTO`); a setting forces either.
A model whose run waits on an accelerator (a GPU execution provider) spends little CPU while the
loop would wait: run it with `Placement.THREAD`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy.typing as npt

Predict = Callable[[Mapping[str, npt.NDArray[Any]]], dict[str, npt.NDArray[Any]]]

# A new measurement's weight in a batch size's running estimate, and the most it counts for, as a multiple of
# the estimate: recent enough to follow the device's load, steady enough that one slow run (a garbage
# collection, page faults) does not move a model off the loop. A real change still shows within a few runs.
SMOOTHING = 0.1
OUTLIER = 4.0
# Runs of one row of zeros before a model serves (RoutedModel.warm_up); the first pays the runtime's lazy
# set-up, so the later ones are what is recorded.
WARM_UP_RUNS = 3


class Placement(StrEnum):
    AUTO = "auto"  # inline when the measured cost is at most inline_seconds, else on a worker thread
    INLINE = "inline"  # always on the event loop
    THREAD = "thread"  # always on a worker thread


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    mode: Placement = Placement.AUTO
    inline_seconds: float = 0.0002

    def inline(self, cost: RunCost, rows: int) -> bool:
        """Whether a batch of `rows` runs on the event loop; a batch of a size never measured, nor bounded by
        a measured one, goes to the worker (which measures it)."""
        if self.mode is not Placement.AUTO:
            return self.mode is Placement.INLINE
        expected = cost.expected(rows)
        return expected is not None and expected <= self.inline_seconds


def _bucket(rows: int) -> int:
    """The power of two at or above `rows`, as its exponent: 1 -> 0, 2 -> 1, 3 and 4 -> 2, 5 to 8 -> 3."""
    return max(rows - 1, 0).bit_length()


class RunCost:
    """A model's measured CPU seconds per run, by batch size (rows rounded up to a power of two).

    A size never measured is bounded by the smallest measured size above it (a batch costs no more
    than a larger one), else scaled up from the largest below (in proportion to rows: an over-estimate,
    since a run's fixed cost is scaled too). Call it from one thread, the event loop's.
    """

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        bucket = _bucket(rows)
        known = self._seconds.get(bucket)
        if known is None:
            self._seconds[bucket] = seconds
        else:
            self._seconds[bucket] = known + SMOOTHING * (min(seconds, OUTLIER * known) - known)

    def expected(self, rows: int) -> float | None:
        """The CPU seconds a run of `rows` is expected to take; None before anything was measured."""
        bucket = _bucket(rows)
        known = self._seconds.get(bucket)
        if known is not None:
            return known
        above = [size for size in self._seconds if size > bucket]
        if above:
            return self._seconds[min(above)]
        below = [size for size in self._seconds if size < bucket]
        if below:
            largest = max(below)
            return self._seconds[largest] * 2.0 ** (bucket - largest)
        return None


def timed(predict: Predict, inputs: Mapping[str, npt.NDArray[Any]]) -> tuple[dict[str, npt.NDArray[Any]], float]:
    """`predict(inputs)` and the CPU seconds the calling thread spent on it."""
    started = time.thread_time()
    outputs = predict(inputs)
    return outputs, time.thread_time() - started
