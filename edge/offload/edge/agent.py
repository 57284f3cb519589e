"""Assemble the edge agent: edge models from the repository, the cloud's replicas, the router, the server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from offload.edge.config import EdgeSection
from offload.edge.dataplane import SERVER_NAME, RouterDataPlane
from offload.edge.gate import GatedModel
from offload.edge.metrics import EdgeCollector
from offload.edge.onnx_model import DEFAULT_CHUNK_BYTES, OnnxModel
from offload.edge.recording import Recorder
from offload.edge.rollout import ModelRollout
from offload.edge.settings import EdgeSettings
from offload.edge.status import StatusLog
from offload.oip.errors import ConfigurationError, one_line
from offload.oip.memory import limit_arenas
from offload.oip.metrics import on_loop
from offload.oip.operations import Operations
from offload.oip.repository import load_repository
from offload.oip.server import OipServer, serve_until_signalled
from offload.router.cache import RowCache
from offload.router.config import RoutedConfig
from offload.router.core import Router
from offload.router.fetch import CloudRowsHook
from offload.router.models import RoutedModel
from offload.router.pool import CloudPool
from offload.router.resilience import BreakerPolicy, BreakerState, RetryBudget, RetryThrottle
from offload.router.upstream import RetryPolicy, Sleep, Upstream

log = logging.getLogger(__name__)


def load_edge_models(
    repository: Path,
    keep: Mapping[str, RoutedModel] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    gates: bool = True,
) -> dict[str, RoutedModel]:
    """The [edge] models of a repository, loaded; those named in `keep` are taken from it as they are
    (a rollout keeps the models it did not change). Each runs a batch in chunks of at most `chunk_bytes`
    of input. gates=False leaves out their gates (`offload calibrate --gate` trains a new one, so an old
    one missing or broken must not stop it)."""
    models: dict[str, RoutedModel] = {}
    for name, entry in load_repository(repository).items():
        if keep is not None and name in keep:
            models[name] = keep[name]
            continue
        section = entry.section("edge", EdgeSection)
        if section is None:
            continue
        # The [routing] table is the router's to validate; a wrong one stops start-up before any model loads.
        config = RoutedConfig.of(entry)
        onnx = OnnxModel(entry.artifact_path(section.artifact), section, chunk_bytes)
        onnx.check_declared(entry.config.inputs, entry.config.outputs)
        routed = RoutedModel(config, onnx)
        if routed.score_output not in {spec.name for spec in onnx.outputs}:
            raise ConfigurationError(
                f"model {name!r}: routing.output {routed.score_output!r} is not an output of {onnx.path}"
            )
        if gates and config.routing.gate is not None:
            # confidence = "gate": the gate runs after the model, on the same settings (threads, providers).
            gate = OnnxModel(entry.artifact_path(config.routing.gate), section)
            routed = RoutedModel(config, GatedModel(onnx, gate, routed.score_output))
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


def warm_up_models(models: Mapping[str, RoutedModel]) -> None:
    """Warm each model up before it serves (RoutedModel.warm_up: lazy set-up, and what a row costs, which decides
    where its batches run). One that fails on a row of zeros still serves: its requests will say what is wrong."""
    for name, model in models.items():
        try:
            model.warm_up()
        except Exception as exc:  # a model can make its runtime raise anything
            log.warning("%s v%s: its warm-up on a row of zeros failed: %s", name, model.version, one_line(exc))
            continue
        row = model.cost.expected(1)
        log.debug("%s v%s warmed up: %.3f ms a row", name, model.version, 1000 * (row or 0.0))


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
        security=settings.cloud_security(),
        streaming=settings.cloud_streaming,
    )


def build_router(
    settings: EdgeSettings,
    on_breaker_change: Callable[[BreakerState], None] | None = None,
    models: Mapping[str, RoutedModel] | None = None,
    on_cloud_rows: CloudRowsHook | None = None,
) -> Router:
    """The in-process router an app can call directly, configured like the agent; it serves `models` if
    given (the agent's from model_repository_url), else those of model_repository, each warmed up first.
    Recording (record_dir) is the caller's to open and close: pass open_recorder(settings)'s on_cloud_rows."""
    # The cloud channel first: its certificates and token are checked before any model loads.
    cloud = build_cloud_pool(settings, on_breaker_change)
    executor = ThreadPoolExecutor(settings.edge_threads, thread_name_prefix="edge-infer")
    cache = RowCache(settings.cache_max_bytes, settings.cache_ttl_seconds) if settings.cache_max_bytes else None
    if models is None:
        models = load_edge_models(settings.model_repository, chunk_bytes=settings.edge_chunk_bytes)
    warm_up_models(models)
    return Router(
        models,
        cloud,
        executor,
        deadline_reserve_seconds=settings.deadline_reserve_seconds,
        cache=cache,
        target_offload=settings.target_offload,
        audit_share=settings.audit_share,
        on_cloud_rows=on_cloud_rows,
        placement=settings.placement(),
        coalesce=settings.coalescing(),
    )


def open_recorder(settings: EdgeSettings) -> Recorder | None:
    """The recorder of the cloud's answers when record_dir is set (opt-in), else None."""
    if settings.record_dir is None:
        return None
    recorder = Recorder.open(settings.record_dir, settings.record_max_bytes)
    log.info(
        "recording the cloud's answers (inputs included) in %s, at most %d bytes of files",
        settings.record_dir,
        settings.record_max_bytes,
    )
    return recorder


# A device's memory is the agent's budget (offload.oip.memory). One malloc arena rather than eight a core, so
# that what one thread frees (gRPC's, after receiving a request) is what the next allocation reuses (with two,
# now and then 19 MiB stayed resident after a 15 MB request; with one, 2 MiB at most). After a request of
# 1 MiB or more, the allocator's free pages go back to the system.
MALLOC_ARENAS = 1
GIVE_BACK_AFTER_BYTES = 1 << 20

# How long the start-up look at the cloud waits for its answer. A device may well start offline,
# so the look only decides whether to warn: it runs beside the server, which serves at once.
CLOUD_CHECK_SECONDS = 5.0


async def report_cloud_at_start(cloud: Upstream, timeout: float = CLOUD_CHECK_SECONDS) -> None:
    """Say once whether the cloud answers: INFO if it does, WARNING with the address and the reason if not.

    Without this, an agent whose cloud is unreachable (a wrong host, a firewall, a cloud not
    started yet) would degrade every cloud-bound row while its log said nothing until the
    breaker opened.
    """
    problem = await cloud.check_ready(timeout)
    if problem is None:
        log.info("cloud %s is ready", cloud.target)
        return
    log.warning(
        "cloud %s does not answer at start-up (%s); serving on the edge meanwhile: rows meant for the cloud get "
        "the edge's answer, flagged degraded, until it does",
        cloud.target,
        problem,
    )


# The health service name that reports the circuit to the cloud: SERVING while at
# least one replica's is closed, NOT_SERVING while none is (rows are answered on the edge).
CLOUD_HEALTH_SERVICE = "offload.cloud"


async def run(settings: EdgeSettings) -> None:
    limit_arenas(MALLOC_ARENAS)  # before the threads that would make arenas of their own
    server: OipServer | None = None

    def breaker_changed(state: BreakerState) -> None:
        if server is not None:
            server.set_service_health_soon(CLOUD_HEALTH_SERVICE, state is BreakerState.CLOSED)

    # Certificates, tokens and tracing are checked before anything else is loaded: a wrong one stops start-up at once.
    security = settings.security()
    operations = Operations(settings, SERVER_NAME)
    # With a model repository URL, the models are the kept or downloaded ones (see offload.edge.rollout).
    load = functools.partial(load_edge_models, chunk_bytes=settings.edge_chunk_bytes)
    rollout = ModelRollout.open(settings, load) if settings.model_repository_url else None
    models = await rollout.start(settings.model_repository) if rollout is not None else None
    recorder = open_recorder(settings)
    router = build_router(settings, breaker_changed, models, recorder.on_cloud_rows if recorder else None)
    plane = RouterDataPlane(router)
    server = OipServer(plane, SERVER_NAME, settings.limits, security, give_back_after_bytes=GIVE_BACK_AFTER_BYTES)
    port = await server.start(settings.host, settings.grpc_port)
    if settings.cloud:
        await server.set_service_health(CLOUD_HEALTH_SERVICE, serving=True)
    for line in await operations.start(server, EdgeCollector(on_loop(asyncio.get_running_loop(), router.stats))):
        print(line, flush=True)
    cloud = settings.cloud or "none (edge answers only)"
    if settings.cloud and settings.cloud_streaming:
        cloud += " over one ModelStreamInfer stream per replica"
    status = StatusLog(router.stats, settings.status_log_seconds, recording=recorder.stats if recorder else None)
    reporter = asyncio.create_task(status.run()) if settings.status_log_seconds > 0 else None
    check = asyncio.create_task(report_cloud_at_start(router.upstream)) if router.upstream is not None else None
    poller = asyncio.create_task(rollout.run(router, settings.model_poll_seconds)) if rollout is not None else None
    try:
        await serve_until_signalled(
            server,
            settings.grace_seconds,
            announce=lambda: print(
                f"offload-edge listening on {settings.host}:{port} (cloud: {cloud}; {security.description})", flush=True
            ),
        )
    finally:
        for task in (check, poller):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if rollout is not None:
            await rollout.close()
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        await router.close()
        if recorder is not None:
            await asyncio.to_thread(recorder.close)  # the rows still waiting go to disk
        if reporter is not None:
            status.log()  # what happened since the last line, so a shutdown does not lose it
        await operations.stop()
