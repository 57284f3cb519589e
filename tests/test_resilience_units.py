"""The resilience policies on their own: retry budget, circuit breaker, and a pool of one replica's retry decisions.

Time is injected: the breaker reads a fake clock and the endpoint's backoffs go to a
fake `sleep` that records them (and moves the fake clock) instead of waiting. The
endpoint talks to a real chaos proxy over loopback, in front of a tiny in-process
echo server, so every attempt is a real RPC the proxy can count and inspect.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from offload.edge.settings import EdgeSettings
from offload.oip.errors import PUSHBACK_DO_NOT_RETRY, parse_pushback
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.router.pool import CloudPool
from offload.router.resilience import BreakerPolicy, BreakerState, CircuitBreaker, RetryBudget, RetryThrottle
from offload.router.upstream import CloudFailure, RetryPolicy
from support.chaos import ChaosProxy, eventually
from support.echo_plane import EchoPlane

Code = grpc.StatusCode


class FakeTime:
    """A clock that moves only when told, and a sleep that records what was asked and moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# --- RetryThrottle: gRPC A6 retry throttling ---


def test_throttle_follows_the_a6_token_arithmetic() -> None:
    throttle = RetryThrottle(RetryBudget(max_tokens=10, token_ratio=0.1))
    assert throttle.tokens == 10
    assert throttle.allows_retry()
    for _ in range(4):
        throttle.record_failure()
    assert throttle.tokens == 6
    assert throttle.allows_retry()
    throttle.record_failure()  # 5 of 10: not *more* than half
    assert throttle.tokens == 5
    assert not throttle.allows_retry()
    throttle.record_success()  # a success pays back token_ratio
    assert throttle.tokens == pytest.approx(5.1)
    assert throttle.allows_retry()


def test_throttle_tokens_stay_between_zero_and_max() -> None:
    throttle = RetryThrottle(RetryBudget(max_tokens=4, token_ratio=0.5))
    for _ in range(10):
        throttle.record_failure()
    assert throttle.tokens == 0
    for _ in range(100):
        throttle.record_success()
    assert throttle.tokens == 4


