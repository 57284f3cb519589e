"""OpenTelemetry tracing: one trace from the app through the edge agent to the cloud, retries included; the
trace context crosses real processes; without the tracing extra everything imports and runs, and --tracing
says what to install."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import SUBPROCESS_ENV
from offload.cloud.dataplane import CloudDataPlane
from offload.edge.dataplane import RouterDataPlane
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.server import SERVICE_NAME, OipServer
from offload.oip.tensors import Tensor
from offload.oip.tracing import start_tracing, stop_tracing
from offload.oip.types import InferRequest
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.pool import CloudPool
from offload.tools.process import ServerProcess
from support.chaos import ALL_TO_CLOUD, ChaosProxy, eventually

# The app's own span, as an instrumented app would send it (W3C traceparent: version-trace-span-flags).
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
APP_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = ("traceparent", f"00-{TRACE_ID}-{APP_SPAN_ID}-01")
SERVER_SPAN = f"{SERVICE_NAME}/ModelInfer"
TIMEOUT = 30.0


def _request(request_id: str) -> InferRequest:
    pixels = np.load(DEMO_REPOSITORY / "digits" / "test.npz")["inputs"][:3].astype(np.float32)
    return InferRequest("digits", [Tensor.of("pixels", pixels)], id=request_id, parameters=dict(ALL_TO_CLOUD))


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    start_tracing("offload-test", exporter)
    try:
        yield exporter
    finally:
        stop_tracing()


@dataclass
class Traced:
    edge: str
    proxy: ChaosProxy


@pytest.fixture
async def traced_stack(
    demo_cloud_plane: CloudDataPlane, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> AsyncIterator[Traced]:
    """A cloud server, a chaos proxy in front of it (failing some attempts), and an edge agent behind both."""
    cloud = OipServer(demo_cloud_plane, "traced-cloud")
    await cloud.start()
    async with ChaosProxy(f"127.0.0.1:{cloud.port}", seed=7) as proxy:
        router = Router(demo_edge_models, CloudPool(proxy.address, TIMEOUT, 1 << 24), edge_executor)
        edge = OipServer(RouterDataPlane(router), "traced-edge")
        await edge.start()
        try:
            yield Traced(f"127.0.0.1:{edge.port}", proxy)
        finally:
            await edge.stop(0)
            await router.close()
    await cloud.stop(0)


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_holds_the_edge_model_the_cloud_call_each_attempt_and_the_cloud_model(
    exported: InMemorySpanExporter, traced_stack: Traced
) -> None:
    proxy = traced_stack.proxy
    proxy.fail_rate = 0.5  # UNAVAILABLE, drawn per (request id, attempt): pick an id whose first attempt fails
    request_id = next(
        f"traced-{i}" for i in range(1000) if proxy._fails(f"traced-{i}", 1) and not proxy._fails(f"traced-{i}", 2)
    )
    async with OipClient(traced_stack.edge) as app:
        answer = await app.infer(_request(request_id), timeout=TIMEOUT, metadata=(TRACEPARENT,))
    assert answer.parameters["offload_route"] == "cloud"
    assert proxy.request_ids == [request_id, request_id], "one retry after the injected UNAVAILABLE"

    await eventually(lambda: len(exported.get_finished_spans()) >= 7, "every span ended")
    spans = exported.get_finished_spans()
    assert {format(span.context.trace_id, "032x") for span in spans} == {TRACE_ID}, "one trace, the app's"
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    servers = sorted(by_name[SERVER_SPAN], key=lambda span: span.start_time or 0)
    assert [span.kind for span in servers] == [SpanKind.SERVER, SpanKind.SERVER]
    edge_server, cloud_server = servers
    # The edge agent's server span continues the app's span.
    assert _parent(edge_server) == int(APP_SPAN_ID, 16)
    assert edge_server.parent is not None
    assert edge_server.parent.is_remote
    (edge_model,) = by_name["offload.edge_model"]
    (cloud_call,) = by_name["offload.cloud_call"]
    assert _parent(edge_model) == _parent(cloud_call) == edge_server.context.span_id
    assert edge_model.attributes is not None
    assert edge_model.attributes["offload.rows"] == 3
    # Each attempt is a client span under the cloud call: the first failed (UNAVAILABLE), the retry answered.
    failed, answered = sorted(by_name["offload.cloud_attempt"], key=lambda span: span.start_time or 0)
    assert {_parent(failed), _parent(answered)} == {cloud_call.context.span_id}
    assert failed.kind == answered.kind == SpanKind.CLIENT
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    # Each attempt names the replica it went to (here the pool's one, the proxy).
    assert answered.attributes is not None
    assert failed.attributes["offload.target"] == answered.attributes["offload.target"] == proxy.address
    assert answered.status.status_code != StatusCode.ERROR
    # The cloud's server span continues the answered attempt (through the proxy), and runs the model.
    assert _parent(cloud_server) == answered.context.span_id
    assert cloud_server.attributes is not None
    assert cloud_server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    (cloud_model,) = by_name["offload.cloud_model"]
    assert _parent(cloud_model) == cloud_server.context.span_id
    assert cloud_model.attributes is not None
    assert cloud_model.attributes["offload.rows"] == 3


async def test_a_failed_call_marks_the_server_span_with_its_status(
    exported: InMemorySpanExporter, demo_cloud_plane: CloudDataPlane
) -> None:
    server = OipServer(demo_cloud_plane, "traced-cloud")
    await server.start()
    try:
        async with OipClient(f"127.0.0.1:{server.port}") as client:
            with pytest.raises(Exception, match="NOT_FOUND"):
                await client.infer(InferRequest("nope", [Tensor.of("x", np.zeros((1, 1), np.float32))]))
    finally:
        await server.stop(0)
    (span,) = exported.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "NOT_FOUND"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_the_trace_context_crosses_real_processes_to_the_console_exporter() -> None:
    env = {**SUBPROCESS_ENV, "OTEL_TRACES_EXPORTER": "console"}
    with ServerProcess(["cloud", "--grpc-port", "0", "--tracing"], env=env) as cloud:
        cloud_address = cloud.start()
        with ServerProcess(["edge", "--grpc-port", "0", "--cloud", cloud_address, "--tracing"], env=env) as edge:
            edge_address = edge.start()
            assert "offload-edge tracing on" in edge.output()

            async def call() -> None:
                async with OipClient(edge_address) as app:
                    await app.infer(_request("across"), timeout=TIMEOUT, metadata=(TRACEPARENT,))

            asyncio.run(call())
            # Each process prints its spans (JSON) as they end, in the app's trace.
            for process, name in ((edge, "offload.edge_model"), (cloud, "offload.cloud_model")):
                process.wait_for_output(f'"name": "{name}"')
                process.wait_for_output(f'"trace_id": "0x{TRACE_ID}"')
            edge.wait_for_output('"service.name": "offload-edge"')
            cloud.wait_for_output('"service.name": "offload-cloud"')


# Without opentelemetry installed (blocked here), as a base install or `offload[edge]` has it.
_WITHOUT_OTEL = "import sys; sys.modules['opentelemetry'] = None; "


def test_without_the_tracing_extra_everything_imports_and_serves() -> None:
    script = _WITHOUT_OTEL + (
        "import asyncio\n"
        "from offload.oip import tracing\n"
        "assert not tracing.INSTALLED\n"
        "import offload.edge.agent, offload.cloud.service, offload.oip.server\n"
        "from offload.oip.client import OipClient\n"
        "from offload.oip.server import OipServer\n"
        "from offload.edge.agent import build_router\n"
        "from offload.edge.dataplane import RouterDataPlane\n"
        "from offload.edge.settings import EdgeSettings\n"
        "async def main():\n"
        "    router = build_router(EdgeSettings())\n"
        "    server = OipServer(RouterDataPlane(router), 'no-otel')\n"
        "    await server.start()\n"
        "    async with OipClient(f'127.0.0.1:{server.port}') as client:\n"
        "        print('ready', await client.server_ready(30))\n"
        "    await server.stop(0)\n"
        "    await router.close()\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "ready True" in done.stdout


def test_tracing_without_the_extra_stops_with_what_to_install() -> None:
    script = (
        _WITHOUT_OTEL + "from offload.tools.cli import main; sys.exit(main(['edge', '--grpc-port', '0', '--tracing']))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "offload edge: tracing needs OpenTelemetry, which is not installed: pip install 'offload[tracing]'"
    )


def test_an_unknown_traces_exporter_stops_start_up() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "offload.tools.cli", "cloud", "--grpc-port", "0", "--tracing"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **SUBPROCESS_ENV, "OTEL_TRACES_EXPORTER": "zipkin"},
    )
    assert done.returncode == 2, done.stderr
    assert "OTEL_TRACES_EXPORTER='zipkin' is not supported here; use otlp, console or none" in done.stderr
