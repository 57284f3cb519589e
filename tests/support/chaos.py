"""Fault injection over real sockets: a chaos proxy in front of a real cloud, and the load tools around it.

`ChaosProxy` is a real gRPC server (grpc.aio, 127.0.0.1, port 0) that speaks the Open
Inference Protocol and forwards every call to an upstream OIP server (a real cloud)
with a raw stub. Faults are switched at run time, between or during bursts:

- `fail_rate`: that share of ModelInfer calls fails with `fail_code` (UNAVAILABLE by
  default). The draw is seeded per (request id, attempt), so it does not depend on
  the order in which concurrent calls arrive.
- `delay_seconds`: every ModelInfer call waits this long first (a slow cloud);
  `delay_first_attempt_seconds`: only the first attempt of each request id does
  (a straggler, what hedging is for).
- `exhausted`: answer RESOURCE_EXHAUSTED, with a `grpc-retry-pushback-ms` trailer
  when `pushback_ms` is set (it goes with the `fail_rate` failures too; a string is
  sent as it is, to try malformed values).
- `corruption`: forward, then break the answer (wrong shape, wrong row count, wrong
  datatype, raw bytes of the wrong size).
- `break_streams`: that many of the next ModelStreamInfer streams fail UNAVAILABLE as
  their first request arrives (it is never forwarded: a stream broken mid-call).

ModelStreamInfer streams are forwarded as streams, request by request and answer by
answer, with no other fault; the proxy counts the streams and the requests on them
apart from unary calls, so a test can tell which way a client's requests went.

The proxy counts what it received: calls, the x-request-id of each (so retries and
hedges of one request can be told from new work), the parameters of each as they came
over the wire, the time each had left before its gRPC deadline as it arrived, which ids
got a good answer, and how many calls were cancelled by the client.

The rest is what the fault tests and the fault benchmark share: an edge router on
a real gRPC port configured like the agent (`edge_under_test`), bounded concurrent
bursts of app requests with a gRPC deadline (`burst`), and a per-row check of every
answer against the edge's and the cloud's own answers (`check`). Latency is checked
only where asked (`check(margin=...)`, the benchmark): tests assert no timings.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload.edge.agent import CLOUD_HEALTH_SERVICE, build_cloud_pool
from offload.edge.dataplane import RouterDataPlane
from offload.edge.settings import EdgeSettings
from offload.models import DEMO_REPOSITORY
from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip.client import OipClient
from offload.oip.errors import PUSHBACK_KEY, UpstreamError
from offload.oip.limits import MAX_MESSAGE_BYTES, channel_options
from offload.oip.messages import request_to_pb, response_from_pb, response_to_pb
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.router.cache import RowCache
from offload.router.confidence import row_confidence
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.options import (
    DETAILS,
    RESPONSE_DEGRADED,
    RESPONSE_ROUTE,
    THRESHOLD,
)
from offload.router.pool import CloudPool
from offload.router.resilience import BreakerState
from offload.router.stats import UpstreamStats
from offload.router.upstream import Sleep
from support import reference as bare_models

if TYPE_CHECKING:
    from offload.oip.grpc_service_pb2_grpc import GRPCInferenceServiceAsyncStub

Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
Reply = TypeVar("Reply")
Method = grpc.aio.UnaryUnaryMultiCallable
REQUEST_ID_KEY = "x-request-id"


class Corruption(StrEnum):
    """Ways to break a good answer on its way back."""

    SHAPE = "shape"  # one column too many: [rows, 11] for [rows, 10]
    ROWS = "rows"  # one row too many
    DATATYPE = "datatype"  # FP64 where FP32 is declared (and the other way round)
    RAW_SIZE = "raw_size"  # raw bytes one short of what the shape needs


def corrupt(reply: pb.ModelInferResponse, kind: Corruption) -> pb.ModelInferResponse:
    """A copy of a good (raw) answer, broken in one way; the first output is the one broken."""
    if kind is Corruption.RAW_SIZE:
        broken = pb.ModelInferResponse()
        broken.CopyFrom(reply)
        broken.raw_output_contents[0] = broken.raw_output_contents[0][:-1]
        return broken
    response = response_from_pb(reply, "upstream answer")
    first = response.outputs[0]
    data = first.data
    if kind is Corruption.SHAPE:
        first = Tensor(first.name, first.datatype, np.concatenate([data, data[..., :1]], axis=-1))
    elif kind is Corruption.ROWS:
        first = Tensor(first.name, first.datatype, np.concatenate([data, data[:1]], axis=0))
    else:
        datatype, dtype = ("FP32", np.float32) if first.datatype == "FP64" else ("FP64", np.float64)
        first = Tensor(first.name, datatype, data.astype(dtype))
    response.outputs[0] = first
    return response_to_pb(response, raw=True)


def wire_value(parameter: pb.InferParameter) -> tuple[str, object]:
    """A parameter as it travels: which field of the oneof is set (bool_param, int64_param, ...) and its value."""
    kind = parameter.WhichOneof("parameter_choice")
    return (kind, getattr(parameter, kind)) if kind else ("", None)


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, proxy: ChaosProxy) -> None:
        self._proxy = proxy

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return await self._proxy.forward(self._proxy.stub.ServerLive, request, context)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return await self._proxy.forward(self._proxy.stub.ServerReady, request, context)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return await self._proxy.forward(self._proxy.stub.ModelReady, request, context)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return await self._proxy.forward(self._proxy.stub.ServerMetadata, request, context)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return await self._proxy.forward(self._proxy.stub.ModelMetadata, request, context)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._proxy.model_infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # An async generator function, as gRPC needs to tell a streaming handler from a blocking one.
        async for reply in self._proxy.model_stream_infer(request_iterator, context):
            yield reply


# W3C trace context metadata (offload.oip.tracing sends it with every call).
TRACE_KEYS = ("traceparent", "tracestate")


class ChaosProxy:
    """A fault-injecting OIP proxy in front of one upstream server. Use `async with` or start()/stop()."""

    def __init__(self, upstream: str, seed: int = 0) -> None:
        self.upstream = upstream
        self.seed = seed
        self.port = 0
        # Faults, switched at run time.
        self.fail_rate = 0.0
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.delay_seconds = 0.0
        self.delay_first_attempt_seconds = 0.0
        self.exhausted = False
        self.pushback_ms: int | str | None = None
        self.corruption: Corruption | None = None
        self.break_streams = 0
        # What arrived.
        self.calls = 0  # unary ModelInfer calls
        self.streams = 0  # ModelStreamInfer streams opened
        self.stream_request_ids: list[str] = []  # the OIP request id of each request on a stream, in arrival order
        self.request_ids: list[str] = []  # x-request-id of each ModelInfer call, in arrival order
        self.message_ids: list[str] = []  # the OIP request id of each call, in arrival order
        # The request parameters of each call, as they came over the wire: name -> (the oneof field set, its value).
        self.parameters: list[dict[str, tuple[str, object]]] = []
        # Seconds each call had left before its deadline (its grpc-timeout) as it arrived; None: no deadline.
        self.time_left: list[float | None] = []
        self.answered: set[str] = set()  # ids that got a good answer from upstream through the proxy
        self.injected = 0  # calls failed by the proxy itself
        self.cancelled = 0  # calls the client cancelled while the proxy held or forwarded them
        self._attempts: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self.stub: GRPCInferenceServiceAsyncStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def distinct_ids(self) -> int:
        return len(set(self.request_ids))

    def heal(self) -> None:
        """Stop injecting faults (the counters stay)."""
        self.fail_rate = 0.0
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.delay_seconds = 0.0
        self.delay_first_attempt_seconds = 0.0
        self.exhausted = False
        self.pushback_ms = None
        self.corruption = None
        self.break_streams = 0

    def reset_counts(self) -> None:
        self.calls = 0
        self.streams = 0
        self.stream_request_ids.clear()
        self.request_ids.clear()
        self.message_ids.clear()
        self.parameters.clear()
        self.time_left.clear()
        self.answered.clear()
        self.injected = 0
        self.cancelled = 0
        self._attempts.clear()

    async def start(self) -> str:
        self._channel = grpc.aio.insecure_channel(self.upstream, options=channel_options(MAX_MESSAGE_BYTES))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._server = grpc.aio.server(options=channel_options(MAX_MESSAGE_BYTES))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self.address

    async def stop(self) -> None:
        """Close the port: from now on the proxy is a dead endpoint (connection refused)."""
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> ChaosProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _fails(self, request_id: str, attempt: int) -> bool:
        if self.fail_rate <= 0.0:
            return False
        # Seeded per request and attempt: the same calls fail however concurrent calls interleave.
        rng = random.Random(f"{self.seed}:{request_id}:{attempt}") if request_id else self._rng
        return rng.random() < self.fail_rate

    async def model_infer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        metadata = dict(context.invocation_metadata() or ())
        value = metadata.get(REQUEST_ID_KEY, "")
        request_id = value if isinstance(value, str) else value.decode()
        self.calls += 1
        self.request_ids.append(request_id)
        self.message_ids.append(request.id)
        self.parameters.append({name: wire_value(value) for name, value in request.parameters.items()})
        self.time_left.append(context.time_remaining())
        self._attempts[request_id] += 1
        attempt = self._attempts[request_id]
        try:
            delay = self.delay_seconds + (self.delay_first_attempt_seconds if attempt == 1 else 0.0)
            if delay > 0:
                await asyncio.sleep(delay)  # the injected fault itself, not synchronisation
            if self._fails(request_id, attempt):
                self.injected += 1
                self._set_pushback(context)
                await context.abort(self.fail_code, f"chaos proxy: injected {self.fail_code.name}")
            if self.exhausted:
                self.injected += 1
                self._set_pushback(context)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "chaos proxy: injected RESOURCE_EXHAUSTED")
            # The trace context goes on too, as a tracing-aware proxy passes it: the cloud's spans stay in the trace.
            trace = tuple((k, v) for k, v in metadata.items() if k in TRACE_KEYS and isinstance(v, str))
            reply = await self._upstream_call(
                self.stub.ModelInfer, request, context, (("x-request-id", request_id), *trace)
            )
            corruption = self.corruption
            if corruption is not None:
                return corrupt(reply, corruption)
            self.answered.add(request_id)
            return reply
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def model_stream_infer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        self.streams += 1
        if self.break_streams > 0:
            self.break_streams -= 1
            async for request in requests:  # the first request: now a call is in flight on the stream
                self.stream_request_ids.append(request.id)
                self.injected += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "chaos proxy: injected a broken stream")
            return
        upstream = self.stub.ModelStreamInfer()

        async def forward_requests() -> None:
            async for request in requests:
                self.stream_request_ids.append(request.id)
                await upstream.write(request)
            await upstream.done_writing()

        forwarding = asyncio.create_task(forward_requests())
        try:
            async for reply in upstream:
                yield reply
            await forwarding
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            forwarding.cancel()
            upstream.cancel()

    def _set_pushback(self, context: Context) -> None:
        if self.pushback_ms is not None:
            context.set_trailing_metadata(((PUSHBACK_KEY, str(self.pushback_ms)),))

    async def forward(self, method: Method[Request, Reply], request: Request, context: Context) -> Reply:
        return await self._upstream_call(method, request, context, ())

    async def _upstream_call(
        self,
        method: Method[Request, Reply],
        request: Request,
        context: Context,
        metadata: tuple[tuple[str, str], ...],
    ) -> Reply:
        remaining = context.time_remaining()
        try:
            return await method(request, timeout=remaining, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            # Pass the upstream's status on, with its retry pushback if it sent one.
            pushback = [(k, v) for k, v in (exc.trailing_metadata() or ()) if k == PUSHBACK_KEY]
            if pushback:
                context.set_trailing_metadata(tuple(pushback))
            await context.abort(exc.code(), exc.details() or "")
            raise AssertionError("context.abort returned") from exc  # pragma: no cover


# --- The app side: an edge router under test, bursts of requests, and checks of every answer. ---

# Test-friendly resilience settings: short cloud deadline, a breaker that probes again soon.
# The row cache is off (the agent's default is on), so that every cloud-bound row meets the
# fault; a test that wants the agent's cache passes cache_max_bytes. Coalescing is off too (the
# agent's default is on), so that each request's rows travel in calls of their own, which the
# fault tests count; tests/test_coalescing.py turns it on.
TEST_EDGE_SETTINGS: dict[str, Any] = {
    "cloud_timeout_seconds": 1.0,
    "breaker_cooldown_seconds": 0.2,
    "retry_budget_max_tokens": 10.0,
    "retry_budget_token_ratio": 0.1,
    "cache_max_bytes": 0,
    "coalesce_max_rows": 0,
}
MODEL = "digits"
ROWS_PER_REQUEST = 3
ALL_TO_CLOUD: dict[str, ParameterValue] = {THRESHOLD: 1.0, DETAILS: True}


@dataclass
class Edge:
    """An edge router behind a real OipServer, as the agent wires it, and an app client for it."""

    server: OipServer
    router: Router
    endpoint: CloudPool  # the router's upstream: the pool of cloud replicas
    client: OipClient
    settings: EdgeSettings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def cloud_health(self) -> int:
        """The agent's "offload.cloud" health status (SERVING while the circuit is closed)."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=CLOUD_HEALTH_SERVICE), timeout=5
            )
        return int(reply.status)

    async def wait_for_cloud_health(self, serving: bool, timeout: float = 10.0) -> None:
        """Poll the health service until it reports `serving` (it is updated from the breaker's callback)."""
        want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        end = time.monotonic() + timeout
        while await self.cloud_health() != want:
            if time.monotonic() > end:
                raise AssertionError(f"health {CLOUD_HEALTH_SERVICE!r} never became {'SERVING' if serving else 'NOT'}")
            await asyncio.sleep(0.01)


