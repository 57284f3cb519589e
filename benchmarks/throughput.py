"""Throughput benchmark (issue 8): the cloud beside MLServer and Triton, the edge agent beside its floors, and
how the cloud scales with rows per request.

    python benchmarks/throughput.py                      # everything; prints the tables
    python benchmarks/throughput.py --parts cloud --peers offload,triton --duration 5
    python benchmarks/throughput.py --with-128 --processes 4 --write-results

Every server gets the same client (`offload bench`'s: closed loop, N workers with one request in
flight each, raw pre-encoded requests), the same load and the same payload, one server at a time:
- cloud: 1-row [1, 64] FP32 requests at concurrency 1, 8, 64 (--with-128 adds 128) to a bare
  grpc.aio echo of the same payload (the floor: client and transport, no work), the least a
  Python batching server does (benchmarks/peers/minimal_batching_server.py: queue, batch, no
  checks; the floor for a Python front end), `offload cloud` (eager, its default, and with
  `compile = "inductor"`),
  MLServer 1.7.1 (adaptive batching) and Triton through PyTriton 0.7.0 (dynamic batcher), each in
  its own virtual environment (benchmarks/peer_servers.py makes them under .peers/ on first use:
  minutes); ratios are requests per second and p99 against Triton's and MLServer's.
- edge: the edge agent's edge route (`offload_route=edge`, no cloud behind it) against the echo
  floor, the agent's OIP layer alone (`offload.tools.bare_oip --answer constant`: checks and codec,
  no model), the OIP layer with the edge model's run (`--answer model`: no routing), and a bare
  onnxruntime InferenceSession.run of the edge model (N threads on one session, the agent's
  session options), at concurrency 1, 8, 64: what each step up costs.
- scaling: `offload cloud` at 1, 8, 64 and 512 rows per request, at --scaling-concurrency.
Each step runs --warmup seconds before --duration counted seconds, sent by --processes client
processes (default 2). When a server comes near the echo floor, the client may be the limit: the
script says so; rerun with more --processes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from offload.edge.config import EdgeSection
from offload.models import DEMO_REPOSITORY
from offload.oip import event_loop
from offload.oip.repository import load_repository
from offload.oip.types import ParameterValue
from offload.tools.bare_echo import BareEchoProcess
from offload.tools.bare_oip import Answer, BareOipProcess
from offload.tools.bench import BenchOptions, StepResult, run_bench, step_result
from offload.tools.bench_load import Window
from offload.tools.bench_transport import OK
from offload.tools.process import ServerProcess
from peer_servers import DEFAULT_VENVS, minimal, mlserver, triton
from results_file import RESULTS, write_section

SECTION = "## Throughput (issue 8)"
PARTS = ("cloud", "edge", "scaling")
CLOUD_PEERS = ("echo", "minimal", "offload", "offload-inductor", "mlserver", "triton")
NAMES = {
    "echo": "bare grpc.aio echo (floor)",
    "minimal": "minimal Python batching server (floor)",
    "offload": "offload cloud",
    "offload-inductor": "offload cloud, compile = inductor",
    "mlserver": "MLServer 1.7.1 (adaptive batching)",
    "triton": "Triton / PyTriton 0.7.0 (dynamic batcher)",
    "edge": "edge agent, edge route",
    "oip-constant": "OIP layer only (bare_oip --answer constant)",
    "oip-model": "OIP layer + edge model (bare_oip --answer model)",
    "onnxruntime": "bare InferenceSession.run",
}
SCALING_ROWS = (1, 8, 64, 512)
# Beyond this share of the echo floor's requests per second, the client may be what limits a server.
NEAR_FLOOR = 0.8

Results = dict[int, StepResult]  # by concurrency, or by rows per request


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...]
    duration: float
    warmup: float
    processes: int

    def options(
        self,
        address: str,
        rows: int = 1,
        concurrency: tuple[int, ...] | None = None,
        parameters: dict[str, ParameterValue] | None = None,
    ) -> BenchOptions:
        return BenchOptions(
            target=address,
            model="digits",
            input_name="pixels",
            shape=(rows, 64),
            datatype="FP32",
            parameters=parameters or {},
            concurrency=concurrency or self.concurrency,
            duration=self.duration,
            warmup=self.warmup,
            processes=self.processes,
        )


def _measure(
    plan: Plan,
    address: str,
    label: str,
    rows: int = 1,
    concurrency: tuple[int, ...] | None = None,
    parameters: dict[str, ParameterValue] | None = None,
) -> Results:
    print(f"{label} ...", file=sys.stderr)
    report = asyncio.run(run_bench(plan.options(address, rows, concurrency, parameters)))
    return {int(step.load): step for step in report.steps}


@contextmanager
def _offload(kind: str, env: dict[str, str] | None = None) -> Iterator[str]:
    with ServerProcess([kind, "--grpc-port", "0", "--log-level", "WARNING"], env) as server:
        yield server.start()


@contextmanager
def _echo() -> Iterator[str]:
    with BareEchoProcess() as server:
        yield server.start()


def _servers(venvs: Path) -> dict[str, Callable[[], AbstractContextManager[str]]]:
    return {
        "echo": _echo,
        "minimal": minimal,
        "offload": lambda: _offload("cloud"),
        # The same program under torch.compile (a [cloud] option; the peers run it eager): fewer Python-level
        # op dispatches holding the GIL that the server's event loop needs.
        "offload-inductor": lambda: _offload("cloud", {"OFFLOAD_CLOUD_COMPILE": "inductor"}),
        "mlserver": lambda: mlserver(venvs),
        "triton": lambda: triton(venvs),
    }


def measure_cloud(plan: Plan, peers: list[str], venvs: Path) -> dict[str, Results]:
    servers = _servers(venvs)
    measured = {}
    for peer in peers:
        with servers[peer]() as address:
            measured[peer] = _measure(plan, address, NAMES[peer])
    return measured


def measure_edge(plan: Plan) -> dict[str, Results]:
    """The edge agent's edge route, and the floors under it, one step more each: the transport (echo), the
    OIP layer (checks and codec, a constant answer), the OIP layer and the model's run (no routing)."""
    edge_route: dict[str, ParameterValue] = {"offload_route": "edge"}
    with _echo() as address:
        echo = _measure(plan, address, NAMES["echo"])
    floors = {}
    for answer in (Answer.CONSTANT, Answer.MODEL):
        with BareOipProcess(answer) as server:
            floors[f"oip-{answer}"] = _measure(plan, server.start(), NAMES[f"oip-{answer}"])
    with _offload("edge") as address:
        edge = _measure(plan, address, NAMES["edge"], parameters=edge_route)
    print(f"{NAMES['onnxruntime']} ...", file=sys.stderr)
    return {"edge": edge, "echo": echo, **floors, "onnxruntime": _onnxruntime(plan)}


