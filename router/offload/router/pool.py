"""The router's connection to its cloud: a pool of replicas (one address is a pool of one), made to
survive a bad network.

- Each attempt goes to one replica (offload.router.replica), picked by the balancer
  (offload.router.balancer): least outstanding calls among the replicas whose circuit lets a call
  through and that can connect; a retry or a hedge goes to a replica this request has not tried,
  when there is one. Which replicas there are: offload.router.discovery (fixed addresses, DNS).
- Retries (tenacity) only on UNAVAILABLE, and on RESOURCE_EXHAUSTED when the server sent a retry
  pushback; exponential backoff with full jitter; bounded attempts; never past the deadline; the
  same request id on every attempt.
- One retry budget shared by every call to every replica (gRPC A6 throttling, per cloud): a pool
  of replicas is one cloud, and N replicas must not mean N times the retries.
- A circuit breaker per replica: while a replica's is open, it is skipped and the others serve;
  while every one is, calls fail at once and rows stay on the edge.
- Optional hedging: a second attempt after a delay, first answer wins, the other is cancelled;
  each hedge sent takes a token from the same retry budget. A replica whose half-open probe is
  in flight takes no other call (one probe, one RPC), so a probe is never hedged to itself.

Every failure surfaces as CloudFailure, which the router answers from the edge. Each call is one
`offload.cloud_call` span (offload.oip.tracing) with an `offload.cloud_attempt` span per RPC, and
its time, every attempt and backoff included, goes in `call_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from offload.oip import tracing
from offload.oip.errors import DeadlineExceeded, OffloadError, UpstreamError
from offload.oip.limits import MAX_ELEMENTS
from offload.oip.security import ChannelSecurity
from offload.oip.stats import SECONDS_BUCKETS, Histogram
from offload.oip.types import InferRequest, InferResponse
from offload.router.balancer import pick
from offload.router.discovery import CloudTargets, ReplicaSet, Resolver, lookup
from offload.router.replica import Replica
from offload.router.resilience import BreakerPolicy, BreakerState, RetryThrottle
from offload.router.stats import UpstreamStats
from offload.router.upstream import CloudFailure, RetryPolicy, Sleep, Validator, retryable

log = logging.getLogger(__name__)

_HEALTHIEST_FIRST = (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN)


class AllCircuitsOpen(CloudFailure):
    """No replica's breaker lets a call through now. Not retried: it changes on the breakers'
    cool-down, not on a backoff's time scale."""


@dataclass(slots=True)
class _Counts:
    """Live counters; stats() hands out a frozen copy."""

    calls: int = 0  # cloud-bound requests
    attempts: int = 0  # RPCs sent, retries and hedges included
    retries: int = 0
    hedges: int = 0
    failures: int = 0  # requests that ended in CloudFailure
    short_circuited: int = 0  # refused because every replica's breaker was open
    by_outcome: dict[str, int] = field(default_factory=dict)
    call_seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))


@dataclass(slots=True)
class _Request:
    """One request's way through the pool: the replicas its attempts went to, the probes it was given."""

    tried: list[Replica] = field(default_factory=list)
    probes: list[tuple[Replica, int]] = field(default_factory=list)

    def abandon_probes(self) -> None:
        # A probe that got no outcome (cancelled, or no time left to send it) must not keep its
        # breaker half-open forever; one that did is already settled, and this does nothing.
        for replica, probe in self.probes:
            replica.breaker.abandon_probe(probe)


