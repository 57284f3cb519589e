"""Many concurrent inference calls over one ModelStreamInfer stream: OipClient's stream mode.

One long-lived bidirectional stream carries every call: a writer task sends the
requests one at a time (gRPC allows one write at a time), a reader task hands each
answer to the call it belongs to. The stream opens on the first call, and again on
the first call after it broke.

Answers are matched to calls by the request `id`, which every OIP server echoes. The
caller's id is sent unchanged; a call without one is given a fresh one (as the router
gives its cloud calls), and its answer gets the empty id back. Ids need not be unique:
calls that share one (a hedge and the attempt it hedges) are matched in the order they
were sent, and an answer without an id (Triton clears it in errors raised while a
model runs) goes to the oldest call. Both rules are exact for a server that answers
a stream's requests in order, as Triton does for every model that is not decoupled
and as our servers do.

Deadlines are the client's own, since a stream's messages carry none: a call out of
time fails DEADLINE_EXCEEDED here, and a call whose caller is cancelled stops waiting.
Either stays on the stream until its answer comes, which is then dropped, so that a
late answer is never taken for another call's. A stream that breaks fails every call
on it with UNAVAILABLE, which the router retries as it retries a unary UNAVAILABLE,
except a refusal of the caller (UNAUTHENTICATED, PERMISSION_DENIED), passed on as it
is. A server without ModelStreamInfer (UNIMPLEMENTED) is noted once: its calls fail
UNAVAILABLE and `usable` turns False, and the client goes on with unary calls.
A close with a grace period (a replica retired from a pool) half-closes the stream
first, so the calls on it are answered before it ends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip.errors import InvalidArgument, UpstreamError, printable, stream_error, upstream_error
from offload.oip.messages import parameters_from_pb

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]
# A failed stream's statuses that its calls get as they are: they refuse the caller, and a new stream
# would be refused alike. Any other failure is the stream's (a network, a server going away): UNAVAILABLE.
_PASSED_ON = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@dataclass(eq=False, slots=True)
class _Call:
    """A request on the stream and the future its caller waits on (done: answered, failed or given up)."""

    message: pb.ModelInferRequest
    answer: asyncio.Future[pb.ModelInferResponse] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class InferStream:
    """The stream mode of one OipClient: `infer` sends a request on the stream and waits for its answer."""

    def __init__(
        self,
        stub: pb_grpc.GRPCInferenceServiceAsyncStub,
        target: str,
        max_message_bytes: int,
        metadata: Callable[[], Metadata],
    ) -> None:
        """`metadata`: the headers of a new stream (its bearer token), asked for each time one opens."""
        self._stub = stub
        self._target = target
        self._max_message_bytes = max_message_bytes
        self._metadata = metadata
        self._session: _Session | None = None
        # False once the server said it has no ModelStreamInfer: the client then calls ModelInfer.
        self.usable = True

    async def infer(self, message: pb.ModelInferRequest, timeout: float | None) -> pb.ModelInferResponse:
        """The answer to `message` (sent as it is, but given an id if it has none), or UpstreamError."""
        size = message.ByteSize()
        if size > self._max_message_bytes:
            # gRPC would fail the whole stream, every call on it, for one message over its limit.
            raise UpstreamError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._target}: RESOURCE_EXHAUSTED: Sent message larger than max ({size} vs. "
                f"{self._max_message_bytes})",
            )
        given_id = message.id
        if not given_id:
            message.id = uuid.uuid4().hex
        session = self._session
        if session is None or session.ended:
            session = self._session = _Session(self._stub, self._target, self._metadata(), self._unimplemented)
        call = _Call(message)
        session.send(call)
        try:
            answer = await asyncio.wait_for(call.answer, timeout)
        except TimeoutError:
            # wait_for has cancelled the future: the session drops the answer when it comes.
            raise UpstreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{self._target}: DEADLINE_EXCEEDED: Deadline Exceeded"
            ) from None
        answer.id = given_id
        return answer

    def _unimplemented(self) -> None:
        if self.usable:
            log.warning(
                "%s does not implement ModelStreamInfer (UNIMPLEMENTED); sending unary ModelInfer calls instead",
                self._target,
            )
        self.usable = False

    def finish(self) -> None:
        """Send nothing more on the stream: the server answers what it was sent, then ends it
        (a close with a grace period, which lets the calls in flight finish)."""
        if self._session is not None:
            self._session.finish()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            # Dropped too: a call object kept alive keeps its connection open after the channel closes.
            await session.close()


class _Session:
    """One ModelStreamInfer call and the calls on it."""

    def __init__(
        self,
        stub: pb_grpc.GRPCInferenceServiceAsyncStub,
        target: str,
        metadata: Metadata,
        on_unimplemented: Callable[[], None],
    ) -> None:
        self._target = target
        self._on_unimplemented = on_unimplemented
        self._rpc = stub.ModelStreamInfer(metadata=metadata)
        # The calls to send, in order; None: half-close the stream there (`finish`).
        self._outbox: asyncio.Queue[_Call | None] = asyncio.Queue()
        # Calls sent and not answered yet: all of them in the order sent, and each id's in that order.
        self._sent: dict[int, _Call] = {}
        self._sent_by_id: dict[str, collections.deque[int]] = {}
        self._sequence = 0
        self.ended = False
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    def send(self, call: _Call) -> None:
        self._outbox.put_nowait(call)

    def finish(self) -> None:
        """Half-close the stream once the calls queued are sent; a call sent after it fails as the stream ends."""
        self._outbox.put_nowait(None)

    async def _write(self) -> None:
        try:
            while True:
                call = await self._outbox.get()
                if call is None:
                    await self._rpc.done_writing()
                    return
                if call.answer.done():
                    continue  # its caller gave up before it went out: never sent
                self._sequence += 1
                self._sent[self._sequence] = call
                self._sent_by_id.setdefault(call.message.id, collections.deque()).append(self._sequence)
                await self._rpc.write(call.message)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A write fails once the call has ended, and the reader learns how it ended (its status):
            # that is what the calls get. Should the call still be running, cancelling it ends the reader.
            if not self._rpc.done():
                self._rpc.cancel()

    async def _read(self) -> None:
        try:
            while isinstance(reply := await self._rpc.read(), pb.ModelStreamInferResponse):  # else EOF
                problem = self._deliver(reply)
                if problem is not None:
                    self._end(self._broken(problem))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._end(self._failure(exc))
            return
        unanswered = self._unanswered()
        self._end(self._broken(f"the server ended it with {len(unanswered)} request(s) unanswered"), unanswered)

    def _deliver(self, reply: pb.ModelStreamInferResponse) -> str | None:
        """Hand an answer to its call; if it belongs to none, why the stream cannot be trusted."""
        answer = reply.infer_response
        call = self._take(answer.id)
        if call is None:
            return f"it answered a request it was not sent (id {printable(answer.id)!r})"
        if call.answer.done():
            return None  # its caller gave up on it (deadline, cancellation)
        if not reply.error_message:
            call.answer.set_result(answer)
            return None
        try:
            parameters = parameters_from_pb(answer.parameters, f"{self._target} stream answer")
        except InvalidArgument:
            parameters = {}  # a parameter without a value: the message alone decides the status
        call.answer.set_exception(stream_error(reply.error_message, parameters, self._target))
        return None

    def _take(self, answer_id: str) -> _Call | None:
        """The call an answer with this id belongs to, no longer in flight; None if there is none."""
        if not answer_id and self._sent:
            answer_id = next(iter(self._sent.values())).message.id
        sequences = self._sent_by_id.get(answer_id)
        if not sequences:
            return None
        sequence = sequences.popleft()
        if not sequences:
            del self._sent_by_id[answer_id]
        return self._sent.pop(sequence)

    def _failure(self, exc: Exception) -> UpstreamError:
        """What the calls in flight get when reading the stream failed with `exc`."""
        if isinstance(exc, grpc.aio.AioRpcError):
            code = exc.code()
            if code in _PASSED_ON:
                return upstream_error(exc, self._target)
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._on_unimplemented()
            return self._broken(f"{code.name}: {printable(exc.details() or '')}")
        return self._broken(f"{type(exc).__name__}: {printable(str(exc))}")

    def _broken(self, why: str) -> UpstreamError:
        return UpstreamError(
            grpc.StatusCode.UNAVAILABLE, f"{self._target}: UNAVAILABLE: the inference stream broke: {why}"
        )

    def _unanswered(self) -> list[_Call]:
        """The calls sent or queued and not answered yet, taken off the stream."""
        waiting = list(self._sent.values())
        self._sent.clear()
        self._sent_by_id.clear()
        while not self._outbox.empty():
            if (queued := self._outbox.get_nowait()) is not None:
                waiting.append(queued)
        return waiting

    def _end(self, failure: UpstreamError, waiting: list[_Call] | None = None) -> None:
        """Fail every call still waiting (`waiting`, or those on the stream) with `failure` and end the
        stream: the next call opens a new one."""
        if self.ended:
            return
        self.ended = True
        if waiting is None:
            waiting = self._unanswered()
        for call in waiting:
            if not call.answer.done():
                # A fresh exception per call: one instance raised in many tasks would share a traceback.
                call.answer.set_exception(UpstreamError(failure.status, str(failure), failure.pushback_ms))
        self._rpc.cancel()
        self._writer.cancel()

    async def close(self) -> None:
        self._end(self._broken("the client closed it"))
        self._reader.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)
