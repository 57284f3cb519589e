"""Assemble the edge agent: edge models from the repository, the cloud endpoint, the router, the server."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from offload.edge.onnx_model import OnnxModel
from offload.oip.errors import ConfigurationError
from offload.oip.repository import load_repository
from offload.oip.server import OipServer, serve_until_signalled
from offload.router.cloud import CloudEndpoint
from offload.router.core import RoutedModel, Router
from offload.router.dataplane import SERVER_NAME, RouterDataPlane
from offload.router.settings import EdgeSettings

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
            entry.config.routing.threshold,
        )
        models[name] = routed
    if not models:
        raise ConfigurationError(f"no model in {repository} has an [edge] section")
    return models


def build_router(settings: EdgeSettings) -> Router:
    """The in-process router an app can call directly, configured like the agent."""
    cloud = None
    if settings.cloud:
        cloud = CloudEndpoint(settings.cloud, settings.cloud_timeout_seconds, settings.max_message_bytes)
    executor = ThreadPoolExecutor(settings.edge_threads, thread_name_prefix="edge-infer")
    return Router(load_edge_models(settings.model_repository), cloud, executor)


async def run(settings: EdgeSettings) -> None:
    router = build_router(settings)
    server = OipServer(RouterDataPlane(router), SERVER_NAME, settings.limits)
    port = await server.start(settings.host, settings.grpc_port)
    cloud = settings.cloud or "none (edge answers only)"
    print(f"offload-edge listening on {settings.host}:{port} (cloud: {cloud})", flush=True)
    try:
        await serve_until_signalled(server, settings.grace_seconds)
    finally:
        await router.close()
