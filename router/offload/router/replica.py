"""One replica of the cloud: its channel, its circuit breaker, and what it is doing now.

A replica sends one RPC at a time for the pool (offload.router.pool), which decides where each
attempt goes, whether to retry or hedge, and pays for both from the budget all replicas share.
The replica keeps what is its own: the health its breaker judges from its answers, how many calls
it has in flight (what the balancer compares), and its own counts for the stats snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from offload.oip.client import OipClient
from offload.oip.errors import InvalidArgument, UpstreamError
from offload.oip.limits import MAX_ELEMENTS
from offload.oip.request_ids import REQUEST_ID_HEADER, request_id_header
from offload.oip.security import ChannelSecurity
from offload.oip.types import InferRequest, InferResponse
from offload.router.resilience import BreakerPolicy, BreakerState, CircuitBreaker
from offload.router.stats import ReplicaStats
from offload.router.upstream import CloudFailure, Validator

# Failures that say the replica (or the way to it) is unwell, as opposed to a
# request the cloud judged wrong; only these count against the breaker's health.
UNHEALTHY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


class Replica:
    """One cloud server behind one channel, with its own circuit breaker."""

    def __init__(
        self,
        target: str,
        max_message_bytes: int,
        breaker: BreakerPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_breaker_change: Callable[[BreakerState], None] | None = None,
        describe: Callable[[], str] | None = None,
        max_elements: int = MAX_ELEMENTS,
        security: ChannelSecurity | None = None,
        streaming: bool = False,
    ) -> None:
        """`streaming`: send the requests on one ModelStreamInfer stream (OipClient's stream mode)."""
        self.target = target
        self.breaker = CircuitBreaker(target, breaker, clock, on_breaker_change, describe)
        self.calls = 0  # RPCs sent
        self.failures = 0  # RPCs that ended in an error status
        self.outstanding = 0  # RPCs in flight
        self._client = OipClient(target, max_message_bytes, max_elements, security, streaming=streaming)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; with `grace`, calls in flight get that long to finish (a replica DNS
        no longer lists is retired this way: its last calls are not cut off)."""
        await self._client.close(grace)

    def ready(self) -> bool:
        """Whether its breaker would let a call through now (asking takes no probe)."""
        return self.breaker.ready()

    def reachable(self) -> bool:
        """False while its channel cannot connect (then a call would fail at once)."""
        return self._client.reachable()

    async def check_ready(self, timeout: float) -> str | None:
        """Ask this replica once whether it is ready: None if it says so within `timeout`, else why not.

        Outside the retries, the budget and the breaker: it is a look, not traffic.
        """
        try:
            ready = await self._client.server_ready(timeout)
        except UpstreamError as exc:
            return str(exc)
        return None if ready else f"{self.target} is live but not ready"

    def stats(self) -> ReplicaStats:
        return ReplicaStats(
            target=self.target,
            circuit=self.breaker.state,
            circuit_changes=self.breaker.transitions,
            calls=self.calls,
            failures=self.failures,
            outstanding=self.outstanding,
            reachable=self.reachable(),
        )

    async def infer(self, request: InferRequest, timeout: float, validate: Validator | None) -> InferResponse:
        """One RPC, its answer checked by `validate`. The caller records the outcome with record().

        Raises UpstreamError with the server's status, or CloudFailure (INTERNAL) when the
        answer does not decode or does not fit the request: a broken or wrong peer.
        """
        self.calls += 1
        self.outstanding += 1
        try:
            response = await self._client.infer(
                request, timeout=timeout, metadata=((REQUEST_ID_HEADER, request_id_header(request.id)),)
            )
            if validate is not None:
                validate(response)
        except InvalidArgument as exc:
            raise CloudFailure(f"{self.target} sent a malformed answer: {exc}", grpc.StatusCode.INTERNAL) from exc
        finally:
            self.outstanding -= 1
        return response

    def record(self, code: grpc.StatusCode) -> None:
        """How a call to this replica ended (a call cancelled by its caller, say a hedge that lost, is
        not recorded: it says nothing about the replica)."""
        if code != grpc.StatusCode.OK:
            self.failures += 1
        # The breaker judges health, not retries: it counts every sign of an unwell replica, and
        # an answered request (even a refusal) as a sign of a well one.
        if code in UNHEALTHY:
            self.breaker.record_failure(code.name)
        else:
            self.breaker.record_success()
