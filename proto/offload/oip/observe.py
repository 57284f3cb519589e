"""What an OIP server sees of each call: its status and duration (`ServerStats`), its request id, its span.

`CallObserver` is the first interceptor on the server: it wraps the handler of every call to the
inference service, whatever handles it after (the servicer, or the token check refusing it), so
it sees every status a caller gets. Per call it sets the request id for log lines
(`current_request_id`), opens the server span in the caller's trace, and counts the call by method
and status code, with its duration, in counters that `stats()` hands out as a frozen snapshot.
A ModelStreamInfer stream counts as one call, by the status it ends with, over its whole life.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc

from offload.oip import tracing
from offload.oip.messages import ReceivedRequest
from offload.oip.request_ids import current_request_id, request_id_of
from offload.oip.stats import SECONDS_BUCKETS, Histogram, HistogramSnapshot

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[
    [AsyncIterator[Any], grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any] | Awaitable[None]
]


@dataclass(frozen=True, slots=True)
class ServerStats:
    """An OIP server's calls to the inference service, at one moment."""

    calls: Mapping[tuple[str, str], int]  # (method, status code name) -> calls that ended so
    seconds: Mapping[str, HistogramSnapshot]  # method -> how long its calls took, whatever their status
    in_flight: int  # calls being handled now


class CallObserver(grpc.aio.ServerInterceptor):
    """Observes the calls to one service (the inference service), unary calls and streams; other services
    pass untouched."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._prefix = f"/{service}/"
        self._calls: dict[tuple[str, str], int] = {}
        self._seconds: dict[str, Histogram] = {}
        self._in_flight = 0
        # Per method, the handler last wrapped and its wrapping: a method's handler is the same object call
        # after call, so it is wrapped once, not once a call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def stats(self) -> ServerStats:
        return ServerStats(
            calls=dict(self._calls),
            seconds={method: histogram.snapshot() for method, histogram in self._seconds.items()},
            in_flight=self._in_flight,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        name = handler_call_details.method
        # Only methods the service has get here with a handler, so the method label stays a short, fixed list.
        if handler is None or not name.startswith(self._prefix):
            return handler
        wrapped = self._wrapped.get(name)
        if wrapped is not None and wrapped[0] is handler:
            return wrapped[1]
        method = name.removeprefix(self._prefix)
        if handler.unary_unary is not None:
            observed = grpc.unary_unary_rpc_method_handler(
                self._observed(method, cast(Behavior, handler.unary_unary)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.stream_stream is not None:
            observed = grpc.stream_stream_rpc_method_handler(
                self._observed_stream(method, cast(StreamBehavior, handler.stream_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:  # the service has no half-streaming method
            return handler
        self._wrapped[name] = (handler, observed)
        return observed

    def _observed(self, method: str, behavior: Behavior) -> Behavior:
        attributes = {"rpc.system": "grpc", "rpc.service": self._service, "rpc.method": method}
        span_name = f"{self._service}/{method}"

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = context.invocation_metadata()
            # ModelInfer's request as the server reads it (its raw contents left in the bytes received).
            message_id = request.message.id if isinstance(request, ReceivedRequest) else ""
            token = current_request_id.set(request_id_of(message_id, metadata))
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN  # what gRPC answers for an exception nobody turned into a status
            self._in_flight += 1
            try:
                with tracing.server_span(span_name, metadata, attributes) as span:
                    try:
                        reply = await behavior(request, context)
                        code = grpc.StatusCode.OK
                        return reply
                    except asyncio.CancelledError:
                        code = grpc.StatusCode.CANCELLED  # the caller went away, or its deadline passed
                        raise
                    finally:
                        # A status set by context.abort (every error a handler answers with) wins.
                        code = _status(context) or code
                        span.set("rpc.grpc.status_code", code.value[0])
                        if code != grpc.StatusCode.OK:
                            span.fail(code.name)
            finally:
                self._in_flight -= 1
                elapsed = time.perf_counter() - started
                self._record(method, code, elapsed)
                if log.isEnabledFor(logging.DEBUG):  # its `extra` would be built for nothing at INFO
                    log.debug(
                        "%s %s in %.1f ms",
                        method,
                        code.name,
                        elapsed * 1000,
                        extra={"method": method, "code": code.name, "duration_ms": round(elapsed * 1000, 3)},
                    )
                current_request_id.reset(token)

        return observed

    def _observed_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        """A stream (ModelStreamInfer) counts as one call, by the status it ends with, over its whole life.

        Neither a request id nor a span is set for it: its requests have ids of their own, and a span
        (a context variable) left open across the stream's yields would leak into gRPC's code between them.
        """

        async def observed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            self._in_flight += 1
            try:
                replies = behavior(requests, context)
                if isinstance(replies, AsyncIterator):
                    async for reply in replies:
                        yield reply
                else:  # a handler that writes (or refuses, as the token check does) rather than yields
                    await replies
                code = grpc.StatusCode.OK
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED  # the caller went away, or its deadline passed
                raise
            finally:
                code = _status(context) or code
                self._in_flight -= 1
                self._record(method, code, time.perf_counter() - started)

        return observed

    def _record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        key = (method, code.name)
        self._calls[key] = self._calls.get(key, 0) + 1
        histogram = self._seconds.get(method)
        if histogram is None:
            histogram = self._seconds[method] = Histogram(SECONDS_BUCKETS)
        histogram.observe(seconds)


def _status(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    """The status the handler set (context.abort, set_code), if any."""
    code: object = context.code()
    if isinstance(code, grpc.StatusCode) or code is None:
        return code
    # Some gRPC versions hand out the status as its number.
    return next((status for status in grpc.StatusCode if status.value[0] == code), None)