@asynccontextmanager
async def edge_under_test(
    cloud: str, models: Mapping[str, RoutedModel], executor: Executor, sleep: Sleep | None = None, **overrides: Any
) -> AsyncIterator[Edge]:
    """An edge router for `cloud` on a loopback port, configured with TEST_EDGE_SETTINGS and `overrides`.

    `sleep` replaces the endpoint's backoff sleep (to record the backoffs it takes).
    """
    settings = EdgeSettings(cloud=cloud, **{**TEST_EDGE_SETTINGS, **overrides})
    server: OipServer | None = None

    def breaker_changed(state: BreakerState) -> None:  # as the agent does
        if server is not None:
            server.set_service_health_soon(CLOUD_HEALTH_SERVICE, state is BreakerState.CLOSED)

    endpoint = build_cloud_pool(settings, breaker_changed, sleep=sleep)
    assert endpoint is not None
    cache = RowCache(settings.cache_max_bytes, settings.cache_ttl_seconds) if settings.cache_max_bytes else None
    router = Router(
        models,
        endpoint,
        executor,
        deadline_reserve_seconds=settings.deadline_reserve_seconds,
        cache=cache,
        audit_share=settings.audit_share,
        rng=np.random.default_rng(0),  # which rows are audited: the same on every run
        placement=settings.placement(),
        coalesce=settings.coalescing(),
    )
    server = OipServer(RouterDataPlane(router), "chaos-edge", settings.limits)
    await server.start()
    await server.set_service_health(CLOUD_HEALTH_SERVICE, serving=True)
    client = OipClient(f"127.0.0.1:{server.port}", settings.max_message_bytes)
    try:
        yield Edge(server, router, endpoint, client, settings)
    finally:
        await client.close()
        await server.stop(0)
        await router.close()


