"""A grpc.aio server for any DataPlane: OIP, health, reflection, limits and graceful shutdown.

The servicer is a thin translation layer: protobuf in, data-plane call,
protobuf out. Every exception becomes a status in one place (`_abort`), so
no handler decides status codes on its own and the server keeps serving
after any bad request.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip.errors import Unavailable, status_for, trailers_for
from offload.oip.limits import INLINE_CODEC_ELEMENTS, ServerLimits, server_options
from offload.oip.messages import (
    ModelInputs,
    check_request,
    decode_request,
    encode_cost,
    model_metadata_to_pb,
    response_to_pb,
    server_metadata_to_pb,
)
from offload.oip.repository import TensorSpec
from offload.oip.types import DataPlane, InferRequest, InferResponse

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_Reply = TypeVar("_Reply")


async def read_request(
    message: pb.ModelInferRequest, max_elements: int, model_inputs: ModelInputs | None
) -> InferRequest:
    """Check a request against the model, then decode it, off the event loop when it is large."""
    # Everything that needs no tensor value is checked first, against the model's metadata, so a
    # wrong request costs next to nothing however large it is; only a request that can run is decoded.
    checked = check_request(message, max_elements, model_inputs)
    if checked.decode_cost > INLINE_CODEC_ELEMENTS:
        return await asyncio.to_thread(decode_request, checked)
    return decode_request(checked)


async def write_response(response: InferResponse, raw: bool) -> pb.ModelInferResponse:
    """The response message, encoded off the event loop when that is much work (typed or BYTES outputs)."""
    if encode_cost(response.outputs, raw) > INLINE_CODEC_ELEMENTS:
        return await asyncio.to_thread(response_to_pb, response, raw)
    return response_to_pb(response, raw)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over a DataPlane."""

    def __init__(self, data_plane: DataPlane, limits: ServerLimits) -> None:
        self._plane = data_plane
        self._limits = limits
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start_draining(self) -> None:
        """Refuse new inference calls with UNAVAILABLE (retryable: another replica can answer)."""
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no inference call is in flight; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _guard(
        self, context: grpc.aio.ServicerContext[object, object], call: Callable[[], Awaitable[_Reply]]
    ) -> _Reply:
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("request failed with an unexpected error")
            trailers = trailers_for(exc)
        # Abort outside the except block and without the call: gRPC keeps the error that abort raises,
        # with the frames it passes, in a reference cycle until the next garbage collection, and
        # chained to `exc` or through `call` it would keep the request (up to max_message_bytes, and
        # decoded) alive until then.
        del call
        if trailers:
            context.set_trailing_metadata(trailers)
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerLiveResponse:
        async def call() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=self._plane.live())

        return await self._guard(context, call)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerReadyResponse:
        async def call() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self._plane.ready())

        return await self._guard(context, call)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelReadyResponse:
        async def call() -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

        return await self._guard(context, call)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerMetadataResponse:
        async def call() -> pb.ServerMetadataResponse:
            return server_metadata_to_pb(self._plane.server_metadata())

        return await self._guard(context, call)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelMetadataResponse:
        async def call() -> pb.ModelMetadataResponse:
            return model_metadata_to_pb(self._plane.model_metadata(request.name, request.version))

        return await self._guard(context, call)

    def _model_inputs(self, name: str, version: str) -> tuple[TensorSpec, ...]:
        return self._plane.model_metadata(name, version).inputs

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        # The message leaves this frame for `call`'s alone: see _guard.
        messages = [request]
        del request

        async def call() -> pb.ModelInferResponse:
            if self._draining:
                raise Unavailable("the server is shutting down; retry on another replica")
            infer_request = await read_request(messages.pop(), self._limits.max_elements, self._model_inputs)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            response = await self._plane.infer(infer_request, deadline)
            return await write_response(response, infer_request.raw)

        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._guard(context, call)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


class OipServer:
    """One gRPC server: OIP, health (grpc.health.v1) and reflection, on one port."""

    def __init__(self, data_plane: DataPlane, name: str, limits: ServerLimits | None = None) -> None:
        self.name = name
        self.data_plane = data_plane
        self.limits = limits or ServerLimits()
        self.port = 0
        self._background: set[asyncio.Task[None]] = set()
        self._health = health.aio.HealthServicer()
        self._server = grpc.aio.server(
            options=server_options(self.limits), maximum_concurrent_rpcs=self.limits.max_concurrent_rpcs
        )
        self._servicer = InferenceServicer(data_plane, self.limits)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server, pool=pb.DESCRIPTOR.pool
        )

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, credentials: grpc.ServerCredentials | None = None
    ) -> int:
        """Bind (port 0: any free port), start, and report SERVING; returns the bound port.

        With `credentials` (TLS) the port is a secure one; without, it is plaintext.
        """
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"{self.name}: could not bind {address}; is the port in use?")
        await self._server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def set_service_health(self, service: str, serving: bool) -> None:
        """Report a dependency's state as its own health service (e.g. the circuit to the cloud)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set(service, status)

    def set_service_health_soon(self, service: str, serving: bool) -> None:
        """set_service_health from synchronous code running on the event loop."""
        task = asyncio.get_running_loop().create_task(self.set_service_health(service, serving))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, grace_seconds: float) -> None:
        """Drain: report NOT_SERVING, refuse new inference calls with UNAVAILABLE, let calls in
        flight finish within the grace period, then close the port.

        gRPC's own shutdown would answer late calls with CANCELLED, which clients do not
        retry; UNAVAILABLE lets them go to another replica.
        """
        started = time.monotonic()
        await self._health.enter_graceful_shutdown()
        self._servicer.start_draining()
        if not await self._servicer.wait_idle(grace_seconds):
            log.warning("%s: calls still in flight after %.1fs; cancelling them", self.name, grace_seconds)
        await self._server.stop(max(0.0, grace_seconds - (time.monotonic() - started)))

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve_until_signalled(server: OipServer, grace_seconds: float) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("%s: shutting down; answering calls in flight for up to %.1fs", server.name, grace_seconds)
        await server.stop(grace_seconds)
        log.info("%s: stopped", server.name)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
