"""Audit sampling: a share of the rows the edge was confident about also go to the cloud, in the
background and off the response path, to measure how often the cloud agrees on the top class."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.oip.types import InferRequest
from offload.router.fetch import Fetched
from offload.router.models import Arrays, RoutedModel
from offload.router.stats import AuditStats
from offload.router.upstream import CloudFailure

log = logging.getLogger(__name__)

# Background audit calls outstanding at once, at most (each is one cloud request).
MAX_AUDITS_IN_FLIGHT = 8

# How an audit gets the cloud's answer for some rows of a request (no deadline: it is in the background).
Fetch = Callable[[RoutedModel, InferRequest, Arrays, npt.NDArray[np.intp], float | None], Awaitable[Fetched]]


class Auditor:
    """Sends `share` of the confident rows to the cloud in the background and counts agreement."""

    def __init__(self, share: float, fetch: Fetch, rng: np.random.Generator) -> None:
        self.share = share
        self._fetch = fetch
        self._rng = rng
        self._tasks: set[asyncio.Task[None]] = set()
        self._stats = AuditStats()

    def stats(self) -> AuditStats:
        return self._stats

    def sample(
        self, model: RoutedModel, request: InferRequest, inputs: Arrays, confident: npt.NDArray[np.intp], edge: Arrays
    ) -> None:
        """Audit a random share of the `confident` rows, whose edge outputs are `edge` (all the request's rows)."""
        if self.share <= 0 or not model.audits_classes:
            return
        picked = confident[self._rng.random(confident.size) < self.share]
        if not picked.size:
            return
        if len(self._tasks) >= MAX_AUDITS_IN_FLIGHT:
            # Audits are a sample: when the cloud is slow, skip some rather than pile up calls.
            self._count(skipped=int(picked.size))
            return
        edge_scores = np.array(edge[model.score_output][picked], copy=True)
        task = asyncio.get_running_loop().create_task(self._audit(model, request, inputs, picked, edge_scores))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Wait for the audit calls started so far (tests, benchmarks, shutdown)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the audit calls still out, and wait until they are gone."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _audit(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: npt.NDArray[np.intp],
        edge_scores: npt.NDArray[Any],
    ) -> None:
        try:
            cloud = await self._fetch(model, request, inputs, rows, None)
        except CloudFailure:
            self._count(failed=int(rows.size))
            return
        agreed = int(np.sum(edge_scores.argmax(axis=1) == cloud.outputs[model.score_output].argmax(axis=1)))
        before = self._stats.rows
        self._count(rows=int(rows.size), agreed=agreed)
        # Every hundredth audited row or so, say how trustworthy the edge's confident answers are.
        if self._stats.rows // 100 != before // 100:
            log.info(
                "audit: the cloud agrees with %.1f%% of %d confident edge rows",
                100 * self._stats.agreed / self._stats.rows,
                self._stats.rows,
            )

    def _count(self, rows: int = 0, agreed: int = 0, failed: int = 0, skipped: int = 0) -> None:
        stats = self._stats
        self._stats = AuditStats(
            stats.rows + rows, stats.agreed + agreed, stats.failed + failed, stats.skipped + skipped
        )
