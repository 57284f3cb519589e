"""Coalescing benchmark: cloud round trips and app latency over a slow link, with and without coalescing.

A real `offload cloud` process behind the chaos proxy of tests/support/chaos.py, which delays every call
by `--link-ms` (the link's round trip); an edge router wired like the agent (in this process, behind a real
loopback gRPC port, so that its counters can be read) takes `--requests` app requests of 3 demo rows, at most
`--concurrency` in flight, with `offload_threshold=1.0` (every row to the cloud) and a `--deadline` deadline.
For each setting: cloud calls (as the proxy counts them) per request, the coalesced calls and the rows they
carried, requests per second, p50/p99 latency from each request's send, degraded answers, and problems (rows
that are neither the cloud's answer nor a flagged edge answer: chaos.check).

    python benchmarks/coalescing.py                  # print and write benchmarks/RESULTS.md
    python benchmarks/coalescing.py --link-ms 5 20 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from offload.edge.agent import load_edge_models, warm_up_models
from offload.models import DEMO_REPOSITORY
from offload.router.models import RoutedModel
from offload.tools.process import ServerProcess
from results_file import RESULTS, write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.chaos import MODEL, ChaosProxy, Reference, burst, check, edge_under_test  # noqa: E402

HEADING = "## Coalescing"
# name -> the edge settings that differ from the agent's defaults (chaos.TEST_EDGE_SETTINGS turn it off).
SETTINGS: dict[str, dict[str, Any]] = {
    "off": {"coalesce_max_rows": 0},
    "until the call in flight ends (window 0)": {"coalesce_max_rows": 256, "coalesce_window_us": 0},
    "window 2 ms (default)": {"coalesce_max_rows": 256, "coalesce_window_us": 2000},
}


@dataclass(frozen=True)
class Row:
    link_ms: float
    setting: str
    requests: int
    calls: int
    coalesced_calls: int
    coalesced_rows: int
    seconds: float
    p50_ms: float
    p99_ms: float
    degraded: int
    failed: int
    problems: int

    def cells(self) -> list[str]:
        return [
            f"{self.link_ms:g}",
            self.setting,
            str(self.requests),
            str(self.calls),
            f"{self.calls / self.requests:.2f}",
            f"{self.coalesced_calls} ({self.coalesced_rows} rows)",
            f"{self.requests / self.seconds:.0f}",
            f"{self.p50_ms:.1f}",
            f"{self.p99_ms:.1f}",
            str(self.degraded),
            str(self.failed),
            str(self.problems),
        ]


COLUMNS = [
    "link ms",
    "coalescing",
    "requests",
    "cloud calls",
    "calls / request",
    "coalesced calls",
    "requests/s",
    "p50 ms",
    "p99 ms",
    "degraded",
    "failed",
    "problems",
]


async def measure(
    link_ms: float,
    setting: str,
    cloud: str,
    reference: Reference,
    models: dict[str, RoutedModel],
    executor: ThreadPoolExecutor,
    options: argparse.Namespace,
) -> Row:
    async with ChaosProxy(cloud) as proxy:
        proxy.delay_seconds = link_ms / 1000  # the link's round trip: the injected "fault"
        async with edge_under_test(proxy.address, models, executor, **SETTINGS[setting]) as edge:
            started = time.monotonic()
            calls = await burst(
                edge.client,
                reference,
                options.requests,
                tag=f"{setting}-{link_ms:g}",
                concurrency=options.concurrency,
                timeout=options.deadline,
            )
            seconds = time.monotonic() - started
            stats = edge.router.stats().coalescing
    # From each request's send (a closed loop: the wait for a slot is the loop's, not the edge's).
    latencies = sorted((call.answered_at - call.sent_at) * 1000 for call in calls if call.response is not None)
    return Row(
        link_ms=link_ms,
        setting=setting,
        requests=len(calls),
        calls=proxy.calls,
        coalesced_calls=stats.coalesced_calls if stats else 0,
        coalesced_rows=stats.coalesced_rows if stats else 0,
        seconds=seconds,
        p50_ms=statistics.median(latencies) if latencies else float("nan"),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan"),
        degraded=sum(call.degraded for call in calls),
        failed=sum(call.error is not None for call in calls),
        problems=len(check(calls, reference, errors_allowed=True)),
    )


async def run(options: argparse.Namespace) -> list[Row]:
    models = load_edge_models(DEMO_REPOSITORY)
    warm_up_models(models)
    rows = []
    with (
        ServerProcess(["cloud", "--grpc-port", "0", "--device", "cpu"]) as cloud,
        ThreadPoolExecutor(1, thread_name_prefix="edge-infer") as executor,
    ):
        await asyncio.to_thread(cloud.start)
        reference = await asyncio.to_thread(Reference.of_demo, cloud.address, models[MODEL])
        for link_ms in options.link_ms:
            for setting in SETTINGS:
                row = await measure(link_ms, setting, cloud.address, reference, models, executor, options)
                rows.append(row)
                print(" | ".join(row.cells()), file=sys.stderr, flush=True)
    return rows


def report(rows: list[Row], options: argparse.Namespace, command: str) -> str:
    header = (
        f"Command: `{command}`; run {datetime.date.today().isoformat()} on {platform.machine()} (Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}; cloud model on the CPU, in its own process). Per "
        f"setting: {options.requests} app requests of 3 demo rows, at most {options.concurrency} in flight (closed "
        f"loop), `offload_threshold=1.0` (every row to the cloud), app deadline {options.deadline:g} s; the proxy "
        "holds every call for the link's round trip before it forwards it. Answer cache off, as in the fault "
        "benchmark, so that every row travels. Cloud calls are counted by the proxy. The proxy adds latency only: "
        "what a real link charges per call (radio wake-ups, TLS records, the cloud's work per request), which "
        "fewer calls save, is not in these figures; what coalescing costs is (rows that wait for a call in flight, "
        "or for the window)."
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return header + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per setting (default 400)")
    parser.add_argument("--concurrency", type=int, default=16, help="most requests in flight (default 16)")
    parser.add_argument("--deadline", type=float, default=2.0, help="the app's gRPC deadline in seconds (2.0)")
    parser.add_argument(
        "--link-ms", type=float, nargs="+", default=[0.0, 5.0, 20.0], help="link round trips (default 0 5 20)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write (benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    options = parser.parse_args(argv)
    rows = asyncio.run(run(options))
    command = shlex.join(["python", "benchmarks/coalescing.py", *(sys.argv[1:] if argv is None else argv)])
    body = report(rows, options, command)
    print(f"{HEADING}\n\n{body}")
    if not options.no_write:
        write_section(options.results, HEADING, body)
        print(f"\nwritten to {options.results}", file=sys.stderr)
    return 0 if all(row.failed == 0 and row.problems == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
