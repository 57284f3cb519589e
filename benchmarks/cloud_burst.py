"""A burst of large requests against the cloud: the memory it takes, and what the callers get.

    python benchmarks/cloud_burst.py [--clients 24] [--requests 2] [--rows 180000] [--deadline 120]
                                     [--checkout DIR] [--cap N] [--write-results]

One real `offload cloud` process on the CPU serves the demo model with its default settings
(OFFLOAD_CLOUD_* in the environment change them). Once it listens and has warmed up, every
client, each on its own channel, sends `--requests` requests of `--rows` FP32 rows at once,
with a `--deadline`. Reported: the server's resident memory (VmRSS) before the burst, its
peak (VmHWM), and after the burst, when every call has ended and again a few seconds later;
how many calls were answered, refused (RESOURCE_EXHAUSTED, and how soon) or ran out their
deadline, and the wall time. With `--checkout`, a first run serves another checkout's code
(say an earlier commit, `git archive COMMIT | tar -x -C DIR`), for a before-and-after; with
`--cap`, a last run sets max_concurrent_rpcs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from offload.oip.messages import request_to_pb
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.tools.process import ServerProcess
from results_file import RESULTS, write_section

SECTION = "## Cloud burst of large requests: memory and deadlines"
MIB = 1 << 20
METHOD = "/inference.GRPCInferenceService/ModelInfer"
SETTLE_SECONDS = 5.0
MESSAGE_BYTES = 64 << 20


async def _burst(address: str, body: bytes, clients: int, requests: int, deadline: float) -> list[tuple[str, float]]:
    """(status name, seconds to the outcome) of every call."""
    options = [("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(clients)]
    started = time.perf_counter()

    async def call(channel: grpc.aio.Channel) -> tuple[str, float]:
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        try:
            await stub(body, timeout=deadline)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        return code, time.perf_counter() - started

    try:
        return await asyncio.gather(*(call(channel) for channel in channels for _ in range(requests)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def _run(label: str, env: dict[str, str], body: bytes, options: argparse.Namespace) -> str:
    """One server, one burst: a table row."""
    args = ["cloud", "--grpc-port", "0", "--device", "cpu", "--log-level", "WARNING"]
    print(f"{label}: {options.clients} x {options.requests} x {options.rows} rows ...", file=sys.stderr)
    with ServerProcess(args, env=env) as cloud:
        address = cloud.start()
        before, _ = cloud.memory()
        wall = time.perf_counter()
        outcomes = asyncio.run(_burst(address, body, options.clients, options.requests, options.deadline))
        wall = time.perf_counter() - wall
        ended_rss, ended_peak = cloud.memory()
        time.sleep(SETTLE_SECONDS)
        settled, _ = cloud.memory()
    codes = Counter(code for code, _ in outcomes)
    refused = sorted(seconds for code, seconds in outcomes if code == "RESOURCE_EXHAUSTED")
    answered = sorted(seconds for code, seconds in outcomes if code == "OK")
    refusals = f"{statistics.median(refused):.1f} / {refused[-1]:.1f}" if refused else "-"
    return (
        f"| {label} | {before / MIB:.0f} | {ended_peak / MIB:.0f} | {ended_rss / MIB:.0f} | "
        f"{settled / MIB:.0f} | {', '.join(f'{code} {count}' for code, count in sorted(codes.items()))} | "
        f"{refusals} | {answered[-1] if answered else 0:.1f} | {wall:.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=24, help="clients, each on its own channel (default 24)")
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends at once (default 2)")
    parser.add_argument("--rows", type=int, default=180_000, help="FP32 rows of 64 values per request (default 180000)")
    parser.add_argument("--deadline", type=float, default=120.0, help="each call's deadline in seconds (default 120)")
    parser.add_argument("--checkout", type=Path, help="first run the server from this checkout's code (before)")
    parser.add_argument("--cap", type=int, help="then once more with max_concurrent_rpcs set to this")
    parser.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in {RESULTS.name}")
    options = parser.parse_args()

    pixels = np.random.default_rng(0).integers(0, 17, size=(options.rows, 64)).astype(np.float32)
    body = request_to_pb(InferRequest("digits", [Tensor.of("pixels", pixels)])).SerializeToString()
    del pixels
    runs: list[tuple[str, dict[str, str]]] = []
    if options.checkout is not None:
        wings = ("proto", "router", "edge", "cloud", "tools", "models")
        pythonpath = os.pathsep.join(str(options.checkout.resolve() / wing) for wing in wings)
        runs.append((f"before ({options.checkout.name})", {"PYTHONPATH": pythonpath}))
    runs.append(("this code, defaults", {}))
    if options.cap is not None:
        runs.append(
            (f"this code, max_concurrent_rpcs={options.cap}", {"OFFLOAD_CLOUD_MAX_CONCURRENT_RPCS": str(options.cap)})
        )
    lines = [
        "| server | VmRSS before MiB | VmHWM MiB | VmRSS at end MiB | VmRSS 5 s later MiB | outcomes | "
        "refused after s (median / slowest) | last answer s | wall s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
        *(_run(label, env, body, options) for label, env in runs),
    ]
    report = "\n".join(lines)
    print(report)
    if options.write_results:
        command = "python benchmarks/cloud_burst.py " + " ".join(sys.argv[1:])
        text = (
            f"Command: `{command.strip()}`; run {datetime.date.today()} on a 2-core CPU shared with other work "
            f"(figures are indicative), loopback, the demo model: {options.clients} clients, each on its own "
            f"channel, send {options.requests} requests of {options.rows:,} FP32 rows ({len(body) / 2**20:.0f} MiB) "
            f"at once, each with a {options.deadline:g} s deadline.\n\n" + report
        )
        write_section(RESULTS, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
