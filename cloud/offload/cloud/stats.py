"""The cloud service's running totals, as one frozen snapshot: `CloudDataPlane.stats()` returns a `CloudStats`.

The single source of the cloud's counters for whoever reports on it (metrics, health details):
each piece (the scheduler, the registry, the response cache, the data plane's per-model counts)
keeps its own live counters and hands out a frozen copy, and the data plane puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from offload.cloud.registry import ModelLoad
from offload.cloud.scheduler import SchedulerStats
from offload.oip.stats import HistogramSnapshot

# How a request was answered: the model ran, or the response cache had the whole answer.
ROUTES = ("model", "cache")


@dataclass(frozen=True, slots=True)
class ModelServing:
    """One model's answered requests (refused and failed ones are in the server's status counts)."""

    requests: Mapping[str, int]  # by ROUTES
    rows: Mapping[str, int]  # by ROUTES
    seconds: HistogramSnapshot  # from the data plane's start on the request to its answer, queueing included


@dataclass(frozen=True, slots=True)
class ResponseCacheStats:
    hits: int
    misses: int
    bytes: int
    entries: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class CloudStats:
    scheduler: SchedulerStats
    models: Mapping[str, ModelServing]
    loads: Mapping[str, ModelLoad]  # per model: its load and warm-up time
    response_cache: ResponseCacheStats | None  # None: no response cache
