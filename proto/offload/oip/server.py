"""A grpc.aio server for any DataPlane: OIP, health, reflection, limits and graceful shutdown.

The servicer is a thin translation layer: protobuf in, data-plane call,
protobuf out. Every exception becomes a status in one place (`_abort`), so
no handler decides status codes on its own and the server keeps serving
after any bad request.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from offload.oip import grpc_service_pb2 as pb
from offload.oip.address import host_port
from offload.oip.errors import InvalidArgument, Unavailable, status_for, status_parameters, trailers_for
from offload.oip.limits import INLINE_CODEC_ELEMENTS, ServerLimits, server_options
from offload.oip.memory import give_back_freed_memory
from offload.oip.messages import (
    ModelInputs,
    ReceivedRequest,
    check_request,
    decode_request,
    encode_cost,
    model_metadata_to_pb,
    parameters_to_pb,
    receive_infer_request,
    response_to_pb,
    server_metadata_to_pb,
)
from offload.oip.observe import CallObserver, ServerStats
from offload.oip.repository import TensorSpec
from offload.oip.security import ServerSecurity
from offload.oip.types import DataPlane, InferRequest, InferResponse

log = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = _SERVICE.full_name
_Reply = TypeVar("_Reply")


async def read_request(received: ReceivedRequest, max_elements: int, model_inputs: ModelInputs | None) -> InferRequest:
    """Check a request against the model, then decode it, off the event loop when it is large."""
    # Everything that needs no tensor value is checked first, against the model's metadata, so a
    # wrong request costs next to nothing however large it is; only a request that can run is decoded.
    checked = check_request(received, max_elements, model_inputs)
    if checked.decode_cost > INLINE_CODEC_ELEMENTS:
        return await asyncio.to_thread(decode_request, checked)
    return decode_request(checked)


async def write_response(response: InferResponse, raw: bool) -> pb.ModelInferResponse:
    """The response message, encoded off the event loop when that is much work (typed or BYTES outputs)."""
    if encode_cost(response.outputs, raw) > INLINE_CODEC_ELEMENTS:
        return await asyncio.to_thread(response_to_pb, response, raw)
    return response_to_pb(response, raw)


class _InFlight:
    """Counts the inference calls in flight (what a drain waits for), `idle` set while there are none: entered
    once per call (a class, not @contextmanager: no generator made per call on the hot path)."""

    __slots__ = ("count", "idle")

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def __enter__(self) -> None:
        self.count += 1
        if self.count == 1:
            self.idle.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()


@dataclass(frozen=True, slots=True)
class _Unparsable:
    """What a request that is not a valid message of its method's type decodes to."""

    message_type: str
    error: str

    async def refuse(self) -> NoReturn:
        raise InvalidArgument(
            f"the request is not a valid {self.message_type} protobuf message ({self.error}); "
            "check the client's encoding (string fields must be UTF-8)"
        )


# How a method's request is read where protobuf's parser is not enough: ModelInfer's raw contents stay in the
# bytes gRPC received (`receive_infer_request`), where the parser would copy them in and out again.
# ModelStreamInfer's requests are ModelInfer's, read alike, one message at a time.
_READERS: dict[str, Callable[[bytes], object]] = {
    "ModelInfer": receive_infer_request,
    "ModelStreamInfer": receive_infer_request,
}


