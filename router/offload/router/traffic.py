"""What the router answered, per model: requests and rows by route, how long answers took, the edge's confidence.

Kept by the router as it answers (`Traffic`), handed out as frozen `ModelTraffic` in `Router.stats()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from offload.oip.stats import SECONDS_BUCKETS, Histogram
from offload.router.answer import Answer
from offload.router.options import AnsweredBy
from offload.router.stats import ROW_ROUTES, ModelTraffic

# The edge's row confidences: tenths, then finer towards 1, where thresholds sit.
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)


@dataclass(slots=True)
class _ModelCounts:
    requests: dict[str, int] = field(default_factory=dict)
    degraded_requests: int = 0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROW_ROUTES, 0))
    seconds: dict[str, Histogram] = field(default_factory=dict)
    confidence: Histogram = field(default_factory=lambda: Histogram(CONFIDENCE_BUCKETS))


class Traffic:
    """Live per-model counts for the models a router serves; `stats()` hands out a frozen copy."""

    def __init__(self, models: Iterable[str]) -> None:
        self._models = {name: _ModelCounts() for name in models}

    def edge_ran(self, model: str, confidence: npt.NDArray[np.float64]) -> None:
        """The edge model ran on a batch whose rows have this confidence."""
        self._models[model].confidence.observe_many(confidence)

    def answered(self, model: str, route: str, answer: Answer, seconds: float) -> None:
        """A request was answered with offload_route `route` after `seconds`; `answer` holds its rows."""
        counts = self._models[model]
        counts.requests[route] = counts.requests.get(route, 0) + 1
        histogram = counts.seconds.get(route)
        if histogram is None:
            histogram = counts.seconds[route] = Histogram(SECONDS_BUCKETS)
        histogram.observe(seconds)
        degraded = int(np.count_nonzero(answer.degraded))
        counts.degraded_requests += degraded > 0
        counts.rows["degraded"] += degraded
        # Counted in a list (C compares, identity first) rather than by elementwise == on an object array.
        routes = answer.routes.tolist()
        if degraded:
            routes = [route for route, flagged in zip(routes, answer.degraded.tolist(), strict=True) if not flagged]
        counts.rows["edge"] += routes.count(AnsweredBy.EDGE)
        counts.rows["cloud"] += routes.count(AnsweredBy.CLOUD)
        counts.rows["cache"] += routes.count(AnsweredBy.CACHE)

    def stats(self) -> dict[str, ModelTraffic]:
        return {
            name: ModelTraffic(
                requests=dict(counts.requests),
                degraded_requests=counts.degraded_requests,
                rows=dict(counts.rows),
                seconds={route: histogram.snapshot() for route, histogram in counts.seconds.items()},
                confidence=counts.confidence.snapshot(),
            )
            for name, counts in self._models.items()
        }
