"""The cloud service's configuration: one validated model (file, OFFLOAD_CLOUD_* environment, flags)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from offload.cloud.config import ComputeDtype, ModelDefaults
from offload.cloud.memory import default_concurrent_rpcs, default_inflight_bytes
from offload.models import DEMO_REPOSITORY
from offload.oip.settings import ServerSettings

if TYPE_CHECKING:
    import torch


CORES_PER_CPU_INSTANCE = 8


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CloudSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_CLOUD_", extra="forbid")

    grpc_port: Annotated[int, Field(ge=0, le=65535, description="gRPC port; 0 picks a free one.")] = 8101
    model_repository: Path = Field(
        DEMO_REPOSITORY, description="Folder of model folders; models with [cloud] are served."
    )
    device: str = Field("auto", description="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    inference_threads: Annotated[
        int | None,
        Field(
            ge=1,
            description="Batches each model runs at once (its instances, one thread each); torch releases the "
            "GIL while it computes. Default: 2 on CUDA (one batch's copies overlap another's compute) and without "
            "batching; on CPU with batching, one per 8 cores, at least one (torch's own threads use the cores, and "
            "more instances on a small machine split the queue into smaller batches).",
        ),
    ] = None
    torch_threads: Annotated[
        int | None,
        Field(
            ge=1,
            description="torch intra-op threads per instance on CPU; default: the cores but one (left to the event "
            "loop: gRPC and decoding), shared by the instances.",
        ),
    ] = None
    batching: bool = Field(
        True,
        description="Run the rows of concurrent requests to one model as one model call (dynamic batching); "
        "off, each request is its own call. A model's [cloud] batching overrides it.",
    )
    max_batch_rows: Annotated[
        int,
        Field(
            ge=1,
            description="Most rows in one model call: the bound of a dynamic batch; a larger request runs in "
            "chunks of this many. A model's [cloud] max_batch_rows overrides it.",
        ),
    ] = 1024
    max_queue_delay_us: Annotated[
        int,
        Field(
            ge=0,
            description="Microseconds a queued request may wait for more rows to join its batch (0: none; a "
            "request that finds a model instance idle never waits). [cloud] max_queue_delay_us overrides it.",
        ),
    ] = 0
    dtype: ComputeDtype | None = Field(
        None,
        description="Run torch models in float16 or bfloat16 (weights and floating inputs cast; outputs keep "
        "their declared datatype); default: the model's own. [cloud] dtype overrides it.",
    )
    compile: str | None = Field(
        None,
        description="torch.compile torch models with this backend ('inductor'); default: eager. "
        "[cloud] compile overrides it ('' for eager).",
    )
    max_concurrent_rpcs: Annotated[
        int | None,
        Field(
            ge=1,
            description="RPCs served at once; gRPC refuses more with RESOURCE_EXHAUSTED before reading their "
            "bodies, so this times max_message_bytes bounds the request bodies held. Default: as many messages "
            "of max_message_bytes as fit in 1/8 of the machine's memory (or of its cgroup limit), at least 128.",
        ),
    ] = None
    max_inflight_rows: Annotated[
        int,
        Field(
            ge=1,
            description="Rows admitted at once (queued or running, all models); past it RESOURCE_EXHAUSTED at once "
            "with a pushback. A larger request is admitted only when nothing else is.",
        ),
    ] = 65_536
    max_inflight_bytes: int = Field(
        default_factory=default_inflight_bytes,
        ge=1,
        description="Bytes of decoded request inputs admitted at once; past it RESOURCE_EXHAUSTED at once with "
        "a pushback. Default: 1/16 of the machine's memory (or of its cgroup limit).",
    )
    response_cache_bytes: Annotated[
        int,
        Field(ge=0, description="Bytes of whole answers cached for all callers (off by default: 0)."),
    ] = 0
    response_cache_ttl_seconds: Annotated[float, Field(gt=0, description="How long a cached answer is used.")] = 300.0
    pushback_ms: Annotated[
        int, Field(ge=0, description="Retry pushback sent with RESOURCE_EXHAUSTED (grpc-retry-pushback-ms).")
    ] = 100

    @model_validator(mode="after")
    def _size_the_rpc_cap(self) -> Self:
        if "max_concurrent_rpcs" not in self.model_fields_set:
            self.max_concurrent_rpcs = default_concurrent_rpcs(self.max_message_bytes)
        return self

    def instances(self, device: torch.device) -> int:
        """`inference_threads`, or its default for `device`."""
        if self.inference_threads is not None:
            return self.inference_threads
        if device.type == "cuda" or not self.batching:
            return 2
        return max(1, cpu_count() // CORES_PER_CPU_INSTANCE)

    def intra_op_threads(self, device: torch.device) -> int:
        """`torch_threads`, or its default: the cores but one, shared by the instances."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, (cpu_count() - 1) // self.instances(device))

    @property
    def model_defaults(self) -> ModelDefaults:
        return ModelDefaults(self.max_batch_rows, self.batching, self.max_queue_delay_us, self.dtype, self.compile)
