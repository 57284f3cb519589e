"""The cloud data plane: validate, run the model off the event loop, answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from offload.cloud.response_cache import ResponseCache
from offload.cloud.runtime import CloudModel
from offload.cloud.settings import CloudSettings
from offload.oip.errors import NotFound, ResourceExhausted
from offload.oip.repository import ModelEntry
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from offload.oip.validation import check_inputs, check_requested_outputs

log = logging.getLogger(__name__)

SERVER_NAME = "offload-cloud"
SERVER_VERSION = "0.1.0"


class CloudDataPlane:
    def __init__(
        self,
        models: Mapping[str, CloudModel],
        executor: ThreadPoolExecutor,
        capacity: int = 66,
        pushback_ms: int = 100,
        response_cache: ResponseCache | None = None,
    ) -> None:
        self._models = dict(models)
        self.response_cache = response_cache
        self._executor = executor
        self._ready = True
        # Admission: requests running or waiting for a thread. Past capacity the
        # answer is an immediate RESOURCE_EXHAUSTED, never a longer queue.
        self.capacity = capacity
        self.pushback_ms = pushback_ms
        self.admitted = 0
        self.rejected = 0

    @classmethod
    def load(
        cls, repository: Mapping[str, ModelEntry], settings: CloudSettings, device: torch.device
    ) -> CloudDataPlane:
        models: dict[str, CloudModel] = {}
        for name, entry in repository.items():
            if entry.config.cloud is None:
                continue
            model = CloudModel(entry, device)
            model.warm_up()
            log.info("loaded %s v%s (%s) on %s", name, model.version, model.platform, device)
            models[name] = model
        if not models:
            from offload.oip.errors import ConfigurationError

            raise ConfigurationError(f"no model in {settings.model_repository} has a [cloud] section")
        executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="cloud-infer")
        cache = None
        if settings.response_cache_bytes:
            cache = ResponseCache(settings.response_cache_bytes, settings.response_cache_ttl_seconds)
        return cls(models, executor, settings.inference_threads + settings.max_queue, settings.pushback_ms, cache)

    def close(self) -> None:
        self._ready = False
        self._executor.shutdown(wait=True)

    def _model(self, name: str, version: str) -> CloudModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served here; models: {sorted(self._models)}")
        if version and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r}; available: [{model.version!r}]")
        return model

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._ready

    def model_ready(self, name: str, version: str) -> bool:
        return self._ready and self._model(name, version) is not None

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, SERVER_VERSION)

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        model = self._model(name, version)
        return ModelMetadata(model.name, (model.version,), model.platform, model.inputs, model.outputs)

    def health_details(self) -> Mapping[str, str]:
        return {
            "models": ",".join(sorted(self._models)),
            "ready": str(self._ready),
            "admitted": f"{self.admitted}/{self.capacity}",
            "rejected": str(self.rejected),
        }

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        model = self._model(request.model_name, request.model_version)
        check_inputs(request, model.inputs)
        wanted = check_requested_outputs(request, model.outputs)
        cache_key = None
        if self.response_cache is not None:
            cache_key = self.response_cache.key(request, model.version, wanted)
            cached = self.response_cache.get(cache_key)
            if cached is not None:
                return InferResponse(model.name, cached, model.version, request.id)
        arrays = {tensor.name: tensor.data for tensor in request.inputs}
        if self.admitted >= self.capacity:
            self.rejected += 1
            raise ResourceExhausted(
                f"the cloud is at capacity ({self.capacity} requests running or queued); "
                f"retry after {self.pushback_ms} ms or add replicas",
                pushback_ms=self.pushback_ms,
            )
        self.admitted += 1
        try:
            loop = asyncio.get_running_loop()
            produced = await loop.run_in_executor(self._executor, model.predict, arrays)
        finally:
            self.admitted -= 1
        datatypes = {spec.name: spec.datatype for spec in model.outputs}
        outputs = [Tensor(name, datatypes[name], produced[name]) for name in wanted]
        if self.response_cache is not None and cache_key is not None:
            self.response_cache.put(cache_key, outputs)
        return InferResponse(model_name=model.name, model_version=model.version, id=request.id, outputs=outputs)
