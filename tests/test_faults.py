"""Fault injection: break a real cloud (child process) while an app sends bursts through a real edge router.

The cloud is `offload cloud` as a child process, reached directly or through a chaos
proxy (tests/support/chaos.py). The edge is the router as the agent wires it, on a
loopback gRPC port, with test-friendly settings (1 s cloud deadline, 0.2 s breaker
cool-down, the default retry budget of 10 tokens / 0.1). The app sends bounded,
concurrent bursts of demo rows with `offload_threshold=1.0` (every row to the cloud)
and a 1.5 s gRPC deadline, which the edge propagates to the cloud.

Each burst is checked row by row (`chaos.check`): every request answered, no error
to the app unless it asked for `offload_require_cloud`, a row meant for the cloud is
either the cloud's answer or flagged degraded and the edge's answer, retries and
hedges within the retry budget and, through the proxy, exactly as many calls
arriving as the endpoint made. After each fault the cloud comes back and the test
polls until a cloud answer arrives again. No test asserts a timing (how long an
answer took depends on the machine's load); benchmarks/faults.py measures and
reports latency against the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import SUBPROCESS_ENV
from offload.cloud.dataplane import CloudDataPlane
from offload.cloud.registry import ModelRegistry
from offload.cloud.scheduler import Scheduler
from offload.cloud.settings import CloudSettings
from offload.edge.settings import EdgeSettings
from offload.edge.status import StatusLog
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.errors import DeadlineExceeded, UpstreamError
from offload.oip.repository import load_repository
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.router.models import RoutedModel
from offload.router.options import REQUIRE_CLOUD
from offload.router.resilience import BreakerState
from offload.tools.process import ServerProcess
from support import gate
from support.chaos import (
    ALL_TO_CLOUD,
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
    wait_for_cloud_answer,
    within_retry_budget,
)

Code = grpc.StatusCode
DEADLINE = 1.5  # the app's gRPC deadline per request


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
def reference() -> Reference:
    """What the bare model files answer for each test row: every answer in a burst is checked against it."""
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        return Reference.bare(data["inputs"].astype(np.float32))


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
    problems = check(calls, reference, errors_allowed=errors_allowed)
    assert problems == [], "\n".join(problems[:20])
    if not errors_allowed:
        assert all(call.response is not None for call in calls)
    stats = edge.endpoint.stats()
    assert within_retry_budget(edge.endpoint), f"retries and hedges past the budget: {stats}"
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

            await wait_for_cloud_answer(edge, reference)
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
        stats = edge.endpoint.stats()
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
        assert edge.endpoint.stats().retries > 0
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
        assert edge.endpoint.stats().by_outcome.get("DEADLINE_EXCEEDED", 0) >= 1
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
        stats = edge.endpoint.stats()
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
        stats = edge.endpoint.stats()
        assert stats.short_circuited > 0
        assert proxy.calls < len(calls), "the open breaker keeps most calls off the failing cloud"
        # The state is visible in the stats snapshot and on the "offload.cloud" health service.
        assert edge.endpoint.stats().circuit in (BreakerState.OPEN, BreakerState.HALF_OPEN)
        await edge.wait_for_cloud_health(serving=False)

        proxy.heal()
        await wait_for_cloud_answer(edge, reference)
        assert edge.endpoint.stats().circuit == BreakerState.CLOSED
        await edge.wait_for_cloud_health(serving=True)


async def test_hedging_answers_for_stragglers_within_the_budget(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    # Each request's first attempt straggles for 2 s (what "every other call is slow" is, at worst), past
    # the 1.5 s deadline: only a hedge can answer. Each hedge takes a retry token, so the budget is sized
    # for one hedge per request (the default budget's limit is in test_resilience_units).
    async with edge_under_test(
        proxy.address, models, edge_executor, hedge_delay_seconds=0.05, retry_budget_max_tokens=100.0
    ) as edge:
        proxy.delay_first_attempt_seconds = 2.0
        calls = await burst(edge.client, reference, 16, tag="hedge", concurrency=8, timeout=DEADLINE)
        assert_sound(calls, reference, edge, proxy)
        assert all(call.from_cloud for call in calls), "answered by the hedge, within the deadline"
        stats = edge.endpoint.stats()
        assert stats.hedges == stats.calls == 16, "one hedge per request, no more"
        assert stats.retries == 0
        assert proxy.calls == stats.attempts == 32
        assert proxy.distinct_ids == 16
        assert proxy.answered == {call.id for call in calls}
        assert stats.by_outcome == {"OK": 16}, "the stragglers, cancelled, record nothing"
        # 100 tokens, one taken per hedge, 0.1 paid back per success.
        assert stats.retry_tokens == pytest.approx(100 - 16 + 16 * 0.1)
        await eventually(lambda: proxy.cancelled == 16, "the stragglers were cancelled on the wire")


async def test_backpressure_admits_capacity_and_refuses_the_rest_at_once(tmp_path: Path) -> None:
    repository = gate.write_repository(tmp_path / "repository")
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    env = {gate.MARKER_ENV: str(gate_dir), "OFFLOAD_CLOUD_MAX_INFLIGHT_ROWS": "2"}
    args = ("--model-repository", str(repository), "--inference-threads", "1")
    with cloud_process(0, *args, env=env) as process:
        address = await asyncio.to_thread(process.start)
        capacity = 2  # rows: one 1-row request running + one queued
        async with OipClient(address) as client:

            def request(index: int) -> InferRequest:
                return InferRequest("gate", [Tensor.of("x", np.full((1, 1), index, dtype=np.float32))])

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
                # Refused while the gate still holds the admitted ones: at once, not after a wait in a queue.
                assert len(pending) == capacity, "exactly capacity requests are admitted, the gate holds them"
                await eventually((gate_dir / "arrived").exists, "an admitted request reached the model")
                assert len(gate.started(gate_dir)) == 1, "one thread: one model call at a time"
            finally:
                (gate_dir / "open").touch()
            for error in refused:
                assert error.status == Code.RESOURCE_EXHAUSTED
                assert error.pushback_ms == 100, "with the grpc-retry-pushback-ms trailer"
            answers = await asyncio.gather(*pending)  # the admitted ones finish once the gate opens
            assert len(answers) == capacity
            assert all(answer.outputs[0].data.shape == (1, 1) for answer in answers)
            # Capacity is free again once they finish.
            answer = await client.infer(request(9), timeout=30)
            np.testing.assert_array_equal(answer.outputs[0].data, [[9.0]])


CALLER_DEADLINE = 1.0  # callers in the admission test give up after this long


async def test_callers_that_give_up_do_not_free_capacity_for_more_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot is the job's, not its caller's: a caller that gives up frees it only once its job is gone."""
    import torch

    repository = gate.write_repository(tmp_path / "repository")
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    monkeypatch.setenv(gate.MARKER_ENV, str(gate_dir))
    settings = CloudSettings(model_repository=repository, inference_threads=1, max_inflight_rows=2)
    plane = CloudDataPlane.load(load_repository(repository), settings, torch.device("cpu"))
    capacity = plane.scheduler.stats().max_rows
    assert capacity == 2  # one 1-row call running, one queued
    server = OipServer(plane, "gated-cloud")
    await server.start()
    try:
        async with OipClient(f"127.0.0.1:{server.port}") as client:

            def request(value: float) -> InferRequest:
                return InferRequest("gate", [Tensor.of("x", np.full((1, 1), value, dtype=np.float32))])

            # A call reaches the model and stays there (the gate is shut); its caller gives up.
            with pytest.raises(UpstreamError) as late:
                await client.infer(request(0), timeout=CALLER_DEADLINE)
            assert late.value.status == Code.DEADLINE_EXCEEDED
            assert gate.started(gate_dir) == {gate.started_marker(0)}
            assert plane.scheduler.stats().admitted_rows == 1, "its job still runs, so it keeps its row"
            # Rounds of callers with short deadlines: the stuck call still holds its slot, so one
            # call is queued (until its caller gives up) and the other is refused at once.
            for round_ in (1, 2):
                values = (10.0 * round_, 10.0 * round_ + 1)
                results = await asyncio.gather(
                    *(client.infer(request(value), timeout=CALLER_DEADLINE) for value in values),
                    return_exceptions=True,
                )
                errors = [result for result in results if isinstance(result, UpstreamError)]
                assert len(errors) == 2, results
                assert sorted(error.status.name for error in errors) == ["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"]
                refused = next(error for error in errors if error.status == Code.RESOURCE_EXHAUSTED)
                assert refused.pushback_ms == settings.pushback_ms
                await eventually(
                    lambda: plane.scheduler.stats().admitted_rows == 1, "the queued job left with its caller"
                )
            stats = plane.scheduler.stats()
            assert stats.peak_rows <= capacity, "admitted work never exceeded capacity"
            assert gate.started(gate_dir) == {gate.started_marker(0)}, "no job whose caller had gone ever ran"
            assert stats.dropped == 2
            assert stats.rejected == 2
            (gate_dir / "open").touch()
            await eventually(
                lambda: plane.scheduler.stats().admitted_rows == 0, "the stuck call's row is freed when it ends"
            )
            answer = await client.infer(request(5), timeout=30)
            np.testing.assert_array_equal(answer.outputs[0].data, [[5.0]])
    finally:
        (gate_dir / "open").touch()
        await server.stop(0)
        plane.close()


