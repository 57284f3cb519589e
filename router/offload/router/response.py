"""The router's answer to a request: the outputs asked for, the routing parameters, the per-row details.

Besides the model's own outputs the router can return three per-row outputs of its
own: `offload_route` (BYTES), `offload_confidence` (FP32) and `offload_degraded` (BOOL).
Naming one in the request's `outputs` returns it like any output (with an explicit
list only the listed outputs come back, as OIP has it); `offload_details` adds all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from offload.oip.repository import BATCH_DIM, TensorSpec
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.oip.validation import check_requested_outputs
from offload.router.answer import Answer
from offload.router.models import RoutedModel
from offload.router.options import (
    RESPONSE_CONFIDENCE,
    RESPONSE_DEGRADED,
    RESPONSE_OFFLOADED_ROWS,
    RESPONSE_ROUTE,
    AnsweredBy,
    Route,
    RoutingOptions,
)

DETAILS = (
    TensorSpec(name=RESPONSE_ROUTE, datatype="BYTES", shape=(BATCH_DIM,)),
    TensorSpec(name=RESPONSE_CONFIDENCE, datatype="FP32", shape=(BATCH_DIM,)),
    TensorSpec(name=RESPONSE_DEGRADED, datatype="BOOL", shape=(BATCH_DIM,)),
)


def requested_outputs(request: InferRequest, model: RoutedModel, options: RoutingOptions) -> list[str]:
    """The outputs to return, in order: those the request names (the model's own or the details),
    else all the model's; then, with `offload_details`, the details not named. InvalidArgument for
    a name that is neither, or one named twice."""
    named = check_requested_outputs(request, (*model.edge.outputs, *DETAILS)) if request.outputs else []
    outputs = named or [spec.name for spec in model.edge.outputs]
    if options.details:
        outputs += [spec.name for spec in DETAILS if spec.name not in outputs]
    return outputs


def build_response(
    model: RoutedModel, request: InferRequest, outputs: Sequence[str], answer: Answer, options: RoutingOptions
) -> InferResponse:
    """The response carrying `outputs` (from requested_outputs) of the routed `answer`."""
    rows = answer.confidence.shape[0]
    routes = answer.routes.tolist()
    offloaded = routes.count(AnsweredBy.CLOUD)
    distinct = set(routes)
    if not distinct:  # an empty batch: say where it was sent
        distinct = {AnsweredBy.CLOUD if options.route is Route.CLOUD else AnsweredBy.EDGE}
    route = distinct.pop() if len(distinct) == 1 else AnsweredBy.MIXED
    parameters: dict[str, ParameterValue] = {
        RESPONSE_ROUTE: str(route),
        RESPONSE_CONFIDENCE: float(answer.confidence.min()) if rows else 1.0,
        RESPONSE_OFFLOADED_ROWS: offloaded,
        RESPONSE_DEGRADED: bool(answer.degraded.any()),
    }
    return InferResponse(
        model_name=model.name,
        model_version=model.version,
        id=request.id,
        outputs=[_output(model, answer, name) for name in outputs],
        parameters=parameters,
    )


def _output(model: RoutedModel, answer: Answer, name: str) -> Tensor:
    spec = next((spec for spec in model.edge.outputs if spec.name == name), None)
    if spec is not None:
        return Tensor(name, spec.datatype, answer.outputs[name])
    if name == RESPONSE_ROUTE:
        route_names = np.empty(answer.routes.shape[0], dtype=object)
        route_names[:] = [str(item).encode() for item in answer.routes.tolist()]
        return Tensor(RESPONSE_ROUTE, "BYTES", route_names)
    if name == RESPONSE_CONFIDENCE:
        return Tensor(RESPONSE_CONFIDENCE, "FP32", answer.confidence.astype(np.float32))
    assert name == RESPONSE_DEGRADED, name
    return Tensor(RESPONSE_DEGRADED, "BOOL", answer.degraded.copy())