@dataclass(frozen=True)
class Reference:
    """The demo test set and what the edge and the cloud answer for each row on their own."""

    pixels: npt.NDArray[np.float32]
    edge_scores: npt.NDArray[np.float32]
    edge_confidence: npt.NDArray[np.float64]
    cloud_scores: npt.NDArray[np.float32]

    @classmethod
    def of_demo(cls, cloud: str, model: RoutedModel) -> Reference:
        """The demo test set, with the answers of `model`'s edge and of the cloud at `cloud`."""
        with np.load(DEMO_REPOSITORY / MODEL / "test.npz") as data:
            pixels = data["inputs"].astype(np.float32)
        request = request_to_pb(InferRequest(MODEL, [Tensor.of("pixels", pixels)]))
        with grpc.insecure_channel(cloud, options=channel_options(MAX_MESSAGE_BYTES)) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        scores = response_from_pb(reply).output("scores")
        assert scores is not None
        return cls.build(model, pixels, scores.data)

    @classmethod
    def build(cls, model: RoutedModel, pixels: npt.NDArray[np.float32], cloud_scores: npt.NDArray[Any]) -> Reference:
        """From the edge model as the router runs it and a cloud's answers (the benchmark: that cloud may be a GPU)."""
        edge = model.edge.predict({"pixels": pixels})
        confidence = row_confidence(edge, model.routing, model.score_output)
        return cls(pixels, edge["scores"], confidence, np.asarray(cloud_scores, dtype=np.float32))

    @classmethod
    def bare(cls, pixels: npt.NDArray[np.float32]) -> Reference:
        """From the model files run bare and a NumPy softmax (support.reference), independent of Offload (tests)."""
        edge = bare_models.edge_scores(pixels)
        return cls(pixels, edge, bare_models.max_softmax(edge), bare_models.cloud_scores(pixels))

    def rows(self, index: int) -> npt.NDArray[np.intp]:
        """The test-set rows of request number `index` (deterministic)."""
        start = (index * ROWS_PER_REQUEST) % len(self.pixels)
        return (np.arange(start, start + ROWS_PER_REQUEST) % len(self.pixels)).astype(np.intp)


