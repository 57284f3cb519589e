"""Prometheus metrics over HTTP, read from the stats snapshots at scrape time.

No second set of counters: each server's collector (offload.edge.metrics, offload.cloud.metrics,
and `ServerCollector` here for the OIP server's own calls) turns a stats snapshot into metric
families when Prometheus scrapes. Counters keep their meaning from the snapshot (totals since
the process started), histograms come from the fixed-bucket counts in it (offload.oip.stats).

prometheus-client serves `/metrics` from a thread of its own, while the counters live on the
server's event loop: `on_loop` takes each snapshot on the loop, so a scrape sees every counter
of a piece at one moment and never a dictionary half updated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from offload.oip.address import host_port
from offload.oip.observe import ServerStats
from offload.oip.stats import HistogramSnapshot

T = TypeVar("T")
# How long a scrape waits for the event loop to hand over a snapshot (a loop blocked this long is news).
SNAPSHOT_TIMEOUT_SECONDS = 5.0

Labels = tuple[str, ...]


def on_loop(loop: asyncio.AbstractEventLoop, snapshot: Callable[[], T]) -> Callable[[], T]:
    """`snapshot`, called on `loop` whichever thread calls the result (the metrics server's, at a scrape)."""

    def taken() -> T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread
            running = None
        if running is loop:
            return snapshot()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(snapshot())
            except Exception as exc:  # handed to the scrape, which answers 500 with it
                result.set_exception(exc)

        loop.call_soon_threadsafe(take)
        return result.result(SNAPSHOT_TIMEOUT_SECONDS)

    return taken


# --- metric families from snapshot values ------------------------------------------------------------------------


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def counters(
    name: str, documentation: str, labels: Labels, values: Iterable[tuple[Labels, float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def gauges(name: str, documentation: str, labels: Labels, values: Iterable[tuple[Labels, float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def histograms(
    name: str, documentation: str, labels: Labels, values: Iterable[tuple[Labels, HistogramSnapshot]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for label_values, snapshot in values:
        buckets = [(_bound(bound), float(count)) for bound, count in snapshot.cumulative()]
        family.add_metric(label_values, buckets, snapshot.total)
    return family


def _bound(bound: float) -> str:
    """A bucket's `le` label as Prometheus writes it: 0.005, 1.0, +Inf."""
    return "+Inf" if math.isinf(bound) else repr(bound)


def labelled(values: Mapping[str, T]) -> Iterator[tuple[Labels, T]]:
    """A mapping's items with each key as the one label value, in key order (stable output)."""
    for key in sorted(values):
        yield (key,), values[key]


# --- the OIP server's calls -------------------------------------------------------------------------------------


class ServerCollector:
    """`<prefix>_grpc_*`: an OIP server's calls to the inference service by method and status code."""

    def __init__(self, prefix: str, stats: Callable[[], ServerStats]) -> None:
        self._prefix = prefix
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats, prefix = self._stats(), self._prefix
        yield counters(
            f"{prefix}_grpc_requests_total",
            "Calls to the inference service that ended, by method and gRPC status code.",
            ("method", "code"),
            (((method, code), count) for (method, code), count in sorted(stats.calls.items())),
        )
        yield histograms(
            f"{prefix}_grpc_request_duration_seconds",
            "How long calls to the inference service took, by method, whatever their status.",
            ("method",),
            labelled(stats.seconds),
        )
        yield gauge(
            f"{prefix}_grpc_requests_in_flight", "Calls to the inference service being handled now.", stats.in_flight
        )


# --- the HTTP endpoint ------------------------------------------------------------------------------------------


def metrics_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of `collectors` and the process's own (CPU, memory, open files, Python GC, version)."""
    registry = CollectorRegistry()
    for collector in (*collectors, PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class MetricsServer:
    """`/metrics` in the Prometheus text format on host:port, from a thread of prometheus-client's."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._stop: Callable[[], None] | None = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        """Listen (port 0: any free one) and serve; returns the bound port. OSError if it cannot bind."""
        try:
            server, thread = start_http_server(port, host, self._registry)
        except OSError as exc:
            raise OSError(f"could not serve metrics on {host_port(host, port)}: {exc.strerror or exc}") from exc
        self.port = int(server.server_address[1])

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        self._stop = stop
        return self.port

    async def stop(self) -> None:
        if self._stop is not None:
            # shutdown() waits for the serving thread's loop to notice (up to half a second): off the event loop.
            await asyncio.to_thread(self._stop)
            self._stop = None
