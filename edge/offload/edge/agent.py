"""Assemble the edge agent: edge models from the repository, the cloud's replicas, the router, the server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from offload.edge.dataplane import SERVER_NAME, RouterDataPlane
from offload.edge.onnx_model import OnnxModel
from offload.edge.settings import EdgeSettings
from offload.edge.status import StatusLog
from offload.oip.errors import ConfigurationError
from offload.oip.repository import load_repository
from offload.oip.server import OipServer, serve_until_signalled
from offload.router.cache import RowCache
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.pool import CloudPool
from offload.router.resilience import BreakerPolicy, BreakerState, RetryBudget, RetryThrottle
from offload.router.upstream import RetryPolicy, Sleep

log = logging.getLogger(__name__)


def load_edge_models(repository: Path) -> dict[str, RoutedModel]:
    models: dict[str, RoutedModel] = {}
    for name, entry in load_repository(repository).items():
        section = entry.config.edge
        if section is None:
            continue
        onnx = OnnxModel(entry.artifact_path(section.artifact), section)
        onnx.check_declared(entry.config.inputs, entry.config.outputs)
        routed = RoutedModel(entry.config, onnx)
        if routed.score_output not in {spec.name for spec in onnx.outputs}:
            raise ConfigurationError(
                f"model {name!r}: routing.output {routed.score_output!r} is not an output of {onnx.path}"
            )
        log.info(
            "loaded %s v%s on the edge (%s, threshold %.3f)",
            name,
            entry.config.version,
            ",".join(onnx.providers),
            routed.routing.threshold,
        )
        models[name] = routed
    if not models:
        raise ConfigurationError(f"no model in {repository} has an [edge] section")
    return models


def build_cloud_pool(
    settings: EdgeSettings,
    on_breaker_change: Callable[[BreakerState], None] | None = None,
    sleep: Sleep | None = None,
) -> CloudPool | None:
    """The cloud's replicas the settings describe; `sleep` replaces asyncio.sleep for backoffs (tests)."""
    if not settings.cloud:
        return None
    return CloudPool(
        settings.cloud,
        settings.cloud_timeout_seconds,
        settings.max_message_bytes,
        max_elements=settings.max_elements,
        retry=settings.policy(RetryPolicy),
        throttle=RetryThrottle(settings.policy(RetryBudget)),
        breaker=settings.policy(BreakerPolicy),
        hedge_delay_seconds=settings.hedge_delay_seconds,
        on_breaker_change=on_breaker_change,
        sleep=sleep or asyncio.sleep,
        resolve_seconds=settings.cloud_resolve_seconds,
    )


def build_router(settings: EdgeSettings, on_breaker_change: Callable[[BreakerState], None] | None = None) -> Router:
    """The in-process router an app can call directly, configured like the agent."""
    executor = ThreadPoolExecutor(settings.edge_threads, thread_name_prefix="edge-infer")
    cache = RowCache(settings.cache_max_bytes, settings.cache_ttl_seconds) if settings.cache_max_bytes else None
    return Router(
        load_edge_models(settings.model_repository),
        build_cloud_pool(settings, on_breaker_change),
        executor,
        deadline_reserve_seconds=settings.deadline_reserve_seconds,
        cache=cache,
        target_offload=settings.target_offload,
        audit_share=settings.audit_share,
    )


# The health service name that reports the circuit to the cloud: SERVING while at
# least one replica's is closed, NOT_SERVING while none is (rows are answered on the edge).
CLOUD_HEALTH_SERVICE = "offload.cloud"


async def run(settings: EdgeSettings) -> None:
    server: OipServer | None = None

    def breaker_changed(state: BreakerState) -> None:
        if server is not None:
            server.set_service_health_soon(CLOUD_HEALTH_SERVICE, state is BreakerState.CLOSED)

    router = build_router(settings, breaker_changed)
    plane = RouterDataPlane(router)
    server = OipServer(plane, SERVER_NAME, settings.limits)
    port = await server.start(settings.host, settings.grpc_port)
    if settings.cloud:
        await server.set_service_health(CLOUD_HEALTH_SERVICE, serving=True)
    cloud = settings.cloud or "none (edge answers only)"
    print(f"offload-edge listening on {settings.host}:{port} (cloud: {cloud})", flush=True)
    status = StatusLog(router.stats, settings.status_log_seconds)
    reporter = asyncio.create_task(status.run()) if settings.status_log_seconds > 0 else None
    try:
        await serve_until_signalled(server, settings.grace_seconds)
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            status.log()  # what happened since the last line, so a shutdown does not lose it
        await router.close()
