"""An asyncio client for any Open Inference Protocol server (ours, Triton, MLServer, KServe)."""

from __future__ import annotations

import asyncio

import grpc

from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip import tracing
from offload.oip.errors import UpstreamError, upstream_error
from offload.oip.limits import INLINE_CODEC_ELEMENTS, MAX_ELEMENTS, MAX_MESSAGE_BYTES, channel_options
from offload.oip.messages import encode_cost, request_to_pb, response_from_pb
from offload.oip.repository import TensorSpec
from offload.oip.security import ChannelSecurity
from offload.oip.stream import InferStream
from offload.oip.types import InferRequest, InferResponse, ModelMetadata

# gRPC's default reconnect backoff starts at 1 s and grows to 120 s while a peer is
# down, so a restarted cloud was found again only seconds later. A router needs
# its cloud back quickly and a connection attempt is cheap: 100 ms, at most 2 s.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class OipClient:
    """One channel to one server. Calls raise UpstreamError carrying the server's status.

    With TLS credentials in `security` the channel is a secure one; without, it is plaintext.
    Its bearer token, if any, goes with every call (in stream mode, with every stream it opens).

    With `streaming`, `infer` sends its requests on one long-lived ModelStreamInfer stream that
    every concurrent call shares (offload.oip.stream says how answers find their calls, and how
    deadlines and a broken stream are handled); against a server without the stream, it falls
    back to unary calls. Other calls are unary either way.
    """

    def __init__(
        self,
        target: str,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_elements: int = MAX_ELEMENTS,
        security: ChannelSecurity | None = None,
        streaming: bool = False,
    ) -> None:
        self.target = target
        # The most elements one answer's tensor may declare: the peer's sizes are checked before decoding.
        self.max_elements = max_elements
        self.security = security or ChannelSecurity()
        options: list[tuple[str, str | int]] = [
            *channel_options(max_message_bytes),
            *RECONNECT_OPTIONS,
            *self.security.options(),
        ]
        if self.security.credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, self.security.credentials, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._stream = InferStream(self._stub, target, max_message_bytes, self.security.metadata) if streaming else None

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; with `grace`, calls in flight get that many seconds to finish first.

        In stream mode the stream is half-closed first, so that it ends once its calls are answered
        (without a grace period, they fail UNAVAILABLE at once).
        """
        if self._stream is not None:
            if grace is None:
                await self._stream.close()
            else:
                self._stream.finish()
        await self._channel.close(grace)
        if self._stream is not None:
            await self._stream.close()  # what the grace period left unanswered fails; its tasks end

    def reachable(self) -> bool:
        """False while the channel cannot connect (TRANSIENT_FAILURE: refused, reset, unreachable).
        It keeps reconnecting in the background, so this turns True again once the server is back."""
        return self._channel.get_state() is not grpc.ChannelConnectivity.TRANSIENT_FAILURE

    async def __aenter__(self) -> OipClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_for_ready(self, timeout: float) -> None:
        """Wait until the server answers ServerReady=true, or raise UpstreamError."""
        try:
            reply = await self._stub.ServerReady(
                pb.ServerReadyRequest(), timeout=timeout, wait_for_ready=True, metadata=self.security.metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, self.target) from exc
        if not reply.ready:
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE, f"{self.target} is live but not ready")

    async def server_ready(self, timeout: float | None = None) -> bool:
        try:
            reply = await self._stub.ServerReady(
                pb.ServerReadyRequest(), timeout=timeout, metadata=self.security.metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, self.target) from exc
        return reply.ready

    async def model_metadata(self, name: str, version: str = "", timeout: float | None = None) -> ModelMetadata:
        try:
            reply = await self._stub.ModelMetadata(
                pb.ModelMetadataRequest(name=name, version=version),
                timeout=timeout,
                metadata=self.security.metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, self.target) from exc

        def specs(tensors: list[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec.model_construct(name=t.name, datatype=t.datatype, shape=tuple(t.shape)) for t in tensors
            )

        return ModelMetadata(
            name=reply.name,
            versions=tuple(reply.versions),
            platform=reply.platform,
            inputs=specs(list(reply.inputs)),
            outputs=specs(list(reply.outputs)),
        )

    async def infer(
        self,
        request: InferRequest,
        timeout: float | None = None,
        raw: bool = True,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> InferResponse:
        """Send a request (raw contents by default: no per-element protobuf work) and decode the answer.

        A malformed answer (sizes that do not match the shapes, unknown datatypes)
        raises InvalidArgument naming the output; the caller decides what that means.
        `metadata` goes with a unary call only: a stream's headers are sent once, when it
        opens (the request's id travels in the message either way).
        """
        # Large requests and answers are encoded and decoded in a worker thread, as the servers do,
        # so one big call does not hold up the caller's event loop (the edge agent's other requests).
        if encode_cost(request.inputs, raw) > INLINE_CODEC_ELEMENTS:
            message = await asyncio.to_thread(request_to_pb, request, raw)
        else:
            message = request_to_pb(request, raw=raw)
        try:
            if self._stream is not None and self._stream.usable:
                reply = await self._stream.infer(message, timeout)
            else:
                reply = await self._stub.ModelInfer(
                    # The current trace context goes along, so the server's spans join the caller's trace.
                    message,
                    timeout=timeout,
                    metadata=(*self.security.metadata(), *metadata, *tracing.outgoing_metadata()),
                )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, self.target) from exc
        where = f"{self.target} response"
        if _declared_elements(reply) > INLINE_CODEC_ELEMENTS:
            return await asyncio.to_thread(response_from_pb, reply, where, self.max_elements)
        return response_from_pb(reply, where=where, max_elements=self.max_elements)


def _declared_elements(reply: pb.ModelInferResponse) -> int:
    """How many elements the answer says it holds: arithmetic on its shapes only, nothing allocated."""
    total = 0
    for output in reply.outputs:
        count = 1
        for dim in output.shape:
            count *= max(int(dim), 0)
        total += count
    return total
