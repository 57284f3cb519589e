"""Optional OpenTelemetry tracing: spans around the steps of a request, and the W3C trace context on the wire.

Off unless a server is started with `tracing` (`start_tracing`), or an app that calls the router
in-process has set up an OpenTelemetry SDK tracer provider of its own: then the spans join the
app's traces. Without the `tracing` extra installed (opentelemetry-api and -sdk) every helper here
is a no-op, and this module imports all the same.

The trace context travels in gRPC metadata as `traceparent` (and `tracestate`, `baggage`): the OIP
server takes it from each call (`server_span`), and `OipClient` sends the current one with each
call (`outgoing_metadata`), so one trace shows an app's call, the edge agent's server span, the
edge model, the cloud call with each attempt, and the cloud's server span and model run.

Where spans go is read from the standard OpenTelemetry environment variables:
OTEL_TRACES_EXPORTER (otlp, the default; console; none), OTEL_EXPORTER_OTLP_ENDPOINT and
OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL (grpc, the default; http/protobuf), OTEL_SERVICE_NAME.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

from offload.oip.errors import ConfigurationError

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the tracing extra is not installed: every helper below does nothing
    INSTALLED = False
else:
    INSTALLED = True

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.util.types import AttributeValue

Attributes = Mapping[str, "AttributeValue"]
EXTRA_HINT = "pip install 'offload[tracing]'"
_TRACER_NAME = "offload"

# The provider start_tracing set up; without one, the global provider (an app's own), if any was set.
_provider: TracerProvider | None = None


class Traced:
    """A span being recorded, or nothing: what the code that opened a span may add to it."""

    def __init__(self, span: trace.Span | None) -> None:
        self._span = span

    def set(self, key: str, value: AttributeValue) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def fail(self, description: str) -> None:
        """Mark the span's operation as failed (a status code other than OK)."""
        if self._span is not None:
            self._span.set_status(Status(StatusCode.ERROR, description))


# Whether the OpenTelemetry environment names a provider class to load. It is read once: when it does not, the only
# way a provider other than the no-op proxy comes is trace.set_tracer_provider, which sets `trace._TRACER_PROVIDER`,
# so until then a span costs one attribute read, not get_tracer_provider's environment lookups (every request).
_PROVIDER_FROM_ENVIRONMENT = bool(os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"))
_UNSET = object()


def _tracer() -> trace.Tracer | None:
    """The tracer to record with, or None when nobody set up tracing (then no span is even made)."""
    if not INSTALLED:
        return None
    if _provider is None and not _PROVIDER_FROM_ENVIRONMENT and getattr(trace, "_TRACER_PROVIDER", _UNSET) is None:
        return None
    provider = _provider or trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):
        return None
    return provider.get_tracer(_TRACER_NAME)


# What a span is while nobody traces: one context manager for every request, not a generator made per span.
_UNTRACED = nullcontext(Traced(None))


def span(name: str, attributes: Attributes | None = None, client: bool = False) -> AbstractContextManager[Traced]:
    """A span around a step of the request being served (`client`: a call to another server)."""
    tracer = _tracer()
    if tracer is None:
        return _UNTRACED
    return _span(tracer, name, attributes, client)


@contextmanager
def _span(tracer: trace.Tracer, name: str, attributes: Attributes | None, client: bool) -> Iterator[Traced]:
    kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
    with tracer.start_as_current_span(name, kind=kind, attributes=attributes) as current:
        yield Traced(current)


def server_span(
    name: str, metadata: Iterable[tuple[str, str | bytes]] | None, attributes: Attributes
) -> AbstractContextManager[Traced]:
    """The span of a call a server handles, in the trace its caller's metadata names (a new one if none).

    The caller sets the span's status (an error's is set from its gRPC status, not from the exception).
    """
    tracer = _tracer()
    if tracer is None:
        return _UNTRACED
    return _server_span(tracer, name, metadata, attributes)


@contextmanager
def _server_span(
    tracer: trace.Tracer, name: str, metadata: Iterable[tuple[str, str | bytes]] | None, attributes: Attributes
) -> Iterator[Traced]:
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    with tracer.start_as_current_span(
        name,
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        yield Traced(current)


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (traceparent, ...) for a call to another server."""
    if _tracer() is None:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def start_tracing(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Record spans from now on, sending them where the OTEL_* environment says (or to `exporter`, for tests).

    Returns the provider; `stop_tracing` flushes it. ConfigurationError when the tracing extra is
    missing or an OTEL_* value is not one this supports.
    """
    global _provider  # noqa: PLW0603 - one provider per process, as OpenTelemetry has it
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError as exc:
        raise ConfigurationError(f"tracing needs OpenTelemetry, which is not installed: {EXTRA_HINT}") from exc
    resource = Resource.create()
    # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins over the server's own name.
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if kind == "console":
            # One span at a time as it ends: a console is for watching.
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif kind == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
        elif kind != "none":
            raise ConfigurationError(f"OTEL_TRACES_EXPORTER={kind!r} is not supported here; use otlp, console or none")
    _provider = provider
    return provider


def stop_tracing() -> None:
    """Send the spans not sent yet and stop recording."""
    global _provider  # noqa: PLW0603 - see start_tracing
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def _otlp_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter()
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            return HttpExporter()
    except ImportError as exc:
        raise ConfigurationError(f"the OTLP exporter is not installed: {EXTRA_HINT}") from exc
    raise ConfigurationError(f"OTLP protocol {protocol!r} is not supported here; use grpc or http/protobuf")
