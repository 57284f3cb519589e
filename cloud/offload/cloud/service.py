"""Run the cloud service: load the repository, serve OIP until signalled."""

from __future__ import annotations

import logging

from offload.cloud.dataplane import SERVER_NAME, CloudDataPlane
from offload.cloud.runtime import pick_device
from offload.cloud.settings import CloudSettings
from offload.oip.repository import load_repository
from offload.oip.server import OipServer, serve_until_signalled

log = logging.getLogger(__name__)


async def build_server(settings: CloudSettings) -> tuple[OipServer, CloudDataPlane]:
    device = pick_device(settings.device)
    plane = CloudDataPlane.load(load_repository(settings.model_repository), settings, device)
    return OipServer(plane, SERVER_NAME, settings.limits), plane


async def run(settings: CloudSettings) -> None:
    server, plane = await build_server(settings)
    port = await server.start(settings.host, settings.grpc_port)
    # One line that scripts (the demo, the tests) read to learn the port.
    print(f"offload-cloud listening on {settings.host}:{port}", flush=True)
    try:
        await serve_until_signalled(server, settings.grace_seconds)
    finally:
        plane.close()
