"""The edge agent's configuration: one validated model (file, OFFLOAD_EDGE_* environment, flags)."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Annotated, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from offload.edge.onnx_model import DEFAULT_CHUNK_BYTES
from offload.models import DEMO_REPOSITORY
from offload.oip.security import ChannelSecurity
from offload.oip.settings import ServerSettings
from offload.router.coalesce import CoalescePolicy
from offload.router.discovery import CloudTargets
from offload.router.placement import Placement, PlacementPolicy
from offload.router.resilience import BreakerPolicy, RetryBudget
from offload.router.upstream import RetryPolicy

# The policies hold the defaults; the settings below start from them.
_RETRY, _BUDGET, _BREAKER = RetryPolicy(), RetryBudget(), BreakerPolicy()
_PLACEMENT, _COALESCE = PlacementPolicy(), CoalescePolicy()
Policy = TypeVar("Policy", RetryPolicy, RetryBudget, BreakerPolicy)
# A policy's field F is the setting PREFIX + F (retry_max_attempts, breaker_window, ...).
_PREFIXES: dict[type, str] = {RetryPolicy: "retry_", RetryBudget: "retry_budget_", BreakerPolicy: "breaker_"}


class EdgeSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="OFFLOAD_EDGE_", extra="forbid")

    model_repository: Path = Field(
        DEMO_REPOSITORY, description="Folder of model folders; models with [edge] are served."
    )
    model_repository_url: str | None = Field(
        None,
        description="HTTP(S) URL of a model repository with a manifest.json (offload manifest DIR writes it): "
        "the agent serves its models, polls it and swaps new versions in; model_repository is then served only "
        "until a first download succeeds.",
    )
    model_poll_seconds: Annotated[
        float,
        Field(gt=0, description="Seconds between looks at model_repository_url (If-None-Match: unchanged is cheap)."),
    ] = 60.0
    model_cache_dir: Path | None = Field(
        None,
        description="Where the last good repository from model_repository_url is kept, to serve after a restart "
        "(offline too); default: $STATE_DIRECTORY/model-cache (systemd's StateDirectory), else "
        "$XDG_STATE_HOME/offload/model-cache, else ~/.local/state/offload/model-cache.",
    )
    model_download_max_bytes: Annotated[
        int,
        Field(
            ge=1,
            description="Most bytes one rollout may download (the files the edge needs, together); a manifest that "
            "lists more is refused before any download.",
        ),
    ] = 1024 * 1024 * 1024
    cloud: str | None = Field(
        None,
        description="The cloud (any OIP server): HOST:PORT (IPv6 in brackets), several replicas as "
        "HOST:PORT,HOST:PORT,..., or dns:///NAME:PORT for a replica at every address of NAME (a headless Kubernetes "
        "Service); calls are balanced across the replicas. None or empty: answer everything on the edge.",
    )
    cloud_tls_ca: Path | None = Field(
        None, description="PEM CA certificate(s) to verify the cloud with; turns TLS to the cloud on."
    )
    cloud_tls_cert: Path | None = Field(
        None, description="PEM client certificate to present to the cloud (and cloud_tls_key); turns TLS on."
    )
    cloud_tls_key: Path | None = Field(None, description="Unencrypted PEM private key of cloud_tls_cert.")
    cloud_tls_server_name: str | None = Field(
        None,
        description="Name to check the cloud's certificate against, instead of the host in cloud (for a "
        "replica found through dns:///NAME:PORT, NAME).",
    )
    cloud_token_file: Path | None = Field(
        None, description="File whose first token is sent to the cloud as 'authorization: Bearer'. Re-read on change."
    )
    cloud_resolve_seconds: Annotated[
        float, Field(gt=0, description="How often the dns:/// names in cloud are looked up again for replicas.")
    ] = 30.0
    cloud_streaming: bool = Field(
        False,
        description="Send the rows for the cloud on long-lived ModelStreamInfer streams (Triton's), one per replica "
        "that every request shares, instead of one ModelInfer call each; falls back to ModelInfer if the cloud "
        "lacks it.",
    )
    cloud_timeout_seconds: Annotated[
        float,
        Field(gt=0, description="Default cloud deadline: all attempts at one request, when the caller's is longer."),
    ] = 1.0
    deadline_reserve_seconds: Annotated[
        float, Field(ge=0, description="Time kept back from the caller's deadline to answer from the edge.")
    ] = 0.02
    edge_threads: Annotated[int, Field(ge=1, description="Threads that run edge models off the event loop.")] = 1
    edge_placement: Placement = Field(
        _PLACEMENT.mode,
        description="Where edge models run a batch: auto (on the event loop when its measured cost is at most "
        "edge_inline_seconds, else on an edge thread), inline (always on the event loop) or thread (always on "
        "an edge thread; for a model that waits on an accelerator).",
    )
    edge_inline_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="auto placement: a batch whose measured CPU cost is at most this runs on the event loop, "
            "saving the hand-off to a thread (which costs more than a small model's run).",
        ),
    ] = _PLACEMENT.inline_seconds
    edge_chunk_bytes: Annotated[
        int,
        Field(ge=1, description="Most input bytes one run of an edge model takes; larger batches run in chunks."),
    ] = DEFAULT_CHUNK_BYTES
    # A device's limit, not a server's: a request costs the agent about three times its size (README).
    max_message_bytes: Annotated[
        int, Field(ge=1024, description="Largest gRPC message sent or received; larger ones get RESOURCE_EXHAUSTED.")
    ] = 16 * 1024 * 1024

    retry_max_attempts: Annotated[int, Field(ge=1, description="Attempts per cloud request, the first included.")] = (
        _RETRY.max_attempts
    )
    retry_initial_backoff_seconds: Annotated[
        float, Field(gt=0, description="Backoff ceiling before the 2nd attempt (full jitter; doubles each time).")
    ] = _RETRY.initial_backoff_seconds
    retry_max_backoff_seconds: Annotated[float, Field(gt=0, description="Largest backoff ceiling.")] = (
        _RETRY.max_backoff_seconds
    )
    retry_budget_max_tokens: Annotated[
        float, Field(gt=0, description="Retry budget (gRPC A6): tokens; retries stop below half of them.")
    ] = _BUDGET.max_tokens
    retry_budget_token_ratio: Annotated[
        float, Field(gt=0, description="Retry budget: tokens a successful cloud call gives back.")
    ] = _BUDGET.token_ratio
    breaker_consecutive_failures: Annotated[
        int, Field(ge=1, description="Circuit breaker: consecutive failures that open it.")
    ] = _BREAKER.consecutive_failures
    breaker_failure_rate: Annotated[
        float, Field(gt=0, le=1, description="Circuit breaker: failure share over the window that opens it.")
    ] = _BREAKER.failure_rate
    breaker_window: Annotated[int, Field(ge=1, description="Circuit breaker: recent calls the rate is taken over.")] = (
        _BREAKER.window
    )
    breaker_min_calls: Annotated[
        int, Field(ge=1, description="Circuit breaker: calls needed before the rate counts.")
    ] = _BREAKER.min_calls
    breaker_cooldown_seconds: Annotated[
        float, Field(ge=0, description="Circuit breaker: how long it stays open before one probe call.")
    ] = _BREAKER.cooldown_seconds
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
    coalesce_window_us: Annotated[
        int,
        Field(
            ge=0,
            description="Coalescing: unsure rows bound for a cloud model go at once when no call of the same model "
            "and parameters is in flight; while one is, they wait for it to end, with other requests' rows, at most "
            "this long (microseconds; 0: until the call in flight ends, however long the link takes).",
        ),
    ] = round(_COALESCE.window_seconds * 1e6)
    coalesce_max_rows: Annotated[
        int,
        Field(
            ge=0,
            description="Coalescing: most rows one shared cloud call carries (a call also carries at most a quarter "
            "of max_message_bytes of input); 0: no coalescing, each request's rows in calls of their own.",
        ),
    ] = _COALESCE.max_rows
    record_dir: Path | None = Field(
        None,
        description="Opt-in, off by default (these are users' inputs): keep every row the cloud answers and its "
        "answer in rotating .npz files in this folder, for `offload distill` (see offload.edge.recording).",
    )
    record_max_bytes: Annotated[
        int,
        Field(
            ge=64 * 1024,
            description="Most bytes of recording files in record_dir together; the oldest are deleted past it. "
            "Each file holds at most 1/8 of it (and at most 16 MiB).",
        ),
    ] = 256 * 1024 * 1024
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

    def placement(self) -> PlacementPolicy:
        """Where edge models run their batches (offload.router.placement)."""
        return PlacementPolicy(self.edge_placement, self.edge_inline_seconds)

    def coalescing(self) -> CoalescePolicy:
        """How concurrent requests' unsure rows share cloud calls (offload.router.coalesce)."""
        return CoalescePolicy(self.coalesce_window_us / 1e6, self.coalesce_max_rows, self.max_message_bytes // 4)

    def cloud_security(self) -> ChannelSecurity:
        """TLS credentials and the token for the cloud channel, from the files these settings name, checked now."""
        return ChannelSecurity.load(
            self.cloud_tls_ca,
            self.cloud_tls_cert,
            self.cloud_tls_key,
            self.cloud_tls_server_name,
            self.cloud_token_file,
        )

    def model_cache_folder(self) -> Path:
        """model_cache_dir, or the default: a state folder (systemd's StateDirectory, the XDG one, or ~'s)."""
        if self.model_cache_dir is not None:
            return self.model_cache_dir
        # systemd sets STATE_DIRECTORY (colon-separated when a unit names several) for StateDirectory=.
        systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if systemd:
            return Path(systemd) / "model-cache"
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(xdg) / "offload" / "model-cache"

    def policy(self, kind: type[Policy]) -> Policy:
        """The retry, retry-budget or breaker policy these settings describe: each field F of the
        policy is the setting <prefix>F where there is one, else the policy's default."""
        prefix = _PREFIXES[kind]
        names = type(self).model_fields
        return kind(**{f.name: getattr(self, prefix + f.name) for f in fields(kind) if prefix + f.name in names})

    @field_validator("model_repository_url")
    @classmethod
    def _url_is_http(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        return value

    @field_validator("cloud")
    @classmethod
    def _cloud_targets(cls, value: str | None) -> str | None:
        # gRPC would take any string and fail only when it dials: say what is wrong now, at start-up
        # (CloudTargets.parse's ValueError names the entry and what to write).
        # Empty means none, as it did before addresses were checked (OFFLOAD_EDGE_CLOUD= in a unit file).
        if not value:
            return None
        CloudTargets.parse(value)
        return value
