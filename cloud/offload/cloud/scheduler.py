"""Admission control and the threads that run the cloud's model calls, in dynamic batches.

Admission counts rows and bytes, not calls: requests queued or running may hold up to
`max_rows` rows and `max_bytes` bytes of inputs together (a larger request is admitted
only when nothing else is, and runs alone, in pieces). Past either, and for a request that
cannot start before its deadline (the rows queued ahead of it for its model, times a
running estimate of what a row costs, over the model's instances), the answer is an
immediate RESOURCE_EXHAUSTED with a retry pushback, never a longer queue or a wait that
ends in DEADLINE_EXCEEDED.

Each model has `instances` threads; each takes a batch from the model's queue
(`offload.cloud.batching`), runs it as one model call and splits the outputs back to the
requests. A batch that fails is rerun one request at a time, so a request that breaks
the model fails alone and the others are answered. What a request holds is released when
its last piece leaves the model, not when its caller leaves: a caller that gave up cannot
make room for more work while its rows still run. A request whose caller has gone, or
whose deadline passed while it waited, is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from offload.cloud.batching import ModelQueue, Pending, Piece, signature_of, split
from offload.cloud.memory import Trimmer
from offload.cloud.runtime import Arrays, CloudModel
from offload.oip import tracing
from offload.oip.datatypes import payload_bytes
from offload.oip.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from offload.oip.stats import ROWS_BUCKETS, SECONDS_BUCKETS, Histogram, HistogramSnapshot


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """The scheduler's counters at one moment."""

    instances: int  # model calls that may run at once for one model (its instance threads)
    max_rows: int  # rows that may be admitted at once (queued or running)
    max_bytes: int  # bytes of request inputs that may be admitted at once
    admitted_rows: int  # admitted now
    admitted_bytes: int
    queued_rows: int  # admitted rows not yet taken into a batch
    peak_rows: int  # the most ever admitted at once: above max_rows only for a request that ran alone
    peak_bytes: int
    requests: int  # requests admitted, in all
    admitted_rows_total: int  # rows of every request admitted
    rejected: int  # refused at capacity (rows or bytes)
    rejected_rows: int  # rows of every request refused (at capacity or late)
    rejected_late: int  # refused because they could not start before their deadline
    started: int  # requests whose rows began to run
    dropped: int  # admitted but never run: the caller left, or the deadline passed, while queued
    cut_short: int  # left part-way: some of their rows never ran (caller gone, deadline, failure)
    failed: int  # failed in the model (on their own, after a failed batch was rerun)
    batches: int  # model calls
    batched_rows: int  # rows in them
    largest_batch: int  # the most rows in one model call
    most_requests: int  # the most requests in one model call
    reruns: int  # failed batches rerun one request at a time
    running: int  # model calls running now
    peak_running: int  # the most model calls ever running at once
    queue_seconds: HistogramSnapshot  # how long each request begun had waited since admission for its first batch
    batch_rows: HistogramSnapshot  # rows per model call begun


class RowCost:
    """A running estimate of the seconds one row costs: a decaying sum of batch times over a decaying
    sum of their rows, so that the large batches a long queue is made of weigh the most."""

    DECAY = 0.9

    def __init__(self) -> None:
        self._seconds = 0.0
        self._rows = 0.0

    def add(self, rows: int, seconds: float) -> None:
        self._seconds = self._seconds * self.DECAY + seconds
        self._rows = self._rows * self.DECAY + rows

    @property
    def per_row(self) -> float | None:
        return self._seconds / self._rows if self._rows else None


@dataclass(eq=False)
class _Lane:
    """One model: its queue, its instance threads and what is ahead of a new request."""

    model: CloudModel
    queue: ModelQueue
    ready: threading.Condition
    cost: RowCost
    pending_rows: int = 0  # admitted rows not yet run

    def start_estimate(self) -> float:
        """Seconds until a request admitted now could start: the rows ahead of it, spread over the instances."""
        per_row = self.cost.per_row
        if per_row is None:
            return 0.0
        return self.pending_rows * per_row / self.queue.instances


# A finished request, and its error (None: answered).
_Delivery = tuple[Pending, BaseException | None]
# What its caller gets: its future, and its answer or its error.
_Outcome = tuple["asyncio.Future[Arrays]", Arrays | BaseException]