@pytest.mark.parametrize(("max_tokens", "ratio"), [(0, 0.1), (10, 0), (-1, 0.1)])
def test_throttle_refuses_a_budget_that_is_not_positive(max_tokens: float, ratio: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        RetryBudget(max_tokens, ratio)


# --- CircuitBreaker ---


def state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh (mypy would otherwise keep an earlier assert's narrowing)."""
    return breaker.state


def _breaker(clock: FakeTime, changes: list[BreakerState] | None = None, **policy: float) -> CircuitBreaker:
    settings = {"consecutive_failures": 3, "failure_rate": 0.5, "window": 10, "min_calls": 10, "cooldown_seconds": 1.0}
    settings.update(policy)
    return CircuitBreaker(
        "cloud:1",
        BreakerPolicy(
            consecutive_failures=int(settings["consecutive_failures"]),
            failure_rate=settings["failure_rate"],
            window=int(settings["window"]),
            min_calls=int(settings["min_calls"]),
            cooldown_seconds=settings["cooldown_seconds"],
        ),
        clock,
        None if changes is None else changes.append,
    )


def test_breaker_opens_after_consecutive_failures() -> None:
    breaker = _breaker(FakeTime(), consecutive_failures=3, min_calls=100)
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = _breaker(FakeTime(), consecutive_failures=3, min_calls=100)
    for outcome in (False, False, True, False, False):
        if outcome:
            breaker.record_success()
        else:
            breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED


def test_breaker_opens_on_a_failure_rate_over_the_window() -> None:
    breaker = _breaker(FakeTime(), consecutive_failures=100, failure_rate=0.5, window=10, min_calls=10)
    # Alternating: never two failures in a row, half of them failures.
    for _ in range(4):
        breaker.record_success()
        breaker.record_failure()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED, "9 calls: below min_calls, the rate does not count yet"
    breaker.record_failure()  # 5 failures in the last 10 calls
    assert state(breaker) is BreakerState.OPEN


def test_breaker_rate_only_counts_the_window() -> None:
    breaker = _breaker(FakeTime(), consecutive_failures=100, failure_rate=0.5, window=10, min_calls=10)
    for _ in range(4):
        breaker.record_failure()
        breaker.record_success()
    for _ in range(10):  # the early failures slide out of the window
        breaker.record_success()
    for _ in range(4):
        breaker.record_failure()
        breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED  # 4 of the last 10


def test_breaker_cools_down_then_lets_one_probe_through_which_closes_it() -> None:
    clock = FakeTime()
    changes: list[BreakerState] = []
    breaker = _breaker(clock, changes, consecutive_failures=1, cooldown_seconds=1.0)
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    clock.now += 0.99
    assert not breaker.allow()
    clock.now += 0.01
    assert breaker.allow(), "after the cool-down one probe goes out"
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow(), "only one probe at a time"
    assert not breaker.allow()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_probe_opens_the_breaker_for_another_cool_down() -> None:
    clock = FakeTime()
    breaker = _breaker(clock, consecutive_failures=1, cooldown_seconds=1.0)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    clock.now += 0.3  # the probe takes a while, then fails
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    clock.now += 0.9
    assert not breaker.allow(), "the new cool-down counts from the probe's failure"
    clock.now += 0.1
    assert breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN


def test_an_abandoned_probe_lets_the_next_call_probe_but_a_stale_one_does_not() -> None:
    clock = FakeTime()
    breaker = _breaker(clock, consecutive_failures=1, cooldown_seconds=1.0)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    first = breaker.probes
    breaker.abandon_probe(first)  # its call was cancelled: no outcome
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow(), "the next call is the probe"
    breaker.abandon_probe(first)  # a stale number must not free the new probe's slot
    assert not breaker.allow()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED


def test_closing_forgets_the_failures_before() -> None:
    clock = FakeTime()
    breaker = _breaker(clock, consecutive_failures=5, failure_rate=0.5, window=10, min_calls=10, cooldown_seconds=1.0)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.record_success()
    for _ in range(4):  # 4 failures after closing: neither 5 in a row nor a rate over 10 calls
        breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED


# --- A pool of one replica: its retry decisions, against a real proxy ---


@dataclass
class Rig:
    proxy: ChaosProxy
    fake: FakeTime


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    server = OipServer(EchoPlane(), "echo")
    await server.start()
    try:
        async with ChaosProxy(f"127.0.0.1:{server.port}", seed=3) as proxy:
            yield Rig(proxy, FakeTime())
    finally:
        await server.stop(0)


def _endpoint(
    rig: Rig,
    retry: RetryPolicy | None = None,
    throttle: RetryThrottle | None = None,
    breaker: BreakerPolicy | None = None,
    hedge_delay_seconds: float | None = None,
    fake_clock: bool = True,
    rng: random.Random | None = None,
) -> CloudPool:
    return CloudPool(
        rig.proxy.address,
        10.0,
        1 << 20,
        retry=retry,
        throttle=throttle or RetryThrottle(RetryBudget(100, 0.1)),
        breaker=breaker or BreakerPolicy(consecutive_failures=1000, min_calls=1000),
        hedge_delay_seconds=hedge_delay_seconds,
        clock=rig.fake if fake_clock else time.monotonic,
        sleep=rig.fake.sleep,
        rng=rng,
    )


def only_breaker(pool: CloudPool) -> CircuitBreaker:
    """The breaker of a pool of one."""
    (replica,) = pool.replicas
    return replica.breaker


def _request(request_id: str = "") -> InferRequest:
    return InferRequest("echo", [Tensor.of("x", np.array([[1.0]], dtype=np.float32))], id=request_id)


async def test_retries_back_off_with_full_jitter_under_the_ceiling_and_keep_the_request_id(rig: Rig) -> None:
    rig.proxy.fail_rate = 1.0
    policy = RetryPolicy(max_attempts=5, initial_backoff_seconds=0.05, max_backoff_seconds=0.15, multiplier=2.0)
    endpoint = _endpoint(rig, retry=policy, rng=random.Random(11))  # seeded: the same backoffs on every run
    request = _request("req-7")
    with pytest.raises(CloudFailure) as failure:
        await endpoint.infer(request, deadline=None)
    assert failure.value.status == Code.UNAVAILABLE
    ceilings = [0.05, 0.1, 0.15, 0.15]  # initial * 2^n, capped at max
    assert len(rig.fake.sleeps) == len(ceilings)
    for slept, ceiling in zip(rig.fake.sleeps, ceilings, strict=True):
        assert 0.0 <= slept <= ceiling
    assert rig.fake.sleeps != ceilings, "full jitter: not always the ceiling"
    assert rig.proxy.calls == endpoint.stats().attempts == 5
    assert endpoint.stats().retries == 4
    assert endpoint.stats().failures == 1
    # One id on every attempt, in the metadata and in the OIP message.
    assert rig.proxy.request_ids == ["req-7"] * 5
    assert rig.proxy.message_ids == ["req-7"] * 5
    assert rig.proxy.distinct_ids == 1


async def test_a_request_without_an_id_gets_one_that_every_attempt_carries(rig: Rig) -> None:
    rig.proxy.fail_rate = 1.0
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(CloudFailure):
        await endpoint.infer(_request(), deadline=None)
    assert rig.proxy.calls == 3
    assert rig.proxy.distinct_ids == 1
    assert rig.proxy.request_ids[0] != ""
    assert rig.proxy.message_ids == rig.proxy.request_ids


async def test_a_retry_that_succeeds_returns_the_answer(rig: Rig) -> None:
    # With seed 3, the first attempt of "flaky-2" draws a failure and the second does not.
    rig.proxy.fail_rate = 0.5
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=10))
    response = await endpoint.infer(_request("flaky-2"), deadline=None)
    np.testing.assert_array_equal(response.outputs[0].data, [[1.0]])
    assert rig.proxy.injected == 1
    assert rig.proxy.answered == {"flaky-2"}
    assert endpoint.stats().attempts == rig.proxy.calls == 2
    assert endpoint.stats().retries == 1
    assert endpoint.stats().failures == 0


