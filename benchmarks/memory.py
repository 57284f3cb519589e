"""What memory the edge agent takes: for one request of N rows, and for its answer cache under unique rows.

    python benchmarks/memory.py [--rows 1000 10000 60000 200000] [--cache-rows 120000] [--write-results]

Requests: an edge agent with no cloud (every row answered on the edge), its message limit raised to
64 MiB for the largest request; per size, one request of that many demo rows (256 bytes each),
resident memory before it, the peak while it ran (VmHWM, reset before) and after it (once the
allocator has given memory back). Cache: an edge agent behind a real cloud, its default 64 MiB cache,
a stream of unique rows all sent to the cloud (128 rows a request, 6 callers), resident memory as it
goes. Linux only (/proc/PID/status).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import platform
import sys

import numpy as np
import numpy.typing as npt

from offload.oip.client import OipClient
from offload.oip.messages import request_to_pb
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, ParameterValue
from offload.tools.process import ServerProcess
from results_file import RESULTS, write_section

SECTION = "## Memory"
MiB = 1 << 20
PER_REQUEST, CALLERS = 128, 6


def _pixels(start: int, rows: int) -> npt.NDArray[np.float32]:
    """Demo rows, unique across calls: the first pixel counts them."""
    pixels = np.random.default_rng(start).integers(0, 17, size=(rows, 64)).astype(np.float32)
    pixels[:, 0] = np.arange(start, start + rows) + 0.5
    return pixels


async def _requests(sizes: list[int]) -> list[str]:
    lines = [
        "| rows | request MB | before MiB | peak MiB | peak - before MiB | x request | after MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    args = ["edge", "--grpc-port", "0", "--max-message-bytes", str(64 * MiB), "--log-level", "DEBUG"]
    with ServerProcess(args) as edge:
        async with OipClient(edge.start(), 64 * MiB) as client:
            await client.infer(InferRequest("digits", [Tensor.of("pixels", _pixels(0, 16))]))  # warm-up
            for rows in sizes:
                pixels = _pixels(0, rows)
                request = InferRequest("digits", [Tensor.of("pixels", pixels)])
                before, _ = edge.memory()
                edge.reset_peak_memory()
                await client.infer(request, timeout=600)
                size = request_to_pb(request).ByteSize()
                if size >= MiB:  # the agent gives memory back after requests of 1 MiB and more
                    edge.wait_for_line(f"after a call of {size} bytes")
                after, peak = edge.memory()
                grown = peak - before
                lines.append(
                    f"| {rows:,} | {pixels.nbytes / 1e6:.1f} | {before / MiB:.0f} | {peak / MiB:.0f} | "
                    f"{grown / MiB:.0f} | {grown / pixels.nbytes:.1f} | {after / MiB:.0f} |"
                )
                print(lines[-1], file=sys.stderr)
    return lines


async def _cache(rows: int, cloud: str) -> list[str]:
    lines = ["| unique rows sent | resident MiB |", "|---:|---:|"]
    with ServerProcess(["edge", "--grpc-port", "0", "--cloud", cloud, "--log-level", "WARNING"]) as edge:
        async with OipClient(edge.start()) as client:
            starts = itertools.count(0, PER_REQUEST)
            parameters: dict[str, ParameterValue] = {"offload_route": "cloud"}

            async def caller(requests: int) -> None:
                for _ in range(requests):
                    pixels = Tensor.of("pixels", _pixels(next(starts), PER_REQUEST))
                    await client.infer(InferRequest("digits", [pixels], parameters=dict(parameters)))

            await caller(1)
            lines.append(f"| {PER_REQUEST:,} | {edge.memory()[0] / MiB:.0f} |")
            step = 20_000 // (PER_REQUEST * CALLERS)
            for sent in range(step * PER_REQUEST * CALLERS, rows + 1, step * PER_REQUEST * CALLERS):
                await asyncio.gather(*(caller(step) for _ in range(CALLERS)))
                lines.append(f"| {sent + PER_REQUEST:,} | {edge.memory()[0] / MiB:.0f} |")
                print(lines[-1], file=sys.stderr)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 10_000, 60_000, 200_000])
    parser.add_argument("--cache-rows", type=int, default=120_000, help="unique rows for the cache (0: skip)")
    parser.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in {RESULTS.name}")
    options = parser.parse_args()

    report = ["**One request of N rows, edge route**", "", *asyncio.run(_requests(options.rows))]
    if options.cache_rows:
        with ServerProcess(["cloud", "--grpc-port", "0", "--log-level", "WARNING"]) as cloud:
            cache = asyncio.run(_cache(options.cache_rows, cloud.start()))
        report += ["", "**Answer cache (64 MiB) under unique cloud-bound rows**", "", *cache]
    text = "\n".join(report)
    print(text)
    if options.write_results:
        command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
        body = (
            f"Command: `{command.strip()}`; run {datetime.date.today()} on a 2-core CPU, loopback, "
            f"Python {platform.python_version()}. MiB of resident memory (VmRSS, VmHWM) of the edge agent.\n\n" + text
        )
        write_section(RESULTS, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
