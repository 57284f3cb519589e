"""The cloud's models: loaded from the repository's [cloud] sections, warmed up, found by name and version."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from offload.cloud.config import ModelDefaults
from offload.cloud.runtime import CloudModel
from offload.oip.errors import ConfigurationError, NotFound
from offload.oip.repository import ModelEntry
from offload.oip.types import ModelMetadata

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, models: Mapping[str, CloudModel]) -> None:
        self._models = dict(models)

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
        for name, entry in repository.items():
            if entry.config.cloud is None:
                continue
            model = CloudModel(entry, device, defaults)
            model.warm_up()
            options = model.options
            log.info(
                "loaded %s v%s (%s) on %s: batching %s, up to %d rows a call, %s, %s",
                name,
                model.version,
                model.platform,
                device,
                f"on (queue delay {options.max_queue_delay_us} us)" if options.batching else "off",
                model.max_batch_rows,
                options.dtype or "own dtype",
                f"torch.compile ({options.compile})" if options.compile else "eager",
            )
            models[name] = model
        if not models:
            raise ConfigurationError(f"no model in {source} has a [cloud] section")
        return cls(models)

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
