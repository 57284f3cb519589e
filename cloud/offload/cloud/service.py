"""Run the cloud service: load the repository, serve OIP until signalled."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import torch

from offload.cloud.dataplane import SERVER_NAME, CloudDataPlane
from offload.cloud.memory import freeze_startup_objects
from offload.cloud.metrics import CloudCollector
from offload.cloud.runtime import pick_device
from offload.cloud.settings import CloudSettings
from offload.oip.metrics import on_loop
from offload.oip.operations import Operations
from offload.oip.repository import load_repository
from offload.oip.server import OipServer, serve_until_signalled

log = logging.getLogger(__name__)


def size_torch_threads(settings: CloudSettings, device: torch.device) -> None:
    """On CPU, give each inference thread its share of the cores, one left to the event loop.

    torch's default intra-op pool is one thread per core *per calling thread*;
    with several inference threads that oversubscribes the cores (measured on 2
    cores: 30 ms p50 / 832 ms p99 per 64-row batch instead of 13 / 18 ms), and
    the event loop (gRPC, decoding) needs a core of its own under load.
    """
    if device.type != "cpu":
        return
    threads = settings.intra_op_threads(device)
    torch.set_num_threads(threads)
    log.info(
        "torch uses %d intra-op thread(s) per inference thread (%d inference threads)",
        threads,
        settings.instances(device),
    )


async def build_server(settings: CloudSettings) -> tuple[OipServer, CloudDataPlane]:
    # Certificates and tokens are checked before the models load: a wrong file stops start-up at once.
    security = settings.security()
    device = pick_device(settings.device)
    size_torch_threads(settings, device)
    plane = CloudDataPlane.load(load_repository(settings.model_repository), settings, device)
    return OipServer(plane, SERVER_NAME, settings.limits, security), plane


async def run(settings: CloudSettings) -> None:
    """Serve until SIGTERM/SIGINT, drain for the grace period, then exit.

    The process exits within the grace period even when a model call is stuck: see
    `_exit_abandoning`.
    """
    # Tracing first: a missing extra or a wrong OTEL_* value stops start-up before the models load.
    operations = Operations(settings, SERVER_NAME)
    server, plane = await build_server(settings)
    freeze_startup_objects()
    port = await server.start(settings.host, settings.grpc_port)
    for line in await operations.start(server, CloudCollector(on_loop(asyncio.get_running_loop(), plane.stats))):
        print(line, flush=True)
    try:
        await serve_until_signalled(
            server,
            settings.grace_seconds,
            # One line that scripts (the demo, the tests) read to learn the port.
            announce=lambda: print(
                f"offload-cloud listening on {settings.host}:{port} ({server.security.description})", flush=True
            ),
        )
    finally:
        running = plane.close()
        await operations.stop()
    if running:
        _exit_abandoning(running, settings.grace_seconds)


def _exit_abandoning(running: int, grace_seconds: float) -> None:
    """End the process now although `running` model calls have not returned.

    Their callers were answered (cancelled) when the grace period ran out, and the queued
    jobs were dropped; what is left cannot be interrupted (torch, or any Python model, runs
    to the end of its call), and the interpreter would join the pool's threads at exit and
    so wait for them, past the grace period an orchestrator gave us. So log, flush and
    leave with os._exit. The exit status is 0: the shutdown that was asked for happened
    within its grace, and the cloud holds no state an abandoned call could leave half
    written; a non-zero status would make systemd or Kubernetes treat an ordinary stop
    as a crash. The WARNING line is what tells an operator that calls were abandoned.
    """
    log.warning(
        "%d model call(s) still running after the %.1fs grace period; exiting without waiting for them "
        "(their calls were cancelled when it ran out)",
        running,
        grace_seconds,
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