async def test_pushback_sets_the_backoff(rig: Rig) -> None:
    rig.proxy.exhausted = True
    rig.proxy.pushback_ms = 250  # far above the jitter ceiling: the server's word wins
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=3, initial_backoff_seconds=0.01))
    with pytest.raises(CloudFailure) as failure:
        await endpoint.infer(_request("busy"), deadline=None)
    assert failure.value.status == Code.RESOURCE_EXHAUSTED
    assert rig.fake.sleeps == [0.25, 0.25]
    assert rig.proxy.calls == 3


async def test_resource_exhausted_without_pushback_is_not_retried(rig: Rig) -> None:
    rig.proxy.exhausted = True
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(CloudFailure) as failure:
        await endpoint.infer(_request(), deadline=None)
    assert failure.value.status == Code.RESOURCE_EXHAUSTED
    assert rig.proxy.calls == 1
    assert rig.fake.sleeps == []


async def test_pushback_longer_than_the_time_left_is_not_waited_for(rig: Rig) -> None:
    rig.proxy.exhausted = True
    rig.proxy.pushback_ms = 5000
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(CloudFailure):
        await endpoint.infer(_request(), deadline=rig.fake.now + 1.0)
    assert rig.proxy.calls == 1
    assert rig.fake.sleeps == []


