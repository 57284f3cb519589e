"""Fault benchmark (issue 3): what the app sees when the cloud breaks, fault by fault.

For each fault a fresh edge router (the agent's wiring, in this process, on a real
loopback gRPC port) takes an open-loop stream of app requests (`--requests` at
`--rate` per second, at most `--concurrency` in flight, each with a `--deadline`
deadline and `offload_threshold=1.0`, so every row is meant for the cloud). Each
request's clock and deadline start at its scheduled send time, before it waits for one
of the `--concurrency` slots: time queued behind slow calls is in its latency, and the
gRPC deadline it is sent with is what is left of the app's (see chaos.burst).
The cloud is a real `offload cloud` child process, reached directly or through the
chaos proxy of tests/support/chaos.py. The fault starts once 20% of the requests
were sent and ends once 60% were (kill: the cloud stays dead until the stream ends,
then restarts on the same port; restart: a new process starts on the same port at
once). Edge settings: 1 s cloud deadline, retry budget 10 tokens / 0.1, breaker
cool-down 0.2 s, 3 attempts (full-jitter backoff from 50 ms).

Columns: requests sent, answered, degraded (answered from the edge because the
cloud did not answer), failed (an error reached the app), cloud attempts per
cloud-bound request (retries and hedges included, as the endpoint counts them),
retries and hedges together against the budget's bound (max_tokens/2 + 1 +
token_ratio * successes; both draw on its tokens), hedges, requests the open breaker
kept off the wire, latency percentiles (from the scheduled send time, time waiting
for a slot included), recovery (seconds from the fault's end to the first cloud
answer) and problems (rows that are neither the cloud's answer nor a flagged edge
answer, or answers past the deadline + MARGIN (0.3 s); see chaos.check).

    python benchmarks/faults.py                        # print and write benchmarks/RESULTS.md
    python benchmarks/faults.py --requests 100 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from offload.edge.agent import load_edge_models
from offload.models import DEMO_REPOSITORY
from offload.oip import client as client_module
from offload.oip.limits import channel_options
from offload.router.models import RoutedModel
from offload.tools.process import ServerProcess
from results_file import RESULTS, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from support.chaos import (  # noqa: E402  (the chaos proxy lives with the tests)
    MODEL,
    TEST_EDGE_SETTINGS,
    Call,
    ChaosProxy,
    Corruption,
    Reference,
    Summary,
    burst,
    check,
    edge_under_test,
    retry_bound,
    wait_for_cloud_answer,
    within_retry_budget,
)

HEADING = "## Faults (issue 3)"
# How far past the app's deadline an answer may come before it counts as a problem. A timing,
# so it is checked here, where it is measured and reported, and not asserted in the tests.
MARGIN = 0.3
MACHINE = "2-core CPU, loopback"
FAULTS = (
    "none",
    "kill",
    "freeze",
    "restart",
    "flaky-30%",
    "slow-3s",
    *(f"malformed-{kind}" for kind in Corruption),
    "breaker-open",
    "straggler+hedging",
)

DESCRIPTIONS = {
    "none": "healthy cloud, direct",
    "kill": "SIGKILL at 20%; dead to the end, then restarted on the same port",
    "freeze": "SIGSTOP at 20%, SIGCONT at 60%",
    "restart": "SIGKILL at 20%, a new process on the same port started at once",
    "flaky-30%": "proxy fails 30% of calls with UNAVAILABLE (seeded)",
    "slow-3s": "proxy delays every call 3 s (past the deadline)",
    "malformed-shape": "proxy answers [rows, 11] for [rows, 10]",
    "malformed-rows": "proxy answers one row too many",
    "malformed-datatype": "proxy answers FP64 for FP32",
    "malformed-raw_size": "proxy answers raw bytes one short",
    "breaker-open": "proxy fails every call with UNAVAILABLE",
    "straggler+hedging": "hedging on (50 ms); proxy holds each request's first attempt 2 s",
}


def cloud_process(port: int | str = 0) -> ServerProcess:
    return ServerProcess(["cloud", "--grpc-port", str(port), "--device", "cpu"])


@dataclass
class Env:
    cloud: ServerProcess
    reference: Reference
    models: dict[str, RoutedModel]
    executor: ThreadPoolExecutor
    options: argparse.Namespace


@dataclass
class Row:
    fault: str
    summary: Summary
    cloud_bound: int
    attempts: int
    retries: int
    bound: float
    hedges: int
    short_circuited: int
    within_budget: bool  # retries and hedges together within the bound (chaos.within_retry_budget)
    recovery: float | None
    problems: int

    def cells(self) -> list[str]:
        summary = self.summary
        per_request = self.attempts / self.cloud_bound if self.cloud_bound else 0.0
        recovery = "-" if self.recovery is None else f"{self.recovery:.2f}"
        return [
            self.fault,
            str(summary.sent),
            str(summary.answered),
            str(summary.degraded),
            str(summary.failed),
            f"{per_request:.2f}",
            f"{self.retries + self.hedges} / {self.bound:.1f}",
            str(self.hedges),
            str(self.short_circuited),
            f"{summary.percentile(0.50) * 1000:.1f}",
            f"{summary.percentile(0.99) * 1000:.1f}",
            recovery,
            str(self.problems),
        ]


COLUMNS = [
    "fault",
    "sent",
    "answered",
    "degraded",
    "failed",
    "cloud attempts / cloud-bound request",
    "retries + hedges / budget bound",
    "hedges",
    "short-circuited",
    "p50 ms",
    "p99 ms",
    "recovery s",
    "problems",
]


class FaultRun:
    """One fault: what it needs started, when it breaks and mends the cloud, and its row of figures."""

    def __init__(self, fault: str, env: Env) -> None:
        self.fault = fault
        self.env = env
        self.processes: list[ServerProcess] = []
        self.proxy: ChaosProxy | None = None
        self.target = ""
        self.begin_at = int(env.options.requests * 0.2)
        self.end_at = int(env.options.requests * 0.6)
        self.ended: list[float] = []  # when the fault ended (the cloud could answer again)
        self.restarting: list[asyncio.Future[str]] = []

    async def setup(self) -> None:
        if self.fault in ("kill", "restart"):
            self.processes.append(cloud_process())
            self.target = await asyncio.to_thread(self.processes[0].start)
        elif self.fault in ("none", "freeze"):
            self.target = self.env.cloud.address
        else:
            self.proxy = ChaosProxy(self.env.cloud.address, seed=self.env.options.seed)
            self.target = await self.proxy.start()

    async def teardown(self) -> None:
        if self.fault == "freeze":
            self.env.cloud.signal(signal.SIGCONT)
        if self.proxy is not None:
            await self.proxy.stop()
        for process in self.processes:
            process.kill()

    def restart_now(self) -> None:
        self.processes.append(cloud_process(self.target.rsplit(":", 1)[1]))
        future = asyncio.ensure_future(asyncio.to_thread(self.processes[-1].start))
        future.add_done_callback(lambda _: self.ended.append(time.monotonic()))
        self.restarting.append(future)

    def begin(self) -> None:
        if self.fault in ("kill", "restart"):
            self.processes[0].kill()  # SIGKILL
            if self.fault == "restart":
                self.restart_now()
        elif self.fault == "freeze":
            self.env.cloud.signal(signal.SIGSTOP)
        elif self.proxy is not None:
            inject(self.proxy, self.fault)

    def end(self) -> None:
        if self.fault == "freeze":
            self.env.cloud.signal(signal.SIGCONT)
            self.ended.append(time.monotonic())
        elif self.proxy is not None:
            self.proxy.heal()
            self.ended.append(time.monotonic())

    def on_send(self, call: Call) -> None:
        if self.fault == "none":
            return
        if call.index == self.begin_at:
            self.begin()
        elif call.index == self.end_at:
            self.end()

    async def measure(self) -> Row:
        options = self.env.options
        overrides: dict[str, Any] = {"cloud_timeout_seconds": options.cloud_timeout}
        if self.fault == "straggler+hedging":
            overrides["hedge_delay_seconds"] = 0.05
        async with edge_under_test(self.target, self.env.models, self.env.executor, **overrides) as edge:
            # Warm up first (connecting the channels, the cloud model's first calls at this batch size),
            # so that the figures are about the fault; then count from here on.
            await wait_for_cloud_answer(edge, self.env.reference, timeout=30.0, tag="warm-up")
            await burst(edge.client, self.env.reference, 20, tag="warm-up", concurrency=4, timeout=options.deadline)
            before = edge.endpoint.stats()
            calls = await burst(
                edge.client,
                self.env.reference,
                options.requests,
                tag=self.fault,
                concurrency=options.concurrency,
                timeout=options.deadline,
                rate=options.rate,
                on_send=self.on_send,
                deadline_from_due=True,
            )
            stats = edge.endpoint.stats()
            row = Row(
                self.fault,
                Summary.of(calls),
                stats.calls - before.calls,
                stats.attempts - before.attempts,
                stats.retries - before.retries,
                retry_bound(edge.endpoint, since=before),
                stats.hedges - before.hedges,
                stats.short_circuited - before.short_circuited,
                within_retry_budget(edge.endpoint, since=before),
                None,
                len(check(calls, self.env.reference, deadline=options.deadline, margin=MARGIN)),
            )
            if self.fault == "kill":
                self.restart_now()
            if self.restarting:
                await self.restarting[0]
            if self.ended:

                async def poll() -> None:
                    await wait_for_cloud_answer(edge, self.env.reference, timeout=60.0, deadline=options.deadline)

                row.recovery = await recovery_seconds(calls, self.ended[0], poll)
            return row


async def run_fault(fault: str, env: Env) -> Row:
    run = FaultRun(fault, env)
    try:
        await run.setup()
        return await run.measure()
    finally:
        await run.teardown()


def inject(proxy: ChaosProxy, fault: str) -> None:
    if fault == "flaky-30%":
        proxy.fail_rate = 0.3
    elif fault == "slow-3s":
        proxy.delay_seconds = 3.0
    elif fault.startswith("malformed-"):
        proxy.corruption = Corruption(fault.removeprefix("malformed-"))
    elif fault == "breaker-open":
        proxy.fail_rate = 1.0
    elif fault == "straggler+hedging":
        proxy.delay_first_attempt_seconds = 2.0


async def recovery_seconds(calls: list[Call], ended: float, poll: Callable[[], Awaitable[None]]) -> float:
    """From the fault's end to the first cloud answer: seen in the stream, or else polled for after it."""
    answered = [call.answered_at for call in calls if call.sent_at >= ended and call.from_cloud]
    if answered:
        return min(answered) - ended
    await poll()
    return time.monotonic() - ended


