"""How `offload bench` holds a load: closed-loop workers or an open-loop schedule, in one process or several.

A Python process drives a few thousand gRPC calls a second before its own CPU is the limit, which a
fast server outruns; `--processes P` splits every step over P client processes (workers dealt out,
the rate divided, each process on connections of its own). Every process times with
perf_counter_ns, the system-wide monotonic clock on Linux and macOS, so a step's window is the same
span in each of them and their counts and latencies simply add up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import cast

import numpy as np

from offload.oip.errors import ConfigurationError
from offload.tools.bench_transport import OK, Connection, Transport, connected

# How long a client process may take to start and connect, beyond a step's own time.
START_SECONDS = 120.0


@dataclass(frozen=True)
class Step:
    """One load level and its times (perf_counter_ns): load from `began`, count from `start` to `end`,
    and on past `end` until at least `min_requests` requests have completed (perf_analyzer's count windows)."""

    mode: str  # "concurrency" or "rate"
    load: float  # workers, or requests per second
    began: int
    start: int
    end: int
    min_requests: int = 0

    def window(self, shares: int = 1) -> Window:
        """An empty window for one of `shares` processes: each must see its share of min_requests."""
        return Window(self.start, self.end, -(-self.min_requests // shares))


@dataclass
class Window:
    """What completed inside a step's window: successful latencies (ns) and failures by status.

    The window closes at `end`, or, if fewer than `min_requests` have completed by then, at the
    completion that makes them enough (`end` moves there)."""

    start: int
    end: int
    min_requests: int = 0
    latencies: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    completed: int = 0

    def open(self, now: int) -> bool:
        """Whether a request sent now may still count."""
        return now < self.end or self.completed < self.min_requests

    def record(self, done: int, latency: int, status: str) -> None:
        if done < self.start:
            return
        if done > self.end:
            if self.completed >= self.min_requests:
                return
            self.end = done
        self.completed += 1
        if status == OK:
            self.latencies.append(latency)
        else:
            self.errors[status] += 1


async def drive(
    transport: Transport,
    requests: list[bytes],
    step: Step,
    senders: int,
    window: Window,
    share: int = 0,
    shares: int = 1,
) -> None:
    """This process's part (`share` of `shares`) of one step, from step.began to step.end, recorded
    in window; an open loop spreads its requests over `senders` senders, a closed loop gives each
    worker its own."""
    ahead = step.began - time.perf_counter_ns()
    if ahead > 0:
        await asyncio.sleep(ahead / 1e9)
    if step.mode == "rate":
        await _open_loop(transport, requests, step, senders, share, shares, window)
    else:
        workers = int(step.load)
        await _closed_loop(transport, requests, workers // shares + (share < workers % shares), window)


async def _closed_loop(transport: Transport, requests: list[bytes], workers: int, window: Window) -> None:
    async def worker(index: int) -> None:
        send = transport.sender(index)
        for turn in itertools.count(index):
            started = time.perf_counter_ns()
            if not window.open(started):
                return
            status = await send(requests[turn % len(requests)])
            done = time.perf_counter_ns()
            window.record(done, done - started, status)

    await asyncio.gather(*(worker(index) for index in range(workers)))


async def _open_loop(
    transport: Transport, requests: list[bytes], step: Step, senders: int, share: int, shares: int, window: Window
) -> None:
    """Requests due every 1/rate seconds from step.began (this process takes every shares-th one);
    each latency runs from its due time, so a request queued behind a slow server is charged for it."""
    sends = [transport.sender(index) for index in range(senders)]
    in_flight: set[asyncio.Task[None]] = set()

    async def one(turn: int, due: int) -> None:
        status = await sends[turn % senders](requests[turn % len(requests)])
        done = time.perf_counter_ns()
        window.record(done, done - due, status)

    for turn in itertools.count(share, shares):
        due = step.began + round(turn * 1e9 / step.load)
        if not window.open(due):
            break
        ahead = due - time.perf_counter_ns()
        if ahead > 0:
            await asyncio.sleep(ahead / 1e9)
        task = asyncio.create_task(one(turn, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


class ClientProcesses:
    """`count` client processes, each with its own transport, that run steps when told to."""

    def __init__(self, connection: Connection, requests: list[bytes], count: int) -> None:
        context = multiprocessing.get_context("spawn")  # no copies of this process's event loop or channels
        self._pipes: list[Pipe] = []
        self._processes = []
        for share in range(count):
            parent, child = context.Pipe()
            process = context.Process(
                target=_client_main, args=(child, connection, requests, share, count), daemon=True
            )
            process.start()
            child.close()
            self._pipes.append(parent)
            self._processes.append(process)

    async def ready(self) -> None:
        for pipe in self._pipes:
            await _receive(pipe, START_SECONDS)

    async def run(self, step: Step, seconds: float) -> Window:
        """Every process's part of the step, merged; `seconds`: the longest it may take."""
        for pipe in self._pipes:
            pipe.send(step)
        merged = step.window()
        for pipe in self._pipes:
            latencies, errors, end = cast(tuple[bytes, dict[str, int], int], await _receive(pipe, seconds))
            merged.latencies.extend(np.frombuffer(latencies, dtype=np.int64).tolist())
            merged.errors.update(errors)
            merged.end = max(merged.end, end)  # where a process had to wait for its share of min_requests
        merged.completed = len(merged.latencies) + merged.errors.total()
        return merged

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # that process has already ended
                pipe.send(None)
            pipe.close()
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


async def _receive(pipe: Pipe, seconds: float) -> object:
    try:
        if await asyncio.to_thread(pipe.poll, seconds):
            return pipe.recv()
    except (EOFError, OSError):
        pass
    raise ConfigurationError(f"a client process did not answer within {seconds:.0f} s (it failed or hung)")


def _client_main(pipe: Pipe, connection: Connection, requests: list[bytes], share: int, shares: int) -> None:
    asyncio.run(_client_loop(pipe, connection, requests, share, shares))


async def _client_loop(pipe: Pipe, connection: Connection, requests: list[bytes], share: int, shares: int) -> None:
    async with connected(connection) as transport:
        pipe.send("ready")
        while (step := await asyncio.to_thread(pipe.recv)) is not None:
            window = step.window(shares)
            await drive(transport, requests, step, connection.channels, window, share, shares)
            pipe.send((np.asarray(window.latencies, dtype=np.int64).tobytes(), dict(window.errors), window.end))