@pytest.mark.parametrize("code", [Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.INTERNAL, Code.DEADLINE_EXCEEDED])
async def test_statuses_other_than_unavailable_are_not_retried(rig: Rig, code: grpc.StatusCode) -> None:
    rig.proxy.fail_rate = 1.0
    rig.proxy.fail_code = code
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=5))
    with pytest.raises(CloudFailure) as failure:
        await endpoint.infer(_request(), deadline=None)
    assert failure.value.status == code
    assert rig.proxy.calls == endpoint.stats().attempts == 1
    assert endpoint.stats().retries == 0
    assert rig.fake.sleeps == []
    assert endpoint.throttle.tokens == endpoint.throttle.max_tokens, "only UNAVAILABLE/RESOURCE_EXHAUSTED cost tokens"


async def test_a_refused_request_does_not_count_against_the_breaker(rig: Rig) -> None:
    rig.proxy.fail_rate = 1.0
    rig.proxy.fail_code = Code.INVALID_ARGUMENT
    endpoint = _endpoint(rig, breaker=BreakerPolicy(consecutive_failures=2, min_calls=1000))
    for _ in range(5):
        with pytest.raises(CloudFailure):
            await endpoint.infer(_request(), deadline=None)
    assert state(only_breaker(endpoint)) is BreakerState.CLOSED
    assert rig.proxy.calls == 5


async def test_retries_stop_before_the_deadline(rig: Rig) -> None:
    class Ceiling(random.Random):
        """Jitter at its worst: always the ceiling."""

        def uniform(self, a: float, b: float) -> float:
            return b

    rig.proxy.fail_rate = 1.0
    policy = RetryPolicy(max_attempts=20, initial_backoff_seconds=0.1, max_backoff_seconds=0.1)
    endpoint = _endpoint(rig, retry=policy, rng=Ceiling())
    start = rig.fake.now
    deadline = start + 0.3
    with pytest.raises(CloudFailure):
        await endpoint.infer(_request(), deadline=deadline)
    # Attempts at 0.0, 0.1, 0.2; a third backoff would end at 0.3 with no time left for the call.
    assert rig.fake.sleeps == [0.1, 0.1]
    assert rig.proxy.calls == 3
    assert rig.fake.now < deadline


async def test_no_attempt_at_all_with_no_time_left(rig: Rig) -> None:
    endpoint = _endpoint(rig)
    with pytest.raises(CloudFailure) as failure:
        await endpoint.infer(_request(), deadline=rig.fake.now + 0.001)
    assert failure.value.status == Code.DEADLINE_EXCEEDED
    assert rig.proxy.calls == 0


async def test_the_retry_budget_is_shared_by_all_calls(rig: Rig) -> None:
    rig.proxy.fail_rate = 1.0
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=5), throttle=RetryThrottle(RetryBudget(4, 0.1)))
    with pytest.raises(CloudFailure):
        await endpoint.infer(_request("a"), deadline=None)
    # 4 -> 3 (3 > 2: retry) -> 2 (not above half: stop).
    assert rig.proxy.request_ids == ["a", "a"]
    with pytest.raises(CloudFailure):
        await endpoint.infer(_request("b"), deadline=None)
    assert rig.proxy.request_ids == ["a", "a", "b"], "the budget is spent: no retry for the next call"
    rig.proxy.heal()
    for index in range(11):  # each success pays back 0.1: 1.0 -> 2.1
        await endpoint.infer(_request(f"ok-{index}"), deadline=None)
    rig.proxy.fail_rate = 1.0
    rig.proxy.reset_counts()
    with pytest.raises(CloudFailure):
        await endpoint.infer(_request("c"), deadline=None)
    assert rig.proxy.request_ids == ["c"], "2.1 - 1 = 1.1 tokens: still not above half"


