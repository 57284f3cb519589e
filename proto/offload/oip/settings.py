"""Settings shared by the servers, and loading them from a file, the environment and flags.

Precedence, highest first: command-line flags, environment variables
(OFFLOAD_EDGE_*, OFFLOAD_CLOUD_*), the TOML file given with --config, defaults.
"""

from __future__ import annotations

import logging
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from offload.oip.errors import ConfigurationError
from offload.oip.event_loop import EventLoop
from offload.oip.limits import MAX_ELEMENTS, MAX_MESSAGE_BYTES, ServerLimits
from offload.oip.logs import LogFormat, log_handler
from offload.oip.security import ServerSecurity

_config_file: ContextVar[Path | None] = ContextVar("offload_config_file", default=None)


class _TomlFileSource(PydanticBaseSettingsSource):
    """The --config file, if one was given to load_settings."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        try:
            return tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigurationError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from exc


class ServerSettings(BaseSettings):
    """What every Offload server has."""

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 or :: to accept remote callers.")
    grpc_port: Annotated[int, Field(ge=0, le=65535, description="gRPC port; 0 picks a free one.")] = 8001
    max_message_bytes: Annotated[
        int, Field(ge=1024, description="Largest gRPC message sent or received; larger ones get RESOURCE_EXHAUSTED.")
    ] = MAX_MESSAGE_BYTES
    max_elements: Annotated[
        int, Field(ge=1, description="Most elements one request tensor may declare; more is INVALID_ARGUMENT.")
    ] = MAX_ELEMENTS
    max_concurrent_rpcs: Annotated[
        int | None,
        Field(
            ge=1,
            description="RPCs served at once (default: no limit); gRPC refuses more with RESOURCE_EXHAUSTED "
            "before reading their bodies.",
        ),
    ] = None
    grace_seconds: Annotated[
        float, Field(ge=0, description="On SIGTERM/SIGINT, how long calls in flight may take to finish.")
    ] = 10.0
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: LogFormat = Field(
        "text", description="text, or json: one JSON object per line (time, level, logger, message, request_id, ...)."
    )
    metrics_port: Annotated[
        int | None,
        Field(ge=0, le=65535, description="Serve Prometheus metrics over HTTP on this port (/metrics); none: off."),
    ] = None
    metrics_host: str | None = Field(None, description="Address the metrics port listens on; default: host.")
    health_port: Annotated[
        int | None,
        Field(
            ge=0,
            le=65535,
            description="Also serve grpc.health.v1 alone, in plaintext, on this port (for probes that cannot speak "
            "TLS or send a token); none: off.",
        ),
    ] = None
    tracing: bool = Field(
        False,
        description="Export OpenTelemetry traces (needs offload[tracing]); where to is read from the standard "
        "OTEL_* environment variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_EXPORTER, OTEL_SERVICE_NAME).",
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain to serve TLS with (and tls_key); none: plaintext."
    )
    tls_key: Path | None = Field(None, description="Unencrypted PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA certificate(s): require client certificates they signed (mutual TLS)."
    )
    auth_token_file: Path | None = Field(
        None,
        description="Accepted bearer tokens, one a line (# comments); inference calls need one. Re-read on change.",
    )
    event_loop: EventLoop = Field(
        "auto",
        description="The asyncio event loop: auto (uvloop where installed, else asyncio's), uvloop, or asyncio.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlFileSource(settings_cls)

    @property
    def limits(self) -> ServerLimits:
        return ServerLimits(
            max_message_bytes=self.max_message_bytes,
            max_elements=self.max_elements,
            max_concurrent_rpcs=self.max_concurrent_rpcs,
        )

    def security(self) -> ServerSecurity:
        """TLS credentials and accepted tokens from the files these settings name, each read and checked now."""
        return ServerSecurity.load(self.tls_cert, self.tls_key, self.tls_client_ca, self.auth_token_file)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], config_file: Path | None = None, **flags: Any) -> SettingsT:
    """Settings from flags (None means not given), environment and file, validated, with clear errors."""
    token = _config_file.set(config_file)
    try:
        return cls(**{key: value for key, value in flags.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        source = f" (config file {config_file})" if config_file else ""
        raise ConfigurationError(f"invalid {cls.__name__}{source}: {problems}") from exc
    finally:
        _config_file.reset(token)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Log to standard error at `level`, as text or JSON lines, each line about a request carrying its id."""
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format)])