def cloud_bound(reference: Reference, rows: npt.NDArray[np.intp], threshold: float = 1.0) -> npt.NDArray[np.bool_]:
    return np.asarray(~(reference.edge_confidence[rows] >= threshold))


@dataclass
class Call:
    """One app request and what came of it.

    Its clock starts at `due_at`, when the app would have sent it (its scheduled send time, or
    the moment it began to wait for a concurrency slot): time spent waiting for a slot is part
    of `seconds`, as it is of what the app sees. `sent_at` is when it got a slot and went out.
    """

    id: str
    index: int
    rows: npt.NDArray[np.intp]
    due_at: float
    sent_at: float = math.nan
    seconds: float = 0.0  # from due_at to the answer or the error
    response: InferResponse | None = None
    error: UpstreamError | None = None
    order: int = -1  # completion order within its burst
    tags: set[str] = field(default_factory=set)

    def output(self, name: str) -> npt.NDArray[Any]:
        assert self.response is not None
        tensor = self.response.output(name)
        assert tensor is not None, f"{self.id}: the answer lacks {name!r}"
        return tensor.data

    @property
    def queued(self) -> float:
        """Seconds it waited for a concurrency slot."""
        return self.sent_at - self.due_at

    @property
    def answered_at(self) -> float:
        return self.due_at + self.seconds

    @property
    def degraded_rows(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.output(RESPONSE_DEGRADED), dtype=bool)

    @property
    def routes(self) -> list[str]:
        return [item.decode() for item in self.output(RESPONSE_ROUTE).tolist()]

    @property
    def degraded(self) -> bool:
        return self.response is not None and bool(self.response.parameters.get(RESPONSE_DEGRADED))

    @property
    def from_cloud(self) -> bool:
        """Every row the cloud was meant to answer came from the cloud, and some in a cloud call
        (not only from the row cache)."""
        return self.response is not None and not self.degraded and "cloud" in self.routes


