"""The router's running totals, as one frozen snapshot: `Router.stats()` returns a `RouterStats`.

This is the single source of counters for whoever reports on a router (the edge
agent's status line; metrics next): every piece keeps its own live counters private
and hands out a frozen copy, and the router puts those copies together. All counts
are totals since the piece was made; a reader that wants rates takes differences.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from offload.oip.stats import HistogramSnapshot
from offload.router.resilience import BreakerState

# Where a row's answer came from; "degraded": meant for the cloud, answered by the edge because the cloud failed.
ROW_ROUTES = ("edge", "cloud", "cache", "degraded")


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """One replica of the cloud: how its circuit stands and what was sent to it."""

    target: str
    circuit: BreakerState
    circuit_changes: int
    calls: int  # RPCs sent to it (first attempts, retries and hedges alike)
    failures: int  # of those, the ones that ended in an error status (not those their caller cancelled)
    outstanding: int  # in flight now
    reachable: bool  # False while its channel cannot connect (the process is gone, the port closed)


@dataclass(frozen=True, slots=True)
class UpstreamStats:
    """The upstream the router sends rows to: where it is, how its circuit stands, what its calls did.

    The totals are the pool's (one cloud, however many replicas); `replicas` has each replica's own
    figures, for the replicas the pool has now (one that DNS no longer lists leaves it, its calls
    staying in the totals).
    """

    target: str  # as configured: one address, several, or dns:///NAME:PORT
    circuit: BreakerState  # closed while any replica's is; else half_open while any is; else open
    circuit_changes: int  # transitions of the replicas' circuits, all together
    retry_tokens: float  # left in the retry budget's bucket
    retry_tokens_max: float
    calls: int  # cloud-bound requests
    attempts: int  # RPCs sent, retries and hedges included
    retries: int
    hedges: int
    failures: int  # requests that ended in CloudFailure
    short_circuited: int  # refused by the open breaker
    by_outcome: Mapping[str, int]  # attempts by the gRPC status they ended with (cancelled ones: none)
    call_seconds: HistogramSnapshot  # how long calls past the breakers took, every attempt and backoff included
    replicas: tuple[ReplicaStats, ...]

    @property
    def retry_tokens_text(self) -> str:
        """The retry tokens left of the bucket, as "7.0/10"."""
        return f"{self.retry_tokens:.1f}/{self.retry_tokens_max:g}"


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The row cache of cloud answers."""

    hits: int
    misses: int
    shared: int  # rows that waited for another request's cloud call (single-flight)
    invalidations: int
    bytes: int
    entries: int
    max_bytes: int
    evicted: int  # entries dropped, least recently used first, to make room
    expired: int  # entries dropped because their TTL ran out


@dataclass(frozen=True, slots=True)
class AuditStats:
    """Edge-cloud agreement on confident rows that were also sent to the cloud in the background."""

    rows: int = 0
    agreed: int = 0
    failed: int = 0
    skipped: int = 0  # picked while the most audits allowed were already waiting on the cloud

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.rows if self.rows else None


@dataclass(frozen=True, slots=True)
class CoalesceStats:
    """Cloud calls made for the router's rows (offload.router.coalesce), and those that carried several requests."""

    calls: int = 0  # cloud calls made for requests' rows (audits included), coalesced or not
    coalesced_calls: int = 0  # of those, the ones that carried the rows of more than one request
    coalesced_requests: int = 0  # requests whose rows travelled in those
    coalesced_rows: int = 0  # rows those carried
    held_requests: int = 0  # requests whose rows wait to be sent now (a level, not a total)


@dataclass(frozen=True, slots=True)
class EdgeRunStats:
    """Runs of the edge models, by where they ran (offload.router.placement)."""

    inline: int = 0  # on the event loop: their measured cost was below the hand-off's
    threaded: int = 0  # handed to a worker thread


@dataclass(frozen=True, slots=True)
class ModelTraffic:
    """One model's answered requests (failed ones are in RouterStats.errors and the server's status counts)."""

    requests: Mapping[str, int]  # by the answer's offload_route: edge, cloud, cache or mixed
    degraded_requests: int  # answers with at least one degraded row
    rows: Mapping[str, int]  # by ROW_ROUTES: every answered row in exactly one
    seconds: Mapping[str, HistogramSnapshot]  # by the answer's offload_route: the router's time to answer
    confidence: HistogramSnapshot  # the edge model's confidence in every row it ran on


@dataclass(frozen=True, slots=True)
class RouterStats:
    """Everything a router has counted, at one moment."""

    requests: int  # answered or failed, in-process callers and the OIP server alike
    degraded: int  # answered, with some rows the edge's because the cloud failed
    errors: int  # ended in an error
    thresholds: Mapping[str, float]  # per model: the threshold unsure rows are judged by now
    audit: AuditStats
    cloud: UpstreamStats | None  # None: the router has no cloud (everything is answered on the edge)
    cache: CacheStats | None  # None: no row cache
    models: Mapping[str, ModelTraffic]  # per model served: what was answered, how and how fast
    edge_runs: EdgeRunStats = EdgeRunStats()  # where the edge models ran
    coalescing: CoalesceStats | None = None  # None: no cloud, or every request's rows in calls of their own
