"""The routing core: run the edge model, send only the unsure rows to the cloud, merge in order.

Transport-free: the gRPC server and in-process callers both call `Router.infer`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt

from offload.oip.errors import InvalidArgument, NotFound
from offload.oip.repository import TensorSpec
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ParameterValue
from offload.oip.validation import check_inputs, check_requested_outputs, check_tensor
from offload.router.budget import AdaptiveThreshold
from offload.router.cache import FetchAbandoned, RowCache, RowOutputs
from offload.router.confidence import row_confidence
from offload.router.config import RoutedConfig as ModelConfig
from offload.router.options import (
    RESPONSE_CONFIDENCE,
    RESPONSE_DEGRADED,
    RESPONSE_OFFLOADED_ROWS,
    RESPONSE_ROUTE,
    AnsweredBy,
    Route,
    RoutingOptions,
    forwarded,
)
from offload.router.upstream import CloudEndpoint, CloudFailure

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
# Background audit calls outstanding at once, at most (each is one cloud request).
MAX_AUDITS_IN_FLIGHT = 8


class LocalModel(Protocol):
    """What the router needs of the edge model (ONNX Runtime's OnnxModel is one)."""

    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]: ...


@dataclass(frozen=True, slots=True)
class RoutedModel:
    config: ModelConfig
    edge: LocalModel

    @property
    def cache_scope(self) -> str:
        """What cached cloud answers of this model depend on besides the inputs: names and versions."""
        routing = self.config.routing
        return f"{self.config.name}@{self.config.version}->{self.config.cloud_model_name}@{routing.cloud_version}"

    @property
    def score_output(self) -> str:
        return self.config.routing.output or self.edge.outputs[0].name

    @property
    def audits_classes(self) -> bool:
        """Whether edge-cloud agreement means the same top class: a classifier's [batch, classes] scores.
        Models with their own confidence output (regression, detection) have no such notion here."""
        spec = next((spec for spec in self.edge.outputs if spec.name == self.score_output), None)
        return self.config.routing.confidence != "output" and spec is not None and len(spec.shape) == 2

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(
            self.config.name, (self.config.version,), "offload_router", self.edge.inputs, self.edge.outputs
        )


@dataclass(slots=True)
class AuditStats:
    """Edge-cloud agreement on confident rows that were also sent to the cloud in the background."""

    rows: int = 0
    agreed: int = 0
    failed: int = 0
    skipped: int = 0  # picked while MAX_AUDITS_IN_FLIGHT audits were already waiting on the cloud

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.rows if self.rows else None

    def record(self, rows: int, agreed: int) -> None:
        self.rows += rows
        self.agreed += agreed
        # Every hundredth audited row or so, say how trustworthy the edge's confident answers are.
        if self.rows // 100 != (self.rows - rows) // 100:
            log.info(
                "audit: the cloud agrees with %.1f%% of %d confident edge rows",
                100 * self.agreed / self.rows,
                self.rows,
            )


@dataclass(slots=True)
class _Answer:
    """Per-row results while a request is being routed."""

    outputs: Arrays
    confidence: npt.NDArray[np.float64]
    routes: npt.NDArray[Any]  # object array of AnsweredBy
    # Rows meant for the cloud that got the edge answer because the cloud failed.
    degraded: npt.NDArray[np.bool_]