class CloudPool:
    """The cloud behind one or more replicas: `target` is EdgeSettings.cloud (discovery.py)."""

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
        resolve_seconds: float = 30.0,
        resolver: Resolver = lookup,
        rng: random.Random | None = None,
        security: ChannelSecurity | None = None,
        streaming: bool = False,
    ) -> None:
        """`streaming`: each replica sends its requests on one ModelStreamInfer stream (OipClient's stream mode)."""
        self.target = target
        self.timeout_seconds = timeout_seconds
        self.retry = retry or RetryPolicy()
        self.throttle = throttle or RetryThrottle()
        self.hedge_delay_seconds = hedge_delay_seconds
        self._counts = _Counts()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_breaker_change = on_breaker_change
        self._circuit_changes = 0
        # The pool's circuit as last reported: closed until a replica's breaker says otherwise.
        self._circuit = BreakerState.CLOSED

        channel_security = security or ChannelSecurity()

        def replica(address: str, name: str | None) -> Replica:
            # Every replica's channel gets the TLS credentials and the token; one found by a DNS
            # lookup checks the certificate against the name looked up.
            replica_security = channel_security if name is None else channel_security.for_name(name)
            return Replica(
                address,
                max_message_bytes,
                breaker,
                clock,
                self._replica_changed,
                self._tokens_text,
                max_elements,
                replica_security,
                streaming,
            )

        # A retired replica's calls can take at most the cloud timeout: that long to finish.
        self._replicas = ReplicaSet(
            CloudTargets.parse(target), replica, resolve_seconds, timeout_seconds, self._update_circuit, resolver
        )

    @property
    def replicas(self) -> list[Replica]:
        return self._replicas.replicas

    async def close(self) -> None:
        await self._replicas.close()

    def stats(self) -> UpstreamStats:
        counts = self._counts
        return UpstreamStats(
            target=self.target,
            circuit=self._circuit,
            circuit_changes=self._circuit_changes,
            retry_tokens=self.throttle.tokens,
            retry_tokens_max=self.throttle.max_tokens,
            calls=counts.calls,
            attempts=counts.attempts,
            retries=counts.retries,
            hedges=counts.hedges,
            failures=counts.failures,
            short_circuited=counts.short_circuited,
            by_outcome=dict(counts.by_outcome),
            call_seconds=counts.call_seconds.snapshot(),
            replicas=tuple(replica.stats() for replica in self.replicas),
        )

    async def check_ready(self, timeout: float) -> str | None:
        """Ask every replica once, at the same time, whether it is ready: None if any is (the others are
        named in a WARNING), else why not, naming each replica and its reason.

        Outside the retries, the budget and the breakers: it is a look, not traffic.
        """
        end = self._clock() + timeout
        replicas = await self._replicas.current(timeout)
        if not replicas:
            return f"no address of {self.target} is known yet"
        left = max(end - self._clock(), 0.0)
        problems = await asyncio.gather(*(replica.check_ready(left) for replica in replicas))
        unready = [problem for problem in problems if problem is not None]
        if not unready:
            return None
        if len(unready) == len(replicas):
            # Each reason starts with its replica's address.
            return unready[0] if len(unready) == 1 else f"no replica answers: {'; '.join(unready)}"
        log.warning(
            "cloud %s: %d of %d replicas do not answer (%s); the others take the calls",
            self.target,
            len(unready),
            len(replicas),
            "; ".join(unready),
        )
        return None

    def _tokens_text(self) -> str:
        return f"retry tokens {self.stats().retry_tokens_text}"

    def _replica_changed(self, state: BreakerState) -> None:
        self._circuit_changes += 1
        self._update_circuit()

    def _update_circuit(self) -> None:
        """Recompute the pool's circuit (after a replica's changed, or the replicas did); tell
        on_breaker_change when it changed. Closed while any replica's is, so the agent's health
        says SERVING while at least one replica takes calls freely."""
        states = {replica.breaker.state for replica in self.replicas}
        circuit = next((state for state in _HEALTHIEST_FIRST if state in states), BreakerState.OPEN)
        if circuit is self._circuit:
            return
        self._circuit = circuit
        if self._on_breaker_change is not None:
            self._on_breaker_change(circuit)

    async def infer(
        self, request: InferRequest, deadline: float | None, validate: Validator | None = None
    ) -> InferResponse:
        """Answer from the cloud within min(deadline, now + timeout) or raise CloudFailure.

        `validate` checks an answer inside the attempt (raising InvalidArgument), so an
        answer that does not fit the request counts as a failure of the replica that sent it.
        """
        with tracing.span("offload.cloud_call", {"offload.target": self.target, "offload.model": request.model_name}):
            return await self._infer(request, deadline, validate)

    async def _infer(self, request: InferRequest, deadline: float | None, validate: Validator | None) -> InferResponse:
        self._counts.calls += 1
        if not request.id:
            # One id for every attempt, so the cloud (and its logs) can tell retries apart from new work.
            request.id = uuid.uuid4().hex
        budget_end = self._clock() + self.timeout_seconds
        end = budget_end if deadline is None else min(deadline, budget_end)
        await self._replicas.current(end - self._clock())
        state = _Request()
        first = self._next(state)
        if first is None:
            self._counts.short_circuited += 1
            raise self._all_open()
        retrying = AsyncRetrying(
            stop=lambda retry_state: self._stop(retry_state, end),
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            sleep=self._sleep,
            reraise=True,
        )
        started = self._clock()
        try:
            async for attempt in retrying:
                with attempt:
                    retry = attempt.retry_state.attempt_number > 1
                    # A retry's replica is picked after the backoff, from the replicas as they are now.
                    replica = self._next(state) if retry else first
                    if replica is None:
                        raise self._all_open()
                    if retry:
                        self._counts.retries += 1
                    return await self._hedged(state, replica, request, end, validate)
        except OffloadError as exc:
            self._counts.failures += 1
            raise _as_failure(exc) from exc
        finally:
            self._counts.call_seconds.observe(self._clock() - started)
            state.abandon_probes()
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _admit(self, state: _Request, replica: Replica) -> Replica:
        """Let the request's next attempt go to `replica`, which pick() chose just now: its breaker
        lets it through (and may make it its half-open probe, noted in `state`)."""
        before = replica.breaker.probes
        allowed = replica.breaker.allow()
        assert allowed, "pick() saw this breaker ready and nothing ran since"
        if replica.breaker.probes != before:
            state.probes.append((replica, replica.breaker.probes))
        state.tried.append(replica)
        return replica

    def _next(self, state: _Request) -> Replica | None:
        """The replica for the request's next attempt, admitted; None if no breaker lets a call through."""
        replica = pick(self.replicas, state.tried, self._rng)
        return None if replica is None else self._admit(state, replica)

    def _all_open(self) -> AllCircuitsOpen:
        replicas = self.replicas
        if not replicas:
            return AllCircuitsOpen(f"no address of {self.target} is known yet; answered on the edge")
        if len(replicas) == 1 and replicas[0].target == self.target:
            return AllCircuitsOpen(f"circuit to {self.target} is open after repeated failures; answered on the edge")
        states = ", ".join(f"{replica.target} {replica.breaker.state}" for replica in replicas)
        return AllCircuitsOpen(
            f"every replica of {self.target} has its circuit open after repeated failures ({states}); "
            "answered on the edge"
        )

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, AllCircuitsOpen):
            return False
        return isinstance(exc, UpstreamError) and retryable(exc.status, exc.pushback_ms)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, UpstreamError) and exc.pushback_ms is not None and exc.pushback_ms >= 0:
            return exc.pushback_ms / 1000
        ceiling = min(
            self.retry.max_backoff_seconds,
            self.retry.initial_backoff_seconds * self.retry.multiplier ** (state.attempt_number - 1),
        )
        return self._rng.uniform(0, ceiling)  # full jitter

    def _stop(self, state: RetryCallState, end: float) -> bool:
        if state.attempt_number >= self.retry.max_attempts:
            return True
        if not self.throttle.allows_retry():
            return True
        if not any(replica.ready() for replica in self.replicas):
            return True
        # No retry that could not finish: the backoff plus a minimal attempt must fit.
        return self._clock() + (state.upcoming_sleep or 0.0) + self.retry.min_attempt_seconds >= end

    async def _hedged(
        self, state: _Request, replica: Replica, request: InferRequest, end: float, validate: Validator | None
    ) -> InferResponse:
        if self.hedge_delay_seconds is None:
            return await self._attempt(replica, request, end, validate)
        first = asyncio.create_task(self._attempt(replica, request, end, validate))
        attempts = {first}
        try:
            started, _ = await asyncio.wait(attempts, timeout=self.hedge_delay_seconds)
            hedge = None if started else self._hedge_replica(state, end)
            if hedge is None:
                return await first
            self._counts.hedges += 1
            attempts.add(asyncio.create_task(self._attempt(hedge, request, end, validate)))
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

    def _hedge_replica(self, state: _Request, end: float) -> Replica | None:
        """Where to hedge now, admitted: time for another attempt, a replica that may take it (another
        than the first when there is one), and a retry token to pay for it; None (nothing taken) if not."""
        if end - self._clock() < self.retry.min_attempt_seconds:
            return None
        replica = pick(self.replicas, state.tried, self._rng)
        if replica is None or not self.throttle.take_for_hedge():
            return None
        return self._admit(state, replica)

    async def _attempt(
        self, replica: Replica, request: InferRequest, end: float, validate: Validator | None
    ) -> InferResponse:
        # One span per RPC, retries and hedges alike, named by the replica it went to; the cloud's
        # server span is its child.
        with tracing.span("offload.cloud_attempt", {"offload.target": replica.target}, client=True) as span:
            try:
                return await self._attempt_once(replica, request, end, validate)
            except UpstreamError as exc:
                span.set("rpc.grpc.status_code", exc.status.value[0])
                raise

    async def _attempt_once(
        self, replica: Replica, request: InferRequest, end: float, validate: Validator | None
    ) -> InferResponse:
        timeout = end - self._clock()
        if timeout < self.retry.min_attempt_seconds:
            raise DeadlineExceeded(f"too little time left ({max(timeout, 0) * 1000:.0f} ms) to call {replica.target}")
        self._counts.attempts += 1
        try:
            response = await replica.infer(request, timeout, validate)
        except UpstreamError as exc:
            self._record(replica, exc.status, exc.pushback_ms)
            raise
        self._record(replica, grpc.StatusCode.OK)
        return response

    def _record(self, replica: Replica, code: grpc.StatusCode, pushback_ms: int | None = None) -> None:
        """An attempt's outcome: in the pool's counts and the shared retry budget, then in the replica
        (its breaker), so that the log line of a transition it causes shows the tokens after it."""
        name = code.name
        self._counts.by_outcome[name] = self._counts.by_outcome.get(name, 0) + 1
        self._charge(code, pushback_ms)
        replica.record(code)

    def _charge(self, code: grpc.StatusCode, pushback_ms: int | None) -> None:
        if code == grpc.StatusCode.OK:
            self.throttle.record_success()
            return
        # The retry budget follows gRPC A6 to the letter: the only failures that take a token
        # are those we would retry (UNAVAILABLE; RESOURCE_EXHAUSTED with a pushback to wait out)
        # and those whose pushback forbids retrying. Every other status leaves the count as it
        # is: a request the cloud judged wrong (NOT_FOUND, INVALID_ARGUMENT) says nothing about
        # retries, and must not refill the bucket as a success would. RESOURCE_EXHAUSTED without
        # a pushback is not retried here (the server did not say when more capacity comes), so
        # it is no budget failure either; it still counts against the replica's breaker.
        if retryable(code, pushback_ms) or (pushback_ms is not None and pushback_ms < 0):
            self.throttle.record_failure()


def _as_failure(exc: OffloadError) -> CloudFailure:
    if isinstance(exc, CloudFailure):
        return exc
    if isinstance(exc, UpstreamError):
        return CloudFailure(f"cloud call failed: {exc}", exc.status)
    if isinstance(exc, DeadlineExceeded):
        return CloudFailure(str(exc), grpc.StatusCode.DEADLINE_EXCEEDED)
    return CloudFailure(str(exc))
