"""Dynamic batching for one model: its queue of admitted requests and the batches taken from it.

Requests wait in arrival order. A batch is taken from the front: the rows of consecutive
requests, up to the model's `max_batch_rows`; a request larger than that is handed out in
pieces of at most that many rows, over several batches, and its answer joined in order.
Only requests whose inputs can be joined share a batch (the same datatypes and trailing
dimensions, which models with variable dimensions can differ in): the first that cannot
be joined ends the batch and starts the next one.

A batch is due at once when a request found an instance of the model idle and nothing
queued (no latency is added at low load), when the queue holds `max_batch_rows` rows, or
when its oldest request has waited `max_queue_delay_us`; what queues while the instances
are busy forms the next batch. With batching off, each batch is one piece of one request.

Not thread-safe on its own: the scheduler calls it under its lock.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.cloud.config import ModelOptions
from offload.cloud.runtime import Arrays

# What must agree for requests to share a batch: per input, its dtype and trailing dimensions.
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


def signature_of(arrays: Mapping[str, npt.NDArray[Any]]) -> Signature:
    return tuple((name, array.dtype.str, tuple(array.shape[1:])) for name, array in sorted(arrays.items()))


@dataclass(eq=False, slots=True)
class Pending:
    """One admitted request, from admission until its answer (or failure) is set."""

    arrays: Mapping[str, npt.NDArray[Any]]
    rows: int
    nbytes: int
    deadline: float | None  # on the scheduler's clock; None: no deadline
    signature: Signature
    future: asyncio.Future[Arrays]  # the caller's, on its event loop
    arrived: float = field(default_factory=time.monotonic)
    # Its caller's context (made on the event loop): the model call's span joins its trace, its log lines carry its id.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    immediate: bool = False  # found an instance idle and nothing queued: its batch is due at once
    taken: int = 0  # rows handed to batches so far
    running: int = 0  # its pieces in batches that are running now
    done_rows: int = 0  # rows whose batch has ended (answered or failed)
    parts: list[tuple[int, Arrays]] = field(default_factory=list)  # (first row, outputs) of answered pieces
    error: BaseException | None = None
    gone: bool = False  # its caller left (cancelled, or its deadline passed)
    finished: bool = False

    def answer(self) -> Arrays:
        """The outputs of all its pieces, joined in row order."""
        if len(self.parts) == 1:
            return self.parts[0][1]
        ordered = [outputs for _, outputs in sorted(self.parts, key=lambda part: part[0])]
        return {name: np.concatenate([outputs[name] for outputs in ordered]) for name in ordered[0]}


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows start:stop of one request, in one batch."""

    request: Pending
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def inputs(self) -> Mapping[str, npt.NDArray[Any]]:
        if self.start == 0 and self.stop == self.request.rows:
            return self.request.arrays
        return {name: array[self.start : self.stop] for name, array in self.request.arrays.items()}


def split(outputs: Arrays, pieces: list[Piece]) -> list[Arrays]:
    """A batch's outputs cut back into its pieces', in order (views, no copies)."""
    answers: list[Arrays] = []
    offset = 0
    for piece in pieces:
        answers.append({name: array[offset : offset + piece.rows] for name, array in outputs.items()})
        offset += piece.rows
    return answers


class ModelQueue:
    """The requests waiting for one model and the batches taken from them."""

    def __init__(self, options: ModelOptions, instances: int) -> None:
        self.options = options
        self.instances = instances
        self.busy = 0  # instances running a batch
        self.rows_waiting = 0  # rows not yet handed to a batch
        self._waiting: deque[Pending] = deque()
        self._delay = options.max_queue_delay_us / 1e6

    def __len__(self) -> int:
        return len(self._waiting)

    def push(self, request: Pending) -> None:
        request.immediate = not self._waiting and self.busy < self.instances
        self._waiting.append(request)
        self.rows_waiting += request.rows

    def discard(self, request: Pending) -> None:
        """Hand no more of `request`'s rows to batches (its caller left, or it failed)."""
        if request in self._waiting:
            self._waiting.remove(request)
            self.rows_waiting -= request.rows - request.taken

    def drain(self) -> list[Pending]:
        """Every waiting request, removed (the scheduler is closing)."""
        waiting = list(self._waiting)
        self._waiting.clear()
        self.rows_waiting = 0
        return waiting

    def due_in(self, now: float) -> float | None:
        """Seconds until a batch is due (0: now), on time.monotonic(); None when nothing waits."""
        if not self._waiting:
            return None
        head = self._waiting[0]
        if head.immediate or not self.options.batching or self.rows_waiting >= self.options.max_batch_rows:
            return 0.0
        return max(0.0, head.arrived + self._delay - now)

    def take(self, now: float) -> tuple[list[Piece], list[Pending]]:
        """The next batch's pieces, and the requests found with their deadline passed (`now` on the
        scheduler's clock), taken out of the queue unrun."""
        pieces: list[Piece] = []
        expired: list[Pending] = []
        limit = self.options.max_batch_rows
        rows = 0
        while self._waiting and rows < limit:
            request = self._waiting[0]
            if request.deadline is not None and now >= request.deadline:
                self.discard(request)
                expired.append(request)
                continue
            if pieces and (request.signature != pieces[0].request.signature or request.rows == 0):
                break
            count = min(request.rows - request.taken, limit - rows)
            pieces.append(Piece(request, request.taken, request.taken + count))
            request.taken += count
            request.running += 1
            rows += count
            self.rows_waiting -= count
            if request.taken == request.rows:
                self._waiting.popleft()
            if not self.options.batching or request.rows == 0:
                break
        return pieces, expired