class Router:
    """Routes requests for a set of models between their edge runtime and one cloud endpoint."""

    def __init__(
        self,
        models: Mapping[str, RoutedModel],
        cloud: CloudEndpoint | None,
        executor: Executor,
        deadline_reserve_seconds: float = 0.02,
        cache: RowCache | None = None,
        target_offload: float | None = None,
        audit_share: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.models = dict(models)
        self.cloud = cloud
        self.cache = cache
        # Online budget: per model, a threshold that keeps the offload share near the target.
        self.budgets = {name: AdaptiveThreshold(target_offload) for name in self.models} if target_offload else {}
        self.audit = AuditStats()
        self.audit_share = audit_share
        self._rng = rng or np.random.default_rng()
        self._audits: set[asyncio.Task[None]] = set()
        self.deadline_reserve_seconds = deadline_reserve_seconds
        self._executor = executor

    async def close(self) -> None:
        for task in list(self._audits):
            task.cancel()
        await asyncio.gather(*self._audits, return_exceptions=True)
        if self.cloud is not None:
            await self.cloud.close()

    async def wait_for_audits(self) -> None:
        """Wait for the background audit calls started so far (tests, benchmarks, shutdown)."""
        await asyncio.gather(*list(self._audits), return_exceptions=True)

    def model(self, name: str, version: str = "") -> RoutedModel:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served here; models: {sorted(self.models)}")
        if version and version != model.config.version:
            raise NotFound(f"model {name!r} has no version {version!r}; available: [{model.config.version!r}]")
        return model

    async def infer(self, request: InferRequest, deadline: float | None = None) -> InferResponse:
        """Answer a request; `deadline` is the caller's, in time.monotonic() seconds."""
        model = self.model(request.model_name, request.model_version)
        options = RoutingOptions.from_parameters(request.parameters)
        rows = check_inputs(request, model.edge.inputs)
        wanted = check_requested_outputs(request, model.edge.outputs)
        inputs = {tensor.name: tensor.data for tensor in request.inputs}
        # The cloud must give up early enough to leave time for an edge answer.
        cloud_deadline = None if deadline is None else deadline - self.deadline_reserve_seconds

        if options.route is Route.CLOUD:
            answer = await self._all_rows_to_cloud(model, request, inputs, rows, cloud_deadline, options)
        else:
            answer = await self._edge_answer(model, inputs)
            if options.route is Route.AUTO and self.cloud is not None:
                threshold = self._threshold(model, options, answer.confidence)
                # Written as "not confident" so that a NaN confidence (non-finite
                # input, a broken model) goes to the cloud rather than staying.
                confident = answer.confidence >= threshold
                unsure = np.flatnonzero(~confident)
                if unsure.size:
                    await self._offload_rows(model, request, inputs, unsure, answer, cloud_deadline, options)
                if self.audit_share > 0:
                    self._maybe_audit(model, request, inputs, np.flatnonzero(confident), answer)
        return self._response(model, request, wanted, answer, options, rows)

    def _threshold(self, model: RoutedModel, options: RoutingOptions, confidence: npt.NDArray[np.float64]) -> float:
        """The caller's threshold, else the online budget's, else the model's."""
        if options.threshold is not None:
            return options.threshold
        budget = self.budgets.get(model.config.name)
        if budget is None:
            return model.config.routing.threshold
        budget.observe(confidence)
        return budget.threshold(model.config.routing.threshold)

    def _maybe_audit(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        confident: npt.NDArray[np.intp],
        answer: _Answer,
    ) -> None:
        """Send a random share of the confident rows to the cloud in the background, to measure agreement."""
        if not model.audits_classes:
            return
        picked = confident[self._rng.random(confident.size) < self.audit_share]
        if not picked.size:
            return
        if len(self._audits) >= MAX_AUDITS_IN_FLIGHT:
            # Audits are a sample: when the cloud is slow, skip some rather than pile up calls.
            self.audit.skipped += int(picked.size)
            return
        edge_scores = np.array(answer.outputs[model.score_output][picked], copy=True)
        task = asyncio.get_running_loop().create_task(self._audit(model, request, inputs, picked, edge_scores))
        self._audits.add(task)
        task.add_done_callback(self._audits.discard)

    async def _audit(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: npt.NDArray[np.intp],
        edge_scores: npt.NDArray[Any],
    ) -> None:
        try:
            cloud = await self._cloud_answer(model, request, inputs, rows, None)
        except CloudFailure:
            self.audit.failed += rows.size
            return
        agreed = int(np.sum(edge_scores.argmax(axis=1) == cloud.outputs[model.score_output].argmax(axis=1)))
        self.audit.record(rows.size, agreed)

    async def _edge_answer(self, model: RoutedModel, inputs: Arrays) -> _Answer:
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, model.edge.predict, inputs)
        confidence = row_confidence(outputs, model.config.routing, model.score_output)
        rows = confidence.shape[0]
        return _Answer(outputs, confidence, np.full(rows, AnsweredBy.EDGE, dtype=object), np.zeros(rows, dtype=bool))

    async def _all_rows_to_cloud(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: int,
        deadline: float | None,
        options: RoutingOptions,
    ) -> _Answer:
        try:
            return await self._cloud_answer(model, request, inputs, np.arange(rows), deadline)
        except CloudFailure as failure:
            if options.require_cloud:
                raise
            log.debug("cloud failed (%s); answering all %d rows on the edge", failure, rows)
            answer = await self._edge_answer(model, inputs)
            answer.degraded[:] = True
            return answer

    async def _offload_rows(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: npt.NDArray[np.intp],
        answer: _Answer,
        deadline: float | None,
        options: RoutingOptions,
    ) -> None:
        try:
            cloud = await self._cloud_answer(model, request, inputs, rows, deadline)
            merged = _merge_rows(answer.outputs, cloud.outputs, rows)
        except CloudFailure as failure:
            if options.require_cloud:
                raise
            log.debug("cloud failed (%s); %d rows keep the edge answer", failure, rows.size)
            answer.degraded[rows] = True
            return
        answer.outputs.update(merged)
        answer.confidence[rows] = cloud.confidence
        answer.routes[rows] = cloud.routes  # cloud, or cache for rows answered from the cache

    async def _cloud_answer(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: npt.NDArray[np.intp],
        deadline: float | None,
    ) -> _Answer:
        """The cloud's answer for some rows: from the cache, a shared call in flight, or a new call."""
        if self.cloud is None:
            raise CloudFailure("this agent has no cloud configured (start it with --cloud HOST:PORT)")
        specs = {spec.name: spec for spec in model.edge.inputs}
        all_rows = rows.size == next(iter(inputs.values())).shape[0]
        tensors = [
            Tensor(name, specs[name].datatype, data if all_rows else data[rows]) for name, data in inputs.items()
        ]
        parameters = forwarded(request.parameters)
        if self.cache is None or rows.size == 0:
            outputs, _ = await self._call_cloud(model, request.id, tensors, parameters, deadline)
            routes = np.full(rows.size, AnsweredBy.CLOUD, dtype=object)
        else:
            outputs, routes = await self._cached_cloud_rows(
                self.cache, model, request.id, tensors, parameters, deadline
            )
        confidence = row_confidence(outputs, model.config.routing, model.score_output)
        return _Answer(outputs, confidence, routes, np.zeros(rows.size, dtype=bool))

    async def _call_cloud(
        self,
        model: RoutedModel,
        request_id: str,
        tensors: list[Tensor],
        parameters: dict[str, ParameterValue],
        deadline: float | None,
    ) -> tuple[Arrays, str]:
        """One cloud request for these rows: their outputs and the cloud model's version."""
        assert self.cloud is not None
        sub_request = InferRequest(
            model_name=model.config.cloud_model_name,
            model_version=model.config.routing.cloud_version,
            id=request_id,
            inputs=tensors,
            parameters=parameters,
        )
        expected_rows = tensors[0].shape[0]

        def validate(response: InferResponse) -> None:
            _check_cloud_outputs(model, response, expected_rows)

        response = await self.cloud.infer(sub_request, deadline, validate)
        produced = response.as_dict()
        return {spec.name: produced[spec.name].data for spec in model.edge.outputs}, response.model_version

    async def _cached_cloud_rows(
        self,
        cache: RowCache,
        model: RoutedModel,
        request_id: str,
        tensors: list[Tensor],
        parameters: dict[str, ParameterValue],
        deadline: float | None,
    ) -> tuple[Arrays, npt.NDArray[Any]]:
        plan = cache.plan(cache.keys(model.cache_scope, tensors, parameters))
        answers: dict[int, RowOutputs] = dict(plan.hits)
        routes = np.full(len(plan.keys), AnsweredBy.CLOUD, dtype=object)
        routes[list(plan.hits)] = AnsweredBy.CACHE
        if plan.sends:
            picked = np.asarray(plan.sends)
            to_send = [Tensor(t.name, t.datatype, t.data[picked]) for t in tensors]
            try:
                outputs, version = await self._call_cloud(model, request_id, to_send, parameters, deadline)
            except BaseException as exc:
                cache.fail(plan, _shared_failure(exc))
                raise
            sent = [{name: array[i] for name, array in outputs.items()} for i in range(len(plan.sends))]
            cache.fulfil(plan, model.config.name, version, sent)
            answers.update(zip(plan.sends, sent, strict=True))
        if plan.waits:
            refetch = await self._wait_for_shared_rows(plan.waits, answers, deadline)
            if refetch:
                # Their sender gave up early; fetch them under this request's own deadline.
                picked = np.asarray(refetch)
                subset = [Tensor(t.name, t.datatype, t.data[picked]) for t in tensors]
                outputs, fetched = await self._cached_cloud_rows(cache, model, request_id, subset, parameters, deadline)
                for i, position in enumerate(refetch):
                    answers[position] = {name: array[i] for name, array in outputs.items()}
                    routes[position] = fetched[i]
        for position, original in plan.duplicates.items():
            answers[position] = answers[original]
            routes[position] = routes[original]
        rows = len(plan.keys)
        outputs = {spec.name: np.stack([answers[i][spec.name] for i in range(rows)]) for spec in model.edge.outputs}
        return outputs, routes

    @staticmethod
    async def _wait_for_shared_rows(
        waits: Mapping[int, asyncio.Future[RowOutputs]], answers: dict[int, RowOutputs], deadline: float | None
    ) -> list[int]:
        """Wait for rows another request is fetching; put them in `answers`. Returns the positions whose
        sender gave up on its own account (deadline, cancellation), which the caller fetches itself."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        waiting = [asyncio.shield(future) for future in waits.values()]
        try:
            results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), timeout)
        except TimeoutError as exc:
            raise CloudFailure(
                "an identical request's cloud call did not finish in time", grpc.StatusCode.DEADLINE_EXCEEDED
            ) from exc
        refetch: list[int] = []
        for position, result in zip(waits, results, strict=True):
            if isinstance(result, FetchAbandoned):
                refetch.append(position)
            elif isinstance(result, CloudFailure):
                # A fresh exception per waiter: one instance raised in many tasks would share a traceback.
                raise CloudFailure(str(result), result.status)
            elif isinstance(result, BaseException):
                raise result
            else:
                answers[position] = result
        return refetch

    def _response(
        self,
        model: RoutedModel,
        request: InferRequest,
        wanted: Sequence[str],
        answer: _Answer,
        options: RoutingOptions,
        rows: int,
    ) -> InferResponse:
        datatypes = {spec.name: spec.datatype for spec in model.edge.outputs}
        outputs = [Tensor(name, datatypes[name], answer.outputs[name]) for name in wanted]
        offloaded = int(np.count_nonzero(answer.routes == AnsweredBy.CLOUD))
        distinct = set(answer.routes.tolist())
        if not distinct:  # an empty batch: say where it was sent
            distinct = {AnsweredBy.CLOUD if options.route is Route.CLOUD else AnsweredBy.EDGE}
        route = distinct.pop() if len(distinct) == 1 else AnsweredBy.MIXED
        parameters: dict[str, ParameterValue] = {
            RESPONSE_ROUTE: str(route),
            RESPONSE_CONFIDENCE: float(answer.confidence.min()) if rows else 1.0,
            RESPONSE_OFFLOADED_ROWS: offloaded,
            RESPONSE_DEGRADED: bool(answer.degraded.any()),
        }
        if options.details:
            route_names = np.empty(rows, dtype=object)
            route_names[:] = [str(item).encode() for item in answer.routes.tolist()]
            outputs.append(Tensor(RESPONSE_ROUTE, "BYTES", route_names))
            outputs.append(Tensor(RESPONSE_CONFIDENCE, "FP32", answer.confidence.astype(np.float32)))
            outputs.append(Tensor(RESPONSE_DEGRADED, "BOOL", answer.degraded.copy()))
        return InferResponse(
            model_name=model.config.name,
            model_version=model.config.version,
            id=request.id,
            outputs=outputs,
            parameters=parameters,
        )


def _check_cloud_outputs(model: RoutedModel, response: InferResponse, rows: int) -> None:
    """Refuse an answer that does not fit the model (a broken or wrong server): InvalidArgument."""
    produced = response.as_dict()
    for spec in model.edge.outputs:
        tensor = produced.get(spec.name)
        if tensor is None:
            raise InvalidArgument(f"the answer lacks output {spec.name!r}")
        check_tensor(tensor, spec, f"output {spec.name!r}")
        if tensor.shape[0] != rows:
            raise InvalidArgument(f"the answer has {tensor.shape[0]} rows of {spec.name!r} for {rows} sent")


def _shared_failure(exc: BaseException) -> BaseException:
    """What requests waiting on a failed call's rows get: the cloud's failure as it is, but
    FetchAbandoned when the sender gave up for its own reasons (its deadline, its caller gone), so
    that a waiter with a later deadline is not failed by another caller's impatience."""
    if isinstance(exc, asyncio.CancelledError):
        return FetchAbandoned("the request fetching this row was cancelled")
    if isinstance(exc, CloudFailure):
        if exc.status == grpc.StatusCode.DEADLINE_EXCEEDED:
            return FetchAbandoned(f"the request fetching this row ran out of time: {exc}")
        return exc
    return CloudFailure(f"the cloud call failed: {exc!r}")


def _merge_rows(edge: Arrays, cloud: Arrays, rows: npt.NDArray[np.intp]) -> Arrays:
    """The edge's outputs with the cloud's rows put in their places."""
    merged: Arrays = {}
    for name, edge_rows in edge.items():
        patch = cloud[name]
        if patch.shape[1:] != edge_rows.shape[1:]:
            raise CloudFailure(
                f"the cloud's output {name!r} has row shape {list(patch.shape[1:])}, the edge's "
                f"{list(edge_rows.shape[1:])}; their rows cannot be merged"
            )
        out = edge_rows if edge_rows.flags.writeable else np.array(edge_rows, copy=True)
        out[rows] = patch
        merged[name] = out
    return merged