async def test_a_queued_call_whose_deadline_has_passed_is_dropped_when_a_thread_comes_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    repository = gate.write_repository(tmp_path / "repository")
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    monkeypatch.setenv(gate.MARKER_ENV, str(gate_dir))
    model = ModelRegistry.load(load_repository(repository), torch.device("cpu"), repository).model("gate", "")
    now = [1000.0]  # the scheduler's clock, moved by hand
    scheduler = Scheduler(instances=1, max_rows=2, max_bytes=1 << 20, clock=lambda: now[0])
    try:
        held = asyncio.create_task(scheduler.run(model, {"x": np.zeros((1, 1), np.float32)}, None))
        await eventually((gate_dir / "arrived").exists, "the first call reached the model")
        # Queued behind it; its deadline passes while it waits: the thread that comes free must not run it.
        late = asyncio.create_task(scheduler.run(model, {"x": np.ones((1, 1), np.float32)}, now[0] + 1))
        await eventually(lambda: scheduler.stats().admitted_rows == 2, "the late call was queued")
        now[0] += 2
        (gate_dir / "open").touch()
        with pytest.raises(DeadlineExceeded, match="deadline passed while the request waited in the model's queue"):
            await late
        np.testing.assert_array_equal((await held)["y"], [[0.0]])
        assert gate.started(gate_dir) == {gate.started_marker(0)}, "the late call never reached the model"
        stats = scheduler.stats()
        assert (stats.max_rows, stats.admitted_rows, stats.peak_rows) == (2, 0, 2)
        assert (stats.rejected, stats.rejected_late, stats.started, stats.dropped) == (0, 0, 1, 1)
        assert (stats.batches, stats.batched_rows) == (1, 1), "one model call, for the first request only"
        assert (stats.queued_rows, stats.admitted_rows_total, stats.rejected_rows) == (0, 2, 0)
        # Only the call that ran waited for an instance and made a batch (of its one row).
        assert stats.queue_seconds.count == 1
        assert stats.batch_rows.counts[0] == stats.batch_rows.count == 1
    finally:
        (gate_dir / "open").touch()
        scheduler.close()