async def run(options: argparse.Namespace) -> list[Row]:
    models = load_edge_models(DEMO_REPOSITORY)
    rows: list[Row] = []
    with cloud_process() as cloud, ThreadPoolExecutor(2, thread_name_prefix="edge-infer") as executor:
        await asyncio.to_thread(cloud.start)
        reference = await asyncio.to_thread(Reference.of_demo, cloud.address, models[MODEL])
        env = Env(cloud, reference, models, executor, options)
        for fault in options.faults:
            started = time.monotonic()
            row = await run_fault(fault, env)
            rows.append(row)
            print(
                f"{fault}: {' | '.join(row.cells()[1:])} ({time.monotonic() - started:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def report(rows: list[Row], options: argparse.Namespace, command: str) -> str:
    edge = {**TEST_EDGE_SETTINGS, "cloud_timeout_seconds": options.cloud_timeout}
    settings = ", ".join(f"{key} {value:g}" for key, value in edge.items())
    header = (
        f"Command: `{command}`; run {datetime.date.today().isoformat()} on a {MACHINE} (Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}; cloud model on the CPU). Per fault: "
        f"{options.requests} requests of 3 demo rows at {options.rate:g}/s, at most {options.concurrency} in "
        f"flight, app deadline {options.deadline:g} s from each request's scheduled send time (time waiting for a "
        "slot comes out of it and is in the latency), `offload_threshold=1.0` (every row to the cloud), "
        f"`offload_details=true`. The cloud is a real `offload cloud` process; the edge router runs in the "
        f"benchmark's process behind a real gRPC port (so its counters can be read), with {settings}, "
        "3 attempts, hedging off except where named. The fault starts when 20% of the requests were sent and "
        "ends when 60% were."
    )
    faults = "\n".join(f"- **{fault}**: {DESCRIPTIONS[fault]}" for fault in (row.fault for row in rows))
    failed = sum(row.summary.failed for row in rows)
    within = all(row.within_budget for row in rows)
    problems = sum(row.problems for row in rows)
    restart = next((row for row in rows if row.fault == "restart"), None)
    kill = next((row for row in rows if row.fault == "kill"), None)
    recoveries = ", ".join(
        f"{row.fault} {row.recovery:.2f} s" for row in (restart, kill) if row is not None and row.recovery is not None
    )
    options_set = [*channel_options(1 << 20), *getattr(client_module, "RECONNECT_OPTIONS", [])]
    reconnect = ", ".join(f"{key.removeprefix('grpc.')}={value}" for key, value in options_set if "reconnect" in key)
    backoff = (
        f"the edge's channel to the cloud reconnects with {reconnect}"
        if reconnect
        else "the edge's channel keeps gRPC's default reconnect backoff: 1 s, growing 1.6x per failed connect "
        "while the cloud is down, up to 120 s, so the longer the outage the longer recovery takes"
    )
    verdict = (
        f"Failed requests with fallback allowed: **{failed}** in all. Retries and hedges within the budget's bound "
        f"under every fault: **{'yes' if within else 'NO'}**. Rows that were neither the cloud's answer nor a "
        f"flagged edge answer, or answers past the deadline + {MARGIN:g} s: **{problems}**. Recovery to cloud "
        f"answers after a restart on the same port: {recoveries or 'not measured'} ({backoff})."
    )
    reading = (
        "Reading the table: *cloud attempts / cloud-bound request* is below 1 where the open breaker answered "
        "requests on the edge without a call (*short-circuited*); *retries + hedges / budget bound* compares the "
        "retries and hedges sent (both take the budget's tokens) with what the A6 budget allows (max_tokens/2 + 1 "
        "+ token_ratio x successes); *p50* and *p99* run from each request's scheduled send time, so where calls "
        "in flight hold the app's slots until the edge gives up on the cloud (freeze, slow), the wait of the "
        "requests queued behind them is in the figures; *recovery* runs from the fault's end (SIGCONT, proxy "
        "healed, restarted process listening) to the first cloud answer. "
        "Degraded requests are answered by the edge model, flagged `offload_degraded=true`. Under flaky-30%, a "
        "failed call is retried only while the budget has more than half its tokens, and the breaker's rate rule "
        "(half of the last 20 calls failed) trips now and then on a 30% cloud: those requests are degraded. "
        "Under straggler+hedging every first attempt stalls: each hedge costs a retry token, so the budget stops "
        "hedging after a few, the stalled requests run past their deadline and are degraded, and the breaker opens; "
        "hedging is for a slow tail of a few percent of calls, which the budget's refill (token_ratio) pays for."
    )
    return f"{header}\n\n{faults}\n\n{table(rows)}\n\n{reading}\n\n{verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fault benchmark: for each fault (kill, freeze, restart, flaky, slow, malformed, breaker-open, "
        "straggler with hedging), requests sent, answered, degraded and failed, cloud attempts per cloud-bound "
        "request, retries and hedges against the budget, p50/p99 latency and recovery time, with real processes "
        "on loopback."
    )
    parser.add_argument("--requests", type=int, default=300, help="requests per fault (default 300)")
    parser.add_argument("--concurrency", type=int, default=16, help="most requests in flight (default 16)")
    parser.add_argument("--rate", type=float, default=60.0, help="requests sent per second (default 60)")
    parser.add_argument("--deadline", type=float, default=1.5, help="the app's gRPC deadline in seconds (1.5)")
    parser.add_argument("--cloud-timeout", type=float, default=1.0, help="the edge's cloud deadline (1.0 s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the proxy's failure draws (1)")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS), help="which faults (all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write (benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    options = parser.parse_args(argv)
    if options.requests < 5 or options.concurrency < 1 or options.rate <= 0:
        parser.error("--requests must be at least 5, --concurrency at least 1, --rate positive")

    rows = asyncio.run(run(options))
    command = shlex.join(["python", "benchmarks/faults.py", *(sys.argv[1:] if argv is None else argv)])
    body = report(rows, options, command)
    print(f"{HEADING}\n\n{body}")
    if not options.no_write:
        write_section(options.results, HEADING, body)
        print(f"\nwritten to {options.results}", file=sys.stderr)
    failed = sum(row.summary.failed for row in rows)
    return 0 if failed == 0 and all(row.within_budget for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
