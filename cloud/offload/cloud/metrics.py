"""The cloud service's Prometheus metrics (`offload_cloud_*`), read from `CloudDataPlane.stats()` at each scrape.

Per model: requests and rows by route (the model ran, or the response cache answered), the time to
answer, load and warm-up time. The scheduler: queue depth, model calls and rows in flight, admitted
and refused rows and requests, queue delay and batch size. The response cache. The OIP server's calls by status code
come from offload.oip.metrics.ServerCollector.

Each section is one function of its snapshot, one `yield` per metric: a figure added to a snapshot
(the scheduler's, say) is one more line here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric

from offload.cloud.scheduler import SchedulerStats
from offload.cloud.stats import CloudStats, ResponseCacheStats
from offload.oip.metrics import counter, counters, gauge, gauges, histograms

PREFIX = "offload_cloud"


class CloudCollector:
    """Metric families from the data plane's stats snapshot (`stats`, taken on the event loop)."""

    def __init__(self, stats: Callable[[], CloudStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield from _models(stats)
        yield from _scheduler(stats.scheduler)
        if stats.response_cache is not None:
            yield from _response_cache(stats.response_cache)


def _models(stats: CloudStats) -> Iterator[Metric]:
    models = sorted(stats.models.items())
    yield counters(
        f"{PREFIX}_requests_total",
        "Answered requests by model and route: model (the model ran) or cache (the response cache answered).",
        ("model", "route"),
        [((name, route), count) for name, served in models for route, count in served.requests.items()],
    )
    yield counters(
        f"{PREFIX}_rows_total",
        "Answered rows by model and route (model or cache).",
        ("model", "route"),
        [((name, route), count) for name, served in models for route, count in served.rows.items()],
    )
    yield histograms(
        f"{PREFIX}_request_duration_seconds",
        "How long answers took, by model: waiting for a thread and the model call included.",
        ("model",),
        [((name,), served.seconds) for name, served in models],
    )
    loads = sorted(stats.loads.items())
    yield gauges(
        f"{PREFIX}_model_load_seconds",
        "How long loading the model took at start-up.",
        ("model",),
        [((name,), load.load_seconds) for name, load in loads],
    )
    yield gauges(
        f"{PREFIX}_model_warmup_seconds",
        "How long the model's warm-up batch took at start-up.",
        ("model",),
        [((name,), load.warmup_seconds) for name, load in loads],
    )


def _scheduler(scheduler: SchedulerStats) -> Iterator[Metric]:
    yield gauge(f"{PREFIX}_queue_depth", "Admitted rows waiting to be taken into a batch.", scheduler.queued_rows)
    yield gauge(f"{PREFIX}_calls_in_flight", "Model calls (batches) running now.", scheduler.running)
    yield gauge(f"{PREFIX}_calls_in_flight_peak", "The most model calls ever running at once.", scheduler.peak_running)
    yield gauge(
        f"{PREFIX}_capacity_calls",
        "Model calls that may run at once for one model (its instances).",
        scheduler.instances,
    )
    yield gauge(f"{PREFIX}_rows_in_flight", "Admitted rows, queued or running.", scheduler.admitted_rows)
    yield gauge(f"{PREFIX}_bytes_in_flight", "Bytes of admitted requests' inputs.", scheduler.admitted_bytes)
    yield gauge(f"{PREFIX}_capacity_rows", "Rows that may be admitted at once (max_inflight_rows).", scheduler.max_rows)
    yield gauge(
        f"{PREFIX}_capacity_bytes",
        "Bytes of inputs that may be admitted at once (max_inflight_bytes).",
        scheduler.max_bytes,
    )
    yield counter(f"{PREFIX}_admitted_rows_total", "Rows of the requests admitted.", scheduler.admitted_rows_total)
    yield counter(
        f"{PREFIX}_rejected_rows_total",
        "Rows refused at capacity or as too late for their deadline (RESOURCE_EXHAUSTED with a retry pushback).",
        scheduler.rejected_rows,
    )
    yield counter(f"{PREFIX}_rejected_calls_total", "Requests refused at capacity (rows or bytes).", scheduler.rejected)
    yield counter(
        f"{PREFIX}_rejected_late_calls_total",
        "Requests refused because the work queued ahead of them would outlast their deadline.",
        scheduler.rejected_late,
    )
    yield counter(f"{PREFIX}_started_calls_total", "Requests whose rows began to run.", scheduler.started)
    yield counter(
        f"{PREFIX}_dropped_calls_total",
        "Admitted requests never run: their caller went away or its deadline passed first.",
        scheduler.dropped,
    )
    yield counter(
        f"{PREFIX}_batches_total", "Model calls, each on the rows of one or more requests.", scheduler.batches
    )
    yield histograms(
        f"{PREFIX}_queue_delay_seconds",
        "How long each request begun had waited since it was admitted for its first batch.",
        (),
        (((), scheduler.queue_seconds),),
    )
    yield histograms(f"{PREFIX}_batch_size_rows", "Rows per model call begun.", (), (((), scheduler.batch_rows),))


def _response_cache(cache: ResponseCacheStats) -> Iterator[Metric]:
    yield counter(f"{PREFIX}_response_cache_hits_total", "Requests answered whole from the response cache.", cache.hits)
    yield counter(
        f"{PREFIX}_response_cache_misses_total", "Requests looked up in the response cache and not found.", cache.misses
    )
    yield gauge(f"{PREFIX}_response_cache_size_bytes", "Bytes of cached answers.", cache.bytes)
    yield gauge(f"{PREFIX}_response_cache_max_bytes", "The response cache's bound in bytes.", cache.max_bytes)
    yield gauge(f"{PREFIX}_response_cache_entries", "Answers cached.", cache.entries)