def _onnxruntime(plan: Plan) -> Results:
    """N threads calling run on one session, as the agent's session options set it up, recorded like bench's steps."""
    import onnxruntime as ort

    entry = load_repository(DEMO_REPOSITORY)["digits"]
    section = entry.section("edge", EdgeSection)
    assert section is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads = section.intra_op_threads
    options.inter_op_num_threads = section.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(entry.artifact_path(section.artifact)), options, providers=section.providers)
    feeds = {"pixels": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    results = {}
    for workers in plan.concurrency:
        began = time.perf_counter_ns()
        start = began + round(plan.warmup * 1e9)
        window = Window(start, start + round(plan.duration * 1e9))

        def work(window: Window = window) -> None:
            while window.open(started := time.perf_counter_ns()):
                session.run(None, feeds)
                done = time.perf_counter_ns()
                window.record(done, done - started, OK)

        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(work) for _ in range(workers)]:
                future.result()
        results[workers] = step_result(window, "concurrency", workers, 1)
    return results


def measure_scaling(plan: Plan, concurrency: int) -> Results:
    measured = {}
    with _offload("cloud") as address:
        for rows in SCALING_ROWS:
            steps = _measure(
                plan, address, f"offload cloud, {rows} rows per request", rows=rows, concurrency=(concurrency,)
            )
            measured[rows] = steps[concurrency]
    return measured


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def _rps(step: StepResult | None) -> float | None:
    return None if step is None else step.rps


