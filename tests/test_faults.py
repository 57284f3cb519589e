"""Fault injection: break a real cloud (child process) while an app sends bursts through a real edge router.

The cloud is `offload cloud` as a child process, reached directly or through a chaos
proxy (tests/support/chaos.py). The edge is the router as the agent wires it, on a
loopback gRPC port, with test-friendly settings (1 s cloud deadline, 0.2 s breaker
cool-down, the default retry budget of 10 tokens / 0.1). The app sends bounded,
concurrent bursts of demo rows with `offload_threshold=1.0` (every row to the cloud)
and a 1.5 s gRPC deadline, which the edge propagates to the cloud.

Each burst is checked row by row (`chaos.check`): every request answered, no error
to the app unless it asked for `offload_require_cloud`, a row meant for the cloud is
either the cloud's answer or flagged degraded and the edge's answer, latency within
the deadline plus 0.3 s, retries within the retry budget and, through the proxy,
exactly as many calls arriving as the endpoint made. After each fault the cloud
comes back and the test polls until a cloud answer arrives again.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import SUBPROCESS_ENV
from offload.models import DEMO_REPOSITORY
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip.client import OipClient
from offload.oip.errors import UpstreamError
from offload.oip.messages import request_to_pb, response_from_pb
from offload.oip.process import ServerProcess
from offload.oip.server import channel_options
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.router.core import RoutedModel
from offload.router.options import REQUIRE_CLOUD
from offload.router.resilience import BreakerState
from support import gate
from support.chaos import (
    ALL_TO_CLOUD,
    MAX_MESSAGE_BYTES,
    Call,
    ChaosProxy,
    Corruption,
    Edge,
    Reference,
    burst,
    check,
    cloud_bound,
    edge_under_test,
    eventually,
    retry_bound,
    wait_for_cloud_answer,
)

Code = grpc.StatusCode
DEADLINE = 1.5  # the app's gRPC deadline per request
MARGIN = 0.3  # what a request may take past it


def cloud_process(port: int | str = 0, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    args = ["cloud", "--grpc-port", str(port), "--device", "cpu", *extra]
    return ServerProcess(args, env={**SUBPROCESS_ENV, **(env or {})})


@pytest.fixture(scope="module")
def cloud_server() -> Iterator[ServerProcess]:
    """A cloud shared by the tests that break things in a proxy in front of it (and the freeze test)."""
    with cloud_process() as process:
        process.start()
        yield process


@pytest.fixture(scope="module")
def cloud(cloud_server: ServerProcess) -> str:
    return cloud_server.address


@pytest.fixture(scope="module")
def reference(cloud: str, demo_edge_models: dict[str, RoutedModel]) -> Reference:
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        pixels = data["inputs"].astype(np.float32)
    request = request_to_pb(InferRequest("digits", [Tensor.of("pixels", pixels)]))
    with grpc.insecure_channel(cloud, options=channel_options(MAX_MESSAGE_BYTES)) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    scores = response_from_pb(reply).output("scores")
    assert scores is not None
    return Reference.build(demo_edge_models["digits"], pixels, scores.data)


@pytest.fixture
def models(demo_edge_models: dict[str, RoutedModel]) -> dict[str, RoutedModel]:
    return demo_edge_models


@pytest.fixture
async def proxy(cloud: str) -> AsyncIterator[ChaosProxy]:
    async with ChaosProxy(cloud, seed=1) as chaos:
        yield chaos


def assert_sound(
    calls: list[Call], reference: Reference, edge: Edge, proxy: ChaosProxy | None = None, errors_allowed: bool = False
) -> None:
    """The checks every burst must pass, whatever the fault."""
    problems = check(calls, reference, deadline=DEADLINE, margin=MARGIN, errors_allowed=errors_allowed)
    assert problems == [], "\n".join(problems[:20])
    if not errors_allowed:
        assert all(call.response is not None for call in calls)
    stats = edge.endpoint.stats
    assert stats.retries <= retry_bound(edge.endpoint), f"retries past the budget: {stats}"
    sent_calls = stats.calls - stats.short_circuited
    assert stats.attempts <= sent_calls + stats.retries + stats.hedges, stats
    if proxy is not None:
        assert proxy.calls == stats.attempts, f"the proxy saw {proxy.calls} calls, the endpoint made {stats}"


def all_degraded(call: Call, reference: Reference) -> bool:
    """Every row meant for the cloud carries the edge's answer, flagged."""
    return call.response is not None and bool(np.all(call.degraded_rows == cloud_bound(reference, call.rows)))


