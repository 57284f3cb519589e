"""Cloud throughput under closed-loop load, with dynamic batching on and off.

    python benchmarks/cloud_load.py [--concurrency 1 8 64 128] [--seconds 10] [--rows 1] [--write-results]

For each setting of batching, a real `offload cloud` process (CPU, the demo model) is started;
then for each concurrency, that many callers each send one request, wait for its answer and
send the next, for `--seconds` after a short warm-up. Requests are serialized once and
answers are not decoded, so the one client process costs the server's cores as little as it
can. Reported: answers per second, p50 and p99 latency, and failed calls.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import statistics
import sys
import time
from collections import Counter

import grpc
import numpy as np

from offload.models import DEMO_REPOSITORY
from offload.oip.messages import request_to_pb
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.tools.process import ServerProcess
from results_file import RESULTS, write_section

SECTION = "## Cloud throughput: dynamic batching"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
WARM_UP_SECONDS = 1.0


def _request(rows: int) -> bytes:
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        pixels = np.ascontiguousarray(data["inputs"][:rows], dtype=np.float32)
    return request_to_pb(InferRequest("digits", [Tensor.of("pixels", pixels)])).SerializeToString()


async def _load(address: str, body: bytes, concurrency: int, seconds: float) -> tuple[int, list[float], Counter[str]]:
    """(answers, latencies in ms, errors by status) of `concurrency` closed-loop callers over `seconds`."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        warm_until = time.perf_counter() + WARM_UP_SECONDS
        stop = warm_until + seconds

        async def caller() -> None:
            while (now := time.perf_counter()) < stop:
                try:
                    await call(body, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                if now >= warm_until:
                    latencies.append((time.perf_counter() - now) * 1000)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), latencies, errors


def _percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 64, 128], help="callers (default: 1 8 64 128)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point (default 10)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in {RESULTS.name}")
    options = parser.parse_args()

    body = _request(options.rows)
    lines = [
        "| batching | concurrency | answers/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for batching in (False, True):
        env = {"OFFLOAD_CLOUD_BATCHING": str(batching).lower()}
        args = ["cloud", "--grpc-port", "0", "--device", "cpu", "--log-level", "WARNING"]
        with ServerProcess(args, env=env) as cloud:
            address = cloud.start()
            for concurrency in options.concurrency:
                print(f"batching {'on' if batching else 'off'}, {concurrency} caller(s) ...", file=sys.stderr)
                answers, latencies, errors = asyncio.run(_load(address, body, concurrency, options.seconds))
                lines.append(
                    f"| {'on' if batching else 'off'} | {concurrency} | {answers / options.seconds:.0f} | "
                    f"{statistics.median(latencies):.2f} | {_percentile(latencies, 0.99):.2f} | "
                    f"{', '.join(f'{code} {count}' for code, count in errors.items()) or 0} |"
                )
    report = "\n".join(lines)
    print(report)
    if options.write_results:
        command = "python benchmarks/cloud_load.py " + " ".join(sys.argv[1:])
        body_text = (
            f"Command: `{command.strip()}`; run {datetime.date.today()} on a 2-core CPU shared with other work "
            f"(figures are indicative), loopback, Python {platform.python_version()}, the demo model, "
            f"{options.rows}-row FP32 requests, one client process, closed loop, {options.seconds:g} s per point "
            f"after {WARM_UP_SECONDS:g} s of warm-up.\n\n" + report
        )
        write_section(RESULTS, SECTION, body_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
