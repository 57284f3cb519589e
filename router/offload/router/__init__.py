"""The router: per-row routing policy between a local model and an upstream OIP server.

Transport-free and runtime-free: it imports neither ONNX Runtime nor torch, and takes the local
model as anything with `predict` (offload.edge's OnnxModel on a device). To build one configured
like the edge agent, use `offload.edge.build_router`:

    from offload.edge import EdgeSettings, build_router
    from offload.router import InferRequest, Tensor

    router = build_router(EdgeSettings(cloud="cloud-host:8101"))
    response = await router.infer(InferRequest("digits", [Tensor.of("pixels", rows)]))
    response.parameters["offload_route"]   # "edge", "cloud", "cache" or "mixed"
"""

from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.router.core import Router
from offload.router.options import AnsweredBy, Route, RoutingOptions
from offload.router.stats import RouterStats

__all__ = [
    "AnsweredBy",
    "InferRequest",
    "InferResponse",
    "Route",
    "Router",
    "RouterStats",
    "RoutingOptions",
    "Tensor",
]
