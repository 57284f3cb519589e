"""The edge agent's configuration: one validated model (file, OFFLOAD_EDGE_* environment, flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from offload.models import DEMO_REPOSITORY
from offload.oip.settings import ServerSettings


class EdgeSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_EDGE_", extra="forbid")

    model_repository: Path = Field(
        DEMO_REPOSITORY, description="Folder of model folders; models with [edge] are served."
    )
    cloud: str | None = Field(
        None, description="The cloud's HOST:PORT (any OIP server); none: answer everything on the edge."
    )
    cloud_timeout_seconds: Annotated[
        float, Field(gt=0, description="Longest a cloud call may take when the caller set no shorter deadline.")
    ] = 2.0
    edge_threads: Annotated[int, Field(ge=1, description="Threads that run edge models off the event loop.")] = 1
