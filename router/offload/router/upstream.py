"""The router's connection to one cloud endpoint (any OIP server), made to survive a bad network.

- Retries (tenacity) only on UNAVAILABLE, and on RESOURCE_EXHAUSTED when the server
  sent a retry pushback; exponential backoff with full jitter; bounded attempts;
  never past the deadline; the same request id on every attempt.
- A retry budget shared by every call to this cloud (gRPC A6 throttling).
- A circuit breaker: while open, calls fail at once and rows stay on the edge.
- Optional hedging: a second attempt after a delay, first answer wins, the
  other is cancelled; each hedge sent takes a token from the same retry budget.
  A half-open breaker's probe is never hedged (one probe, one RPC).

Every failure surfaces as CloudFailure, which the router answers from the edge.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from offload.oip.client import OipClient
from offload.oip.errors import DeadlineExceeded, InvalidArgument, OffloadError, UpstreamError
from offload.oip.limits import MAX_ELEMENTS
from offload.oip.security import ChannelSecurity
from offload.oip.types import InferRequest, InferResponse
from offload.router.resilience import BreakerPolicy, BreakerState, CircuitBreaker, RetryThrottle
from offload.router.stats import UpstreamStats

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
# Failures that say the cloud (or the way to it) is unwell, as opposed to a
# request the cloud judged wrong; only these count against the breaker's health.
UNHEALTHY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


# The request id also travels as this header, for proxies and logs on the way to the cloud.
REQUEST_ID_HEADER = "x-request-id"
# The longest request id sent in the header as it is (a UUID takes 36, a W3C trace id 32).
MAX_HEADER_REQUEST_ID = 128


def request_id_header(request_id: str) -> str:
    """The x-request-id value for a request id: the id itself where gRPC can carry it, else a digest.

    OIP puts no limit on a request's `id`, and apps send what they like (any length, any
    characters), so refusing some ids would break calls that are valid OIP. The cloud
    request's body carries the id unchanged (a message field has no such limit, and the
    cloud echoes it back). A header value, though, must be printable ASCII, and gRPC
    refuses a call whose headers exceed the peer's metadata limit (8 KiB by default): a
    header copied blindly failed the cloud call and degraded the answer. So the header
    carries the id when it is short printable ASCII without surrounding blanks, and
    otherwise "sha256:" and the first 32 hex digits of the SHA-256 of its UTF-8 bytes,
    which is legal, stable across retries and hedges, and computable from the id by
    whoever reads the logs.
    """
    if (
        len(request_id) <= MAX_HEADER_REQUEST_ID
        and request_id.isascii()
        and request_id.isprintable()
        and request_id == request_id.strip()
    ):
        return request_id
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest[:32]}"


class CloudFailure(UpstreamError):
    """The cloud gave no usable answer in time; the router falls back to the edge unless told not to.

    Its status is what a caller who required the cloud receives.
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(code, message)


Validator = Callable[[InferResponse], None]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 1.0
    multiplier: float = 2.0
    # Below this much time left there is no point in calling the cloud.
    min_attempt_seconds: float = 0.005


class Upstream(Protocol):
    """The upstream a router sends rows to: one CloudEndpoint today, a pool of replicas next."""

    async def infer(
        self, request: InferRequest, deadline: float | None, validate: Validator | None = None
    ) -> InferResponse:
        """The answer, checked by `validate` (which raises InvalidArgument), or CloudFailure."""
        ...

    async def check_ready(self, timeout: float) -> str | None:
        """Ask once, outside retries, budget and breaker, whether it can answer: None if so, else why not."""
        ...

    @property
    def target(self) -> str:
        """Where it sends rows, for logs."""
        ...

    def stats(self) -> UpstreamStats: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Counts:
    """Live counters; stats() hands out a frozen copy."""

    calls: int = 0  # cloud-bound requests
    attempts: int = 0  # RPCs sent, retries and hedges included
    retries: int = 0
    hedges: int = 0
    failures: int = 0  # requests that ended in CloudFailure
    short_circuited: int = 0  # refused by the open breaker
    by_outcome: dict[str, int] = field(default_factory=dict)