async def test_the_open_breaker_keeps_calls_off_the_wire_until_a_probe_closes_it(rig: Rig) -> None:
    rig.proxy.fail_rate = 1.0
    endpoint = _endpoint(
        rig, retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(consecutive_failures=2, cooldown_seconds=5.0)
    )
    for _ in range(2):
        with pytest.raises(CloudFailure):
            await endpoint.infer(_request(), deadline=None)
    assert state(only_breaker(endpoint)) is BreakerState.OPEN
    with pytest.raises(CloudFailure, match="circuit"):
        await endpoint.infer(_request(), deadline=None)
    assert rig.proxy.calls == 2
    assert endpoint.stats().short_circuited == 1
    rig.proxy.heal()
    rig.fake.now += 5.0
    await endpoint.infer(_request(), deadline=None)  # the probe
    assert state(only_breaker(endpoint)) is BreakerState.CLOSED
    assert rig.proxy.calls == 3


async def _open_then_cool_down(rig: Rig, endpoint: CloudPool) -> None:
    rig.proxy.fail_rate = 1.0
    for _ in range(only_breaker(endpoint).policy.consecutive_failures):
        with pytest.raises(CloudFailure):
            await endpoint.infer(_request(), deadline=None)
    assert state(only_breaker(endpoint)) is BreakerState.OPEN
    rig.proxy.heal()
    rig.fake.now += only_breaker(endpoint).policy.cooldown_seconds


async def test_a_probe_that_gives_up_before_sending_does_not_wedge_the_breaker(rig: Rig) -> None:
    endpoint = _endpoint(
        rig, retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(consecutive_failures=2, cooldown_seconds=5.0)
    )
    await _open_then_cool_down(rig, endpoint)
    sent = rig.proxy.calls
    with pytest.raises(CloudFailure):  # the probe's caller has no time left: nothing is sent
        await endpoint.infer(_request(), deadline=rig.fake.now)
    assert rig.proxy.calls == sent
    await endpoint.infer(_request(), deadline=None)  # the next call may probe
    assert state(only_breaker(endpoint)) is BreakerState.CLOSED


async def test_a_cancelled_probe_does_not_wedge_the_breaker(rig: Rig) -> None:
    endpoint = _endpoint(
        rig,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(consecutive_failures=2, cooldown_seconds=5.0),
    )
    await _open_then_cool_down(rig, endpoint)
    sent = rig.proxy.calls
    rig.proxy.delay_seconds = 30.0
    probe = asyncio.create_task(endpoint.infer(_request(), deadline=None))
    await eventually(lambda: rig.proxy.calls > sent, "the probe reached the proxy")
    probe.cancel()  # e.g. the app's own call was cancelled
    with pytest.raises(asyncio.CancelledError):
        await probe
    rig.proxy.heal()
    await endpoint.infer(_request(), deadline=None)
    assert state(only_breaker(endpoint)) is BreakerState.CLOSED


async def test_a_hedge_answers_for_a_straggler_and_the_straggler_is_cancelled(rig: Rig) -> None:
    rig.proxy.delay_first_attempt_seconds = 30.0
    endpoint = _endpoint(rig, hedge_delay_seconds=0.01, fake_clock=False)
    response = await endpoint.infer(_request("slow-first"), deadline=time.monotonic() + 5.0)
    np.testing.assert_array_equal(response.outputs[0].data, [[1.0]])
    assert endpoint.stats().hedges == 1
    assert rig.proxy.request_ids == ["slow-first", "slow-first"]
    # The cancellation reaches the proxy on its own time.
    await eventually(lambda: rig.proxy.cancelled >= 1, "the straggler was cancelled on the wire")
    assert rig.proxy.cancelled == 1


async def test_no_hedge_when_the_retry_budget_is_spent(rig: Rig) -> None:
    rig.proxy.delay_first_attempt_seconds = 0.1
    throttle = RetryThrottle(RetryBudget(10, 0.1))
    for _ in range(5):
        throttle.record_failure()
    endpoint = _endpoint(rig, throttle=throttle, hedge_delay_seconds=0.01, fake_clock=False)
    response = await endpoint.infer(_request("patient"), deadline=time.monotonic() + 5.0)
    np.testing.assert_array_equal(response.outputs[0].data, [[1.0]])
    assert endpoint.stats().hedges == 0
    assert rig.proxy.request_ids == ["patient"]