async def test_a_failing_cloud_with_the_row_cache_on_answers_cached_rows_and_degrades_the_rest(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    cache_bytes = EdgeSettings.model_fields["cache_max_bytes"].default  # on, as the agent has it
    async with edge_under_test(proxy.address, models, edge_executor, cache_max_bytes=cache_bytes) as edge:
        warm = await burst(edge.client, reference, 10, tag="warm", concurrency=5, timeout=DEADLINE)
        assert all(call.from_cloud for call in warm)

        proxy.fail_rate = 1.0
        # The warm rows again (cached), and new rows, each asked twice at once (single-flight).
        cached, fresh, twin = await asyncio.gather(
            burst(edge.client, reference, 10, tag="cached", concurrency=5, timeout=DEADLINE),
            burst(edge.client, reference, 10, tag="fresh", concurrency=5, timeout=DEADLINE, first_index=10),
            burst(edge.client, reference, 10, tag="twin", concurrency=5, timeout=DEADLINE, first_index=10),
        )
        assert_sound(warm + cached + fresh + twin, reference, edge, proxy)
        for call in cached:
            assert not call.degraded, f"{call.id}: its rows were cached"
            assert "cloud" not in call.routes
            assert "cache" in call.routes
        assert not any(request_id.startswith("cached-") for request_id in proxy.request_ids), "never sent"
        cache = edge.router.stats().cache
        assert cache is not None
        assert cache.hits == sum(int(cloud_bound(reference, call.rows).sum()) for call in cached)
        assert all(all_degraded(call, reference) for call in fresh + twin)
        assert proxy.injected > 0

        proxy.heal()
        await wait_for_cloud_answer(edge, reference)
        again = await burst(edge.client, reference, 10, tag="again", concurrency=5, timeout=DEADLINE, first_index=10)
        assert all(call.from_cloud for call in again), "the rows that failed were not cached"
        assert_sound(again, reference, edge, proxy)


async def test_an_overloaded_cloud_is_retried_after_its_pushback_then_the_edge_answers(
    tmp_path: Path, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    # A cloud serving the demo model and the gate, with room for one call; the gate holds that one.
    repository = gate.write_repository(tmp_path / "repository")
    (repository / "digits").symlink_to(DEMO_REPOSITORY / "digits", target_is_directory=True)
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    pushback_ms = 50
    env = {
        gate.MARKER_ENV: str(gate_dir),
        "OFFLOAD_CLOUD_MAX_INFLIGHT_ROWS": "1",
        "OFFLOAD_CLOUD_PUSHBACK_MS": str(pushback_ms),
    }
    args = ("--model-repository", str(repository), "--inference-threads", "1")
    with cloud_process(0, *args, env=env) as process:
        address = await asyncio.to_thread(process.start)
        async with OipClient(address) as holder:
            held = asyncio.ensure_future(
                holder.infer(InferRequest("gate", [Tensor.of("x", np.full((1, 1), 7, dtype=np.float32))]), timeout=60)
            )
            try:
                await eventually(lambda: gate.started_marker(7) in gate.started(gate_dir), "the one slot is taken")
                backoffs: list[float] = []

                async def sleep(seconds: float) -> None:
                    backoffs.append(seconds)
                    await asyncio.sleep(seconds)  # the backoff itself, recorded

                async with edge_under_test(address, models, edge_executor, sleep=sleep) as edge:
                    (first,) = await burst(edge.client, reference, 1, tag="busy", concurrency=1, timeout=DEADLINE)
                    assert edge.endpoint.stats().by_outcome == {"RESOURCE_EXHAUSTED": 3}, "all attempts were made"
                    assert backoffs == [pushback_ms / 1000] * 2, "each retry waited as long as the cloud asked"
                    assert all_degraded(first, reference)
                    more = await burst(
                        edge.client, reference, 8, tag="busy", concurrency=4, timeout=DEADLINE, first_index=1
                    )
                    assert_sound([first, *more], reference, edge)
                    assert all(all_degraded(call, reference) for call in more)
                    assert set(backoffs) == {pushback_ms / 1000}
                    (gate_dir / "open").touch()
                    await held
                    await wait_for_cloud_answer(edge, reference)
            finally:
                (gate_dir / "open").touch()
                await asyncio.gather(held, return_exceptions=True)


async def test_an_app_deadline_shorter_than_the_cloud_timeout_reaches_the_cloud(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    cloud_timeout = 30.0
    # gRPC rounds a timeout up on the wire (grpc-timeout, three significant figures): below 1 s by
    # at most a millisecond, well inside the edge's 20 ms deadline reserve; for 30 s by up to 1%.
    app_deadline = 0.8
    async with edge_under_test(proxy.address, models, edge_executor, cloud_timeout_seconds=cloud_timeout) as edge:
        (call,) = await burst(edge.client, reference, 1, tag="short", concurrency=1, timeout=app_deadline)
        assert call.from_cloud
        (time_left,) = proxy.time_left
        assert time_left is not None, "the cloud call carries a deadline"
        assert time_left <= app_deadline, "the app's deadline, not the longer cloud_timeout_seconds"
        # Without an app deadline, cloud_timeout_seconds bounds the cloud call.
        rows = reference.rows(1)
        request = InferRequest(
            "digits", [Tensor.of("pixels", reference.pixels[rows])], id="no-deadline", parameters=dict(ALL_TO_CLOUD)
        )
        await edge.client.infer(request)
        untimed = proxy.time_left[1]
        assert untimed is not None
        assert app_deadline < untimed <= cloud_timeout * 1.01


async def test_the_status_line_says_what_happened_since_the_last_one(
    proxy: ChaosProxy, reference: Reference, models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    cache_bytes = EdgeSettings.model_fields["cache_max_bytes"].default
    overrides = {"cache_max_bytes": cache_bytes, "breaker_cooldown_seconds": 60.0}
    async with edge_under_test(proxy.address, models, edge_executor, **overrides) as edge:
        now = [0.0]
        status = StatusLog(edge.router.stats, 60.0, clock=lambda: now[0])
        assert status.line() is None, "nothing happened yet"

        await burst(edge.client, reference, 4, tag="warm", concurrency=2, timeout=DEADLINE)
        again = await burst(edge.client, reference, 4, tag="again", concurrency=2, timeout=DEADLINE)
        rows = sum(int(cloud_bound(reference, call.rows).sum()) for call in again)
        calls = sum(bool(cloud_bound(reference, call.rows).any()) for call in again)
        now[0] = 60.0
        assert status.line() == (
            f"status over the last 60s: 8 requests (0 degraded, 0 errors); cloud {proxy.address}: circuit closed, "
            f"retry tokens 10.0/10, {calls} calls (0 failed, 0 short-circuited, 0 retries, 0 hedges); "
            f"cache hit rate 50.0% ({rows} of {2 * rows} rows)"
        )
        assert status.line() is None, "nothing happened since the last line"

        proxy.fail_rate = 1.0
        # One at a time: the first request makes 3 attempts (10 -> 7 tokens), the second 2 (-> 5, not
        # above half: no more retries), which is 5 failures in a row: the circuit opens for 60 s.
        down = await burst(edge.client, reference, 6, tag="down", concurrency=1, timeout=DEADLINE, first_index=20)
        assert all(call.degraded for call in down)
        now[0] = 180.0
        line = status.line()
        assert line is not None
        assert line.startswith(
            f"status over the last 120s: 6 requests (6 degraded, 0 errors); cloud {proxy.address}: circuit open "
            "(1 change), retry tokens 5.0/10, 6 calls (2 failed, 4 short-circuited, 3 retries, 0 hedges); "
            "cache hit rate 0.0% (0 of "
        ), line


async def test_the_status_line_is_written_every_interval_only_when_something_happened(
    proxy: ChaosProxy,
    reference: Reference,
    models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offload.edge.status")
    async with edge_under_test(proxy.address, models, edge_executor, audit_share=1.0) as edge:
        # The interval passes when the test says so: the injected sleep waits for a tick.
        ticks: asyncio.Queue[None] = asyncio.Queue()
        naps: list[float] = []

        async def nap(seconds: float) -> None:
            naps.append(seconds)
            await ticks.get()

        status = StatusLog(edge.router.stats, 30.0, sleep=nap)
        loop = asyncio.create_task(status.run())
        try:
            await eventually(lambda: len(naps) == 1, "the loop waits for its first interval")
            ticks.put_nowait(None)  # an interval with nothing in it
            await eventually(lambda: len(naps) == 2, "the loop went round")
            assert caplog.records == []

            # Auto routing at the model's threshold: the confident rows are audited (audit_share 1).
            await burst(edge.client, reference, 6, tag="audit", concurrency=3, timeout=DEADLINE, parameters={})
            await edge.router.wait_for_audits()
            audit = edge.router.stats().audit
            assert audit.agreement is not None
            ticks.put_nowait(None)
            await eventually(lambda: len(naps) == 3, "the loop went round")
            (record,) = caplog.records
            assert record.levelno == logging.INFO
            message = record.getMessage()
            assert message.startswith("status over the last ")
            assert "6 requests (0 degraded, 0 errors)" in message
            assert message.endswith(f"; audit agreement {100 * audit.agreement:.1f}% over {audit.rows} rows")
            assert naps == [30.0] * 3
        finally:
            loop.cancel()


@pytest.mark.parametrize(("deadline_from_due", "sent"), [(True, 1), (False, 2)])
async def test_burst_counts_the_wait_for_a_slot_against_the_apps_deadline_when_asked(
    deadline_from_due: bool, sent: int
) -> None:
    """The benchmark's app (deadline_from_due) starts each request's deadline when it is due: one whose deadline
    passed while it waited for a slot is not sent and fails DEADLINE_EXCEEDED. Without it, it is sent."""
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        pixels = data["inputs"][:6].astype(np.float32)
    scores = np.zeros((6, 10), dtype=np.float32)
    rows_only = Reference(pixels, scores, np.zeros(6), scores)  # burst reads the pixels alone
    async with ChaosProxy("127.0.0.1:1") as held, OipClient(held.address) as client:
        held.delay_seconds = 60.0  # the injected fault: each call is held past its deadline, keeping its slot
        # Both due at once (an open loop at a huge rate): the second waits for the slot the first's whole deadline.
        calls = await burst(
            client,
            rows_only,
            2,
            tag="queued",
            concurrency=1,
            timeout=0.2,
            rate=1e9,
            deadline_from_due=deadline_from_due,
        )
    assert [call.error.status if call.error else None for call in calls] == [Code.DEADLINE_EXCEEDED] * 2
    assert held.calls == sent
    assert calls[1].sent_at >= calls[0].answered_at  # it got the slot once the first had its answer
