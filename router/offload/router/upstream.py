"""The seam between the router and its cloud: the Upstream protocol, and what every upstream shares.

The router sends rows to an Upstream (offload.router.pool.CloudPool: one or many replicas) and
answers from the edge on CloudFailure. Which failures are retried (`retryable`) and how
(`RetryPolicy`), and what the x-request-id header carries (`request_id_header`), is decided
here, once, for every upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from offload.oip.errors import UpstreamError
from offload.oip.types import InferRequest, InferResponse
from offload.router.stats import UpstreamStats

Sleep = Callable[[float], Awaitable[None]]


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