# --- Hedging: cancellation, the retry budget, probes ---


async def test_a_call_cancelled_during_the_hedge_delay_cancels_its_attempt(rig: Rig) -> None:
    # The first attempt takes 1 s at the proxy; the hedge would come only after 30 s.
    rig.proxy.delay_first_attempt_seconds = 1.0
    endpoint = _endpoint(rig, hedge_delay_seconds=30.0, fake_clock=False)
    call = asyncio.create_task(endpoint.infer(_request("gone"), deadline=time.monotonic() + 10.0))
    await eventually(lambda: rig.proxy.calls == 1, "the first attempt reached the proxy")
    call.cancel()  # the app's call went away while the endpoint waited for the hedge delay
    with pytest.raises(asyncio.CancelledError):
        await call
    # The attempt's RPC ends one way or the other: cancelled on the wire, or (if it leaked) answered.
    await eventually(lambda: rig.proxy.cancelled + len(rig.proxy.answered) >= 1, "the first attempt ended")
    assert rig.proxy.cancelled == 1, "the attempt was cancelled with the call"
    assert rig.proxy.answered == set()
    assert endpoint.stats().by_outcome == {}, "a cancelled attempt records no outcome"
    assert endpoint.throttle.tokens == endpoint.throttle.max_tokens
    assert state(only_breaker(endpoint)) is BreakerState.CLOSED
    assert endpoint.stats().hedges == 0


async def test_a_hedge_takes_a_retry_token_even_when_it_wins(rig: Rig) -> None:
    rig.proxy.delay_first_attempt_seconds = 30.0
    endpoint = _endpoint(rig, throttle=RetryThrottle(RetryBudget(10, 0.1)), hedge_delay_seconds=0.01, fake_clock=False)
    await endpoint.infer(_request("hedged"), deadline=time.monotonic() + 5.0)
    assert endpoint.stats().hedges == 1
    # 10, minus the hedge's token, plus the ratio its success pays back; the straggler was cancelled.
    assert endpoint.throttle.tokens == pytest.approx(9.1)
    assert endpoint.stats().by_outcome == {"OK": 1}


async def test_hedges_against_a_slow_but_healthy_cloud_stop_when_the_budget_is_spent(rig: Rig) -> None:
    # Every call succeeds, but only a hedge answers quickly: without the charge, every call would be hedged.
    rig.proxy.delay_first_attempt_seconds = 30.0
    endpoint = _endpoint(rig, throttle=RetryThrottle(RetryBudget(4, 0.1)), hedge_delay_seconds=0.01, fake_clock=False)
    for index in range(3):  # 4 -> 3.1 -> 2.2 -> 1.3: each hedge costs 1, each success pays back 0.1
        await endpoint.infer(_request(f"slow-{index}"), deadline=time.monotonic() + 5.0)
    assert endpoint.stats().hedges == 3
    assert endpoint.throttle.tokens == pytest.approx(1.3)
    assert not endpoint.throttle.allows_retry(), "no more hedges until successes refill the budget"
    rig.proxy.heal()
    await endpoint.infer(_request("fast"), deadline=time.monotonic() + 5.0)
    assert endpoint.stats().hedges == 3
    assert rig.proxy.request_ids.count("fast") == 1


async def test_the_half_open_probe_is_never_hedged(rig: Rig) -> None:
    endpoint = _endpoint(
        rig,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(consecutive_failures=2, cooldown_seconds=5.0),
        hedge_delay_seconds=0.01,
    )
    await _open_then_cool_down(rig, endpoint)
    hedges = endpoint.stats().hedges
    # The probe's answer takes longer than the hedge delay: a hedge would go out if the probe could hedge.
    rig.proxy.delay_first_attempt_seconds = 0.2
    await endpoint.infer(_request("probe"), deadline=None)
    assert state(only_breaker(endpoint)) is BreakerState.CLOSED
    assert rig.proxy.request_ids.count("probe") == 1, "one probe, one RPC"
    assert endpoint.stats().hedges == hedges


