"""The cloud service's configuration: one validated model (file, OFFLOAD_CLOUD_* environment, flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from offload.models import DEMO_REPOSITORY
from offload.oip.settings import ServerSettings


class CloudSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_CLOUD_", extra="forbid")

    grpc_port: Annotated[int, Field(ge=0, le=65535, description="gRPC port; 0 picks a free one.")] = 8101
    model_repository: Path = Field(
        DEMO_REPOSITORY, description="Folder of model folders; models with [cloud] are served."
    )
    device: str = Field("auto", description="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    inference_threads: Annotated[
        int, Field(ge=1, description="Threads that run models; torch releases the GIL while it computes.")
    ] = 2
    torch_threads: Annotated[
        int | None,
        Field(
            ge=1, description="torch intra-op threads on CPU; default: cores / inference_threads (no oversubscription)."
        ),
    ] = None
    max_queue: Annotated[
        int,
        Field(ge=0, description="Requests that may wait for a thread; past it, RESOURCE_EXHAUSTED at once."),
    ] = 64
    response_cache_bytes: Annotated[
        int,
        Field(ge=0, description="Bytes of whole answers cached for all callers (off by default: 0)."),
    ] = 0
    response_cache_ttl_seconds: Annotated[float, Field(gt=0, description="How long a cached answer is used.")] = 300.0
    pushback_ms: Annotated[
        int, Field(ge=0, description="Retry pushback sent with RESOURCE_EXHAUSTED (grpc-retry-pushback-ms).")
    ] = 100
