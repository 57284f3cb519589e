"""Limits and defaults of the wire, in one place: servers, clients and settings all read them here."""

from __future__ import annotations

from dataclasses import dataclass

# Set explicitly on every server and channel rather than relying on gRPC's 4 MiB
# default; larger messages get RESOURCE_EXHAUSTED from gRPC itself.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The most elements one tensor of a request, or of a peer's answer, may declare.
MAX_ELEMENTS = 1 << 26
# Decoding or encoding that touches more elements one by one than this runs in a worker thread,
# so one large message cannot hold the event loop (every other call on a server or client) for
# its duration. Below it the work is too small to matter: 4096 elements take about 0.25 ms typed,
# 1.5 ms as raw BYTES, against about 0.1 ms for the hand-off itself.
INLINE_CODEC_ELEMENTS = 1 << 12
# Requests of one ModelStreamInfer stream a server works on at once; past it the stream is not read until
# the oldest is answered (gRPC's flow control then holds the client back). About the cloud's own queue.
MAX_STREAM_IN_FLIGHT = 64


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Upper bound on the elements of one tensor a request may declare.
    max_elements: int = MAX_ELEMENTS
    # Requests of one stream in flight at once (see MAX_STREAM_IN_FLIGHT).
    max_stream_in_flight: int = MAX_STREAM_IN_FLIGHT
    # RPCs served at once (None: no limit). gRPC answers more with RESOURCE_EXHAUSTED before it
    # reads their bodies, so this times max_message_bytes bounds the request bodies a server holds.
    max_concurrent_rpcs: int | None = None


def server_options(limits: ServerLimits) -> list[tuple[str, int]]:
    """gRPC options for a server with these limits.

    With a cap on concurrent RPCs, gRPC's bandwidth-delay probing is off: it grows every stream's
    flow-control window to megabytes, so under a burst the bodies of RPCs past the cap, waiting to
    be refused, were read in full anyway. Without it such a stream holds only the initial window
    (64 KiB), while an RPC being served still gets a window for its whole message.
    """
    options = channel_options(limits.max_message_bytes)
    if limits.max_concurrent_rpcs is not None:
        options.append(("grpc.http2.bdp_probe", 0))
    return options


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options that hold a server or a channel to `max_message_bytes` both ways."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
