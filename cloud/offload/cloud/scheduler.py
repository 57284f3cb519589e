"""Admission control and the thread pool that runs the cloud's model calls.

Model calls running or waiting for a thread are admitted up to a capacity; past it
the answer is an immediate RESOURCE_EXHAUSTED with a retry pushback, never a longer
queue. A slot is held by the job, not by its caller: it is freed when the job ends
in the pool (done, failed or dropped), so a caller that gave up cannot make room for
more work while its model call still runs. A queued job whose caller has gone is
dropped, never run.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from offload.cloud.runtime import Arrays, CloudModel
from offload.oip import tracing
from offload.oip.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from offload.oip.stats import ROWS_BUCKETS, SECONDS_BUCKETS, Histogram, HistogramSnapshot


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """The scheduler's counters at one moment."""

    capacity: int  # model calls that may be admitted at once (running or queued)
    admitted: int  # model calls admitted now
    peak: int  # the most ever admitted at once: never above capacity
    rejected: int  # calls refused at capacity
    started: int  # model calls begun
    dropped: int  # queued jobs whose caller went away before a thread took them: never run
    queued: int  # admitted model calls waiting for a thread now (the rest of `admitted` are running)
    admitted_rows: int  # rows of every call admitted
    rejected_rows: int  # rows of every call refused at capacity
    queue_seconds: HistogramSnapshot  # how long each call a thread took had waited for it since admission
    batch_rows: HistogramSnapshot  # rows per model call begun


class _CallerGone(Exception):
    """A queued job was taken by a thread after its caller had gone: not run."""


@dataclass(slots=True)
class _Job:
    """One model call handed to the pool."""

    deadline: float | None
    rows: int
    admitted_at: float  # time.monotonic()
    # Set when the caller has gone (deadline passed, call cancelled) before a thread took the job.
    caller_gone: bool = False


class Scheduler:
    """Runs model calls in `threads` threads, with up to `max_queue` more waiting for one."""

    def __init__(self, threads: int, max_queue: int, pushback_ms: int = 100) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="cloud-infer")
        self.capacity = threads + max_queue
        self.pushback_ms = pushback_ms
        self._closed = False
        # Touched from pool threads too, hence the lock.
        self._lock = threading.Lock()
        self._admitted = 0
        self._peak = 0
        self._rejected = 0
        self._started = 0
        self._dropped = 0
        self._queued = 0
        self._admitted_rows = 0
        self._rejected_rows = 0
        self._queue_seconds = Histogram(SECONDS_BUCKETS)
        self._batch_rows = Histogram(ROWS_BUCKETS)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(
                self.capacity,
                self._admitted,
                self._peak,
                self._rejected,
                self._started,
                self._dropped,
                self._queued,
                self._admitted_rows,
                self._rejected_rows,
                self._queue_seconds.snapshot(),
                self._batch_rows.snapshot(),
            )

    async def run(self, model: CloudModel, arrays: Arrays, deadline: float | None) -> Arrays:
        """`model.predict(arrays)` in the pool if there is room; RESOURCE_EXHAUSTED at once if not.

        `deadline` is the caller's (time.monotonic() seconds, or None): a job still queued when it
        passes is not run.
        """
        if self._closed:
            raise Unavailable("the server is shutting down; retry on another replica")
        rows = next(iter(arrays.values())).shape[0] if arrays else 0
        with self._lock:
            if self._admitted >= self.capacity:
                self._rejected += 1
                self._rejected_rows += rows
                raise ResourceExhausted(
                    f"the cloud is at capacity ({self.capacity} requests running or queued); "
                    f"retry after {self.pushback_ms} ms or add replicas",
                    pushback_ms=self.pushback_ms,
                )
            self._admitted += 1
            self._admitted_rows += rows
            self._queued += 1
            self._peak = max(self._peak, self._admitted)
        job = _Job(deadline, rows, time.monotonic())
        # In the caller's context: the model call's span joins the request's trace, its log lines carry its id.
        future = self._executor.submit(contextvars.copy_context().run, self._run, job, model, arrays)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The caller is gone. A job still queued is dropped now and frees its slot; one a
            # thread already took runs to the end (a model call cannot be interrupted) and keeps
            # its slot until then. The flag covers a thread that took the job a moment ago.
            job.caller_gone = True
            if future.cancel():
                with self._lock:
                    self._dropped += 1
            raise

    def close(self) -> int:
        """Stop taking work, drop the queued jobs and return at once, without waiting for model
        calls still running (the server's grace period for them is over by now).

        Returns how many model calls are still running.
        """
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            return self._admitted

    def _run(self, job: _Job, model: CloudModel, arrays: Arrays) -> Arrays:
        """In a pool thread."""
        with self._lock:
            self._queued -= 1
            if job.caller_gone:
                self._dropped += 1
                raise _CallerGone
            if job.deadline is not None and time.monotonic() >= job.deadline:
                # Its caller's cancellation at the deadline has not reached the job yet; running it
                # would spend a thread on an answer nobody can use.
                self._dropped += 1
                raise DeadlineExceeded("the deadline passed while the call waited for a thread")
            self._started += 1
            self._queue_seconds.observe(time.monotonic() - job.admitted_at)
            self._batch_rows.observe(job.rows)
        with tracing.span("offload.cloud_model", {"offload.model": model.name, "offload.rows": job.rows}):
            return model.predict(arrays)

    def _release(self, future: Future[Arrays]) -> None:
        """The job ended in the pool (answered, failed, dropped or cancelled): its slot is free."""
        with self._lock:
            self._admitted -= 1
            if future.cancelled():  # it never reached a thread, so it left the queue only now
                self._queued -= 1
