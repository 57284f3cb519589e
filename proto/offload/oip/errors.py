"""Errors with their gRPC status: the one place where failures meet the wire.

Code raises these anywhere (data planes, codec, runtimes); the servers turn
them into a status with `status_for` and nothing else. Messages are written
for the caller: they name the field, what was expected and what was given.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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


def one_line(exc: BaseException) -> str:
    """An exception as one line, its type first: for messages that wrap a library's error."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    """The status and message a server answers with for an exception (the message clipped to fit a trailer)."""
    if isinstance(exc, UpstreamError):
        return exc.status, clip_message(str(exc))
    if isinstance(exc, OffloadError):
        return exc.code, clip_message(str(exc))
    # Anything else is a bug on our side: say so without leaking internals.
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def upstream_error(exc: grpc.aio.AioRpcError, target: str) -> UpstreamError:
    """A peer's failed call as UpstreamError: its status, its message (escaped) and its retry pushback."""
    pushback = None
    for key, value in exc.trailing_metadata() or ():
        if key == PUSHBACK_KEY:
            # A negative or garbled value is kept as "do not retry" (gRPC A6), not dropped.
            pushback = parse_pushback(value)
    # The peer's message is its own free text: escaped, so that it cannot break a log line of ours.
    return UpstreamError(exc.code(), f"{target}: {exc.code().name}: {printable(exc.details() or '')}", pushback)


# On ModelStreamInfer a failed request is answered with a message, not a status: the stream goes on
# (Triton's ModelStreamInferResponse.error_message). Our servers send the status and its trailers
# beside the message, as parameters of the answer named as gRPC names them on the wire, so that our
# client sees the same status on the stream as on a unary call (UNAVAILABLE while a server drains,
# RESOURCE_EXHAUSTED with its pushback); other clients (tritonclient) read the message and ignore them.
STATUS_PARAMETER = "grpc-status"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# Triton puts no status in its stream error messages. The one that matters to a caller is the refusal of a
# server going down, which is UNAVAILABLE on a unary call and worth a retry elsewhere; Triton's gRPC server
# says "GRPC server is shutting down and has stopped accepting new requests." (as ours says "shutting down").
_SHUTTING_DOWN = "shutting down"


def status_parameters(code: grpc.StatusCode, trailers: Iterable[tuple[str, str]]) -> dict[str, int | str]:
    """The parameters that carry a status and its trailers beside a stream answer's error_message."""
    return {STATUS_PARAMETER: code.value[0], **dict(trailers)}


def stream_error(message: str, parameters: Mapping[str, object], target: str) -> UpstreamError:
    """The UpstreamError for a stream answer whose error_message is `message`.

    The status is the one our servers send beside the message (`status_parameters`). A server that
    sends none (Triton) gets UNAVAILABLE when the message says it is shutting down, and INTERNAL
    otherwise: the message alone does not say whose fault the failure is, and INTERNAL neither
    blames the caller's request nor asks for a retry (the router counts it against the cloud).
    """
    sent = parameters.get(STATUS_PARAMETER)
    code = _CODES.get(sent) if isinstance(sent, int) and not isinstance(sent, bool) else None
    if code is None or code == grpc.StatusCode.OK:
        code = grpc.StatusCode.UNAVAILABLE if _SHUTTING_DOWN in message else grpc.StatusCode.INTERNAL
    pushback = parameters.get(PUSHBACK_KEY)
    return UpstreamError(
        code,
        f"{target}: {code.name}: {printable(message)}",
        None if pushback is None else parse_pushback(str(pushback)),
    )


# gRPC sends a status message percent-encoded in a trailer, and a client refuses trailers over
# its metadata limit (8 KiB soft, 16 KiB hard by default): the caller then gets RESOURCE_EXHAUSTED
# "received metadata size exceeds ..." instead of our status. Messages quote what the caller sent
# (a model name of any length, say), so they are clipped to this many bytes as sent.
MAX_STATUS_MESSAGE_BYTES = 4096


def clip_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message` cut so that, percent-encoded as gRPC sends it, it takes at most `limit` bytes.

    The middle goes: a message starts with what it is about and ends with what to do, and
    what grows without bound is the caller's string quoted in between.
    """
    # Each character takes at most 4 UTF-8 bytes, each at most 3 bytes percent-encoded.
    if len(message) * 12 <= limit:
        return message
    # Measured from both ends and no further than needed: the message may be as large as a request.
    half = (limit - 64) // 2  # 64: room for the note on what was cut
    head = _fitting(message, half)
    tail = _fitting(reversed(message), half)
    if head + tail >= len(message):
        return message
    return f"{message[:head]}...[{len(message) - head - tail} characters not shown]...{message[-tail:]}"


def _fitting(chars: Iterable[str], budget: int) -> int:
    """How many of the leading characters fit in `budget` bytes as gRPC sends a status message
    (percent-encoded: every byte outside ' '..'~', and '%', takes 3)."""
    used = 0
    count = 0
    for char in chars:
        used += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "surrogatepass"))
        if used > budget:
            break
        count += 1
    return count


def printable(text: str) -> str:
    """`text` with every non-printable character escaped as repr() writes it (\\n, \\x00, \\u2028).

    For a peer's free text (another server's status message) on its way into our own
    messages and log lines, where a raw newline would let the peer forge a log line.
    Our messages quote the caller's strings with !r, which escapes the same way.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
