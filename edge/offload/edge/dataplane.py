"""The edge agent's data plane: the router behind the Open Inference Protocol."""

from __future__ import annotations

from collections.abc import Mapping

from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from offload.oip.version import SERVER_VERSION
from offload.router.core import Router

SERVER_NAME = "offload-edge"


class RouterDataPlane:
    """An OIP adapter over a router: what the router counts, it counts itself (`router.stats()`)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        # The edge models are loaded before the server starts; the cloud is
        # optional (rows fall back to the edge), so it does not gate readiness.
        return True

    def model_ready(self, name: str, version: str) -> bool:
        return self.router.model(name, version) is not None

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, SERVER_VERSION, ("offload_routing",))

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        return self.router.model(name, version).metadata()

    def health_details(self) -> Mapping[str, str]:
        # offload.oip's DataPlane protocol asks for it, but no server serves it: the router's
        # state is in router.stats() and the agent's status line.
        return {}

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        return await self.router.infer(request, deadline)
