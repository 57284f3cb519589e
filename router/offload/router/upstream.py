"""The seam between the router and its cloud: the Upstream protocol, and what every upstream shares.

The router sends rows to an Upstream (offload.router.pool.CloudPool: one or many replicas) and
answers from the edge on CloudFailure. Which failures are retried (`retryable`) and how
(`RetryPolicy`) is decided here, once, for every upstream. What the x-request-id header carries
is offload.oip.request_ids's to say: the servers' log lines use the same form.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from offload.oip.errors import UpstreamError
from offload.oip.types import InferRequest, InferResponse
from offload.router.stats import UpstreamStats

Sleep = Callable[[float], Awaitable[None]]


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
    """The upstream a router sends rows to (offload.router.pool.CloudPool)."""

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
