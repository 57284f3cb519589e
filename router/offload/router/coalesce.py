"""Coalescing: the unsure rows of concurrent requests bound for the same cloud model travel in one cloud call.

Over a device's slow link each round trip costs the link's latency, so rows that are ready at about
the same time go together: a call carries its members' rows one after the other, and each member
gets exactly its own rows of the answer back (a view of them).

Which rows may share a call (a batch's key): those of the same edge model (the same object: a model
swapped in since is another), with the same parameters forwarded to the cloud (by type and value: a
bool and an int travel as different fields) and the same inputs (names in order, datatypes, row shapes).

When a batch goes:
- At once when no call of its key is in flight (at the end of the event loop's turn, so that rows
  ready in the same turn go together): a request alone waits for nobody.
- While one is, the batch gathers the rows that come meanwhile and goes when the calls in flight
  have ended, or `window_seconds` (2 ms by default) after its first rows arrived, whichever comes
  first; with `window_seconds` 0 it waits for the calls in flight to end, however long they take.
  Over a slow link that wait is a whole round trip per batch, and calls go one after the other
  (measured in benchmarks/RESULTS.md, Coalescing: at a 20 ms link, waiting for the call in flight
  served 0.63x the requests per second of no coalescing); a short window lets calls overlap.
- Either way: at once when it holds `max_rows` rows; rows that would take it past `max_rows` or
  `max_bytes` of input go in the next batch (a request that is larger alone goes alone, as it would
  without coalescing). And never later than a member can afford: a member whose deadline leaves less
  than a call's expected time after the batch's send time sends the batch now, or when its time to
  send comes (a call's expected time: the average of the recent calls; before any, half the time
  the member has left).

Each member keeps its own deadline, cache entries and fallback: it stops waiting when its deadline
passes (a DEADLINE_EXCEEDED CloudFailure, which the router answers from the edge) while the call goes
on for the others, whose latest deadline is the call's; once no member waits, the call is cancelled.
A failed call fails every member with a CloudFailure of its own, which each answers per its own
options (an edge answer, or the error with offload_require_cloud).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from offload.oip.datatypes import payload_bytes
from offload.oip.tensors import Tensor
from offload.oip.types import ParameterValue
from offload.router.models import Arrays, RoutedModel
from offload.router.stats import CoalesceStats
from offload.router.upstream import CloudFailure

log = logging.getLogger(__name__)

# One call of these rows to the cloud: their outputs (every output of the edge model) and the cloud model's version.
Send = Callable[
    [RoutedModel, str, list[Tensor], dict[str, ParameterValue], float | None], Awaitable[tuple[Arrays, str]]
]
# A call's expected time is the average of the recent calls': each new call's weight in it.
SMOOTHING = 0.2

_Key = tuple[int, tuple[tuple[str, str, ParameterValue], ...], tuple[tuple[str, str, tuple[int, ...]], ...]]


@dataclass(frozen=True, slots=True)
class CoalescePolicy:
    """How concurrent requests' rows share cloud calls; `max_rows` 0 turns coalescing off."""

    window_seconds: float = 0.002
    max_rows: int = 256
    max_bytes: int = 4 * 1024 * 1024

    @property
    def enabled(self) -> bool:
        return self.max_rows > 0


@dataclass(eq=False, slots=True)
class _Member:
    """One request's rows in a batch, and where its part of the answer goes."""

    tensors: list[Tensor]
    rows: int
    bytes: int
    deadline: float | None
    request_id: str
    answer: asyncio.Future[tuple[Arrays, str]]
    batch: _Batch | None = None
    expiry: asyncio.TimerHandle | None = None


@dataclass(eq=False, slots=True)
class _Batch:
    key: _Key
    model: RoutedModel
    parameters: dict[str, ParameterValue]
    members: list[_Member] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    send_at: float | None = None  # when its send is scheduled; None: when the call in flight ends
    timer: asyncio.Handle | None = None
    sent: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> list[_Member]:
        """The members still waiting for their answer (the others' deadlines passed, or their callers left)."""
        return [member for member in self.members if not member.answer.done()]


@dataclass(slots=True)
class _Counts:
    calls: int = 0
    coalesced_calls: int = 0
    coalesced_requests: int = 0
    coalesced_rows: int = 0


