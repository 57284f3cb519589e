"""What a server offers operators besides its gRPC port, as its settings ask: a plaintext health port,
Prometheus metrics on an HTTP port, and OpenTelemetry tracing.

    operations = Operations(settings, "offload-edge")      # tracing starts here: a bad setup stops start-up
    ... build and start the OipServer ...
    for line in await operations.start(server, EdgeCollector(...)):
        print(line)
    ... serve ...
    await operations.stop()
"""

from __future__ import annotations

import asyncio

from prometheus_client.registry import Collector

from offload.oip.address import host_port
from offload.oip.metrics import MetricsServer, ServerCollector, metrics_registry, on_loop
from offload.oip.server import OipServer
from offload.oip.settings import ServerSettings
from offload.oip.tracing import start_tracing, stop_tracing


class Operations:
    """The health port, the metrics port and tracing of one server named `name` (offload-edge, offload-cloud)."""

    def __init__(self, settings: ServerSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        # Metric names start with the server's name: offload_edge_..., offload_cloud_...
        self.prefix = name.replace("-", "_")
        self.metrics: MetricsServer | None = None
        self._tracing = settings.tracing
        if self._tracing:
            # First of all, so that a missing extra or a wrong OTEL_* value stops start-up before models load.
            start_tracing(name)

    async def start(self, server: OipServer, collector: Collector) -> list[str]:
        """Open the ports the settings ask for, once `server` serves; returns a line to print for each.

        `collector` gives the server's own metrics (its snapshot taken on this event loop, see `on_loop`);
        the OIP server's calls by status and the process's figures come with it.
        """
        settings, lines = self.settings, []
        if settings.health_port is not None:
            port = await server.start_health(settings.host, settings.health_port)
            lines.append(f"{self.name} health on {host_port(settings.host, port)} (grpc.health.v1 only, plaintext)")
        if settings.metrics_port is not None:
            calls = ServerCollector(self.prefix, on_loop(asyncio.get_running_loop(), server.stats))
            self.metrics = MetricsServer(metrics_registry(calls, collector))
            host = settings.metrics_host or settings.host
            port = self.metrics.start(host, settings.metrics_port)
            lines.append(f"{self.name} metrics on http://{host_port(host, port)}/metrics")
        if self._tracing:
            lines.append(f"{self.name} tracing on (OpenTelemetry; exporter from OTEL_* environment variables)")
        return lines

    async def stop(self) -> None:
        """Close the metrics port and send the spans not sent yet (the health port closes with the server)."""
        if self.metrics is not None:
            await self.metrics.stop()
        if self._tracing:
            stop_tracing()
