"""Triton's ModelStreamInfer: on both servers, in OipClient's stream mode, and on the edge agent's way to the cloud.

tritonclient's stream API (start_stream / async_stream_infer) runs against the real `offload
cloud` and `offload edge` processes; the raw stream and OipClient against servers in this
process where a test holds calls in flight (support.held) or drains a server; the edge agent
with --cloud-streaming reaches the cloud through a chaos proxy that counts streams apart from
unary calls and breaks streams on demand.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import SUBPROCESS_ENV, Processes
from offload.cloud.dataplane import CloudDataPlane
from offload.edge.settings import EdgeSettings
from offload.models import DEMO_REPOSITORY
from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip.client import OipClient
from offload.oip.errors import PUSHBACK_KEY, STATUS_PARAMETER, ResourceExhausted, UpstreamError, stream_error
from offload.oip.limits import ServerLimits
from offload.oip.messages import request_to_pb
from offload.oip.security import ChannelSecurity, ServerSecurity
from offload.oip.server import SERVICE_NAME, InferenceServicer, OipServer
from offload.oip.settings import load_settings
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.router.models import RoutedModel
from offload.router.options import REQUIRE_CLOUD, RESPONSE_DEGRADED, RESPONSE_ROUTE
from offload.router.pool import CloudPool
from offload.tools.cli import build_parser
from offload.tools.process import ServerProcess
from support.chaos import ALL_TO_CLOUD, ChaosProxy, Reference, burst, check, edge_under_test, eventually
from support.held import HeldCloud

ROWS = 60
TIMEOUT = 30.0
Code = grpc.StatusCode
STREAM_METHOD = f"/{SERVICE_NAME}/ModelStreamInfer"

Pixels = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def pixels() -> Pixels:
    """The last rows of the test set: other tests send the first ones through the shared edge agent, and
    its row cache would answer them differently (route `mixed`) had these tests sent them first."""
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        return np.asarray(data["inputs"][-ROWS:], dtype=np.float32)


def _inputs(rows: Pixels) -> list[Any]:
    tensor = triton.InferInput("pixels", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return [tensor]


def _request(request_id: str, rows: Pixels, model: str = "digits") -> pb.ModelInferRequest:
    return request_to_pb(InferRequest(model, [Tensor.of("pixels", rows)], id=request_id))


def stream_through_tritonclient(address: str, requests: Sequence[tuple[str, str, Pixels]]) -> list[tuple[Any, Any]]:
    """Send (id, model, rows) requests on one tritonclient stream, half-close it, and return the
    (result, error) pairs its callback got, in the order it got them.

    stop_stream half-closes and returns only once the stream has ended, so every answer is in by then.
    """
    delivered: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with triton.InferenceServerClient(url=address) as client:
        client.start_stream(callback=lambda result, error: delivered.put((result, error)))
        for request_id, model, rows in requests:
            client.async_stream_infer(model, _inputs(rows), request_id=request_id)
        client.stop_stream()
    return [delivered.get_nowait() for _ in range(delivered.qsize())]


def _address(processes: Processes, server: str) -> str:
    return processes.edge.address if server == "edge" else processes.cloud.address


# --- tritonclient's stream API against the real processes ----------------------------------------------------------


@pytest.mark.parametrize("server", ["edge", "cloud"])
def test_stream_answers_equal_the_unary_answers_row_by_row_in_request_order(
    demo_processes: Processes, server: str, pixels: Pixels
) -> None:
    address = _address(demo_processes, server)
    requests = [(f"row-{i}", "digits", pixels[i : i + 1]) for i in range(ROWS)]
    with triton.InferenceServerClient(url=address) as client:
        unary = [
            client.infer(model, _inputs(rows), request_id=request_id, client_timeout=TIMEOUT)
            for request_id, model, rows in requests
        ]
    streamed = stream_through_tritonclient(address, requests)

    assert [error for _, error in streamed] == [None] * ROWS
    # Every request answered once, in the order sent (as Triton answers a model that is not decoupled).
    assert [result.get_response().id for result, _ in streamed] == [request_id for request_id, _, _ in requests]
    for (result, _), expected in zip(streamed, unary, strict=True):
        np.testing.assert_allclose(result.as_numpy("scores"), expected.as_numpy("scores"), rtol=1e-5, atol=1e-6)
        if server == "edge":
            # Where each row was answered; the agent's row cache (which earlier calls fill) stands for the cloud.
            routes = [answer.get_response().parameters[RESPONSE_ROUTE].string_param for answer in (result, expected)]
            assert {route.replace("cache", "cloud") for route in routes} in ({"edge"}, {"cloud"})


@pytest.mark.parametrize("server", ["edge", "cloud"])
def test_an_invalid_request_gets_an_error_message_and_the_stream_goes_on(
    demo_processes: Processes, server: str, pixels: Pixels
) -> None:
    streamed = stream_through_tritonclient(
        _address(demo_processes, server),
        [
            ("before", "digits", pixels[:2]),
            ("no-such-model", "nope", pixels[:2]),
            ("wrong-shape", "digits", pixels[:2, :63]),
            ("after", "digits", pixels[2:5]),
        ],
    )
    assert len(streamed) == 4
    (before, no_error), (none_1, unknown), (none_2, wrong_shape), (after, no_error_either) = streamed
    assert (no_error, none_1, none_2, no_error_either) == (None, None, None, None)
    assert before.get_response().id == "before"
    assert before.as_numpy("scores").shape == (2, 10)
    assert "'nope'" in unknown.message()
    assert "shape [2, 63], expected [-1, 64]" in wrong_shape.message()
    assert after.get_response().id == "after"
    assert after.as_numpy("scores").shape == (3, 10)


def test_many_concurrent_requests_on_one_stream_are_each_answered_once(
    demo_processes: Processes, pixels: Pixels
) -> None:
    address = demo_processes.cloud.address
    count = 300
    requests = [(f"r{i}", "digits", pixels[i % ROWS : i % ROWS + 1 + i % 3]) for i in range(count)]
    with triton.InferenceServerClient(url=address) as client:
        whole = client.infer("digits", _inputs(pixels), client_timeout=TIMEOUT).as_numpy("scores")
    streamed = stream_through_tritonclient(address, requests)
    assert [error for _, error in streamed] == [None] * count
    assert [result.get_response().id for result, _ in streamed] == [f"r{i}" for i in range(count)]
    for i, (result, _) in enumerate(streamed):
        first = i % ROWS
        expected = whole[first : first + 1 + i % 3]
        np.testing.assert_allclose(result.as_numpy("scores"), expected, rtol=1e-5, atol=1e-6)


# --- the raw stream: what the protocol says, message by message -----------------------------------------------------


def _raw_stream(channel: grpc.aio.Channel) -> Any:
    """A ModelStreamInfer call whose requests may be messages or raw bytes (to send what no client would)."""
    return channel.stream_stream(
        STREAM_METHOD,
        request_serializer=lambda message: message if isinstance(message, bytes) else message.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )()


def _status(reply: pb.ModelStreamInferResponse) -> Code:
    code = reply.infer_response.parameters[STATUS_PARAMETER].int64_param
    return next(status for status in Code if status.value[0] == code)


@pytest.mark.parametrize("server", ["edge", "cloud"])
async def test_a_failed_request_is_answered_with_its_id_and_status_and_the_stream_goes_on(
    demo_processes: Processes, server: str, pixels: Pixels
) -> None:
    # Field 3 (id) as a string that is not UTF-8: not a ModelInferRequest gRPC could parse.
    not_a_message = b"\x1a\x02\xff\xfe"
    async with grpc.aio.insecure_channel(_address(demo_processes, server)) as channel:
        call = _raw_stream(channel)
        for request in (not_a_message, _request("lost", pixels[:1], model="nope"), _request("good", pixels[:4])):
            await call.write(request)
        await call.done_writing()
        unparsable, unknown, good = [await call.read() for _ in range(3)]
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == Code.OK

    assert "not a valid inference.ModelInferRequest protobuf message" in unparsable.error_message
    assert _status(unparsable) == Code.INVALID_ARGUMENT
    assert unparsable.infer_response.id == ""
    assert "'nope'" in unknown.error_message
    assert _status(unknown) == Code.NOT_FOUND
    assert unknown.infer_response.id == "lost"
    assert good.error_message == ""
    assert good.infer_response.id == "good"
    assert list(good.infer_response.outputs[0].shape) == [4, 10]


async def test_a_client_half_close_ends_the_stream_once_every_request_is_answered(
    demo_processes: Processes, pixels: Pixels
) -> None:
    async with grpc.aio.insecure_channel(demo_processes.cloud.address) as channel:
        call = _raw_stream(channel)
        for i in range(5):
            await call.write(_request(f"h{i}", pixels[i : i + 1]))
        await call.done_writing()  # before a single answer was read
        answers = [await call.read() for _ in range(5)]
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == Code.OK
    assert [answer.infer_response.id for answer in answers] == [f"h{i}" for i in range(5)]
    assert all(answer.error_message == "" for answer in answers)


# --- servers in this process: requests held in flight, a drain ------------------------------------------------------


@asynccontextmanager
async def serving(plane: Any, limits: ServerLimits | None = None) -> AsyncIterator[OipServer]:
    server = OipServer(plane, "stream-test", limits)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def _address_of(server: OipServer) -> str:
    return f"127.0.0.1:{server.port}"


async def _read(call: Any) -> pb.ModelStreamInferResponse:
    reply = await call.read()
    assert isinstance(reply, pb.ModelStreamInferResponse), reply
    return reply


async def test_a_stream_is_not_read_past_its_bound_of_requests_in_flight(
    demo_cloud_plane: CloudDataPlane, pixels: Pixels
) -> None:
    held = HeldCloud(demo_cloud_plane)
    async with (
        serving(held, ServerLimits(max_stream_in_flight=2)) as server,
        grpc.aio.insecure_channel(_address_of(server)) as channel,
        OipClient(_address_of(server)) as client,
    ):
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        for i in range(5):
            await call.write(_request(f"b{i}", pixels[i : i + 1]))
        arrived = [(await held.arrived.get()).id for _ in range(2)]
        # Two requests are in flight at once. A round trip through the same server gives its stream
        # reader ample turns to take a third request off the stream, were it allowed to.
        assert await client.server_ready(timeout=TIMEOUT)
        assert held.arrived.empty()
        held.gate.set()
        answers = [await _read(call) for _ in range(5)]
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    assert arrived == ["b0", "b1"]
    assert [answer.infer_response.id for answer in answers] == [f"b{i}" for i in range(5)]


async def _wait_until_not_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    while True:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            return
        await asyncio.sleep(0.01)  # polling the health service, not synchronising on time


async def test_a_drain_answers_what_a_stream_has_read_then_ends_it_and_refuses_new_streams(
    demo_cloud_plane: CloudDataPlane, pixels: Pixels
) -> None:
    held = HeldCloud(demo_cloud_plane)
    server = OipServer(held, "stream-test")
    await server.start()
    async with grpc.aio.insecure_channel(_address_of(server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer()
        await call.write(_request("in-flight", pixels[:1]))
        await held.arrived.get()
        # A grace period longer than the test's own timeout: an open stream holding the shutdown fails the test.
        stopping = asyncio.create_task(server.stop(600))
        await _wait_until_not_serving(channel)
        late = stub.ModelStreamInfer()
        assert await late.code() == Code.UNAVAILABLE
        assert "shutting down" in (await late.details() or "")
        held.gate.set()
        answer = await _read(call)
        # The server ends the stream; the client never half-closed it.
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == Code.OK
        await stopping
    assert answer.error_message == ""
    assert answer.infer_response.id == "in-flight"


async def test_each_stream_counts_as_one_call_by_the_status_it_ends_with(
    demo_cloud_plane: CloudDataPlane, pixels: Pixels
) -> None:
    held = HeldCloud(demo_cloud_plane, lambda request: request.id == "held")
    async with serving(held) as server, grpc.aio.insecure_channel(_address_of(server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        finished = stub.ModelStreamInfer()
        for index in range(3):
            await finished.write(_request(f"s{index}", pixels[index : index + 1]))
        await finished.done_writing()
        assert [(await _read(finished)).infer_response.id for _ in range(3)] == ["s0", "s1", "s2"]
        assert await finished.code() == Code.OK
        abandoned = stub.ModelStreamInfer()
        await abandoned.write(_request("held", pixels[:1]))
        while (await held.arrived.get()).id != "held":  # the first stream's three came before it
            pass
        assert server.stats().in_flight == 1
        abandoned.cancel()
        await eventually(lambda: server.stats().in_flight == 0, "the cancelled stream is counted")
        stats = server.stats()
    assert stats.calls == {("ModelStreamInfer", "OK"): 1, ("ModelStreamInfer", "CANCELLED"): 1}
    assert stats.seconds["ModelStreamInfer"].count == 2


async def test_a_large_request_on_a_stream_gives_memory_back_once_it_is_answered(pixels: Pixels) -> None:
    # Over the edge agent's 1 MiB threshold: the stream stays open, so the give-back cannot wait for its end.
    rows = np.tile(pixels, (70, 1))
    request = _request("large", rows)
    assert request.ByteSize() > 1 << 20
    with ServerProcess(["edge", "--grpc-port", "0", "--log-level", "DEBUG"]) as edge:
        address = await asyncio.to_thread(edge.start)
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            await call.write(request)
            answer = await _read(call)
            # The line comes while the stream is still open: the client has not half-closed it.
            line = await asyncio.to_thread(edge.wait_for_line, "gave the allocator's free memory back")
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
    assert f"after a call of {request.ByteSize()} bytes" in line
    assert answer.error_message == ""
    assert answer.infer_response.id == "large"
    assert list(answer.infer_response.outputs[0].shape) == [len(rows), 10]


# --- OipClient's stream mode ----------------------------------------------------------------------------------------


@pytest.fixture
async def cloud(demo_cloud_plane: CloudDataPlane) -> AsyncIterator[OipServer]:
    async with serving(demo_cloud_plane) as server:
        yield server


@pytest.fixture
async def proxy(cloud: OipServer) -> AsyncIterator[ChaosProxy]:
    async with ChaosProxy(_address_of(cloud)) as chaos:
        yield chaos


def _infer_request(request_id: str, rows: Pixels, model: str = "digits") -> InferRequest:
    return InferRequest(model, [Tensor.of("pixels", rows)], id=request_id)


def _scores(response: InferResponse) -> npt.NDArray[Any]:
    tensor = response.output("scores")
    assert tensor is not None
    return tensor.data


async def test_client_stream_mode_sends_every_concurrent_call_on_one_stream(proxy: ChaosProxy, pixels: Pixels) -> None:
    # Ids as apps send them: unique, shared by two calls, and none at all.
    requests = [_infer_request(f"c{i}" if i % 4 else ("shared" if i % 8 else ""), pixels[i : i + 2]) for i in range(40)]
    async with OipClient(proxy.address, streaming=True) as streaming, OipClient(proxy.address) as unary:
        streamed = await asyncio.gather(*(streaming.infer(request, timeout=TIMEOUT) for request in requests))
        assert (proxy.streams, proxy.calls) == (1, 0)
        expected = await asyncio.gather(*(unary.infer(request, timeout=TIMEOUT) for request in requests))
    assert len(proxy.stream_request_ids) == len(requests)
    for request, got, want in zip(requests, streamed, expected, strict=True):
        assert got.id == want.id == request.id
        np.testing.assert_allclose(_scores(got), _scores(want), rtol=1e-5, atol=1e-6)
    # A call without an id went out with a fresh one of its own, and got its empty id back.
    assert "" not in proxy.stream_request_ids


async def test_client_stream_mode_reports_a_failed_request_with_the_status_a_unary_call_gets(
    demo_cloud_plane: CloudDataPlane, pixels: Pixels
) -> None:
    held = HeldCloud(demo_cloud_plane)
    held.failure = ResourceExhausted("the test's cloud is full", pushback_ms=250)
    held.gate.set()
    async with serving(held) as server:
        for streaming in (True, False):
            async with OipClient(_address_of(server), streaming=streaming) as client:
                with pytest.raises(UpstreamError) as unknown:
                    await client.infer(_infer_request("u", pixels[:1], model="nope"), timeout=TIMEOUT)
                with pytest.raises(UpstreamError) as full:
                    await client.infer(_infer_request("f", pixels[:1]), timeout=TIMEOUT)
            assert unknown.value.status == Code.NOT_FOUND, streaming
            assert "'nope'" in str(unknown.value)
            assert full.value.status == Code.RESOURCE_EXHAUSTED, streaming
            assert full.value.pushback_ms == 250, streaming
            assert "the test's cloud is full" in str(full.value)


async def test_client_deadlines_are_its_own_and_a_late_answer_is_never_taken_for_another_calls(
    demo_cloud_plane: CloudDataPlane, pixels: Pixels
) -> None:
    held = HeldCloud(demo_cloud_plane)
    async with serving(held) as server, OipClient(_address_of(server), streaming=True) as client:
        # Given up by its caller once it is in flight: its answer will come, later.
        abandoned = asyncio.create_task(client.infer(_infer_request("same", pixels[:1]), timeout=TIMEOUT))
        assert (await held.arrived.get()).id == "same"
        abandoned.cancel()
        # No answer can come while the cloud holds it: the client's own deadline ends the call.
        with pytest.raises(UpstreamError) as late:
            await client.infer(_infer_request("other", pixels[1:2]), timeout=0.05)
        assert late.value.status == Code.DEADLINE_EXCEEDED
        # The same id as the abandoned call, other rows: answered after the abandoned call's answer.
        wanted = asyncio.create_task(client.infer(_infer_request("same", pixels[5:8]), timeout=TIMEOUT))
        while not np.array_equal((await held.arrived.get()).inputs[0].data, pixels[5:8]):
            pass  # the call that timed out may have arrived before it
        held.gate.set()
        answer = await wanted
    assert answer.id == "same"
    assert _scores(answer).shape == (3, 10)
    expected = (await demo_cloud_plane.infer(_infer_request("x", pixels[5:8]), None)).outputs[0].data
    np.testing.assert_allclose(_scores(answer), expected, rtol=1e-5, atol=1e-6)
    assert abandoned.cancelled()


async def test_a_broken_stream_fails_its_calls_unavailable_and_the_next_call_opens_a_new_one(
    proxy: ChaosProxy, pixels: Pixels
) -> None:
    proxy.break_streams = 1
    async with OipClient(proxy.address, streaming=True) as client:
        failed = await asyncio.gather(
            *(client.infer(_infer_request(f"b{i}", pixels[i : i + 1]), timeout=TIMEOUT) for i in range(3)),
            return_exceptions=True,
        )
        answer = await client.infer(_infer_request("again", pixels[:2]), timeout=TIMEOUT)
    assert all(isinstance(error, UpstreamError) and error.status == Code.UNAVAILABLE for error in failed), failed
    assert "the inference stream broke" in str(failed[0])
    assert answer.id == "again"
    assert _scores(answer).shape == (2, 10)
    assert (proxy.streams, proxy.calls) == (2, 0)


async def test_a_client_closed_with_a_grace_period_lets_the_calls_on_its_stream_finish(
    demo_cloud_plane: CloudDataPlane, pixels: Pixels
) -> None:
    held = HeldCloud(demo_cloud_plane)
    async with serving(held) as server:
        client = OipClient(_address_of(server), streaming=True)
        call = asyncio.create_task(client.infer(_infer_request("last", pixels[:2]), timeout=TIMEOUT))
        assert (await held.arrived.get()).id == "last"
        # A grace period longer than the test's own timeout: a stream left open would hold the close for all of it.
        closing = asyncio.create_task(client.close(grace=600))
        held.gate.set()
        answer = await call
        await closing
    assert answer.id == "last"
    expected = (await demo_cloud_plane.infer(_infer_request("x", pixels[:2]), None)).outputs[0].data
    np.testing.assert_allclose(_scores(answer), expected, rtol=1e-5, atol=1e-6)


async def test_every_replica_of_a_cloud_pool_gets_a_stream_of_its_own(
    demo_cloud_plane: CloudDataPlane, pixels: Pixels
) -> None:
    held = HeldCloud(demo_cloud_plane)
    async with (
        serving(held) as server,
        ChaosProxy(_address_of(server)) as first,
        ChaosProxy(_address_of(server)) as second,
    ):
        pool = CloudPool(f"{first.address},{second.address}", TIMEOUT, 1 << 20, streaming=True)
        try:
            # One at a time, each held in flight: the balancer sends the second to the replica without a call.
            calls = []
            for i in range(2):
                calls.append(asyncio.create_task(pool.infer(_infer_request(f"p{i}", pixels[i : i + 1]), None)))
                assert (await held.arrived.get()).id == f"p{i}"
            held.gate.set()
            answers = await asyncio.gather(*calls)
        finally:
            await pool.close()
    assert [(proxy.streams, proxy.calls) for proxy in (first, second)] == [(1, 0), (1, 0)]
    assert sorted(first.stream_request_ids + second.stream_request_ids) == ["p0", "p1"]
    expected = (await demo_cloud_plane.infer(_infer_request("x", pixels[:2]), None)).outputs[0].data
    for i, answer in enumerate(answers):
        assert answer.id == f"p{i}"
        np.testing.assert_allclose(_scores(answer), expected[i : i + 1], rtol=1e-5, atol=1e-6)


async def test_a_refused_token_is_passed_on_and_a_server_without_the_stream_gets_unary_calls(
    demo_cloud_plane: CloudDataPlane, pixels: Pixels, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("stream-token\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it\n")
    server = OipServer(demo_cloud_plane, "guarded", security=ServerSecurity.load(auth_token_file=tokens))
    await server.start()
    try:
        # Refused for the caller, not for the stream: passed on as it is, not made a retryable UNAVAILABLE.
        async with OipClient(
            _address_of(server), security=ChannelSecurity.load(token_file=wrong), streaming=True
        ) as client:
            with pytest.raises(UpstreamError) as refused:
                await client.infer(_infer_request("t", pixels[:1]), timeout=TIMEOUT)
        assert refused.value.status == Code.UNAUTHENTICATED
        async with OipClient(
            _address_of(server), security=ChannelSecurity.load(token_file=tokens), streaming=True
        ) as client:
            assert (await client.infer(_infer_request("t", pixels[:1]), timeout=TIMEOUT)).id == "t"
    finally:
        await server.stop(0)

    # A server whose service lacks ModelStreamInfer (an older one, say).
    handlers = InferenceServicer(demo_cloud_plane, ServerLimits()).method_handlers()
    del handlers["ModelStreamInfer"]
    unary_only = grpc.aio.server()
    unary_only.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = unary_only.add_insecure_port("127.0.0.1:0")
    await unary_only.start()
    try:
        async with OipClient(f"127.0.0.1:{port}", streaming=True) as client:
            with pytest.raises(UpstreamError) as first:
                await client.infer(_infer_request("first", pixels[:1]), timeout=TIMEOUT)
            # Retryable, and the retry goes unary.
            assert first.value.status == Code.UNAVAILABLE
            assert "UNIMPLEMENTED" in str(first.value)
            answer = await client.infer(_infer_request("second", pixels[:1]), timeout=TIMEOUT)
        assert answer.id == "second"
    finally:
        await unary_only.stop(0)


@pytest.mark.parametrize(
    ("message", "parameters", "status", "pushback"),
    [
        # Ours: the status and its pushback beside the message.
        (
            "full",
            {STATUS_PARAMETER: Code.RESOURCE_EXHAUSTED.value[0], PUSHBACK_KEY: "250"},
            Code.RESOURCE_EXHAUSTED,
            250,
        ),
        ("gone", {STATUS_PARAMETER: Code.NOT_FOUND.value[0]}, Code.NOT_FOUND, None),
        ("no", {STATUS_PARAMETER: Code.UNAVAILABLE.value[0], PUSHBACK_KEY: "-1"}, Code.UNAVAILABLE, -1),
        # Triton's: no status; its shutdown refusal is worth a retry elsewhere, anything else is INTERNAL.
        ("GRPC server is shutting down and has stopped accepting new requests.", {}, Code.UNAVAILABLE, None),
        ("[request id: r] unexpected shape for input 'x' for model 'm'", {}, Code.INTERNAL, None),
        # A status that is not one, or OK for a failure: the message alone decides.
        ("odd", {STATUS_PARAMETER: 99}, Code.INTERNAL, None),
        ("odd", {STATUS_PARAMETER: True}, Code.INTERNAL, None),
        ("odd", {STATUS_PARAMETER: Code.OK.value[0]}, Code.INTERNAL, None),
    ],
)
def test_a_stream_error_message_becomes_an_upstream_error_with_a_sensible_status(
    message: str, parameters: dict[str, object], status: Code, pushback: int | None
) -> None:
    error = stream_error(message + "\n", parameters, "cloud:1")
    assert error.status == status
    assert error.pushback_ms == pushback
    assert str(error) == f"cloud:1: {status.name}: {message}\\n"  # the peer's text escaped, on one line


# --- the edge agent's stream to the cloud ---------------------------------------------------------------------------


def test_the_cloud_streaming_setting_comes_from_the_flag_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args(["edge"]).cloud_streaming is None  # not given: the setting decides
    assert build_parser().parse_args(["edge", "--cloud-streaming"]).cloud_streaming is True
    assert load_settings(EdgeSettings).cloud_streaming is False
    monkeypatch.setenv("OFFLOAD_EDGE_CLOUD_STREAMING", "true")
    assert load_settings(EdgeSettings).cloud_streaming is True


@pytest.fixture
async def streaming_edge(demo_processes: Processes) -> AsyncIterator[tuple[ServerProcess, ChaosProxy]]:
    """A real `offload edge --cloud-streaming` whose cloud is the demo cloud, through a proxy (row cache off, and
    coalescing off: each request's rows in a call of their own, whose request ids the test follows)."""
    async with ChaosProxy(demo_processes.cloud.address) as chaos:
        env = {**SUBPROCESS_ENV, "OFFLOAD_EDGE_CACHE_MAX_BYTES": "0", "OFFLOAD_EDGE_COALESCE_MAX_ROWS": "0"}
        args = ["edge", "--grpc-port", "0", "--cloud", chaos.address, "--cloud-streaming"]
        with ServerProcess(args, env=env) as edge:
            # Started off the event loop: the proxy serves on it meanwhile (the agent's start-up look).
            await asyncio.to_thread(edge.start)
            yield edge, chaos


async def test_the_edge_agent_with_cloud_streaming_answers_as_the_unary_agent_over_one_stream(
    demo_processes: Processes, streaming_edge: tuple[ServerProcess, ChaosProxy], pixels: Pixels
) -> None:
    edge, proxy = streaming_edge
    assert "over one ModelStreamInfer stream" in edge.wait_for_output("listening on")
    requests = [
        InferRequest("digits", [Tensor.of("pixels", pixels[i : i + 3])], id=f"e{i}", parameters=dict(ALL_TO_CLOUD))
        for i in range(0, ROWS, 3)
    ]
    async with OipClient(edge.address) as streaming, OipClient(demo_processes.edge.address) as unary:
        got = await asyncio.gather(*(streaming.infer(request, timeout=TIMEOUT) for request in requests))
        want = await asyncio.gather(*(unary.infer(request, timeout=TIMEOUT) for request in requests))
    for request, answer, expected in zip(requests, got, want, strict=True):
        assert answer.id == request.id
        np.testing.assert_allclose(_scores(answer), _scores(expected), rtol=1e-5, atol=1e-6)
        # Every row from the cloud (the unary agent may have some in its row cache by now).
        assert answer.parameters[RESPONSE_ROUTE] == "cloud"
        assert answer.parameters[RESPONSE_DEGRADED] is False
        assert expected.parameters[RESPONSE_DEGRADED] is False
    # Every cloud call went over the one stream: none unary.
    assert (proxy.streams, proxy.calls) == (1, 0)
    assert sorted(proxy.stream_request_ids) == sorted(request.id for request in requests)


@pytest.fixture
async def reference(demo_edge_models: dict[str, RoutedModel], demo_cloud_plane: CloudDataPlane) -> Reference:
    """The demo test set with the edge's and the cloud's own answers."""
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        test_pixels = data["inputs"].astype(np.float32)
    scores = (await demo_cloud_plane.infer(_infer_request("reference", test_pixels), None)).outputs[0].data
    return Reference.build(demo_edge_models["digits"], test_pixels, scores)


async def test_a_stream_broken_mid_call_is_retried_on_a_new_stream_or_answered_on_the_edge(
    proxy: ChaosProxy,
    reference: Reference,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
) -> None:
    # Retried: the attempt in flight on the broken stream fails UNAVAILABLE, the retry opens a new stream.
    async with edge_under_test(proxy.address, demo_edge_models, edge_executor, cloud_streaming=True) as edge:
        proxy.break_streams = 1
        calls = await burst(edge.client, reference, 1, tag="retried", concurrency=1, timeout=TIMEOUT)
        assert check(calls, reference) == []
        assert calls[0].from_cloud
        stats = edge.endpoint.stats()
        assert (stats.retries, stats.by_outcome) == (1, {"UNAVAILABLE": 1, "OK": 1})
        assert (proxy.streams, proxy.calls) == (2, 0)

    # No retries left: the rows are the edge's, flagged degraded, or the cloud's refusal for a caller who requires it.
    proxy.reset_counts()
    overrides: dict[str, Any] = {"cloud_streaming": True, "retry_max_attempts": 1}
    async with edge_under_test(proxy.address, demo_edge_models, edge_executor, **overrides) as edge:
        proxy.break_streams = 1
        (degraded,) = await burst(edge.client, reference, 1, tag="degraded", concurrency=1, timeout=TIMEOUT)
        assert check([degraded], reference) == []
        assert degraded.degraded
        proxy.break_streams = 1
        (refused,) = await burst(
            edge.client,
            reference,
            1,
            tag="refused",
            concurrency=1,
            timeout=TIMEOUT,
            parameters={**ALL_TO_CLOUD, REQUIRE_CLOUD: True},
            first_index=1,
        )
        assert refused.error is not None
        assert refused.error.status == Code.UNAVAILABLE
        assert "the inference stream broke" in str(refused.error)
        assert (proxy.streams, proxy.calls) == (2, 0)
