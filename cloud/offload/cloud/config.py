"""The [cloud] section of a model.toml: the large model that runs on the GPU server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from offload.oip.repository import Section

# What a model may run in: its own parameters' datatype (None), or weights and floating-point
# inputs cast to half or bfloat16 on the way in (outputs keep their declared datatype).
ComputeDtype = Literal["float32", "float16", "bfloat16"]


class CloudSection(Section):
    """The large model that runs on the GPU server.

    The batching and execution fields override the server's settings of the same name for
    this model (`offload.cloud.settings.CloudSettings`); left out, the server's apply.
    """

    artifact: str | None = None
    factory: str | None = None
    # The largest warm-up batch: batches of 1, 2, 4, ... up to this many rows run before the
    # model reports ready (0: none).
    warmup_rows: Annotated[int, Field(ge=0)] = 8
    # The most rows one model call runs: the bound of a dynamic batch, and a larger request runs
    # in chunks of at most this many rows. A torch.export program's own bound applies anyway.
    max_batch_rows: Annotated[int, Field(ge=1)] | None = None
    # Rows of concurrent requests run as one model call (off: each request is its own call).
    batching: bool | None = None
    # How long a queued request may wait for more rows to join its batch, in microseconds.
    max_queue_delay_us: Annotated[int, Field(ge=0)] | None = None
    dtype: ComputeDtype | None = None
    # torch.compile the module with this backend ("inductor" is torch's default); empty: eager.
    compile: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.artifact is None) == (self.factory is None):
            raise ValueError("give exactly one of 'artifact' (a .pt2 or TorchScript file) or 'factory' (pkg.module:fn)")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory {self.factory!r} must look like 'package.module:function'")
        return self


@dataclass(frozen=True, slots=True)
class ModelDefaults:
    """The server's settings for the fields a [cloud] section may override."""

    max_batch_rows: int = 1024
    batching: bool = True
    max_queue_delay_us: int = 0
    dtype: ComputeDtype | None = None
    compile: str | None = None

    def resolve(self, section: CloudSection, program_rows: int | None) -> ModelOptions:
        """A model's options: its section's values where given, these otherwise; `program_rows` is the
        largest batch its torch.export program takes (None: unbounded)."""
        rows = section.max_batch_rows if section.max_batch_rows is not None else self.max_batch_rows
        return ModelOptions(
            max_batch_rows=rows if program_rows is None else min(rows, program_rows),
            batching=self.batching if section.batching is None else section.batching,
            max_queue_delay_us=self.max_queue_delay_us
            if section.max_queue_delay_us is None
            else section.max_queue_delay_us,
            dtype=section.dtype or self.dtype,
            compile=section.compile if section.compile is not None else self.compile,
            warmup_rows=section.warmup_rows,
        )


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """How one model is batched and run, resolved from its [cloud] section and the server's defaults."""

    max_batch_rows: int
    batching: bool
    max_queue_delay_us: int
    dtype: ComputeDtype | None
    compile: str | None
    warmup_rows: int