async def burst(
    client: OipClient,
    reference: Reference,
    count: int,
    *,
    tag: str,
    concurrency: int,
    timeout: float,
    parameters: Mapping[str, ParameterValue] | None = None,
    first_index: int = 0,
    on_done: Callable[[Call, int], None] | None = None,
    on_send: Callable[[Call], None] | None = None,
    rate: float | None = None,
    deadline_from_due: bool = False,
) -> list[Call]:
    """Send `count` requests, at most `concurrency` at a time, each with a gRPC deadline of `timeout` seconds.

    `on_send(call)` runs as each request goes out (once it has a slot), `on_done(call,
    completed)` as each one ends (completed counts the ends so far): hooks to break things
    on a condition. With `rate`, request i is due i / rate seconds from the start (an open
    loop, for the benchmark); without, every request is due at once. Each call's clock
    starts when it is due, before it waits for a slot (see `Call`). With
    `deadline_from_due`, the deadline runs from then too, as an app's deadline does: the
    gRPC deadline sent is what is left of `timeout` after the wait for a slot, and a request
    whose deadline passed while it waited is not sent and fails DEADLINE_EXCEEDED.
    """
    gate = asyncio.Semaphore(concurrency)
    calls: list[Call] = []
    completed = 0
    parameters = dict(ALL_TO_CLOUD if parameters is None else parameters)
    start = time.monotonic()

    async def one(index: int) -> None:
        nonlocal completed
        rows = reference.rows(index)
        due = time.monotonic()
        if rate is not None:
            due = start + (index - first_index) / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # load pacing
        call = Call(f"{tag}-{index}", index, rows, due)
        async with gate:
            call.sent_at = time.monotonic()
            if on_send is not None:
                on_send(call)
            request = InferRequest(
                MODEL, [Tensor.of("pixels", reference.pixels[rows])], id=call.id, parameters=dict(parameters)
            )
            left = timeout - call.queued if deadline_from_due else timeout
            if left > 0:
                try:
                    call.response = await client.infer(request, timeout=left)
                except UpstreamError as exc:
                    call.error = exc
            else:
                call.error = UpstreamError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{call.id}: the app's {timeout}s deadline passed while it waited {call.queued:.3f}s for a slot",
                )
            call.seconds = time.monotonic() - call.due_at
            call.order = completed
            completed += 1
            calls.append(call)
            if on_done is not None:
                on_done(call, completed)

    await asyncio.gather(*(one(index) for index in range(first_index, first_index + count)))
    calls.sort(key=lambda call: call.index)
    return calls


