"""The cloud's models: loaded from the repository's [cloud] sections, warmed up, found by name and version."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.cloud.config import ModelDefaults
from offload.cloud.runtime import CloudModel
from offload.oip.errors import ConfigurationError, NotFound
from offload.oip.repository import ModelEntry
from offload.oip.types import ModelMetadata

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """How long a model took to become ready: reading and placing it on the device, then its warm-up batch."""

    load_seconds: float
    warmup_seconds: float


class ModelRegistry:
    def __init__(self, models: Mapping[str, CloudModel], loads: Mapping[str, ModelLoad] | None = None) -> None:
        self._models = dict(models)
        self.loads: Mapping[str, ModelLoad] = dict(loads or {})

    @classmethod
    def load(
        cls,
        repository: Mapping[str, ModelEntry],
        device: torch.device,
        source: Path,
        defaults: ModelDefaults | None = None,
    ) -> ModelRegistry:
        """Every model with a [cloud] section, each warmed up on `device`; `source` is the repository's
        folder; `defaults`: the server's settings for what a [cloud] section may override."""
        models: dict[str, CloudModel] = {}
        loads: dict[str, ModelLoad] = {}
        for name, entry in repository.items():
            if entry.config.cloud is None:
                continue
            started = time.perf_counter()
            model = CloudModel(entry, device, defaults)
            loaded = time.perf_counter()
            model.warm_up()
            loads[name] = ModelLoad(loaded - started, time.perf_counter() - loaded)
            options = model.options
            log.info(
                "loaded %s v%s (%s) on %s in %.2fs (warm-up %.2fs): batching %s, up to %d rows a call, %s, %s",
                name,
                model.version,
                model.platform,
                device,
                loads[name].load_seconds,
                loads[name].warmup_seconds,
                f"on (queue delay {options.max_queue_delay_us} us)" if options.batching else "off",
                model.max_batch_rows,
                options.dtype or "own dtype",
                f"torch.compile ({options.compile})" if options.compile else "eager",
            )
            models[name] = model
        if not models:
            raise ConfigurationError(f"no model in {source} has a [cloud] section")
        return cls(models, loads)

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def model(self, name: str, version: str) -> CloudModel:
        """The model served as `name` (any version when `version` is empty); NotFound otherwise."""
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served here; models: {self.names}")
        if version and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r}; available: [{model.version!r}]")
        return model

    def metadata(self, name: str, version: str) -> ModelMetadata:
        model = self.model(name, version)
        return ModelMetadata(model.name, (model.version,), model.platform, model.inputs, model.outputs)