def _p99(step: StepResult | None) -> float | None:
    return None if step is None else step.p99_ms


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _failed(step: StepResult) -> str:
    """Failures with their statuses, e.g. `12 RESOURCE_EXHAUSTED`."""
    return ", ".join(f"{count} {status}" for status, count in sorted(step.errors.items())) or "0"


def cloud_table(measured: dict[str, Results]) -> str:
    lines = [
        "| server | concurrency | rps | p50 ms | p99 ms | failed | rps vs Triton | rps vs MLServer "
        "| p99 vs Triton | p99 vs MLServer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for peer, results in measured.items():
        for workers, step in results.items():
            triton_step = measured.get("triton", {}).get(workers)
            mlserver_step = measured.get("mlserver", {}).get(workers)
            lines.append(
                f"| {NAMES[peer]} | {workers} | {step.rps:.0f} | {_ms(step.p50_ms)} | {_ms(step.p99_ms)} "
                f"| {_failed(step)} | {_ratio(step.rps, _rps(triton_step))} "
                f"| {_ratio(step.rps, _rps(mlserver_step))} "
                f"| {_ratio(step.p99_ms, _p99(triton_step))} "
                f"| {_ratio(step.p99_ms, _p99(mlserver_step))} |"
            )
    return "\n".join(lines)


def edge_table(measured: dict[str, Results]) -> str:
    lines = [
        "| path | concurrency | rps | p50 ms | p99 ms | failed | rps vs echo | p50 vs echo | rps vs OIP + model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path, results in measured.items():
        for workers, step in results.items():
            echo, floor = measured["echo"].get(workers), measured.get("oip-model", {}).get(workers)
            p50 = None if echo is None else echo.p50_ms
            lines.append(
                f"| {NAMES[path]} | {workers} | {step.rps:.0f} | {_ms(step.p50_ms)} | {_ms(step.p99_ms)} "
                f"| {_failed(step)} | {_ratio(step.rps, _rps(echo))} | {_ratio(step.p50_ms, p50)} "
                f"| {_ratio(step.rps, _rps(floor))} |"
            )
    return "\n".join(lines)


def scaling_table(measured: Results, concurrency: int) -> str:
    one = measured.get(1)
    base = None if one is None else one.rows_per_second
    lines = [
        f"`offload cloud`, concurrency {concurrency}:",
        "",
        "| rows per request | rps | rows/s | p50 ms | p99 ms | failed | rows/s vs 1 row |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows, step in measured.items():
        lines.append(
            f"| {rows} | {step.rps:.0f} | {step.rows_per_second:.0f} | {_ms(step.p50_ms)} | {_ms(step.p99_ms)} "
            f"| {_failed(step)} | {_ratio(step.rows_per_second, base)} |"
        )
    return "\n".join(lines)


def near_floor(measured: dict[str, Results]) -> list[str]:
    """Servers within NEAR_FLOOR of the echo floor: there the client, not the server, may set the pace."""
    floor = measured.get("echo", {})
    return [
        f"{NAMES[name]} at concurrency {workers}: {step.rps:.0f} rps, echo {floor[workers].rps:.0f}"
        for name, results in measured.items()
        if name != "echo"
        for workers, step in results.items()
        if workers in floor and step.rps >= NEAR_FLOOR * floor[workers].rps
    ]


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=_csv, default=list(PARTS), help=f"which of {','.join(PARTS)} (default all)")
    parser.add_argument(
        "--peers", type=_csv, default=list(CLOUD_PEERS), help=f"cloud part: which of {','.join(CLOUD_PEERS)} (all)"
    )
    parser.add_argument("--concurrency", type=_csv, default=["1", "8", "64"], help="steps (default 1,8,64)")
    parser.add_argument("--with-128", action="store_true", help="cloud part: add concurrency 128")
    parser.add_argument("--scaling-concurrency", type=int, default=8, help="scaling part's concurrency (default 8)")
    parser.add_argument("--duration", type=float, default=10.0, help="counted seconds per step (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each step counts (default 2)")
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="client processes (default 2; one Python client process tops out below a bare grpc.aio server)",
    )
    parser.add_argument(
        "--peer-venvs",
        type=Path,
        default=DEFAULT_VENVS,
        help="folder of the peers' virtual environments, mlserver/ and triton/ (default .peers/; made if missing)",
    )
    parser.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in {RESULTS.name}")
    options = parser.parse_args()
    unknown = sorted(set(options.parts) - set(PARTS)) + sorted(set(options.peers) - set(CLOUD_PEERS))
    if unknown:
        parser.error(f"unknown parts or peers: {unknown}")
    concurrency = tuple(int(workers) for workers in options.concurrency)
    plan = Plan(concurrency, options.duration, options.warmup, options.processes)

    sections = []
    warnings: list[str] = []
    if "cloud" in options.parts:
        cloud_plan = replace(plan, concurrency=(*concurrency, 128) if options.with_128 else concurrency)
        cloud = measure_cloud(cloud_plan, options.peers, options.peer_venvs)
        warnings += near_floor(cloud)
        sections.append("**Cloud, 1-row requests**\n\n" + cloud_table(cloud))
    if "edge" in options.parts:
        edge = measure_edge(plan)
        warnings += near_floor({name: results for name, results in edge.items() if name != "onnxruntime"})
        sections.append("**Edge, 1-row requests**\n\n" + edge_table(edge))
    if "scaling" in options.parts:
        scaling = measure_scaling(plan, options.scaling_concurrency)
        sections.append("**Rows per request**\n\n" + scaling_table(scaling, options.scaling_concurrency))
    if warnings:
        sections.append(
            "Near the echo floor (the client may be the limit; rerun with more --processes):\n\n"
            + "\n".join(f"- {line}" for line in warnings)
        )
    report = "\n\n".join(sections)
    print(report)
    if options.write_results:
        write_section(RESULTS, SECTION, _header(options) + "\n\n" + report)
    return 0


def _header(options: argparse.Namespace) -> str:
    import grpc
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (models on the CPU)"
    loop = (
        f"uvloop {importlib.metadata.version('uvloop')}"
        if event_loop.chosen_loop("auto") == "uvloop"
        else "asyncio's event loop"
    )
    command = shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]])
    return (
        f"Command: `{command}`; run {datetime.date.today()} on {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{device}, loopback, Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"torch {torch.__version__}. "
        f"Closed loop, {options.warmup:g} s warm-up then {options.duration:g} s counted per step, "
        f"{options.processes} client process(es); one server at a time; rps counts successful requests, "
        "latencies are theirs, failed counts the rest by status. MLServer: adaptive batching (64 requests, 1 ms), "
        "parallel workers off; Triton: dynamic batcher (64 rows, no queue delay); both run cloud.pt2 with torch "
        "2.13.0 in their own virtual environments, as `offload cloud` runs it by default: at most 2 batches at "
        "once, on CPU each with cores / 2 torch threads. `offload cloud` and the edge agent run with their "
        "defaults (answer caches off for these requests: the cloud's is off by default, the edge route never "
        f"reaches the cloud); they, the echo, the bare OIP servers and the minimal batching server run on {loop} "
        "(event_loop auto)."
    )


if __name__ == "__main__":
    sys.exit(main())
