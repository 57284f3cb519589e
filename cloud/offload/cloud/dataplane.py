"""The cloud data plane: validate, run the model off the event loop, answer."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from offload.cloud.response_cache import ResponseCache
from offload.cloud.runtime import Arrays, CloudModel
from offload.cloud.settings import CloudSettings
from offload.oip.errors import NotFound, ResourceExhausted, Unavailable
from offload.oip.repository import ModelEntry
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from offload.oip.validation import check_inputs, check_requested_outputs
from offload.oip.version import SERVER_VERSION

log = logging.getLogger(__name__)

SERVER_NAME = "offload-cloud"


class _CallerGone(Exception):
    """A queued job was taken by a thread after its caller had gone: not run."""


@dataclass(slots=True)
class _Job:
    """One model call handed to the pool."""

    # Set when the caller has gone (deadline passed, call cancelled) before a thread took the job.
    caller_gone: bool = False


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
        # Admission: model calls running or waiting for a thread. Past capacity the answer
        # is an immediate RESOURCE_EXHAUSTED, never a longer queue. A slot is held by the
        # job, not by its caller: it is freed when the job ends in the pool (done, failed or
        # dropped), so a caller that gave up cannot make room for more work while its model
        # call still runs. The counters are touched from pool threads too, hence the lock.
        self.capacity = capacity
        self.pushback_ms = pushback_ms
        self.admitted = 0
        self.peak = 0  # the most jobs ever admitted at once: never above capacity
        self.rejected = 0
        self.started = 0  # model calls begun
        self.dropped = 0  # queued jobs whose caller went away before a thread took them: never run
        self._lock = threading.Lock()

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

    def close(self) -> int:
        """Stop taking work, drop the queued jobs and return at once, without waiting for model
        calls still running (the server's grace period for them is over by now).

        Returns how many model calls are still running.
        """
        self._ready = False
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            return self.admitted

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
            "admitted": f"{self.admitted}/{self.capacity} (peak {self.peak})",
            "rejected": str(self.rejected),
            "started": str(self.started),
            "dropped": str(self.dropped),
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
        produced = await self._run_admitted(model, arrays)
        datatypes = {spec.name: spec.datatype for spec in model.outputs}
        outputs = [Tensor(name, datatypes[name], produced[name]) for name in wanted]
        if self.response_cache is not None and cache_key is not None:
            self.response_cache.put(cache_key, outputs)
        return InferResponse(model_name=model.name, model_version=model.version, id=request.id, outputs=outputs)

    async def _run_admitted(self, model: CloudModel, arrays: Arrays) -> Arrays:
        """Run the model in the pool if there is room; RESOURCE_EXHAUSTED at once if not."""
        if not self._ready:
            raise Unavailable("the server is shutting down; retry on another replica")
        with self._lock:
            if self.admitted >= self.capacity:
                self.rejected += 1
                raise ResourceExhausted(
                    f"the cloud is at capacity ({self.capacity} requests running or queued); "
                    f"retry after {self.pushback_ms} ms or add replicas",
                    pushback_ms=self.pushback_ms,
                )
            self.admitted += 1
            self.peak = max(self.peak, self.admitted)
        job = _Job()
        future = self._executor.submit(self._run, job, model, arrays)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The caller is gone. A job still queued is dropped now and frees its slot; one a
            # thread already took runs to the end (a model call cannot be interrupted) and keeps
            # its slot until then. The flag covers a thread that took the job a moment ago.
            job.caller_gone = True
            if future.cancel():
                with self._lock:
                    self.dropped += 1
            raise

    def _run(self, job: _Job, model: CloudModel, arrays: Arrays) -> Arrays:
        """In a pool thread."""
        with self._lock:
            if job.caller_gone:
                self.dropped += 1
                raise _CallerGone
            self.started += 1
        return model.predict(arrays)

    def _release(self, _: Future[Arrays]) -> None:
        """The job ended in the pool (answered, failed, dropped or cancelled): its slot is free."""
        with self._lock:
            self.admitted -= 1
