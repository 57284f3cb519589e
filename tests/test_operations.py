"""What operators run the servers with besides metrics and traces: the plaintext health-only port, and log
lines (text or JSON) that carry the request id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import SUBPROCESS_ENV
from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip.client import OipClient
from offload.oip.errors import UpstreamError
from offload.oip.logs import LogFormat, log_handler
from offload.oip.repository import TensorSpec
from offload.oip.request_ids import current_request_id, request_id_header, request_id_of
from offload.oip.security import ChannelSecurity, ServerSecurity
from offload.oip.server import SERVICE_NAME, OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from offload.tools.process import ServerProcess
from support import picky
from support.certs import CertificateAuthority
from support.chaos import eventually

TIMEOUT = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT
        )
    return int(reply.status)


# --- the health port ----------------------------------------------------------------------------------------------


class HeldPlane:
    """A data plane whose inference calls wait until the test releases them: a call in flight, on demand."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.spec = TensorSpec.model_construct(name="x", datatype="FP32", shape=(-1, 1))

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def model_ready(self, name: str, version: str) -> bool:
        return True

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("held", "1")

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        return ModelMetadata(name, ("1",), "held", (self.spec,), (self.spec,))

    def health_details(self) -> Mapping[str, str]:
        return {}

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        self.arrived.set()
        await self.release.wait()
        return InferResponse(request.model_name, [Tensor("x", "FP32", request.inputs[0].data)], "1", request.id)


async def test_the_health_port_answers_in_plaintext_beside_tls_and_tokens_and_serves_nothing_else(
    tmp_path: Path,
) -> None:
    authority = CertificateAuthority(tmp_path, "ca")
    pair = authority.issue("server", server=True)
    tokens = tmp_path / "tokens"
    tokens.write_text("the-token\n")
    plane = HeldPlane()
    server = OipServer(plane, "guarded", security=ServerSecurity.load(pair.cert, pair.key, auth_token_file=tokens))
    await server.start()
    port = await server.start_health("127.0.0.1", 0)
    assert port == server.health_port != server.port
    health = f"127.0.0.1:{port}"
    stopping: asyncio.Task[None] | None = None
    try:
        # The kubelet's probe: plaintext, no certificate, no token; the overall service and the inference service.
        assert await _health(health) == SERVING
        assert await _health(health, SERVICE_NAME) == SERVING
        # Nothing but health: no inference, no reflection.
        async with grpc.aio.insecure_channel(health) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unserved:
                await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT)
        assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The gRPC port itself still wants TLS and the token.
        secure = ChannelSecurity.load(ca=authority.cert)
        async with OipClient(f"localhost:{server.port}", security=secure) as client:
            with pytest.raises(UpstreamError) as refused:
                await client.server_ready(TIMEOUT)
        assert refused.value.status == grpc.StatusCode.UNAUTHENTICATED

        # While the server drains a call in flight, the health port says NOT_SERVING; then it closes.
        token = tmp_path / "token"
        token.write_text("the-token\n")
        guarded = ChannelSecurity.load(ca=authority.cert, token_file=token)
        async with OipClient(f"localhost:{server.port}", security=guarded) as client:
            request = InferRequest("held", [Tensor.of("x", np.ones((1, 1), dtype=np.float32))])
            held = asyncio.create_task(client.infer(request, timeout=TIMEOUT))
            await asyncio.wait_for(plane.arrived.wait(), TIMEOUT)
            async with grpc.aio.insecure_channel(health) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                assert (await watch.read()).status == SERVING
                stopping = asyncio.create_task(server.stop(TIMEOUT))
                assert (await watch.read()).status == NOT_SERVING
                assert not held.done(), "the call is still in flight: the server is draining"
                plane.release.set()
                assert (await held).outputs[0].data.tolist() == [[1.0]]
                await stopping
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(health)
    finally:
        plane.release.set()
        if stopping is None:
            await server.stop(0)


