"""The routing core: run the edge model, send only the unsure rows to the cloud, merge in order.

Transport-free: the gRPC server and in-process callers both call `Router.infer`. The router
only orchestrates; each step is its own piece: where the edge model runs (placement.py), the
threshold (thresholds.py), the cloud's rows through the cache (fetch.py), audits (audit.py), the
per-row answer (answer.py) and the response (response.py). `stats()` is the one snapshot of
everything they count (stats.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor

import numpy as np
import numpy.typing as npt

from offload.oip import tracing
from offload.oip.errors import NotFound
from offload.oip.types import InferRequest, InferResponse
from offload.oip.validation import check_inputs
from offload.router.answer import Answer
from offload.router.audit import Auditor
from offload.router.cache import RowCache
from offload.router.coalesce import CoalescePolicy
from offload.router.fetch import CloudRowsHook, RowFetcher
from offload.router.models import Arrays, RoutedModel
from offload.router.options import RESPONSE_DEGRADED, RESPONSE_ROUTE, Route, RoutingOptions
from offload.router.placement import PlacementPolicy, timed
from offload.router.response import build_response, requested_outputs
from offload.router.stats import EdgeRunStats, RouterStats
from offload.router.thresholds import Thresholds
from offload.router.traffic import Traffic
from offload.router.upstream import CloudFailure, Upstream

log = logging.getLogger(__name__)


class Router:
    """Routes requests for a set of models between their edge runtime and one upstream (the cloud)."""

    def __init__(
        self,
        models: Mapping[str, RoutedModel],
        cloud: Upstream | None,
        executor: Executor,
        deadline_reserve_seconds: float = 0.02,
        cache: RowCache | None = None,
        target_offload: float | None = None,
        audit_share: float = 0.0,
        rng: np.random.Generator | None = None,
        on_cloud_rows: CloudRowsHook | None = None,
        placement: PlacementPolicy | None = None,
        coalesce: CoalescePolicy | None = None,
    ) -> None:
        """`executor` runs the edge models' batches that `placement` does not run inline on the event loop;
        `coalesce` says how concurrent requests' unsure rows share cloud calls (None: each in calls of its own)."""
        self._models = dict(models)
        self._executor = executor
        self._placement = placement or PlacementPolicy()
        # The cloud must give up early enough to leave time for an edge answer.
        self.deadline_reserve_seconds = deadline_reserve_seconds
        # on_cloud_rows: told of every row the cloud newly answered (offload.router.fetch.CloudRowsHook).
        self._fetcher = RowFetcher(cloud, cache, on_cloud_rows, coalesce)
        self._thresholds = Thresholds(self._models, target_offload)
        self._auditor = Auditor(audit_share, self._fetcher.fetch, rng or np.random.default_rng())
        self._traffic = Traffic(self._models)
        self._requests = 0
        self._degraded = 0
        self._errors = 0
        self._inline_runs = 0
        self._threaded_runs = 0

    async def close(self) -> None:
        await self._auditor.close()
        await self._fetcher.close()

    async def wait_for_audits(self) -> None:
        """Wait for the background audit calls started so far (tests, benchmarks, shutdown)."""
        await self._auditor.wait()

    def replace_models(self, models: Mapping[str, RoutedModel]) -> None:
        """Serve `models` from now on, in one step (call it on the router's event loop).

        Calls in flight finish on the model they started with (each holds its own); calls that start
        after this get the new one, so none fails for the swap. A model kept as it was (the same object)
        keeps its online budget and its cached cloud answers; a changed, new or removed one starts a fresh
        budget and its cached answers are dropped. (Cache keys name the edge model's version too, so an
        old answer could not be found under a new version anyway: dropping them frees their room.)
        """
        old = self._models
        self._models = dict(models)
        self._thresholds.replace_models(self._models)
        cache = self._fetcher.cache
        if cache is not None:
            for name, model in old.items():
                if self._models.get(name) is not model:
                    cache.invalidate(name)

    def model(self, name: str, version: str = "") -> RoutedModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served here; models: {sorted(self._models)}")
        if version and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r}; available: [{model.version!r}]")
        return model

    @property
    def upstream(self) -> Upstream | None:
        """Where unsure rows go (None: this router answers everything on the edge)."""
        return self._fetcher.upstream

    def stats(self) -> RouterStats:
        upstream, cache = self._fetcher.upstream, self._fetcher.cache
        return RouterStats(
            requests=self._requests,
            degraded=self._degraded,
            errors=self._errors,
            thresholds=self._thresholds.current(),
            audit=self._auditor.stats(),
            edge_runs=EdgeRunStats(self._inline_runs, self._threaded_runs),
            cloud=upstream.stats() if upstream is not None else None,
            cache=cache.stats() if cache is not None else None,
            coalescing=self._fetcher.coalescing(),
            models=self._traffic.stats(),
        )

    async def infer(self, request: InferRequest, deadline: float | None = None) -> InferResponse:
        """Answer a request; `deadline` is the caller's, in time.monotonic() seconds."""
        self._requests += 1
        started = time.perf_counter()
        try:
            response = await self._route(request, deadline, started)
        except Exception:
            self._errors += 1
            raise
        if response.parameters.get(RESPONSE_DEGRADED):
            self._degraded += 1
        return response

    async def _route(self, request: InferRequest, deadline: float | None, started: float) -> InferResponse:
        model = self.model(request.model_name, request.model_version)
        options = RoutingOptions.from_parameters(request.parameters)
        rows = check_inputs(request, model.edge.inputs)
        outputs = requested_outputs(request, model, options)
        inputs = {tensor.name: tensor.data for tensor in request.inputs}
        cloud_deadline = None if deadline is None else deadline - self.deadline_reserve_seconds

        if options.route is Route.CLOUD:
            answer = await self._all_rows_to_cloud(model, request, inputs, rows, cloud_deadline, options)
        else:
            answer = await self._edge_answer(model, inputs, rows)
            if options.route is Route.AUTO and self._fetcher.upstream is not None:
                threshold = self._thresholds.for_rows(model, options, answer.confidence)
                # Written as "not confident" so that a NaN confidence (non-finite
                # input, a broken model) goes to the cloud rather than staying.
                confident = answer.confidence >= threshold
                unsure = np.flatnonzero(~confident)
                if unsure.size:
                    await self._offload_rows(model, request, inputs, unsure, answer, cloud_deadline, options)
                self._auditor.sample(model, request, inputs, np.flatnonzero(confident), answer.outputs)
        response = build_response(model, request, outputs, answer, options)
        route = str(response.parameters[RESPONSE_ROUTE])
        self._traffic.answered(model.name, route, answer, time.perf_counter() - started)
        return response

    async def _edge_answer(self, model: RoutedModel, inputs: Arrays, rows: int) -> Answer:
        with tracing.span("offload.edge_model", {"offload.model": model.name, "offload.rows": rows}):
            outputs = await self._run_edge(model, inputs, rows)
        answer = Answer.from_edge(model.answer_outputs(outputs), model.confidence(outputs))
        self._traffic.edge_ran(model.name, answer.confidence)
        return answer

    async def _run_edge(self, model: RoutedModel, inputs: Arrays, rows: int) -> Arrays:
        """The edge model's outputs: run inline when its measured cost is below the hand-off's, else on the
        executor; the run's cost is recorded either way."""
        if self._placement.inline(model.cost, rows):
            self._inline_runs += 1
            outputs, seconds = timed(model.edge.predict, inputs)
        else:
            self._threaded_runs += 1
            loop = asyncio.get_running_loop()
            outputs, seconds = await loop.run_in_executor(self._executor, timed, model.edge.predict, inputs)
        model.cost.record(rows, seconds)
        return outputs

    async def _all_rows_to_cloud(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: int,
        deadline: float | None,
        options: RoutingOptions,
    ) -> Answer:
        try:
            fetched = await self._fetcher.fetch(model, request, inputs, np.arange(rows), deadline)
        except CloudFailure as failure:
            if options.require_cloud:
                raise
            log.debug("cloud failed (%s); answering all %d rows on the edge", failure, rows)
            answer = await self._edge_answer(model, inputs, rows)
            answer.degraded[:] = True
            return answer
        return Answer.of(fetched.outputs, model.cloud_confidence(fetched.outputs), fetched.routes)

    async def _offload_rows(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: npt.NDArray[np.intp],
        answer: Answer,
        deadline: float | None,
        options: RoutingOptions,
    ) -> None:
        try:
            fetched = await self._fetcher.fetch(model, request, inputs, rows, deadline)
            answer.put(rows, fetched.outputs, model.cloud_confidence(fetched.outputs), fetched.routes)
        except CloudFailure as failure:
            if options.require_cloud:
                raise
            log.debug("cloud failed (%s); %d rows keep the edge answer", failure, rows.size)
            answer.degraded[rows] = True
