"""How `offload bench` sends: pre-encoded ModelInfer requests over gRPC, unary or on Triton's stream.

The load tool must not be the bottleneck, so the hot path does no protobuf work: each request is
serialized once, before the run, and sent as bytes (a multicallable without a serializer passes
bytes through); unary answers are not even parsed, since the gRPC status says whether a call
failed. tritonclient's `InferenceServerClient` builds InferInput objects and parses every answer
into NumPy per call; the generated stubs (ours or tritonclient's, the same upb runtime) serialize
and parse every message. Raw bytes over the channel cost less than either.

A sender returns the outcome as a status name: "OK", a gRPC status code's name, STREAM_ERROR for
an error the server reported inside the stream (ModelStreamInfer carries errors in-band as
`error_message`, with no status code), or STREAM_CLOSED for a request left unanswered when the
server ended the stream without an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from offload.oip import grpc_service_pb2 as pb
from offload.oip.limits import channel_options

SERVICE = "/inference.GRPCInferenceService/"
OK = "OK"
STREAM_ERROR = "STREAM_ERROR"
STREAM_CLOSED = "STREAM_CLOSED"
# ModelInferRequest.id and ModelStreamInferResponse.infer_response: field numbers in the OIP proto.
REQUEST_ID_FIELD = 3
STREAM_INFER_RESPONSE_FIELD = 2

Sender = Callable[[bytes], Awaitable[str]]
_StreamCall = grpc.aio.StreamStreamCall[bytes, pb.ModelStreamInferResponse]


def encode_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): tag, varint length, bytes."""
    header = bytearray([(number << 3) | 2])
    length = len(payload)
    while length >= 0x80:
        header.append((length & 0x7F) | 0x80)
        length >>= 7
    header.append(length)
    return bytes(header) + payload


def with_request_id(payload: bytes, request_id: str) -> bytes:
    """The encoded request with its `id` set, without re-encoding it: a protobuf parser takes the
    last value of a field that occurs twice, so an appended id replaces any earlier one."""
    return payload + encode_field(REQUEST_ID_FIELD, request_id.encode())


class Transport(Protocol):
    def sender(self, index: int) -> Sender:
        """The index-th sender: a worker's own (closed loop) or one of a few shared ones (open loop)."""
        ...

    async def close(self) -> None: ...


class UnaryTransport:
    """ModelInfer calls, sender i on channel i mod the channel count."""

    def __init__(self, channels: list[grpc.aio.Channel], timeout: float) -> None:
        self._calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            channel.unary_unary(SERVICE + "ModelInfer") for channel in channels
        ]
        self._timeout = timeout

    def sender(self, index: int) -> Sender:
        call = self._calls[index % len(self._calls)]
        timeout = self._timeout

        async def send(payload: bytes) -> str:
            try:
                await call(payload, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return OK

        return send

    async def close(self) -> None:
        """Nothing of its own to release: the channels belong to the caller."""


class _Stream:
    """One ModelStreamInfer call; requests carry ids and answers find their request by id.

    The stream is opened on first use and again after it ends. A request not answered within the
    timeout counts as DEADLINE_EXCEEDED (the stream itself has no deadline); when the stream fails,
    every request waiting on it gets the stream's status. Writes take turns: grpc.aio breaks the
    stream when a write starts before the previous one finished.
    """

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._open: grpc.aio.StreamStreamMultiCallable[bytes, pb.ModelStreamInferResponse] = channel.stream_stream(
            SERVICE + "ModelStreamInfer", response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        self._timeout = timeout
        self._call: _StreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._ids = itertools.count()
        self._writing = asyncio.Lock()
        self.last_error = ""  # the latest error message the server sent, in the stream or as a status

    async def send(self, payload: bytes) -> str:
        call = self._call
        if call is None:
            call = self._call = self._open()
            self._reader = asyncio.create_task(self._read(call))
        request_id = str(next(self._ids))
        answer = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            async with self._writing:
                await call.write(with_request_id(payload, request_id))
            return await asyncio.wait_for(answer, self._timeout)
        except grpc.aio.AioRpcError as exc:
            self.last_error = str(exc.details())
            return str(exc.code().name)
        except (grpc.aio.UsageError, asyncio.InvalidStateError):
            # Written after the stream ended: the reader has already answered with its status.
            return await answer if answer.done() else grpc.StatusCode.UNAVAILABLE.name
        except TimeoutError:
            return grpc.StatusCode.DEADLINE_EXCEEDED.name
        finally:
            self._pending.pop(request_id, None)

    async def _read(self, call: _StreamCall) -> None:
        status = STREAM_CLOSED
        try:
            async for response in call:
                # An answer without a known id (some servers leave it out of errors) goes to the oldest request.
                answer = self._pending.pop(response.infer_response.id, None)
                if answer is None and self._pending:
                    answer = self._pending.pop(next(iter(self._pending)))
                if response.error_message:
                    self.last_error = response.error_message
                if answer is not None and not answer.done():
                    answer.set_result(STREAM_ERROR if response.error_message else OK)
        except grpc.aio.AioRpcError as exc:
            self.last_error = str(exc.details())
            status = str(exc.code().name)
        finally:
            if self._call is call:
                self._call = None
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_result(status)
            self._pending.clear()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class StreamTransport:
    """ModelStreamInfer (Triton's bidirectional stream): sender i is stream i, on channel i mod the count."""

    def __init__(self, channels: list[grpc.aio.Channel], timeout: float) -> None:
        self._channels = channels
        self._timeout = timeout
        self._streams: dict[int, _Stream] = {}

    def sender(self, index: int) -> Sender:
        return self._stream(index).send

    def last_error(self, index: int) -> str:
        """The latest error message stream `index` got from the server."""
        return self._stream(index).last_error

    def _stream(self, index: int) -> _Stream:
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = _Stream(self._channels[index % len(self._channels)], self._timeout)
        return stream

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()


@dataclass(frozen=True)
class Connection:
    """Where and how to send: what a client process needs to make its own transport."""

    target: str
    channels: int = 1
    streaming: bool = False
    timeout: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024


@contextlib.asynccontextmanager
async def connected(connection: Connection) -> AsyncIterator[Transport]:
    """A transport over `connection.channels` channels, each on its own connection (gRPC shares one
    connection between channels with the same arguments unless each has a subchannel pool of its own)."""
    options = [*channel_options(connection.max_message_bytes), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(connection.target, options=options) for _ in range(connection.channels)]
    transport: Transport = (StreamTransport if connection.streaming else UnaryTransport)(channels, connection.timeout)
    try:
        yield transport
    finally:
        await transport.close()
        for channel in channels:
            await channel.close()
