"""The router: per-row routing between the edge model and the cloud, in-process or behind gRPC.

In-process use, with no server in between:

    from offload.router import EdgeSettings, build_router, InferRequest, Tensor

    router = build_router(EdgeSettings(cloud="cloud-host:8101"))
    response = await router.infer(InferRequest("digits", [Tensor.of("pixels", rows)]))
    response.parameters["offload_route"]   # "edge", "cloud" or "mixed"
"""

from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.router.agent import build_router
from offload.router.core import Router
from offload.router.options import AnsweredBy, Route, RoutingOptions
from offload.router.settings import EdgeSettings

__all__ = [
    "AnsweredBy",
    "EdgeSettings",
    "InferRequest",
    "InferResponse",
    "Route",
    "Router",
    "RoutingOptions",
    "Tensor",
    "build_router",
]