def _lenient(message_type: type[Message], read: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """A request deserializer that returns _Unparsable rather than raising."""
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> object:
        try:
            return read(data)
        except DecodeError as exc:
            return _Unparsable(name, str(exc))

    return deserialize


class _StreamEnd(enum.Enum):
    """Why a ModelStreamInfer stream stops reading: its requests are answered, and then it ends."""

    HALF_CLOSED = "the client sent its last request"
    DRAINING = "the server is shutting down"


@dataclass(frozen=True, slots=True)
class _Answering:
    """A stream's request being answered: the answer to come, and the request's size on the wire."""

    answer: asyncio.Task[pb.ModelStreamInferResponse]
    size: int


_StreamItem = _Answering | _StreamEnd


class InferenceServicer:
    """GRPCInferenceService over a DataPlane (its handlers: `method_handlers`)."""

    def __init__(self, data_plane: DataPlane, limits: ServerLimits, give_back_after_bytes: int | None = None) -> None:
        self._plane = data_plane
        self._limits = limits
        self._give_back_after_bytes = give_back_after_bytes
        self._draining = False
        # The answer queue of every open ModelStreamInfer stream, to tell each of a drain.
        self._streams: set[asyncio.Queue[_StreamItem]] = set()
        self._in_flight = _InFlight()

    def start_draining(self) -> None:
        """Refuse new inference calls with UNAVAILABLE (retryable: another replica can answer), and
        end each open stream once the requests it has read are answered."""
        self._draining = True
        for answers in self._streams:
            answers.put_nowait(_StreamEnd.DRAINING)

    async def _serving(self) -> None:
        if self._draining:
            raise Unavailable("the server is shutting down; retry on another replica")

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no inference call is in flight; False if the timeout came first."""
        if self._in_flight.idle.is_set():
            return True  # asyncio.wait_for with a timeout of 0 would time out even on a set event
        try:
            await asyncio.wait_for(self._in_flight.idle.wait(), timeout)
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
            _log_if_unexpected(code)
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

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The service's handlers, with requests that do not parse answered INVALID_ARGUMENT.

        The generated registration lets gRPC parse each request, and gRPC answers one it cannot
        parse (a string field that is not UTF-8, a message cut short) with UNKNOWN "Unexpected
        DecodeError", which names no field and tells no client what to fix. Here the parser hands
        such a request to the handler as _Unparsable, which refuses it through `_guard` like
        any other bad request. The methods and their message types are read from the service
        descriptor, so the registration follows the .proto as the generated one does; a method
        in `_READERS` is read by its own reader, which raises DecodeError as the parser does.
        """
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in _SERVICE.methods:
            handler = getattr(self, method.name)
            message_type: type[Message] = getattr(pb, method.input_type.name)
            deserializer = _lenient(message_type, _READERS.get(method.name, message_type.FromString))
            serializer = getattr(pb, method.output_type.name).SerializeToString
            if method.client_streaming and method.server_streaming:
                # A stream refuses an unparsable request in its answer to it, and goes on (ModelStreamInfer).
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    handler, request_deserializer=deserializer, response_serializer=serializer
                )
            elif not (method.client_streaming or method.server_streaming):
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._refusing_unparsable(handler),
                    request_deserializer=deserializer,
                    response_serializer=serializer,
                )
            else:  # pragma: no cover - the .proto has none; registering it as unary would break it
                raise TypeError(f"{method.full_name}: a half-streaming method has no handler registration")
        return handlers

    def _refusing_unparsable(
        self, handler: Callable[[Any, grpc.aio.ServicerContext[object, object]], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext[object, object]], Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext[object, object]) -> Any:
            if isinstance(request, _Unparsable):
                return await self._guard(context, request.refuse)
            return await handler(request, context)

        return handle

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

    def _gives_back_after(self, size: int) -> bool:
        """Whether a request of `size` bytes is large enough to give memory back once it is answered."""
        return self._give_back_after_bytes is not None and size >= self._give_back_after_bytes

    async def _answer(
        self, request: ReceivedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        """One inference request, unary or on a stream: checked, decoded, answered, encoded (or raises)."""
        await self._serving()
        infer_request = await read_request(request, self._limits.max_elements, self._model_inputs)
        # On a stream this is the stream's deadline, if it has one: its requests carry none of their own.
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        response = await self._plane.infer(infer_request, deadline)
        return await write_response(response, infer_request.raw)

    async def ModelInfer(
        self, request: ReceivedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        if self._gives_back_after(request.size):
            # Once the call has ended, its request and answer freed, the memory it took goes back to the system.
            done = functools.partial(_give_back_after, request.size)
            context.add_done_callback(done)  # type: ignore[arg-type]  # stubs: a class, not a Protocol
        # The message leaves this frame for the call's alone: see _guard.
        messages = [request]
        del request
        with self._in_flight:
            return await self._guard(context, lambda: self._answer(messages.pop(), context))

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[ReceivedRequest | _Unparsable],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's stream: each request is answered as ModelInfer would answer it, a failure in the
        answer's error_message (the stream goes on), until the client half-closes.

        Requests are answered concurrently, and the answers are sent in the order the requests
        came, as Triton does for a model that is not decoupled (every model here answers each
        request once); every answer carries its request's id too. At most
        `max_stream_in_flight` requests of one stream are in flight: at the bound the stream is
        not read further until the oldest is answered, so a client that sends faster than the
        server answers is held back by gRPC's flow control rather than queued here.

        Each request is read as ModelInfer's are (raw contents left in the bytes received), and
        once the answer to a large one is sent, memory goes back to the system as after a large
        unary call: a stream can stay open for as long as its client runs.

        A drain ends every stream once the requests it has read are answered (and refuses new
        streams with UNAVAILABLE), as it refuses new unary calls: an idle stream would otherwise
        hold the shutdown for its whole grace period, and its client on a server going away.
        """
        await self._guard(context, self._serving)
        slots = asyncio.Semaphore(self._limits.max_stream_in_flight)
        # The answers being worked out, in the order of their requests, then why the stream ends.
        answers: asyncio.Queue[_StreamItem] = asyncio.Queue()

        async def read() -> None:
            try:
                requests = aiter(request_iterator)
                while True:
                    await slots.acquire()
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        return
                    size = request.size if isinstance(request, ReceivedRequest) else 0
                    answers.put_nowait(_Answering(asyncio.create_task(self._stream_answer(request, context)), size))
                    del request  # its answer holds it while it is needed; waiting for the next, it would stay
            finally:
                answers.put_nowait(_StreamEnd.HALF_CLOSED)

        reader = asyncio.create_task(read())
        self._streams.add(answers)
        draining = False
        try:
            while (item := await answers.get()) is not _StreamEnd.HALF_CLOSED:
                if item is _StreamEnd.DRAINING:
                    draining = True
                    reader.cancel()  # no more reading; its HALF_CLOSED follows what it has read
                    continue
                size = item.size
                yield await item.answer
                slots.release()
                if self._gives_back_after(size):
                    del item  # the answer sent, its request and response are freed once nothing holds them
                    _give_back_after(size, None)
            if not draining:
                await reader  # a failure to read the stream (other than its end) fails the call
        finally:
            # The client went away (or reading failed): nothing left is answered.
            self._streams.discard(answers)
            reader.cancel()
            while not answers.empty():
                left = answers.get_nowait()
                if isinstance(left, _Answering):
                    left.answer.cancel()

    async def _stream_answer(
        self, request: ReceivedRequest | _Unparsable, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelStreamInferResponse:
        """The stream's answer to one request: its response, or its failure as error_message with
        the status beside it (`status_parameters`) and the request's id, so the client knows which
        request failed and why, as a unary call's status would say."""
        with self._in_flight:
            try:
                if isinstance(request, _Unparsable):
                    await request.refuse()
                return pb.ModelStreamInferResponse(infer_response=await self._answer(request, context))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = status_for(exc)
                _log_if_unexpected(code)
                failed = pb.ModelInferResponse(id="" if isinstance(request, _Unparsable) else request.message.id)
                parameters_to_pb(status_parameters(code, trailers_for(exc)), failed.parameters)
                return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)


def _give_back_after(size: int, _: object) -> None:
    """A large call has ended: the C allocator's free memory goes back to the system, on a worker thread."""

    def give_back() -> None:
        give_back_freed_memory()
        log.debug("gave the allocator's free memory back to the system after a call of %d bytes", size)

    asyncio.get_running_loop().run_in_executor(None, give_back)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """A descriptor pool with every service the server lists, for reflection to describe them: OIP's
    messages live in a private pool (see proto/generate.py), health's and reflection's in protobuf's
    default one, and reflection answers from a single pool."""
    pool = descriptor_pool.DescriptorPool()
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(file.serialized_pb)
    return pool


class OipServer:
    """One gRPC server: OIP, health (grpc.health.v1) and reflection, on one port (and, with
    `start_health`, health alone in plaintext on another)."""

    def __init__(
        self,
        data_plane: DataPlane,
        name: str,
        limits: ServerLimits | None = None,
        security: ServerSecurity | None = None,
        give_back_after_bytes: int | None = None,
    ) -> None:
        """`security`: TLS credentials and bearer tokens (default: plaintext, any caller).

        Tokens guard the inference service only: health and reflection stay open, so
        probes and tools need no secret.

        `give_back_after_bytes`: after an inference call whose request was at least this large, the
        memory the C allocator holds free is given back to the system (`offload.oip.memory`).
        """
        self.name = name
        self.data_plane = data_plane
        self.limits = limits or ServerLimits()
        self.security = security or ServerSecurity()
        self.port = 0
        self.health_port: int | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._health = health.aio.HealthServicer()
        self._health_server: grpc.aio.Server | None = None
        # First, so that it sees every call's status, those the token check refuses included.
        self._observer = CallObserver(SERVICE_NAME)
        self._server = grpc.aio.server(
            options=server_options(self.limits),
            maximum_concurrent_rpcs=self.limits.max_concurrent_rpcs,
            interceptors=[self._observer, *self.security.interceptors(SERVICE_NAME)],
        )
        self._servicer = InferenceServicer(data_plane, self.limits, give_back_after_bytes)
        handlers = self._servicer.method_handlers()
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self._server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server, pool=_reflection_pool()
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind (port 0: any free port), start, and report SERVING; returns the bound port.

        With TLS credentials in `security` the port is a secure one (and only that); without, it is plaintext.
        """
        address = host_port(host, port)
        credentials = self.security.credentials
        if credentials is None:
            if not _is_loopback(host):
                log.warning(
                    "%s: serving plaintext on %s: anyone on the network can read the traffic; "
                    "give tls_cert and tls_key for TLS",
                    self.name,
                    host,
                )
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"{self.name}: could not bind {address}; is the port in use?")
        await self._server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def start_health(self, host: str, port: int) -> int:
        """Serve grpc.health.v1 alone, in plaintext and open to any caller, on another port; returns it.

        For probes that cannot speak TLS or send a token (Kubernetes' gRPC probes, Docker health checks):
        it answers what the main port's health service answers (the same servicer: SERVING once started,
        NOT_SERVING while draining) and serves nothing else, no inference, metadata or reflection.
        """
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = host_port(host, port)
        bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"{self.name}: could not bind the health port {address}; is the port in use?")
        await server.start()
        self._health_server, self.health_port = server, bound
        return bound

    def stats(self) -> ServerStats:
        """The calls to the inference service so far, by method and status, with their durations."""
        return self._observer.stats()

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
        if self._health_server is not None:
            # Last: a probe sees NOT_SERVING for the whole drain, then the port closes.
            await self._health_server.stop(0)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _log_if_unexpected(code: grpc.StatusCode) -> None:
    """Log the exception being handled, with its traceback, when its status says it is a bug of ours."""
    if code == grpc.StatusCode.INTERNAL:
        log.exception("request failed with an unexpected error")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_until_signalled(
    server: OipServer, grace_seconds: float, announce: Callable[[], None] | None = None
) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully.

    `announce` runs once the signals are handled: a server announced before that (its
    `listening on` line) could be stopped by a signal sent right after the line, with no drain.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        if announce is not None:
            announce()
        await stop.wait()
        log.info("%s: shutting down; answering calls in flight for up to %.1fs", server.name, grace_seconds)
        await server.stop(grace_seconds)
        log.info("%s: stopped", server.name)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
