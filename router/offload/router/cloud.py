"""The router's connection to one cloud endpoint (any OIP server)."""

from __future__ import annotations

import time

import grpc

from offload.oip.client import OipClient
from offload.oip.errors import DeadlineExceeded, UpstreamError
from offload.oip.types import InferRequest, InferResponse


class CloudEndpoint:
    """Calls one cloud with a per-call timeout bounded by the caller's deadline."""

    def __init__(self, target: str, timeout_seconds: float, max_message_bytes: int) -> None:
        self.target = target
        self.timeout_seconds = timeout_seconds
        self._client = OipClient(target, max_message_bytes)

    async def close(self) -> None:
        await self._client.close()

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        timeout = self.timeout_seconds
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded(f"no time left to call the cloud at {self.target}")
        try:
            return await self._client.infer(request, timeout=timeout)
        except UpstreamError as exc:
            if exc.status == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"the cloud at {self.target} did not answer within {timeout:.3f}s") from exc
            raise
