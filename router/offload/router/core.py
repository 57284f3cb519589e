"""The routing core: run the edge model, send only the unsure rows to the cloud, merge in order.

Transport-free: the gRPC server and in-process callers both call `Router.infer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from offload.oip.errors import InvalidArgument, NotFound, Unavailable, UpstreamError
from offload.oip.repository import ModelConfig, TensorSpec
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ParameterValue
from offload.oip.validation import check_inputs, check_requested_outputs, check_tensor
from offload.router.cloud import CloudEndpoint
from offload.router.confidence import max_probability
from offload.router.options import (
    RESPONSE_CONFIDENCE,
    RESPONSE_OFFLOADED_ROWS,
    RESPONSE_ROUTE,
    AnsweredBy,
    Route,
    RoutingOptions,
    forwarded,
)

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]


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
    def score_output(self) -> str:
        return self.config.routing.output or self.edge.outputs[0].name

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(
            self.config.name, (self.config.version,), "offload_router", self.edge.inputs, self.edge.outputs
        )


@dataclass(slots=True)
class _Answer:
    """Per-row results while a request is being routed."""

    outputs: Arrays
    confidence: npt.NDArray[np.float64]
    routes: npt.NDArray[Any]  # object array of AnsweredBy


class Router:
    """Routes requests for a set of models between their edge runtime and one cloud endpoint."""

    def __init__(self, models: Mapping[str, RoutedModel], cloud: CloudEndpoint | None, executor: Executor) -> None:
        self.models = dict(models)
        self.cloud = cloud
        self._executor = executor

    async def close(self) -> None:
        if self.cloud is not None:
            await self.cloud.close()

    def model(self, name: str, version: str = "") -> RoutedModel:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served here; models: {sorted(self.models)}")
        if version and version != model.config.version:
            raise NotFound(f"model {name!r} has no version {version!r}; available: [{model.config.version!r}]")
        return model

    async def infer(self, request: InferRequest, deadline: float | None = None) -> InferResponse:
        model = self.model(request.model_name, request.model_version)
        options = RoutingOptions.from_parameters(request.parameters)
        rows = check_inputs(request, model.edge.inputs)
        wanted = check_requested_outputs(request, model.edge.outputs)
        inputs = {tensor.name: tensor.data for tensor in request.inputs}

        if options.route is Route.CLOUD:
            answer = await self._cloud_answer(model, request, inputs, np.arange(rows), deadline)
        else:
            answer = await self._edge_answer(model, inputs)
            if options.route is Route.AUTO:
                threshold = model.config.routing.threshold if options.threshold is None else options.threshold
                # Written as "not confident" so that a NaN confidence (non-finite
                # input, a broken model) goes to the cloud rather than staying.
                unsure = np.flatnonzero(~(answer.confidence >= threshold))
                if unsure.size:
                    await self._offload_rows(model, request, inputs, unsure, answer, deadline)
        return self._response(model, request, wanted, answer, options, rows)

    async def _edge_answer(self, model: RoutedModel, inputs: Arrays) -> _Answer:
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, model.edge.predict, inputs)
        confidence = max_probability(outputs[model.score_output], model.config.routing.output_kind)
        routes = np.full(confidence.shape[0], AnsweredBy.EDGE, dtype=object)
        return _Answer(outputs, confidence, routes)

    async def _offload_rows(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: npt.NDArray[np.intp],
        answer: _Answer,
        deadline: float | None,
    ) -> None:
        if self.cloud is None:
            # An edge-only agent: the edge answer is the best there is.
            return
        cloud = await self._cloud_answer(model, request, inputs, rows, deadline)
        for name, edge_rows in answer.outputs.items():
            patch = cloud.outputs.get(name)
            if patch is None:
                continue
            if patch.shape[1:] != edge_rows.shape[1:]:
                raise Unavailable(
                    f"the cloud's output {name!r} has row shape {list(patch.shape[1:])}, the edge's "
                    f"{list(edge_rows.shape[1:])}; their rows cannot be merged"
                )
            merged = edge_rows if edge_rows.flags.writeable else np.array(edge_rows, copy=True)
            merged[rows] = patch
            answer.outputs[name] = merged
        answer.confidence[rows] = cloud.confidence
        answer.routes[rows] = AnsweredBy.CLOUD

    async def _cloud_answer(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: npt.NDArray[np.intp],
        deadline: float | None,
    ) -> _Answer:
        if self.cloud is None:
            raise Unavailable("this agent has no cloud configured (start it with --cloud HOST:PORT)")
        specs = {spec.name: spec for spec in model.edge.inputs}
        all_rows = rows.size == next(iter(inputs.values())).shape[0]
        sub_request = InferRequest(
            model_name=model.config.cloud_model_name,
            model_version=model.config.routing.cloud_version,
            id=request.id,
            inputs=[
                Tensor(name, specs[name].datatype, data if all_rows else data[rows]) for name, data in inputs.items()
            ],
            parameters=forwarded(request.parameters),
        )
        try:
            response = await self.cloud.infer(sub_request, deadline)
        except UpstreamError as exc:
            raise UpstreamError(exc.status, f"cloud call failed: {exc}") from exc
        outputs = self._checked_cloud_outputs(model, response, rows.size)
        confidence = max_probability(outputs[model.score_output], model.config.routing.output_kind)
        routes = np.full(rows.size, AnsweredBy.CLOUD, dtype=object)
        return _Answer(outputs, confidence, routes)

    def _checked_cloud_outputs(self, model: RoutedModel, response: InferResponse, rows: int) -> Arrays:
        """The cloud's outputs, refusing any answer that does not fit the model (a broken or wrong server)."""
        produced = response.as_dict()
        outputs: Arrays = {}
        for spec in model.edge.outputs:
            tensor = produced.get(spec.name)
            if tensor is None:
                raise Unavailable(f"the cloud's answer lacks output {spec.name!r}")
            try:
                check_tensor(tensor, spec, f"the cloud's output {spec.name!r}")
            except InvalidArgument as exc:
                raise Unavailable(str(exc)) from exc
            if tensor.shape[0] != rows:
                raise Unavailable(f"the cloud answered {tensor.shape[0]} rows of {spec.name!r} for {rows} sent")
            outputs[spec.name] = tensor.data
        return outputs

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
        }
        if options.details:
            route_names = np.empty(rows, dtype=object)
            route_names[:] = [str(item).encode() for item in answer.routes.tolist()]
            outputs.append(Tensor(RESPONSE_ROUTE, "BYTES", route_names))
            outputs.append(Tensor(RESPONSE_CONFIDENCE, "FP32", answer.confidence.astype(np.float32)))
        return InferResponse(
            model_name=model.config.name,
            model_version=model.config.version,
            id=request.id,
            outputs=outputs,
            parameters=parameters,
        )
