"""The edge agent's configuration: one validated model (file, OFFLOAD_EDGE_* environment, flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from offload.models import DEMO_REPOSITORY
from offload.oip.address import check_address
from offload.oip.settings import ServerSettings


class EdgeSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_EDGE_", extra="forbid")

    model_repository: Path = Field(
        DEMO_REPOSITORY, description="Folder of model folders; models with [edge] are served."
    )
    cloud: str | None = Field(
        None,
        description="The cloud's HOST:PORT (any OIP server; IPv6 in brackets); none or empty: answer everything "
        "on the edge.",
    )
    cloud_timeout_seconds: Annotated[
        float,
        Field(gt=0, description="Default cloud deadline: all attempts at one request, when the caller's is longer."),
    ] = 1.0
    deadline_reserve_seconds: Annotated[
        float, Field(ge=0, description="Time kept back from the caller's deadline to answer from the edge.")
    ] = 0.02
    edge_threads: Annotated[int, Field(ge=1, description="Threads that run edge models off the event loop.")] = 1

    retry_max_attempts: Annotated[int, Field(ge=1, description="Attempts per cloud request, the first included.")] = 3
    retry_initial_backoff_seconds: Annotated[
        float, Field(gt=0, description="Backoff ceiling before the 2nd attempt (full jitter; doubles each time).")
    ] = 0.05
    retry_max_backoff_seconds: Annotated[float, Field(gt=0, description="Largest backoff ceiling.")] = 1.0
    retry_budget_max_tokens: Annotated[
        float, Field(gt=0, description="Retry budget (gRPC A6): tokens; retries stop below half of them.")
    ] = 10.0
    retry_budget_token_ratio: Annotated[
        float, Field(gt=0, description="Retry budget: tokens a successful cloud call gives back.")
    ] = 0.1
    breaker_consecutive_failures: Annotated[
        int, Field(ge=1, description="Circuit breaker: consecutive failures that open it.")
    ] = 5
    breaker_failure_rate: Annotated[
        float, Field(gt=0, le=1, description="Circuit breaker: failure share over the window that opens it.")
    ] = 0.5
    breaker_window: Annotated[int, Field(ge=1, description="Circuit breaker: recent calls the rate is taken over.")] = (
        20
    )
    breaker_min_calls: Annotated[
        int, Field(ge=1, description="Circuit breaker: calls needed before the rate counts.")
    ] = 10
    breaker_cooldown_seconds: Annotated[
        float, Field(ge=0, description="Circuit breaker: how long it stays open before one probe call.")
    ] = 5.0
    cache_max_bytes: Annotated[
        int, Field(ge=0, description="Bytes of cloud answers cached per row (least recently used out); 0: no cache.")
    ] = 64 * 1024 * 1024
    cache_ttl_seconds: Annotated[float, Field(gt=0, description="How long a cached cloud answer is used.")] = 300.0
    target_offload: Annotated[
        float | None,
        Field(gt=0, lt=1, description="Online budget: keep the offload share near this by adapting the threshold."),
    ] = None
    audit_share: Annotated[
        float, Field(ge=0, le=1, description="Share of confident rows also sent to the cloud to measure agreement.")
    ] = 0.0
    hedge_delay_seconds: Annotated[
        float | None,
        Field(
            gt=0,
            description="Hedging (opt-in): send a second attempt after this delay; first answer wins. "
            "Each hedge takes a retry-budget token.",
        ),
    ] = None
    status_log_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="Seconds between INFO status lines (circuit, retry tokens, cloud calls, failures and "
            "degraded answers since the last line, cache hit rate, audit agreement), written only when something "
            "happened; 0: none.",
        ),
    ] = 60.0

    @field_validator("cloud")
    @classmethod
    def _cloud_is_host_port(cls, value: str | None) -> str | None:
        # gRPC would take any string and fail only when it dials: say what is wrong now, at start-up.
        # Empty means none, as it did before addresses were checked (OFFLOAD_EDGE_CLOUD= in a unit file).
        return check_address(value) if value else None
