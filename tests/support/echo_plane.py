"""A minimal OIP data plane in the test process: model "echo" returns its input x as y (no ML framework
needed), for tests of the router's way to the cloud that need real RPCs but no real model."""

from __future__ import annotations

from collections.abc import Mapping

from offload.oip.errors import NotFound
from offload.oip.repository import TensorSpec
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata


class EchoPlane:
    """A minimal OIP data plane: model "echo" returns its input x as y (no ML framework needed)."""

    spec = TensorSpec.model_construct(name="x", datatype="FP32", shape=(-1, 1))
    out = TensorSpec.model_construct(name="y", datatype="FP32", shape=(-1, 1))

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def model_ready(self, name: str, version: str) -> bool:
        return name == "echo"

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("echo", "1")

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        if name != "echo":
            raise NotFound(name)
        return ModelMetadata("echo", ("1",), "echo", (self.spec,), (self.out,))

    def health_details(self) -> Mapping[str, str]:
        return {}

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        if request.model_name != "echo":
            raise NotFound(request.model_name)
        return InferResponse("echo", [Tensor("y", "FP32", request.inputs[0].data)], "1", request.id)