def check(
    calls: Sequence[Call],
    reference: Reference,
    *,
    deadline: float | None = None,
    margin: float | None = None,
    threshold: float = 1.0,
    errors_allowed: bool = False,
) -> list[str]:
    """Everything wrong with a burst's answers, one line per problem (an empty list: all good).

    Per row: a row meant for the cloud was answered by the cloud or from the row cache
    (and carries the cloud's answer) xor is flagged degraded (and carries the edge's
    answer); other rows are the edge's, never degraded. Per request: the response's
    degraded parameter agrees with its rows. With `deadline` and `margin` (the fault
    benchmark), also: it came within the deadline plus the margin, counted from when it was
    due (time waiting for a concurrency slot included, see `Call`). Tests leave that
    out: a timing depends on the machine's load, and the benchmark reports it.
    """
    problems: list[str] = []
    for call in calls:
        if deadline is not None and margin is not None and call.seconds > deadline + margin:
            problems.append(f"{call.id}: took {call.seconds:.3f}s, past the {deadline}s deadline + {margin}s")
        if call.error is not None:
            if not errors_allowed:
                problems.append(f"{call.id}: error to the app: {call.error.status.name}: {call.error}")
            continue
        assert call.response is not None
        scores = call.output("scores")
        routes = call.routes
        degraded = call.degraded_rows
        meant = cloud_bound(reference, call.rows, threshold)
        for j, row in enumerate(call.rows.tolist()):
            where = f"{call.id} row {j} (test row {row})"
            edge_answer = np.allclose(scores[j], reference.edge_scores[row], rtol=1e-4, atol=1e-4)
            cloud_answer = np.allclose(scores[j], reference.cloud_scores[row], rtol=1e-3, atol=1e-3)
            from_cloud = routes[j] in ("cloud", "cache")  # the cache holds the cloud's answers
            if not meant[j]:
                if routes[j] != "edge" or degraded[j] or not edge_answer:
                    problems.append(f"{where}: not meant for the cloud, yet route {routes[j]} degraded {degraded[j]}")
            elif from_cloud == bool(degraded[j]):
                problems.append(f"{where}: route {routes[j]} with degraded={degraded[j]}: must be one or the other")
            elif degraded[j] and (routes[j] != "edge" or not edge_answer):
                problems.append(f"{where}: degraded but not the edge's answer (route {routes[j]})")
            elif from_cloud and not cloud_answer:
                problems.append(f"{where}: route {routes[j]} but not the cloud's answer")
        if call.degraded != bool(degraded.any()):
            problems.append(f"{call.id}: response degraded={call.degraded} but rows say {degraded.tolist()}")
    return problems