# --- The retry budget follows gRPC A6 ---


def _drained(tokens: float = 6.0) -> RetryThrottle:
    throttle = RetryThrottle(RetryBudget(10, 0.1))
    throttle.tokens = tokens
    return throttle


@pytest.mark.parametrize(
    "code", [Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.DEADLINE_EXCEEDED, Code.INTERNAL]
)
async def test_failures_that_are_not_retried_leave_the_tokens_unchanged(rig: Rig, code: grpc.StatusCode) -> None:
    rig.proxy.fail_rate = 1.0
    rig.proxy.fail_code = code
    endpoint = _endpoint(rig, throttle=_drained())
    with pytest.raises(CloudFailure):
        await endpoint.infer(_request(), deadline=None)
    assert endpoint.throttle.tokens == 6.0, "neither a failure (-1) nor a success (+0.1)"


async def test_resource_exhausted_without_pushback_leaves_the_tokens_but_counts_against_the_breaker(rig: Rig) -> None:
    rig.proxy.exhausted = True
    endpoint = _endpoint(rig, throttle=_drained(), breaker=BreakerPolicy(consecutive_failures=2, min_calls=1000))
    for _ in range(2):
        with pytest.raises(CloudFailure):
            await endpoint.infer(_request(), deadline=None)
    assert rig.proxy.calls == 2, "not retried: the server did not say when to come back"
    assert endpoint.throttle.tokens == 6.0
    assert state(only_breaker(endpoint)) is BreakerState.OPEN, "an overloaded cloud is an unwell one"


async def test_resource_exhausted_with_pushback_is_a_retryable_failure_and_takes_tokens(rig: Rig) -> None:
    rig.proxy.exhausted = True
    rig.proxy.pushback_ms = 10
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=2), throttle=_drained(9.0))
    with pytest.raises(CloudFailure):
        await endpoint.infer(_request(), deadline=None)
    assert rig.proxy.calls == 2
    assert endpoint.throttle.tokens == 7.0


@pytest.mark.parametrize("pushback", ["-1", "-250", "soon", "1.5", "99999999999"])
@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED])
async def test_a_negative_or_unparseable_pushback_means_do_not_retry(
    rig: Rig, code: grpc.StatusCode, pushback: str
) -> None:
    rig.proxy.fail_rate = 1.0
    rig.proxy.fail_code = code
    rig.proxy.pushback_ms = pushback
    endpoint = _endpoint(rig, retry=RetryPolicy(max_attempts=3), throttle=RetryThrottle(RetryBudget(10, 0.1)))
    with pytest.raises(CloudFailure) as failure:
        await endpoint.infer(_request(), deadline=None)
    assert failure.value.status == code
    assert rig.proxy.calls == 1, "the server asked not to be retried (and the budget would have allowed it)"
    assert rig.fake.sleeps == []
    assert endpoint.throttle.tokens == 9.0, "A6: a pushback that forbids retrying counts as a failure"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("250", 250),
        (b"250", 250),
        (" 7 ", 7),
        ("-1", PUSHBACK_DO_NOT_RETRY),
        ("-250", PUSHBACK_DO_NOT_RETRY),
        ("", PUSHBACK_DO_NOT_RETRY),
        ("soon", PUSHBACK_DO_NOT_RETRY),
        ("1.5", PUSHBACK_DO_NOT_RETRY),
        (str(2**31), PUSHBACK_DO_NOT_RETRY),  # past a signed 32-bit integer
    ],
)
def test_parse_pushback(value: str | bytes, expected: int) -> None:
    assert parse_pushback(value) == expected