def test_offload_cloud_serves_its_health_port_with_tls_on(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path, "ca")
    pair = authority.issue("server", server=True)
    args = ["cloud", "--grpc-port", "0", "--health-port", "0", "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]
    with ServerProcess(args, env=SUBPROCESS_ENV) as cloud:
        cloud.start()
        line = cloud.wait_for_output("health on")
        match = re.search(r"offload-cloud health on (\S+) \(grpc.health.v1 only, plaintext\)", line)
        assert match, line
        assert asyncio.run(_health(match.group(1))) == SERVING
        assert cloud.terminate() == 0


# --- log lines ----------------------------------------------------------------------------------------------------


def _record(message: str, log_format: LogFormat = "json", **extra: object) -> str:
    stream = io.StringIO()
    handler = log_handler(log_format)
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logger = logging.getLogger("offload.test.json")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning(message, extra=extra)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_a_json_line_is_one_object_with_the_request_id_and_extra_fields_on_one_line() -> None:
    token = current_request_id.set("req-42")
    try:
        text = _record("the cloud said 'no\nnewline'\u2028here", target="gpu-host:8101", rows=3)
    finally:
        current_request_id.reset(token)
    assert text.count("\n") == 1, "one physical line, whatever the message holds"
    entry = json.loads(text)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "offload.test.json"
    assert entry["message"] == "the cloud said 'no\nnewline'\u2028here"
    assert entry["request_id"] == "req-42"
    assert (entry["target"], entry["rows"]) == ("gpu-host:8101", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])
    assert "request_id" not in json.loads(_record("outside any call"))


def test_a_text_line_ends_with_the_request_id_when_it_is_about_a_request() -> None:
    token = current_request_id.set("req-43")
    try:
        about = _record("cloud failed", "text")
    finally:
        current_request_id.reset(token)
    assert re.fullmatch(r"\S+ \S+ WARNING offload.test.json: cloud failed \[request req-43\]\n", about), about
    assert _record("started", "text").endswith("WARNING offload.test.json: started\n")


def test_the_request_id_is_the_oip_id_else_the_header_in_its_legal_bounded_form() -> None:
    assert request_id_of("abc", (("x-request-id", "other"),)) == "abc"
    assert request_id_of("", (("x-request-id", "from-header"),)) == "from-header"
    assert request_id_of("", ()) is None
    hostile = "line\nbreak" + "x" * 1000
    assert request_id_of(hostile, None) == request_id_header(hostile)
    assert request_id_of(hostile, None).startswith("sha256:")  # type: ignore[union-attr]


def test_every_log_line_of_both_servers_is_json_and_those_about_a_request_carry_its_id(tmp_path: Path) -> None:
    repository = picky.write_repository(tmp_path / "repository")
    common = ["--grpc-port", "0", "--model-repository", str(repository), "--log-format", "json"]
    with ServerProcess(["cloud", *common], env=SUBPROCESS_ENV) as cloud:
        cloud_address = cloud.start()
        with ServerProcess(
            ["edge", *common, "--cloud", cloud_address, "--log-level", "DEBUG"], env=SUBPROCESS_ENV
        ) as edge:
            edge_address = edge.start()
            edge.wait_for_output("is ready")

            async def call() -> InferResponse:
                # A row the cloud model refuses: the cloud logs the failure, the edge answers it degraded.
                request = InferRequest("picky", [Tensor.of("x", np.array([[-0.5]], dtype=np.float32))], id="req-7")
                async with OipClient(edge_address) as app:
                    return await app.infer(request, timeout=TIMEOUT)

            assert asyncio.run(call()).parameters["offload_degraded"] is True
            cloud_error = json.loads(cloud.wait_for_output("request failed with an unexpected error"))
            edge_debug = json.loads(edge.wait_for_output("keep the edge answer"))
            asyncio.run(eventually(lambda: "ModelInfer OK" in edge.output(), "the edge logged the call"))
            edge_lines, cloud_lines = edge.output().splitlines(), cloud.output().splitlines()
    assert cloud_error["level"] == "ERROR"
    assert cloud_error["request_id"] == "req-7", "the edge passes the id on; the cloud logs with it"
    assert "ValueError: picky refuses negative rows" in cloud_error["exception"]
    assert edge_debug["request_id"] == "req-7"
    (call_line,) = [json.loads(line) for line in edge_lines if "ModelInfer OK" in line]
    assert (call_line["request_id"], call_line["method"], call_line["code"]) == ("req-7", "ModelInfer", "OK")
    assert call_line["duration_ms"] > 0
    # Every line but the start-up lines the servers print for scripts is one JSON object.
    for line in edge_lines + cloud_lines:
        if line.startswith(("offload-edge ", "offload-cloud ")):
            continue
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(entry), line
