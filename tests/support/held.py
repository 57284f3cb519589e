"""A real cloud data plane behind a gate: each call waits until the test lets it through.

Served by a real OipServer, it holds calls in flight on demand, so tests can line
requests up against each other without any timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from offload.cloud.dataplane import CloudDataPlane
from offload.oip.types import InferRequest, InferResponse


class HeldCloud:
    """The given cloud data plane, each call held until `gate` is set (with `hold`: only the calls it picks)."""

    def __init__(self, plane: CloudDataPlane, hold: Callable[[InferRequest], bool] | None = None) -> None:
        self._plane = plane
        self._hold = hold
        self.arrived = asyncio.Queue[InferRequest]()
        self.gate = asyncio.Event()
        self.failure: Exception | None = None  # raised instead of answering, once the gate opens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plane, name)

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        self.arrived.put_nowait(request)
        if self._hold is None or self._hold(request):
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return await self._plane.infer(request, deadline)