class Scheduler:
    """Runs model calls in `instances` threads per model, batching concurrent requests."""

    def __init__(
        self,
        instances: int,
        max_rows: int,
        max_bytes: int,
        pushback_ms: int = 100,
        clock: Callable[[], float] = time.monotonic,
        trimmer: Trimmer | None = None,
    ) -> None:
        self.instances = instances
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.pushback_ms = pushback_ms
        # The clock deadlines are read on (time.monotonic(), as the servers give them).
        self._clock = clock
        self._trimmer = trimmer
        self._closed = False
        # Touched from the event loop and from every instance thread, hence one lock; each
        # model's condition shares it.
        self._lock = threading.Lock()
        self._lanes: dict[CloudModel, _Lane] = {}
        self._admitted_rows = 0
        self._admitted_bytes = 0
        self._peak_rows = 0
        self._peak_bytes = 0
        self._requests = 0
        self._rejected = 0
        self._rejected_late = 0
        self._started = 0
        self._dropped = 0
        self._cut_short = 0
        self._failed = 0
        self._batches = 0
        self._batched_rows = 0
        self._largest_batch = 0
        self._most_requests = 0
        self._reruns = 0
        self._running = 0
        self._peak_running = 0
        self._queued_rows = 0
        self._admitted_rows_total = 0
        self._rejected_rows = 0
        self._queue_seconds = Histogram(SECONDS_BUCKETS)
        self._batch_rows = Histogram(ROWS_BUCKETS)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(
                instances=self.instances,
                max_rows=self.max_rows,
                max_bytes=self.max_bytes,
                admitted_rows=self._admitted_rows,
                admitted_bytes=self._admitted_bytes,
                queued_rows=self._queued_rows,
                peak_rows=self._peak_rows,
                peak_bytes=self._peak_bytes,
                requests=self._requests,
                admitted_rows_total=self._admitted_rows_total,
                rejected=self._rejected,
                rejected_rows=self._rejected_rows,
                rejected_late=self._rejected_late,
                started=self._started,
                dropped=self._dropped,
                cut_short=self._cut_short,
                failed=self._failed,
                batches=self._batches,
                batched_rows=self._batched_rows,
                largest_batch=self._largest_batch,
                most_requests=self._most_requests,
                reruns=self._reruns,
                running=self._running,
                peak_running=self._peak_running,
                queue_seconds=self._queue_seconds.snapshot(),
                batch_rows=self._batch_rows.snapshot(),
            )

    async def run(self, model: CloudModel, arrays: Arrays, deadline: float | None) -> Arrays:
        """`model`'s outputs for `arrays`, run in a batch with other requests' rows if there is room;
        RESOURCE_EXHAUSTED at once if not.

        `deadline` is the caller's (on the scheduler's clock, time.monotonic() by default, or None):
        a request that cannot start before it is refused, and one still queued when it passes is
        not run.
        """
        now = self._clock()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded("the deadline passed before the request reached the model's queue")
        rows = int(next(iter(arrays.values())).shape[0]) if arrays else 0
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        nbytes = sum(payload_bytes(array) for array in arrays.values())
        request = Pending(arrays, rows, nbytes, deadline, signature_of(arrays), future)
        with self._lock:
            if self._closed:  # under the lock: close() must find every request it is to drop
                raise Unavailable("the server is shutting down; retry on another replica")
            lane = self._lane(model)
            self._admit(lane, request, now)
            lane.queue.push(request)
            lane.ready.notify()
        try:
            return await future
        except asyncio.CancelledError:
            self._deliver(self._leave(lane, request))
            raise

    def close(self) -> int:
        """Stop taking work, drop the queued requests and return at once, without waiting for model
        calls still running (the server's grace period for them is over by now).

        Returns how many model calls are still running.
        """
        deliveries: list[_Delivery] = []
        with self._lock:
            self._closed = True
            for lane in self._lanes.values():
                for request in lane.queue.drain():
                    request.error = request.error or Unavailable("the server is shutting down; retry elsewhere")
                    if request.running == 0:
                        if request.taken == 0:
                            self._dropped += 1
                        deliveries.append(self._finish(lane, request))
                lane.ready.notify_all()
            running = self._running
        self._deliver(deliveries)
        return running

    def _lane(self, model: CloudModel) -> _Lane:
        """The model's lane, its instance threads started on its first request (under the lock)."""
        lane = self._lanes.get(model)
        if lane is None:
            lane = _Lane(model, ModelQueue(model.options, self.instances), threading.Condition(self._lock), RowCost())
            if model.warmup_cost is not None:
                lane.cost.add(*model.warmup_cost)
            self._lanes[model] = lane
            for index in range(self.instances):
                name = f"cloud-{model.name}-{index}"
                threading.Thread(target=self._serve, args=(lane,), name=name, daemon=True).start()
        return lane

    def _admit(self, lane: _Lane, request: Pending, now: float) -> None:
        """Count the request in, or refuse it with RESOURCE_EXHAUSTED (under the lock)."""
        over_rows = self._admitted_rows and self._admitted_rows + request.rows > self.max_rows
        over_bytes = self._admitted_bytes and self._admitted_bytes + request.nbytes > self.max_bytes
        if over_rows or over_bytes:
            self._refused(request)
            raise ResourceExhausted(
                f"the cloud is at capacity ({self._admitted_rows} rows, {_mib(self._admitted_bytes)} of requests in "
                f"flight; this one has {request.rows} rows, {_mib(request.nbytes)}; limits {self.max_rows} rows, "
                f"{_mib(self.max_bytes)}); retry after {self.pushback_ms} ms, send fewer rows, or add replicas",
                pushback_ms=self.pushback_ms,
            )
        wait = lane.start_estimate()
        if request.deadline is not None and now + wait > request.deadline:
            self._refused(request, late=True)
            pushback = max(self.pushback_ms, math.ceil(wait * 1000))
            raise ResourceExhausted(
                f"the request cannot start before its deadline: {lane.pending_rows} rows for model "
                f"{lane.model.name!r} are ahead of it, about {wait:.2f}s of work, and {request.deadline - now:.2f}s "
                f"are left; retry after {pushback} ms, with a longer deadline, or add replicas",
                pushback_ms=pushback,
            )
        self._requests += 1
        self._admitted_rows_total += request.rows
        self._queued_rows += request.rows
        self._admitted_rows += request.rows
        self._admitted_bytes += request.nbytes
        self._peak_rows = max(self._peak_rows, self._admitted_rows)
        self._peak_bytes = max(self._peak_bytes, self._admitted_bytes)
        lane.pending_rows += request.rows

    def _refused(self, request: Pending, late: bool = False) -> None:
        """Count a refusal (under the lock); its inputs are let go with it."""
        if late:
            self._rejected_late += 1
        else:
            self._rejected += 1
        self._rejected_rows += request.rows
        if self._trimmer is not None:
            self._trimmer.freed(request.nbytes, idle=self._admitted_bytes == 0)

    def _leave(self, lane: _Lane, request: Pending) -> list[_Delivery]:
        """The caller left: run no more of its rows; free what it holds unless a piece still runs."""
        with self._lock:
            if request.finished:
                return []
            request.gone = True
            lane.queue.discard(request)
            if request.running:
                return []  # the instance that ends its last piece finishes it
            if request.taken == 0:
                self._dropped += 1
            return [self._finish(lane, request)]

    def _serve(self, lane: _Lane) -> None:
        """An instance thread: take a batch, run it, answer its requests; until the scheduler closes."""
        while True:
            with self._lock:
                taken = self._next_batch(lane)
            if taken is None:
                return
            pieces, deliveries = taken
            self._deliver(deliveries)
            if not pieces:
                continue
            # In the first request's context (a copy: another instance may be running a piece of it).
            results, seconds = pieces[0].request.context.copy().run(_traced_execute, lane.model, pieces)
            with self._lock:
                deliveries = self._complete(lane, pieces, results, seconds)
            self._deliver(deliveries)

    def _next_batch(self, lane: _Lane) -> tuple[list[Piece], list[_Delivery]] | None:
        """Wait until a batch is due and take it (under the lock); None once the scheduler closes."""
        while not self._closed:
            due = lane.queue.due_in(time.monotonic())
            if due != 0.0:
                lane.ready.wait(due)
                continue
            pieces, expired = lane.queue.take(self._clock())
            deliveries: list[_Delivery] = []
            for request in expired:
                request.error = DeadlineExceeded("the deadline passed while the request waited in the model's queue")
                if request.running == 0:
                    if request.taken == 0:
                        self._dropped += 1
                    deliveries.append(self._finish(lane, request))
            if pieces:
                lane.queue.busy += 1
                self._running += 1
                self._peak_running = max(self._peak_running, self._running)
                now = time.monotonic()
                for piece in pieces:
                    self._queued_rows -= piece.rows
                    if piece.start == 0:
                        self._started += 1
                        self._queue_seconds.observe(now - piece.request.arrived)
                self._batch_rows.observe(sum(piece.rows for piece in pieces))
            return pieces, deliveries
        return None

    def _complete(
        self, lane: _Lane, pieces: list[Piece], results: list[Arrays | BaseException], seconds: float | None
    ) -> list[_Delivery]:
        """Book a batch that ended (`seconds`: how long it took, when it was answered by one call);
        the requests it finished (under the lock)."""
        lane.queue.busy -= 1
        self._running -= 1
        rows = sum(piece.rows for piece in pieces)
        self._batches += 1
        self._batched_rows += rows
        self._largest_batch = max(self._largest_batch, rows)
        self._most_requests = max(self._most_requests, len(pieces))
        if seconds is not None and rows:
            lane.cost.add(rows, seconds)
        elif seconds is None and len(pieces) > 1:
            self._reruns += 1
        deliveries: list[_Delivery] = []
        for piece, result in zip(pieces, results, strict=True):
            request = piece.request
            request.running -= 1
            request.done_rows += piece.rows
            lane.pending_rows -= piece.rows
            if isinstance(result, BaseException):
                if request.error is None:
                    request.error = result
                    self._failed += 1
                lane.queue.discard(request)
            elif request.error is None and not request.gone:
                request.parts.append((piece.start, result))
            ended = request.error is not None or request.gone or request.taken == request.rows
            if request.running == 0 and ended and not request.finished:
                deliveries.append(self._finish(lane, request))
        return deliveries

    def _finish(self, lane: _Lane, request: Pending) -> _Delivery:
        """Release what a request holds; its outcome is delivered outside the lock (under the lock)."""
        request.finished = True
        self._queued_rows -= request.rows - request.taken  # its rows never taken into a batch
        self._admitted_rows -= request.rows
        self._admitted_bytes -= request.nbytes
        lane.pending_rows -= request.rows - request.done_rows  # its rows that never ran
        if request.taken > 0 and request.done_rows < request.rows:
            self._cut_short += 1
        error = request.error
        if error is None and request.gone:
            error = DeadlineExceeded("the caller left before its answer was ready")
        return request, error

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        """Hand each finished request's outcome to its caller's event loop, one wake-up for all of them
        (joining each request's pieces here, in the calling thread, outside the lock)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for request, error in deliveries:
            outcome = error if error is not None else request.answer()
            by_loop.setdefault(request.future.get_loop(), []).append((request.future, outcome))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: no caller is left to answer
                loop.call_soon_threadsafe(_settle, outcomes)
        if self._trimmer is not None and deliveries:
            # Read without the lock: whether anything is in flight is only a hint of when to trim.
            idle = self._admitted_bytes == 0
            self._trimmer.freed(sum(request.nbytes for request, _ in deliveries), idle)


def _settle(outcomes: list[_Outcome]) -> None:
    """On the callers' event loop: set each future that is still awaited (a caller that left has
    cancelled its own)."""
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _traced_execute(model: CloudModel, pieces: list[Piece]) -> tuple[list[Arrays | BaseException], float | None]:
    rows = sum(piece.rows for piece in pieces)
    with tracing.span(
        "offload.cloud_model", {"offload.model": model.name, "offload.rows": rows, "offload.requests": len(pieces)}
    ):
        return _execute(model, pieces)


def _execute(model: CloudModel, pieces: list[Piece]) -> tuple[list[Arrays | BaseException], float | None]:
    """Run a batch: each piece's outputs or error, and the seconds it took when it was answered by one
    call. A batch that fails is rerun one piece at a time, so that only a request that breaks the
    model on its own fails; the others pay one more call each."""
    started = time.perf_counter()
    try:
        outputs = model.run_batch([piece.inputs() for piece in pieces])
    except Exception as exc:
        if len(pieces) == 1:
            return [exc], None
    else:
        answers: list[Arrays | BaseException] = list(split(outputs, pieces))
        return answers, time.perf_counter() - started
    results: list[Arrays | BaseException] = []
    for piece in pieces:
        try:
            results.append(model.run_batch([piece.inputs()]))
        except Exception as exc:
            results.append(exc)
    return results, None


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
