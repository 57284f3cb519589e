"""The edge agent's Prometheus metrics (`offload_edge_*`), read from `Router.stats()` at each scrape.

Per model: requests by the answer's route, rows by where their answer came from (edge, cloud,
cache, degraded), the router's time to answer, the edge's row confidences and the threshold in
force. The cloud pool's totals (label `target`, as configured): calls, attempts by status, retries,
hedges, failures, short-circuits, call latency, circuit state and the shared retry tokens; and each
replica's own (`offload_edge_cloud_replica_*`, label `target`, its address): calls, failures, calls
in flight, circuit state, reachability. The row cache, coalescing and the audit; where the edge models
ran. The OIP server's calls by status code come from offload.oip.metrics.ServerCollector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import Metric

from offload.oip.metrics import Labels, counter, counters, gauge, gauges, histograms, labelled
from offload.router.resilience import BreakerState
from offload.router.stats import CacheStats, CoalesceStats, ReplicaStats, RouterStats, UpstreamStats

PREFIX = "offload_edge"


class EdgeCollector:
    """Metric families from the router's stats snapshot (`stats`, taken on the event loop)."""

    def __init__(self, stats: Callable[[], RouterStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield from _traffic(stats)
        yield counter(f"{PREFIX}_request_errors_total", "Requests the router ended with an error.", stats.errors)
        runs = stats.edge_runs
        yield counters(
            f"{PREFIX}_model_runs_total",
            "Runs of the edge models by where they ran: inline on the event loop, or on an edge thread.",
            ("place",),
            ((("inline",), runs.inline), (("thread",), runs.threaded)),
        )
        if stats.coalescing is not None:
            yield from _coalescing(stats.coalescing)
        if stats.cloud is not None:
            yield from _cloud(stats.cloud)
            yield from _replicas(stats.cloud.replicas)
        if stats.cache is not None:
            yield from _cache(stats.cache)
        audit = stats.audit
        yield counter(f"{PREFIX}_audit_rows_total", "Confident rows also sent to the cloud to check.", audit.rows)
        yield counter(
            f"{PREFIX}_audit_agreed_rows_total", "Audited rows on whose top class the cloud agreed.", audit.agreed
        )
        yield counter(f"{PREFIX}_audit_failed_rows_total", "Audited rows whose cloud call failed.", audit.failed)
        yield counter(
            f"{PREFIX}_audit_skipped_rows_total",
            "Rows picked for audit but skipped: too many audits out.",
            audit.skipped,
        )


def _traffic(stats: RouterStats) -> Iterator[Metric]:
    models = sorted(stats.models.items())
    yield counters(
        f"{PREFIX}_requests_total",
        "Answered requests by model and the answer's route (edge, cloud, cache or mixed).",
        ("model", "route"),
        [((name, route), count) for name, traffic in models for route, count in sorted(traffic.requests.items())],
    )
    yield counters(
        f"{PREFIX}_degraded_requests_total",
        "Answered requests with rows meant for the cloud answered by the edge because the cloud failed.",
        ("model",),
        [((name,), traffic.degraded_requests) for name, traffic in models],
    )
    yield counters(
        f"{PREFIX}_rows_total",
        "Answered rows by model and where their answer came from: edge, cloud, cache or degraded (meant for the "
        "cloud, answered by the edge).",
        ("model", "route"),
        [((name, route), count) for name, traffic in models for route, count in traffic.rows.items()],
    )
    yield histograms(
        f"{PREFIX}_request_duration_seconds",
        "How long the router took to answer, by model and the answer's route.",
        ("model", "route"),
        [((name, route), seconds) for name, traffic in models for route, seconds in sorted(traffic.seconds.items())],
    )
    yield histograms(
        f"{PREFIX}_confidence_ratio",
        "The edge model's confidence in each row it ran on (rows below the threshold go to the cloud).",
        ("model",),
        [((name,), traffic.confidence) for name, traffic in models],
    )
    yield gauges(
        f"{PREFIX}_threshold_ratio",
        "The confidence a row needs now to stay on the edge (requests may set their own).",
        ("model",),
        labelled(stats.thresholds),
    )


def _cloud(cloud: UpstreamStats) -> Iterator[Metric]:
    """The pool's totals, labelled by `target` as configured (one address, several, or dns:///...)."""
    target = ("target",)

    def total(value: float) -> tuple[tuple[Labels, float]]:
        return (((cloud.target,), value),)

    yield counters(f"{PREFIX}_cloud_requests_total", "Requests sent towards the cloud.", target, total(cloud.calls))
    yield counters(
        f"{PREFIX}_cloud_attempts_total",
        "RPCs to the cloud that ended, by gRPC status code (retries and hedges included; cancelled ones not).",
        ("target", "code"),
        [((cloud.target, code), count) for code, count in sorted(cloud.by_outcome.items())],
    )
    yield counters(f"{PREFIX}_cloud_retries_total", "Retried attempts.", target, total(cloud.retries))
    yield counters(f"{PREFIX}_cloud_hedges_total", "Hedged attempts sent.", target, total(cloud.hedges))
    yield counters(
        f"{PREFIX}_cloud_failures_total",
        "Cloud requests that failed for good (their rows were answered by the edge, or the caller got the error).",
        target,
        total(cloud.failures),
    )
    yield counters(
        f"{PREFIX}_cloud_short_circuited_total",
        "Cloud requests refused at once because every replica's circuit breaker was open.",
        target,
        total(cloud.short_circuited),
    )
    yield histograms(
        f"{PREFIX}_cloud_request_duration_seconds",
        "How long cloud requests past the breakers took, every attempt and backoff included.",
        target,
        (((cloud.target,), cloud.call_seconds),),
    )
    yield gauges(
        f"{PREFIX}_cloud_circuit_state",
        "The pool's circuit: 1 for the state it is in (closed while any replica's is closed; else half_open while "
        "any is; else open), 0 for the others.",
        ("target", "state"),
        [((cloud.target, str(state)), float(cloud.circuit is state)) for state in BreakerState],
    )
    yield counters(
        f"{PREFIX}_cloud_circuit_changes_total",
        "Circuit breaker transitions, every replica's together.",
        target,
        total(cloud.circuit_changes),
    )
    yield gauges(
        f"{PREFIX}_cloud_retry_tokens",
        "Tokens left in the retry budget every replica shares (retries and hedges stop at half the maximum).",
        target,
        total(cloud.retry_tokens),
    )
    yield gauges(f"{PREFIX}_cloud_retry_tokens_max", "The retry budget's size.", target, total(cloud.retry_tokens_max))


def _replicas(replicas: Iterable[ReplicaStats]) -> Iterator[Metric]:
    """Each replica the pool has now, labelled by `target`: its address (host:port, as DNS gave it)."""
    ordered = sorted(replicas, key=lambda replica: replica.target)
    target = ("target",)

    def each(value: Callable[[ReplicaStats], float]) -> list[tuple[Labels, float]]:
        return [((replica.target,), value(replica)) for replica in ordered]

    yield counters(
        f"{PREFIX}_cloud_replica_requests_total",
        "RPCs sent to a replica (first attempts, retries and hedges alike).",
        target,
        each(lambda r: r.calls),
    )
    yield counters(
        f"{PREFIX}_cloud_replica_failures_total",
        "RPCs to a replica that ended in an error status (not those their caller cancelled).",
        target,
        each(lambda r: r.failures),
    )
    yield gauges(
        f"{PREFIX}_cloud_replica_requests_in_flight",
        "RPCs to a replica in flight now.",
        target,
        each(lambda r: r.outstanding),
    )
    yield gauges(
        f"{PREFIX}_cloud_replica_circuit_state",
        "A replica's circuit breaker: 1 for the state it is in (closed, open, half_open), 0 for the others.",
        ("target", "state"),
        [
            ((replica.target, str(state)), float(replica.circuit is state))
            for replica in ordered
            for state in BreakerState
        ],
    )
    yield counters(
        f"{PREFIX}_cloud_replica_circuit_changes_total",
        "A replica's circuit breaker transitions.",
        target,
        each(lambda r: r.circuit_changes),
    )
    yield gauges(
        f"{PREFIX}_cloud_replica_reachable",
        "1 while a replica's channel can connect, 0 while it cannot (the process is gone, the port closed).",
        target,
        each(lambda r: r.reachable),
    )


def _coalescing(coalescing: CoalesceStats) -> Iterator[Metric]:
    yield counter(
        f"{PREFIX}_coalesced_calls_total",
        "Cloud calls that carried the rows of more than one request.",
        coalescing.coalesced_calls,
    )
    yield counter(
        f"{PREFIX}_coalesced_requests_total", "Requests whose rows travelled in those.", coalescing.coalesced_requests
    )
    yield counter(f"{PREFIX}_coalesced_rows_total", "Rows those carried.", coalescing.coalesced_rows)
    yield gauge(
        f"{PREFIX}_coalescing_held_requests", "Requests whose rows wait now to share a call.", coalescing.held_requests
    )


def _cache(cache: CacheStats) -> Iterator[Metric]:
    yield counter(f"{PREFIX}_cache_hits_total", "Rows answered from the row cache.", cache.hits)
    yield counter(f"{PREFIX}_cache_misses_total", "Rows looked up and not found, then sent to the cloud.", cache.misses)
    yield counter(
        f"{PREFIX}_cache_shared_total",
        "Rows that waited for an identical row's cloud call (single-flight).",
        cache.shared,
    )
    yield counters(
        f"{PREFIX}_cache_evictions_total",
        "Entries dropped: to make room (size, least recently used first) or at the end of their TTL (ttl).",
        ("reason",),
        ((("size",), cache.evicted), (("ttl",), cache.expired)),
    )
    yield counter(
        f"{PREFIX}_cache_invalidations_total",
        "Times a model's entries were dropped (a new version).",
        cache.invalidations,
    )
    yield gauge(f"{PREFIX}_cache_size_bytes", "Bytes of cached answers.", cache.bytes)
    yield gauge(f"{PREFIX}_cache_max_bytes", "The cache's bound in bytes.", cache.max_bytes)
    yield gauge(f"{PREFIX}_cache_entries", "Rows cached.", cache.entries)