class CloudEndpoint:
    def __init__(
        self,
        target: str,
        timeout_seconds: float,
        max_message_bytes: int,
        retry: RetryPolicy | None = None,
        throttle: RetryThrottle | None = None,
        breaker: BreakerPolicy | None = None,
        hedge_delay_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_breaker_change: Callable[[BreakerState], None] | None = None,
        max_elements: int = MAX_ELEMENTS,
        security: ChannelSecurity | None = None,
        streaming: bool = False,
    ) -> None:
        """`streaming`: send the requests on one ModelStreamInfer stream (OipClient's stream mode)."""
        self.target = target
        self.timeout_seconds = timeout_seconds
        self.retry = retry or RetryPolicy()
        self.throttle = throttle or RetryThrottle()
        self.breaker = CircuitBreaker(target, breaker, clock, on_breaker_change, describe=self._tokens_text)
        self.hedge_delay_seconds = hedge_delay_seconds
        self._counts = _Counts()
        self._clock = clock
        self._sleep = sleep
        self._client = OipClient(target, max_message_bytes, max_elements, security, streaming=streaming)

    async def close(self) -> None:
        await self._client.close()

    def stats(self) -> UpstreamStats:
        counts = self._counts
        return UpstreamStats(
            target=self.target,
            circuit=self.breaker.state,
            circuit_changes=self.breaker.transitions,
            retry_tokens=self.throttle.tokens,
            retry_tokens_max=self.throttle.max_tokens,
            calls=counts.calls,
            attempts=counts.attempts,
            retries=counts.retries,
            hedges=counts.hedges,
            failures=counts.failures,
            short_circuited=counts.short_circuited,
            by_outcome=dict(counts.by_outcome),
        )

    async def check_ready(self, timeout: float) -> str | None:
        """Ask the cloud once whether it is ready: None if it says so within `timeout`, else why not.

        Outside the retries, the budget and the breaker: it is a look, not traffic.
        """
        try:
            ready = await self._client.server_ready(timeout)
        except UpstreamError as exc:
            return str(exc)
        return None if ready else f"{self.target} is live but not ready"

    def _tokens_text(self) -> str:
        return f"retry tokens {self.stats().retry_tokens_text}"

    async def infer(
        self, request: InferRequest, deadline: float | None, validate: Validator | None = None
    ) -> InferResponse:
        """Answer from the cloud within min(deadline, now + timeout) or raise CloudFailure.

        `validate` checks an answer inside the attempt (raising InvalidArgument), so an
        answer that does not fit the request counts as a failure of the cloud.
        """
        self._counts.calls += 1
        if not request.id:
            # One id for every attempt, so the cloud (and its logs) can tell retries apart from new work.
            request.id = uuid.uuid4().hex
        budget_end = self._clock() + self.timeout_seconds
        end = budget_end if deadline is None else min(deadline, budget_end)
        probes: list[int] = []  # half-open probes this call was given
        if not self._allow(probes):
            self._counts.short_circuited += 1
            raise CloudFailure(f"circuit to {self.target} is open after repeated failures; answered on the edge")
        retrying = AsyncRetrying(
            stop=lambda state: self._stop(state, end, probes),
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self._counts.retries += 1
                    # A half-open probe is one RPC: a hedge would make it two, and
                    # both would count as the probe's outcome.
                    return await self._hedged(request, end, validate, may_hedge=not probes)
        except OffloadError as exc:
            self._counts.failures += 1
            raise _as_failure(exc) from exc
        finally:
            # A probe that got no outcome (cancelled, or no time left to send it) must not
            # keep the breaker half-open forever; one that did is already settled.
            for probe in probes:
                self.breaker.abandon_probe(probe)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _allow(self, probes: list[int]) -> bool:
        """breaker.allow(), noting in `probes` the half-open probe it gave this call, if any."""
        before = self.breaker.probes
        if not self.breaker.allow():
            return False
        if self.breaker.probes != before:
            probes.append(self.breaker.probes)
        return True

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, UpstreamError) and retryable(exc.status, exc.pushback_ms)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, UpstreamError) and exc.pushback_ms is not None and exc.pushback_ms >= 0:
            return exc.pushback_ms / 1000
        ceiling = min(
            self.retry.max_backoff_seconds,
            self.retry.initial_backoff_seconds * self.retry.multiplier ** (state.attempt_number - 1),
        )
        return random.uniform(0, ceiling)  # full jitter

    def _stop(self, state: RetryCallState, end: float, probes: list[int]) -> bool:
        if state.attempt_number >= self.retry.max_attempts:
            return True
        if not self.throttle.allows_retry():
            return True
        if not self._allow(probes):
            return True
        # No retry that could not finish: the backoff plus a minimal attempt must fit.
        return self._clock() + (state.upcoming_sleep or 0.0) + self.retry.min_attempt_seconds >= end

    async def _hedged(
        self, request: InferRequest, end: float, validate: Validator | None, may_hedge: bool
    ) -> InferResponse:
        if self.hedge_delay_seconds is None or not may_hedge:
            return await self._attempt(request, end, validate)
        first = asyncio.create_task(self._attempt(request, end, validate))
        attempts = {first}
        try:
            started, _ = await asyncio.wait(attempts, timeout=self.hedge_delay_seconds)
            if started or not self._send_hedge(end):
                return await first
            self._counts.hedges += 1
            attempts.add(asyncio.create_task(self._attempt(request, end, validate)))
            pending = set(attempts)
            error: BaseException | None = None
            while pending:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if task.exception() is None:
                        return task.result()
                    error = task.exception()
            assert error is not None
            raise error
        finally:
            # Whatever ends this call (an answer, an error, or the caller's own cancellation,
            # which asyncio.wait does not pass on to what it waits for), no attempt outlives
            # it: cancelling the task cancels its RPC on the wire, and an attempt cancelled
            # this way records no outcome in the breaker or the budget.
            for task in attempts:
                task.cancel()

    def _send_hedge(self, end: float) -> bool:
        """Whether to hedge now: time for another attempt, and a retry token to pay for it."""
        if end - self._clock() < self.retry.min_attempt_seconds:
            return False
        return self.throttle.take_for_hedge()

    async def _attempt(self, request: InferRequest, end: float, validate: Validator | None) -> InferResponse:
        timeout = end - self._clock()
        if timeout < self.retry.min_attempt_seconds:
            raise DeadlineExceeded(f"too little time left ({max(timeout, 0) * 1000:.0f} ms) to call {self.target}")
        self._counts.attempts += 1
        try:
            response = await self._client.infer(
                request, timeout=timeout, metadata=((REQUEST_ID_HEADER, request_id_header(request.id)),)
            )
            if validate is not None:
                validate(response)
        except UpstreamError as exc:
            self._record(exc.status, exc.pushback_ms)
            raise
        except InvalidArgument as exc:
            # The answer did not decode or does not fit the request: a broken or wrong peer.
            self._record(grpc.StatusCode.INTERNAL)
            raise CloudFailure(f"{self.target} sent a malformed answer: {exc}", grpc.StatusCode.INTERNAL) from exc
        self._record(grpc.StatusCode.OK)
        return response

    def _record(self, code: grpc.StatusCode, pushback_ms: int | None = None) -> None:
        name = code.name
        self._counts.by_outcome[name] = self._counts.by_outcome.get(name, 0) + 1
        if code == grpc.StatusCode.OK:
            self.throttle.record_success()
            self.breaker.record_success()
            return
        # The retry budget follows gRPC A6 to the letter: the only failures that take a token
        # are those we would retry (UNAVAILABLE; RESOURCE_EXHAUSTED with a pushback to wait out)
        # and those whose pushback forbids retrying. Every other status leaves the count as it
        # is: a request the cloud judged wrong (NOT_FOUND, INVALID_ARGUMENT) says nothing about
        # retries, and must not refill the bucket as a success would. RESOURCE_EXHAUSTED without
        # a pushback is not retried here (the server did not say when more capacity comes), so
        # it is no budget failure either; it still counts against the breaker below.
        if retryable(code, pushback_ms) or (pushback_ms is not None and pushback_ms < 0):
            self.throttle.record_failure()
        # The breaker judges health, not retries: it counts every sign of an unwell cloud, and
        # an answered request (even a refusal) as a sign of a well one.
        if code in UNHEALTHY:
            self.breaker.record_failure(name)
        else:
            self.breaker.record_success()


def retryable(code: grpc.StatusCode, pushback_ms: int | None) -> bool:
    """Whether an attempt that failed with `code` (and this pushback, if any) is retried.

    UNAVAILABLE is; RESOURCE_EXHAUSTED only when the server said how long to wait; nothing
    is when the server's pushback said not to retry (a negative value, gRPC A6).
    """
    if pushback_ms is not None and pushback_ms < 0:
        return False
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback_ms is not None


def _as_failure(exc: OffloadError) -> CloudFailure:
    if isinstance(exc, CloudFailure):
        return exc
    if isinstance(exc, UpstreamError):
        return CloudFailure(f"cloud call failed: {exc}", exc.status)
    if isinstance(exc, DeadlineExceeded):
        return CloudFailure(str(exc), grpc.StatusCode.DEADLINE_EXCEEDED)
    return CloudFailure(str(exc))
