"""The edge agent's data plane: the router behind the Open Inference Protocol."""

from __future__ import annotations

from collections.abc import Mapping

from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from offload.oip.version import SERVER_VERSION
from offload.router.core import Router
from offload.router.options import RESPONSE_DEGRADED

SERVER_NAME = "offload-edge"


class RouterDataPlane:
    def __init__(self, router: Router) -> None:
        self.router = router
        # What the app saw, for the status line and health details.
        self.requests = 0
        self.degraded = 0  # answered, with some rows the edge's because the cloud failed
        self.errors = 0  # answered with an error status

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
        details = {
            "models": ",".join(sorted(self.router.models)),
            "requests": str(self.requests),
            "degraded": str(self.degraded),
            "errors": str(self.errors),
        }
        agreement = self.router.audit.agreement
        if agreement is not None:
            details["audit_agreement"] = f"{agreement:.4f} over {self.router.audit.rows} rows"
        for name, budget in self.router.budgets.items():
            details[f"threshold.{name}"] = f"{budget.threshold(self.router.models[name].config.routing.threshold):.4f}"
        details.update(self.router.cloud.health_details() if self.router.cloud else {"cloud": "none"})
        return details

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        self.requests += 1
        try:
            response = await self.router.infer(request, deadline)
        except Exception:
            self.errors += 1
            raise
        if response.parameters.get(RESPONSE_DEGRADED):
            self.degraded += 1
        return response