async def test_through_a_healthy_proxy_every_row_is_the_clouds(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    async with edge_under_test(proxy.address, models, edge_executor) as edge:
        calls = await burst(edge.client, reference, 30, tag="healthy", concurrency=10, timeout=DEADLINE)
        assert_sound(calls, reference, edge, proxy)
        assert all(call.from_cloud for call in calls)
        assert proxy.calls == proxy.distinct_ids == 30
        assert proxy.answered == {call.id for call in calls}
        assert proxy.message_ids == proxy.request_ids, "the OIP id and x-request-id agree"


async def test_cloud_killed_under_load_then_restarted_on_the_same_port(
    reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    processes = [cloud_process()]
    address = await asyncio.to_thread(processes[0].start)
    try:
        async with edge_under_test(address, models, edge_executor) as edge:
            killed = False

            def kill_after_ten(call: Call, completed: int) -> None:
                nonlocal killed
                if completed == 10:
                    processes[0].kill()  # SIGKILL, and reaped: nothing it does from here on
                    killed = True

            def mark(call: Call) -> None:
                if killed:
                    call.tags.add("after-kill")

            calls = await burst(
                edge.client,
                reference,
                40,
                tag="kill",
                concurrency=8,
                timeout=DEADLINE,
                on_done=kill_after_ten,
                on_send=mark,
            )
            assert_sound(calls, reference, edge)
            in_order = sorted(calls, key=lambda call: call.order)
            assert all(call.from_cloud for call in in_order[:10]), "answered before the kill"
            after = [call for call in calls if "after-kill" in call.tags]
            assert len(after) >= 40 - 10 - 8  # at most `concurrency` were in flight at the kill
            assert all(all_degraded(call, reference) for call in after)

            # A caller who would rather have an error than an edge answer gets one.
            strict = await burst(
                edge.client,
                reference,
                8,
                tag="strict",
                concurrency=4,
                timeout=DEADLINE,
                parameters={**ALL_TO_CLOUD, REQUIRE_CLOUD: True},
            )
            assert_sound(strict, reference, edge, errors_allowed=True)
            for call in strict:
                assert call.error is not None, f"{call.id}: fell back although the cloud was required"
                assert call.error.status in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED), call.error

            # Restart on the same port while the app keeps sending.
            processes.append(cloud_process(address.rsplit(":", 1)[1]))
            restart = asyncio.ensure_future(asyncio.to_thread(processes[1].start))
            during: list[Call] = []
            while not restart.done():
                during += await burst(
                    edge.client, reference, 4, tag="during", concurrency=4, timeout=DEADLINE, first_index=len(during)
                )
                await asyncio.sleep(0.05)  # pacing the polling loop that waits for the restart
            assert await restart == address
            assert any(all_degraded(call, reference) for call in during)

            recovered = await wait_for_cloud_answer(edge, reference)
            assert recovered < 15.0
            again = await burst(edge.client, reference, 12, tag="again", concurrency=6, timeout=DEADLINE)
            assert all(call.from_cloud for call in again)
            assert_sound(calls + during + again, reference, edge)
    finally:
        for process in processes:
            process.kill()


async def test_cloud_frozen_by_sigstop(
    cloud_server: ServerProcess,
    cloud: str,
    reference: Reference,
    models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
) -> None:
    async with edge_under_test(cloud, models, edge_executor) as edge:
        warm = await burst(edge.client, reference, 6, tag="warm", concurrency=6, timeout=DEADLINE)
        assert all(call.from_cloud for call in warm)
        cloud_server.signal(signal.SIGSTOP)
        try:
            frozen = await burst(edge.client, reference, 24, tag="frozen", concurrency=12, timeout=DEADLINE)
        finally:
            cloud_server.signal(signal.SIGCONT)
        assert_sound(warm + frozen, reference, edge)
        assert all(all_degraded(call, reference) for call in frozen)
        stats = edge.endpoint.stats
        assert stats.by_outcome.get("DEADLINE_EXCEEDED", 0) >= 5, "a hang ends at the cloud deadline"
        assert stats.short_circuited > 0, "the breaker opened and kept the rest off the frozen cloud"
        await wait_for_cloud_answer(edge, reference)


async def test_flaky_cloud_failing_30_percent(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    async with edge_under_test(proxy.address, models, edge_executor) as edge:
        proxy.fail_rate = 0.3
        calls = await burst(edge.client, reference, 40, tag="flaky", concurrency=8, timeout=DEADLINE)
        assert_sound(calls, reference, edge, proxy)
        assert proxy.injected > 0
        assert edge.endpoint.stats.retries > 0
        # Degraded exactly where the cloud did not answer: the proxy knows which requests it answered.
        assert {call.id for call in calls if call.from_cloud} == proxy.answered
        assert {call.id for call in calls if call.degraded} == {call.id for call in calls} - proxy.answered
        assert all(all_degraded(call, reference) for call in calls if call.degraded)
        assert proxy.distinct_ids <= 40
        proxy.heal()
        await wait_for_cloud_answer(edge, reference)


async def test_slow_cloud_past_the_deadline(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    async with edge_under_test(proxy.address, models, edge_executor) as edge:
        proxy.delay_seconds = 3.0
        calls = await burst(edge.client, reference, 16, tag="slow", concurrency=8, timeout=DEADLINE)
        assert_sound(calls, reference, edge, proxy)
        assert all(all_degraded(call, reference) for call in calls)
        assert proxy.answered == set()
        assert edge.endpoint.stats.by_outcome.get("DEADLINE_EXCEEDED", 0) >= 1
        proxy.heal()
        await wait_for_cloud_answer(edge, reference)


@pytest.mark.parametrize("kind", list(Corruption))
async def test_malformed_answers_are_failures_never_passed_on(
    kind: Corruption,
    proxy: ChaosProxy,
    reference: Reference,
    models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
) -> None:
    async with edge_under_test(proxy.address, models, edge_executor) as edge:
        proxy.corruption = kind
        calls = await burst(edge.client, reference, 12, tag=f"bad-{kind}", concurrency=6, timeout=DEADLINE)
        assert_sound(calls, reference, edge, proxy)
        assert all(all_degraded(call, reference) for call in calls)
        stats = edge.endpoint.stats
        assert stats.by_outcome.get("INTERNAL", 0) >= 1
        assert stats.retries == 0, "a malformed answer is not retried"
        proxy.heal()
        await wait_for_cloud_answer(edge, reference)


async def test_breaker_opens_on_a_failing_cloud_and_closes_when_it_recovers(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    async with edge_under_test(proxy.address, models, edge_executor) as edge:
        proxy.fail_rate = 1.0
        calls = await burst(edge.client, reference, 30, tag="down", concurrency=6, timeout=DEADLINE)
        assert_sound(calls, reference, edge, proxy)
        assert all(all_degraded(call, reference) for call in calls)
        stats = edge.endpoint.stats
        assert stats.short_circuited > 0
        assert proxy.calls < len(calls), "the open breaker keeps most calls off the failing cloud"
        # The state is visible in the health detail and on the "offload.cloud" health service.
        assert edge.endpoint.health_details()["circuit"] in (BreakerState.OPEN, BreakerState.HALF_OPEN)
        await edge.wait_for_cloud_health(serving=False)

        proxy.heal()
        await wait_for_cloud_answer(edge, reference)
        assert edge.endpoint.health_details()["circuit"] == BreakerState.CLOSED
        await edge.wait_for_cloud_health(serving=True)


async def test_hedging_answers_for_stragglers_within_the_budget(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    # Each request's first attempt straggles for 2 s (what "every other call is slow" is, at worst).
    async with edge_under_test(proxy.address, models, edge_executor, hedge_delay_seconds=0.05) as edge:
        proxy.delay_first_attempt_seconds = 2.0
        calls = await burst(edge.client, reference, 16, tag="hedge", concurrency=8, timeout=DEADLINE)
        assert_sound(calls, reference, edge, proxy)
        assert all(call.from_cloud for call in calls)
        assert max(call.seconds for call in calls) < 1.0, "answered by the hedge, long before the 2 s straggler"
        stats = edge.endpoint.stats
        assert stats.hedges == stats.calls == 16, "one hedge per request, no more"
        assert stats.retries == 0
        assert proxy.calls == stats.attempts == 32
        assert proxy.distinct_ids == 16
        assert edge.endpoint.throttle.tokens == edge.endpoint.throttle.max_tokens
        await eventually(lambda: proxy.cancelled == 16, "the stragglers were cancelled on the wire")


async def test_backpressure_admits_capacity_and_refuses_the_rest_at_once(tmp_path: Path) -> None:
    repository = gate.write_repository(tmp_path / "repository")
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    env = {gate.MARKER_ENV: str(gate_dir), "OFFLOAD_CLOUD_MAX_QUEUE": "1"}
    args = ("--model-repository", str(repository), "--inference-threads", "1")
    with cloud_process(0, *args, env=env) as process:
        address = await asyncio.to_thread(process.start)
        capacity = 2  # one running + one queued
        async with OipClient(address) as client:

            def request(index: int) -> InferRequest:
                return InferRequest("gate", [Tensor.of("x", np.full((1, 1), index, dtype=np.float32))])

            loop = asyncio.get_running_loop()
            started = loop.time()
            tasks = [asyncio.ensure_future(client.infer(request(index), timeout=60)) for index in range(6)]
            pending: set[asyncio.Future[InferResponse]] = set(tasks)
            refused: list[UpstreamError] = []
            try:
                while len(refused) < len(tasks) - capacity:
                    done, pending = await asyncio.wait(pending, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                    assert done, "the requests past capacity were not refused"
                    for task in done:
                        error = task.exception()
                        assert isinstance(error, UpstreamError), f"past capacity yet answered: {task}"
                        refused.append(error)
                refused_after = loop.time() - started
                assert len(pending) == capacity, "exactly capacity requests are admitted, the gate holds them"
                assert (gate_dir / "arrived").exists()
            finally:
                (gate_dir / "open").touch()
            for error in refused:
                assert error.status == Code.RESOURCE_EXHAUSTED
                assert error.pushback_ms == 100, "with the grpc-retry-pushback-ms trailer"
            assert refused_after < 5.0, "refused at once, not queued"
            answers = await asyncio.gather(*pending)  # the admitted ones finish once the gate opens
            assert len(answers) == capacity
            assert all(answer.outputs[0].data.shape == (1, 1) for answer in answers)
            # Capacity is free again once they finish.
            answer = await client.infer(request(9), timeout=30)
            np.testing.assert_array_equal(answer.outputs[0].data, [[9.0]])
