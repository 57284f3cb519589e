"""The cloud data plane: the model registry, the scheduler and the response cache behind the OIP server."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from offload.cloud.memory import Trimmer
from offload.cloud.registry import ModelRegistry
from offload.cloud.response_cache import ResponseCache
from offload.cloud.scheduler import Scheduler
from offload.cloud.settings import CloudSettings
from offload.oip.repository import ModelEntry
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from offload.oip.validation import check_inputs, check_requested_outputs
from offload.oip.version import SERVER_VERSION

SERVER_NAME = "offload-cloud"


class CloudDataPlane:
    def __init__(
        self, registry: ModelRegistry, scheduler: Scheduler, response_cache: ResponseCache | None = None
    ) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.response_cache = response_cache

    @classmethod
    def load(
        cls, repository: Mapping[str, ModelEntry], settings: CloudSettings, device: torch.device
    ) -> CloudDataPlane:
        registry = ModelRegistry.load(repository, device, settings.model_repository, settings.model_defaults)
        scheduler = Scheduler(
            settings.instances(device),
            settings.max_inflight_rows,
            settings.max_inflight_bytes,
            settings.pushback_ms,
            trimmer=Trimmer(),
        )
        cache = None
        if settings.response_cache_bytes:
            cache = ResponseCache(settings.response_cache_bytes, settings.response_cache_ttl_seconds)
        return cls(registry, scheduler, cache)

    def close(self) -> int:
        """Stop taking work and return at once; how many model calls are still running (Scheduler.close)."""
        return self.scheduler.close()

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.scheduler.closed

    def model_ready(self, name: str, version: str) -> bool:
        return self.ready() and self.registry.model(name, version) is not None

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, SERVER_VERSION)

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        return self.registry.metadata(name, version)

    def health_details(self) -> Mapping[str, str]:
        stats = self.scheduler.stats()
        return {
            "models": ",".join(self.registry.names),
            "ready": str(self.ready()),
            "admitted_rows": f"{stats.admitted_rows}/{stats.max_rows} (peak {stats.peak_rows})",
            "admitted_bytes": f"{stats.admitted_bytes}/{stats.max_bytes} (peak {stats.peak_bytes})",
            "rejected": f"{stats.rejected} at capacity, {stats.rejected_late} past their deadline",
            "started": str(stats.started),
            "dropped": str(stats.dropped),
            "batches": f"{stats.batches} ({stats.batched_rows} rows, largest {stats.largest_batch})",
        }

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        model = self.registry.model(request.model_name, request.model_version)
        check_inputs(request, model.inputs)
        wanted = check_requested_outputs(request, model.outputs)
        cache_key = None
        if self.response_cache is not None:
            cache_key = self.response_cache.key(request, model.version, wanted)
            cached = self.response_cache.get(cache_key)
            if cached is not None:
                return InferResponse(model.name, cached, model.version, request.id)
        arrays = {tensor.name: tensor.data for tensor in request.inputs}
        produced = await self.scheduler.run(model, arrays, deadline)
        datatypes = {spec.name: spec.datatype for spec in model.outputs}
        outputs = [Tensor(name, datatypes[name], produced[name]) for name in wanted]
        if self.response_cache is not None and cache_key is not None:
            self.response_cache.put(cache_key, outputs)
        return InferResponse(model_name=model.name, model_version=model.version, id=request.id, outputs=outputs)
