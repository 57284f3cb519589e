"""Request ids: the id a request goes by in headers and log lines, and the one of the call being served.

The OIP request `id` travels in the request body unchanged; `x-request-id` carries it (or
its digest) as a header for proxies and logs on the way. While an OIP server handles a call,
`current_request_id` holds the id it goes by, so that every log line about the call carries it
(offload.oip.logs) without any code passing it along.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextvars import ContextVar

# The request id also travels as this header, for proxies and logs on the way to the cloud.
REQUEST_ID_HEADER = "x-request-id"
# The longest request id sent in the header as it is (a UUID takes 36, a W3C trace id 32).
MAX_HEADER_REQUEST_ID = 128


def request_id_header(request_id: str) -> str:
    """The x-request-id value for a request id: the id itself where gRPC can carry it, else a digest.

    OIP puts no limit on a request's `id`, and apps send what they like (any length, any
    characters), so refusing some ids would break calls that are valid OIP. The cloud
    request's body carries the id unchanged (a message field has no such limit, and the
    cloud echoes it back). A header value, though, must be printable ASCII, and gRPC
    refuses a call whose headers exceed the peer's metadata limit (8 KiB by default): a
    header copied blindly failed the cloud call and degraded the answer. So the header
    carries the id when it is short printable ASCII without surrounding blanks, and
    otherwise "sha256:" and the first 32 hex digits of the SHA-256 of its UTF-8 bytes,
    which is legal, stable across retries and hedges, and computable from the id by
    whoever reads the logs.
    """
    if (
        len(request_id) <= MAX_HEADER_REQUEST_ID
        and request_id.isascii()
        and request_id.isprintable()
        and request_id == request_id.strip()
    ):
        return request_id
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest[:32]}"


# The id of the request being served, in its header form; None outside a call, or for a call without one.
current_request_id: ContextVar[str | None] = ContextVar("offload_request_id", default=None)


def request_id_of(message_id: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The id a call goes by: its OIP `id` if it has one, else its x-request-id header, in header form.

    The header form is legal and bounded whatever was sent (see request_id_header), so a
    100,000-character id, or one with a newline in it, cannot bloat or forge a log line.
    """
    if message_id:
        return request_id_header(message_id)
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            text = value if isinstance(value, str) else value.decode("ascii", "replace")
            return request_id_header(text) if text else None
    return None