# --- The breaker's state, visible in the log ---


async def test_every_breaker_transition_is_logged_with_its_reason_and_the_retry_tokens(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="offload.router.resilience")
    endpoint = _endpoint(
        rig, retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(consecutive_failures=2, cooldown_seconds=5.0)
    )
    await _open_then_cool_down(rig, endpoint)
    await endpoint.infer(_request(), deadline=None)  # the probe, which succeeds
    lines = [(record.levelno, record.getMessage()) for record in caplog.records]
    target = rig.proxy.address
    assert lines == [
        (
            logging.WARNING,
            f"cloud {target}: circuit closed -> open: 2 consecutive failures (last: UNAVAILABLE); answering on the "
            "edge for 5s, then one probe call; retry tokens 98.0/100",
        ),
        (
            logging.INFO,
            f"cloud {target}: circuit open -> half_open: the 5s cool-down is over; letting one probe call through; "
            "retry tokens 98.0/100",
        ),
        (logging.INFO, f"cloud {target}: circuit half_open -> closed: the probe call succeeded; retry tokens 98.1/100"),
    ]


def test_a_failure_rate_and_a_failed_probe_are_named_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="offload.router.resilience")
    clock = FakeTime()
    breaker = _breaker(clock, consecutive_failures=100, failure_rate=0.5, window=4, min_calls=4, cooldown_seconds=1.0)
    breaker.record_success()
    breaker.record_failure("INTERNAL")
    breaker.record_success()
    breaker.record_failure("DEADLINE_EXCEEDED")  # 2 of 4
    clock.now += 1.0
    assert breaker.allow()
    breaker.record_failure("UNAVAILABLE")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith(
        "cloud cloud:1: circuit closed -> open: 2 of the last 4 calls failed (last: DEADLINE_EXCEEDED)"
    )
    assert messages[2].startswith("cloud cloud:1: circuit half_open -> open: the probe call failed (UNAVAILABLE)")
    assert breaker.transitions == 3


# --- Settings ---


def test_status_log_seconds_is_a_validated_setting() -> None:
    assert EdgeSettings().status_log_seconds == 60.0
    assert EdgeSettings(status_log_seconds=0).status_log_seconds == 0.0
    with pytest.raises(ValidationError, match="status_log_seconds"):
        EdgeSettings(status_log_seconds=-1)


def test_the_edge_settings_start_from_the_policies_defaults() -> None:
    settings = EdgeSettings()
    assert settings.policy(RetryPolicy) == RetryPolicy()
    assert settings.policy(RetryBudget) == RetryBudget()
    assert settings.policy(BreakerPolicy) == BreakerPolicy()


def test_every_retry_and_breaker_setting_reaches_its_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    declared = EdgeSettings.model_fields
    names = [name for name in declared if name.startswith(("retry_", "breaker_"))]
    assert len(names) == 10
    # A valid value other than the default for each: ints one more, floats half.
    changed: dict[str, Any] = {}
    for name in names:
        default = declared[name].default
        changed[name] = default + 1 if isinstance(default, int) else default / 2
    monkeypatch.setenv("OFFLOAD_EDGE_BREAKER_WINDOW", "7")  # the flat names, from the environment too
    settings = EdgeSettings(**{name: value for name, value in changed.items() if name != "breaker_window"})
    changed["breaker_window"] = 7
    policies: list[tuple[str, RetryPolicy | RetryBudget | BreakerPolicy]] = [
        ("retry_", settings.policy(RetryPolicy)),
        ("retry_budget_", settings.policy(RetryBudget)),
        ("breaker_", settings.policy(BreakerPolicy)),
    ]
    reached: dict[str, Any] = {}
    for prefix, policy in policies:
        reached.update({prefix + field.name: getattr(policy, field.name) for field in fields(policy)})
    assert {name: reached.get(name) for name in names} == changed
