"""An online offload budget: a threshold that follows live traffic so the cloud share stays near a target.

A fixed threshold sends a fixed share of rows to the cloud only while traffic
looks like the validation set it was chosen on. When the confidence
distribution shifts (new users, new lighting, a new product line), the share
moves with it and can silently blow the cloud budget. `AdaptiveThreshold` keeps
the most recent row confidences in a bounded ring buffer and answers with the
threshold that would have offloaded `target_offload` of them.

    budget = AdaptiveThreshold(target_offload=0.15, window=2048, min_samples=64)
    ...
    budget.observe(confidence)                 # every row's confidence, as the router computes it
    threshold = budget.threshold(default=0.9)  # the configured threshold until min_samples are in
    offload = confidence < threshold

API:

- `AdaptiveThreshold(target_offload, window=2048, min_samples=64)`: target_offload
  in [0, 1]; window: how many recent confidences are kept (memory: 8 bytes each,
  allocated once); min_samples in [1, window]: how many must be seen before the
  window's quantile replaces the default.
- `observe(confidences)`: add a batch (any array-like of numbers; non-finite
  values are skipped). The oldest values are overwritten once the window is full.
- `threshold(default)`: `default` until min_samples confidences are in; then the
  target-offload quantile of the window: a threshold t such that the share of
  window rows with confidence < t is the largest not above target_offload (ties
  go together), placed midway between the two confidences it separates.
- `samples`: confidences currently held (at most window); `recent()`: a copy of
  them, oldest first; `nbytes`: the memory they take; `offload_share(t)`: the
  share of them below t.

It is pure logic, not thread-safe: call it from one thread (the router's event loop).
The threshold reacts within about one window of rows to a shift in traffic.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class AdaptiveThreshold:
    """The target-offload quantile of a bounded window of recent row confidences."""

    def __init__(self, target_offload: float, window: int = 2048, min_samples: int = 64) -> None:
        if not 0.0 <= target_offload <= 1.0:
            raise ValueError(f"target_offload must be in [0, 1], got {target_offload}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if not 1 <= min_samples <= window:
            raise ValueError(f"min_samples must be in [1, window={window}], got {min_samples}")
        self.target_offload = float(target_offload)
        self.window = int(window)
        self.min_samples = int(min_samples)
        self._values = np.zeros(self.window, dtype=np.float64)
        self._next = 0  # where the next value goes
        self._count = 0  # values held, at most window
        self._cached: float | None = None  # the threshold for the window as it is

    @property
    def samples(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Memory held for confidences: fixed at construction (8 bytes x window)."""
        return int(self._values.nbytes)

    def recent(self) -> npt.NDArray[np.float64]:
        """A copy of the confidences held, oldest first."""
        if self._count < self.window:
            return self._values[: self._count].copy()
        return np.concatenate([self._values[self._next :], self._values[: self._next]])

    def observe(self, confidences: npt.ArrayLike) -> None:
        """Add row confidences (non-finite ones are skipped); the oldest fall out of a full window."""
        values = np.asarray(confidences, dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        if values.size >= self.window:
            self._values[:] = values[-self.window :]
            self._next, self._count = 0, self.window
        else:
            end = self._next + values.size
            if end <= self.window:
                self._values[self._next : end] = values
            else:
                split = self.window - self._next
                self._values[self._next :] = values[:split]
                self._values[: end - self.window] = values[split:]
            self._next = end % self.window
            self._count = min(self.window, self._count + values.size)
        self._cached = None

    def threshold(self, default: float) -> float:
        """The threshold that offloads target_offload of the window; `default` until min_samples are in."""
        if self._count < self.min_samples:
            return default
        if self._cached is None:
            self._cached = _quantile_threshold(self._values[: self._count], self.target_offload)
        return self._cached

    def offload_share(self, threshold: float) -> float:
        """The share of the window's confidences below threshold (0 when empty)."""
        if self._count == 0:
            return 0.0
        return float(np.count_nonzero(self._values[: self._count] < threshold) / self._count)


def _quantile_threshold(values: npt.NDArray[np.float64], target: float) -> float:
    """The threshold offloading the largest share of values not above target (rows below it are offloaded)."""
    ordered = np.sort(values)
    rows = ordered.size
    wanted = int(np.floor(target * rows + 1e-9))  # rows to offload, at most
    if wanted == 0:
        return min(0.0, float(ordered[0]))
    if wanted >= rows:
        # Everything: any threshold above the largest confidence (confidences lie in [0, 1]).
        return max(1.0, float(np.nextafter(ordered[-1], np.inf)))
    # Ties: equal confidences go the same way, so step back to the first of the value at `wanted`.
    wanted = int(np.searchsorted(ordered, ordered[wanted], side="left"))
    if wanted == 0:
        return min(0.0, float(ordered[0]))
    return float((ordered[wanted - 1] + ordered[wanted]) / 2.0)