def _key(model: RoutedModel, tensors: list[Tensor], parameters: dict[str, ParameterValue]) -> _Key:
    forwarded = tuple(sorted((name, type(value).__name__, value) for name, value in parameters.items()))
    inputs = tuple((tensor.name, tensor.datatype, tuple(tensor.data.shape[1:])) for tensor in tensors)
    return id(model), forwarded, inputs


class Coalescer:
    """Puts concurrent requests' rows for the same cloud model into shared calls made with `send`."""

    def __init__(self, send: Send, policy: CoalescePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._send_rows = send
        self.policy = policy
        self._clock = clock
        self._pending: dict[_Key, _Batch] = {}
        self._in_flight: dict[_Key, int] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._call_seconds: float | None = None
        self._counts = _Counts()

    def stats(self) -> CoalesceStats:
        counts = self._counts
        held = sum(len(batch.members) for batch in self._pending.values())
        return CoalesceStats(
            counts.calls, counts.coalesced_calls, counts.coalesced_requests, counts.coalesced_rows, held
        )

    async def call(
        self,
        model: RoutedModel,
        request_id: str,
        tensors: list[Tensor],
        parameters: dict[str, ParameterValue],
        deadline: float | None,
    ) -> tuple[Arrays, str]:
        """These rows' outputs and the cloud model's version, from a call they may share (`Send`'s contract)."""
        rows = int(tensors[0].data.shape[0]) if tensors else 0
        size = sum(payload_bytes(tensor.data) for tensor in tensors)
        if rows == 0 or rows > self.policy.max_rows or size > self.policy.max_bytes:
            self._counts.calls += 1
            return await self._send_rows(model, request_id, tensors, parameters, deadline)
        loop = asyncio.get_running_loop()
        member = _Member(tensors, rows, size, deadline, request_id, loop.create_future())
        self._join(_key(model, tensors, parameters), model, parameters, member)
        if deadline is not None:
            member.expiry = loop.call_later(max(0.0, deadline - self._clock()), self._expire, member)
        try:
            return await member.answer
        except asyncio.CancelledError:
            self._leave(member)  # the caller went away (awaiting the future cancelled it)
            raise
        finally:
            if member.expiry is not None:
                member.expiry.cancel()

    async def close(self) -> None:
        """Fail the rows still waiting to be sent, and cancel the calls in flight."""
        for batch in list(self._pending.values()):
            self._drop(batch)
            for member in batch.waiting:
                member.answer.set_exception(CloudFailure("the router is closing; answered on the edge"))
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    def _join(self, key: _Key, model: RoutedModel, parameters: dict[str, ParameterValue], member: _Member) -> None:
        batch = self._pending.get(key)
        if batch is not None and (
            batch.rows + member.rows > self.policy.max_rows or batch.bytes + member.bytes > self.policy.max_bytes
        ):
            self._send(batch)  # full: it goes now, and these rows start the next one
            batch = None
        now = self._clock()
        if batch is None:
            batch = self._pending[key] = _Batch(key, model, parameters)
            if not self._in_flight.get(key):
                self._schedule(batch, now)  # at the end of this turn of the event loop
            elif self.policy.window_seconds > 0:
                self._schedule(batch, now + self.policy.window_seconds)
        batch.members.append(member)
        member.batch = batch
        batch.rows += member.rows
        batch.bytes += member.bytes
        if batch.rows >= self.policy.max_rows:
            self._send(batch)
            return
        latest = self._latest_send(member, now)
        if latest is not None:
            if latest <= now:
                self._send(batch)
            else:
                self._schedule(batch, latest)

    def _latest_send(self, member: _Member, now: float) -> float | None:
        """The latest time the member's rows can leave and still be answered by its deadline (None: no deadline)."""
        if member.deadline is None:
            return None
        if self._call_seconds is None:
            return now + (member.deadline - now) / 2
        return member.deadline - self._call_seconds

    def _schedule(self, batch: _Batch, when: float) -> None:
        """Send `batch` at `when` (monotonic seconds), unless it is already due to go earlier."""
        if batch.send_at is not None and batch.send_at <= when:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        batch.send_at = when
        loop = asyncio.get_running_loop()
        delay = when - self._clock()
        if delay <= 0:
            batch.timer = loop.call_soon(self._send, batch)
        else:
            batch.timer = loop.call_later(delay, self._send, batch)

    def _drop(self, batch: _Batch) -> None:
        """Take a batch out of the pending ones (it is being sent, or it has no member left)."""
        batch.sent = True
        if batch.timer is not None:
            batch.timer.cancel()
        if self._pending.get(batch.key) is batch:
            del self._pending[batch.key]

    def _send(self, batch: _Batch) -> None:
        if batch.sent:
            return
        self._drop(batch)
        if not batch.waiting:
            return
        self._in_flight[batch.key] = self._in_flight.get(batch.key, 0) + 1
        batch.task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(batch.task)
        batch.task.add_done_callback(self._running.discard)

    async def _run(self, batch: _Batch) -> None:
        members = batch.members  # all of them, those gone included: the rows were sent, and the offsets count them
        waiting = batch.waiting
        try:
            outputs, version = await self._call(batch, waiting)
        except asyncio.CancelledError:
            for member in batch.waiting:  # the router is closing (once every member has left, none is waiting)
                member.answer.set_exception(CloudFailure("the router is closing; answered on the edge"))
            raise
        except CloudFailure as failure:
            alone = len(members) == 1  # a call of one request's rows fails as it would without coalescing
            for member in batch.waiting:
                # Else a fresh exception per member: one instance raised in many tasks would share a traceback.
                member.answer.set_exception(failure if alone else CloudFailure(str(failure), failure.status))
        except Exception as exc:  # not the cloud's failure (a bug): each member answers from the edge, and it is logged
            log.exception("a coalesced cloud call failed unexpectedly")
            for member in batch.waiting:
                member.answer.set_exception(CloudFailure(f"the cloud call failed: {exc!r}"))
        else:
            start = 0
            for member in members:
                if not member.answer.done():
                    part = outputs if len(members) == 1 else _rows(outputs, start, start + member.rows)
                    member.answer.set_result((part, version))
                start += member.rows
        finally:
            self._call_ended(batch.key)

    async def _call(self, batch: _Batch, waiting: list[_Member]) -> tuple[Arrays, str]:
        members = batch.members
        self._counts.calls += 1
        if len(members) == 1:
            tensors, request_id = members[0].tensors, members[0].request_id
        else:
            self._counts.coalesced_calls += 1
            self._counts.coalesced_requests += len(members)
            self._counts.coalesced_rows += batch.rows
            tensors = [
                Tensor(first.name, first.datatype, np.concatenate([member.tensors[index].data for member in members]))
                for index, first in enumerate(members[0].tensors)
            ]
            # The call is no one request's: it gets an id of its own, which the log ties to theirs.
            request_id = uuid.uuid4().hex
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "cloud call %s carries %d rows of %d requests: %s",
                    request_id,
                    batch.rows,
                    len(members),
                    ", ".join(member.request_id or "(no id)" for member in members),
                )
        deadlines = [member.deadline for member in waiting]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        started = self._clock()
        result = await self._send_rows(batch.model, request_id, tensors, batch.parameters, deadline)
        took = self._clock() - started
        self._call_seconds = (
            took if self._call_seconds is None else self._call_seconds + SMOOTHING * (took - self._call_seconds)
        )
        return result

    def _call_ended(self, key: _Key) -> None:
        left = self._in_flight[key] - 1
        if left:
            self._in_flight[key] = left
            return
        del self._in_flight[key]
        held = self._pending.get(key)
        if held is not None:
            self._send(held)  # the rows that waited for the calls in flight go now

    def _expire(self, member: _Member) -> None:
        """The member's deadline passed before its answer came: it stops waiting (the call goes on for others)."""
        member.expiry = None
        if not member.answer.done():
            member.answer.set_exception(
                CloudFailure(
                    "the cloud call carrying this request's rows did not answer by its deadline",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            )
        self._leave(member)

    def _leave(self, member: _Member) -> None:
        """A member stopped waiting: out of its batch if not yet sent; the call is cancelled once no one waits."""
        batch = member.batch
        if batch is None:
            return
        if not batch.sent:
            batch.members.remove(member)
            batch.rows -= member.rows
            batch.bytes -= member.bytes
            if not batch.members:
                self._drop(batch)
        elif batch.task is not None and not batch.waiting:
            batch.task.cancel()


def _rows(outputs: Arrays, start: int, stop: int) -> Arrays:
    return {name: array[start:stop] for name, array in outputs.items()}
