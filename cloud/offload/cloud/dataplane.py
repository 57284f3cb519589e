"""The cloud data plane: the model registry, the scheduler and the response cache behind the OIP server."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from offload.cloud.memory import Trimmer
from offload.cloud.registry import ModelRegistry
from offload.cloud.response_cache import ResponseCache
from offload.cloud.scheduler import Scheduler
from offload.cloud.settings import CloudSettings
from offload.cloud.stats import ROUTES, CloudStats, ModelServing
from offload.oip.repository import ModelEntry
from offload.oip.stats import SECONDS_BUCKETS, Histogram
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from offload.oip.validation import check_inputs, check_requested_outputs
from offload.oip.version import SERVER_VERSION

SERVER_NAME = "offload-cloud"


@dataclass(slots=True)
class _Served:
    """One model's live counts; stats() hands out a frozen copy."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROUTES, 0))
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROUTES, 0))
    seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))

    def answered(self, route: str, rows: int, seconds: float) -> None:
        self.requests[route] += 1
        self.rows[route] += rows
        self.seconds.observe(seconds)


class CloudDataPlane:
    def __init__(
        self, registry: ModelRegistry, scheduler: Scheduler, response_cache: ResponseCache | None = None
    ) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.response_cache = response_cache
        self._served = {name: _Served() for name in registry.names}

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

    def stats(self) -> CloudStats:
        return CloudStats(
            scheduler=self.scheduler.stats(),
            models={
                name: ModelServing(dict(served.requests), dict(served.rows), served.seconds.snapshot())
                for name, served in self._served.items()
            },
            loads=self.registry.loads,
            response_cache=None if self.response_cache is None else self.response_cache.stats(),
        )

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
        started = time.perf_counter()
        model = self.registry.model(request.model_name, request.model_version)
        rows = check_inputs(request, model.inputs)
        wanted = check_requested_outputs(request, model.outputs)
        cache_key = None
        if self.response_cache is not None:
            cache_key = self.response_cache.key(request, model.version, wanted)
            cached = self.response_cache.get(cache_key)
            if cached is not None:
                self._served[model.name].answered("cache", rows, time.perf_counter() - started)
                return InferResponse(model.name, cached, model.version, request.id)
        arrays = {tensor.name: tensor.data for tensor in request.inputs}
        produced = await self.scheduler.run(model, arrays, deadline)
        datatypes = {spec.name: spec.datatype for spec in model.outputs}
        outputs = [Tensor(name, datatypes[name], produced[name]) for name in wanted]
        if self.response_cache is not None and cache_key is not None:
            self.response_cache.put(cache_key, outputs)
        self._served[model.name].answered("model", rows, time.perf_counter() - started)
        return InferResponse(model_name=model.name, model_version=model.version, id=request.id, outputs=outputs)