def retry_bound(endpoint: CloudPool, since: UpstreamStats | None = None) -> float:
    """The most retries and hedges together the budget allows (gRPC A6): half the bucket, plus what
    successes paid back, plus one. Each retry follows a failure that took a token, each hedge takes
    one when sent, and neither goes out unless more than half the bucket is left. With `since`,
    for the calls made after that snapshot."""
    throttle = endpoint.throttle
    successes = endpoint.stats().by_outcome.get("OK", 0) - (since.by_outcome.get("OK", 0) if since else 0)
    return throttle.max_tokens / 2 + 1 + throttle.token_ratio * successes


def within_retry_budget(endpoint: CloudPool, since: UpstreamStats | None = None) -> bool:
    """The retries and hedges sent (since that snapshot), together, are within `retry_bound`: both take
    the budget's tokens."""
    stats = endpoint.stats()
    retries = stats.retries - (since.retries if since else 0)
    hedges = stats.hedges - (since.hedges if since else 0)
    return retries + hedges <= retry_bound(endpoint, since)


@dataclass(frozen=True)
class Summary:
    sent: int
    answered: int
    degraded: int
    failed: int
    latencies: tuple[float, ...]

    @classmethod
    def of(cls, calls: Sequence[Call]) -> Summary:
        return cls(
            sent=len(calls),
            answered=sum(call.response is not None for call in calls),
            degraded=sum(call.degraded for call in calls),
            failed=sum(call.error is not None for call in calls),
            latencies=tuple(sorted(call.seconds for call in calls)),
        )

    def percentile(self, share: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[max(0, min(98, round(share * 100) - 1))]


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll until `condition()` holds (waiting on a condition, not sleeping as synchronisation)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.005)


async def wait_for_cloud_answer(
    edge: Edge, reference: Reference, *, timeout: float = 20.0, deadline: float = 1.5, tag: str = "recovery"
) -> float:
    """Poll with app requests until one is answered by the cloud; return the seconds it took."""
    started = time.monotonic()
    index = 0
    while True:
        (call,) = await burst(
            edge.client, reference, 1, tag=tag, concurrency=1, timeout=deadline, first_index=10_000 + index
        )
        if call.from_cloud:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no cloud answer within {timeout}s of the fault's end; last: {call.response}")
        index += 1
        await asyncio.sleep(0.02)  # polling for a condition: the cloud answering again
