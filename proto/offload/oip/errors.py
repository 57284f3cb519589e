"""Errors with their gRPC status: the one place where failures meet the wire.

Code raises these anywhere (data planes, codec, runtimes); the servers turn
them into a status with `status_for` and nothing else. Messages are written
for the caller: they name the field, what was expected and what was given.
"""

from __future__ import annotations

import re
from typing import ClassVar

import grpc


class OffloadError(Exception):
    """Base class: a failure with a gRPC status and a message a caller can act on."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL


class InvalidArgument(OffloadError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(OffloadError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(OffloadError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(OffloadError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, pushback_ms: int | None = None) -> None:
        super().__init__(message)
        # Sent as gRPC's `grpc-retry-pushback-ms` trailer: the server asks the
        # client to wait this long before retrying (only then is a retry wanted).
        self.pushback_ms = pushback_ms


class DeadlineExceeded(OffloadError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(OffloadError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(OffloadError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(OffloadError):
    """A call without an accepted bearer token (the message never repeats what was sent)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(OffloadError):
    code = grpc.StatusCode.INTERNAL


class UpstreamError(OffloadError):
    """A peer server (the cloud) failed; carries the peer's own status.

    `pushback_ms` is the peer's `grpc-retry-pushback-ms`: None when it sent none, the
    milliseconds to wait before a retry, or PUSHBACK_DO_NOT_RETRY (negative) when it
    asked not to be retried at all.
    """

    def __init__(self, code: grpc.StatusCode, message: str, pushback_ms: int | None = None) -> None:
        super().__init__(message)
        self.upstream_code = code
        self.pushback_ms = pushback_ms

    @property
    def status(self) -> grpc.StatusCode:
        return self.upstream_code


class ConfigurationError(OffloadError):
    """Bad settings or model repository, found at start-up."""

    code = grpc.StatusCode.FAILED_PRECONDITION


PUSHBACK_KEY = "grpc-retry-pushback-ms"
# What a pushback that forbids retrying is read as (any negative value means that).
PUSHBACK_DO_NOT_RETRY = -1
_PUSHBACK_VALUE = re.compile(r"-?[0-9]+")


def parse_pushback(value: str | bytes) -> int:
    """A `grpc-retry-pushback-ms` value: milliseconds to wait, or PUSHBACK_DO_NOT_RETRY.

    gRPC A6: the value is a signed 32-bit integer in ASCII; a negative or unparseable
    value means the server asks the client not to retry at all. Reading a garbled
    value as "retry" would do the opposite of what a server under stress most likely meant.
    """
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if not _PUSHBACK_VALUE.fullmatch(text):
        return PUSHBACK_DO_NOT_RETRY
    milliseconds = int(text)
    if milliseconds < 0 or milliseconds > 2**31 - 1:
        return PUSHBACK_DO_NOT_RETRY
    return milliseconds


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that goes with an error's status (the retry pushback)."""
    pushback = getattr(exc, "pushback_ms", None)
    return ((PUSHBACK_KEY, str(pushback)),) if isinstance(pushback, int) else ()


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a server answers with for an exception."""
    if isinstance(exc, UpstreamError):
        return exc.status, str(exc)
    if isinstance(exc, OffloadError):
        return exc.code, str(exc)
    # Anything else is a bug on our side: say so without leaking internals.
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
