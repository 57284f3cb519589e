"""The [cloud] section of a model.toml: the large model that runs on the GPU server."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, model_validator

from offload.oip.repository import Section


class CloudSection(Section):
    """The large model that runs on the GPU server."""

    artifact: str | None = None
    factory: str | None = None
    # Rows of the warm-up batch run before the model reports ready.
    warmup_rows: Annotated[int, Field(ge=0)] = 8
    # Larger batches are run in chunks of at most this many rows and the outputs joined (to bound
    # memory per call). A torch.export program's own bound on its batch dimension applies anyway.
    max_batch_rows: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.artifact is None) == (self.factory is None):
            raise ValueError("give exactly one of 'artifact' (a .pt2 or TorchScript file) or 'factory' (pkg.module:fn)")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory {self.factory!r} must look like 'package.module:function'")
        return self
