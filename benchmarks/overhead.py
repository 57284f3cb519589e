"""What each layer of Offload costs, against its baseline in the same run.

    python benchmarks/overhead.py [--requests 500] [--rows 1 64] [--write-results]

Baselines: raw ONNX Runtime (the edge model alone), raw torch (the cloud model
alone, unbatched), and a bare gRPC echo server (transport only: it answers every
ModelInfer with the request's own bytes, no decoding; `offload.tools.bare_echo`). Measured: the in-process router,
the edge agent over gRPC (edge route and cloud route), and the cloud service over
gRPC. Servers are real child processes on loopback; requests are sequential, so
latencies are per request; ratios compare medians.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import numpy.typing as npt

from offload.edge.agent import load_edge_models
from offload.models import DEMO_REPOSITORY
from offload.oip import grpc_service_pb2 as pb
from offload.oip.client import OipClient
from offload.oip.repository import load_repository
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.router.core import Router
from offload.tools.bare_echo import BareEchoProcess
from offload.tools.process import ServerProcess
from results_file import RESULTS, write_section

SECTION = "## Overhead (issue 2)"


def _stats(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _time_async(call: Callable[[], Awaitable[object]], requests: int) -> list[float]:
    for _ in range(10):  # warm-up
        await call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _time_sync(call: Callable[[], object], requests: int) -> list[float]:
    for _ in range(10):
        call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def _measure(rows: int, requests: int, edge: str, cloud: str, echo: str) -> list[tuple[str, str, float, float]]:
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        pixels: npt.NDArray[np.float32] = data["inputs"][:rows].astype(np.float32)
    models = load_edge_models(DEMO_REPOSITORY)
    onnx = models["digits"].edge
    from offload.cloud.runtime import CloudModel, pick_device

    cloud_model = CloudModel(load_repository(DEMO_REPOSITORY)["digits"], pick_device("auto"))
    feeds = {"pixels": pixels}

    def request(route: str) -> InferRequest:
        return InferRequest("digits", [Tensor.of("pixels", pixels)], parameters={"offload_route": route})

    results: list[tuple[str, str, float, float]] = []

    def record(name: str, baseline: str, samples: list[float]) -> None:
        results.append((name, baseline, *_stats(samples)))

    record("raw ONNX Runtime (edge model)", "", _time_sync(lambda: onnx.predict(feeds), requests))
    with ThreadPoolExecutor(1) as executor:
        router = Router(models, None, executor)
        record(
            "in-process router, edge route",
            "raw ONNX Runtime (edge model)",
            await _time_async(lambda: router.infer(request("edge")), requests),
        )
    record("raw torch (cloud model, unbatched)", "", _time_sync(lambda: cloud_model.predict(feeds), requests))

    async with grpc.aio.insecure_channel(echo) as channel:
        stub = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        from offload.oip.messages import request_to_pb

        message = request_to_pb(request("edge"))
        record("bare gRPC echo (transport only)", "", await _time_async(lambda: stub(message), requests))

    async with OipClient(edge) as edge_client, OipClient(cloud) as cloud_client:
        record(
            "edge agent over gRPC, edge route",
            "bare gRPC echo (transport only)",
            await _time_async(lambda: edge_client.infer(request("edge")), requests),
        )
        record(
            "cloud service over gRPC",
            "raw torch (cloud model, unbatched)",
            await _time_async(lambda: cloud_client.infer(request("cloud")), requests),
        )
        record(
            "edge agent over gRPC, cloud route",
            "cloud service over gRPC",
            await _time_async(lambda: edge_client.infer(request("cloud")), requests),
        )
    return results


def _table(rows: int, results: list[tuple[str, str, float, float]]) -> str:
    medians = {name: p50 for name, _, p50, _ in results}
    lines = [
        f"**{rows} row{'s' if rows > 1 else ''} per request**",
        "",
        "| path | p50 ms | p99 ms | baseline | p50 vs baseline | added p50 ms |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, baseline, p50, p99 in results:
        if baseline:
            base = medians[baseline]
            lines.append(f"| {name} | {p50:.3f} | {p99:.3f} | {baseline} | {p50 / base:.2f}x | {p50 - base:+.3f} |")
        else:
            lines.append(f"| {name} | {p50:.3f} | {p99:.3f} | (baseline) | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="timed requests per path (default 500)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64], help="rows per request (default: 1 64)")
    parser.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in {RESULTS.name}")
    options = parser.parse_args()

    tables = []
    with ServerProcess(["cloud", "--grpc-port", "0", "--log-level", "WARNING"]) as cloud, BareEchoProcess() as echo:
        cloud_address = cloud.start()
        echo_address = echo.start()
        edge_args = ["edge", "--grpc-port", "0", "--cloud", cloud_address, "--log-level", "WARNING"]
        with ServerProcess(edge_args, env={"OFFLOAD_EDGE_CACHE_MAX_BYTES": "0"}) as edge:
            edge_address = edge.start()
            for rows in options.rows:
                print(f"measuring {rows} row(s) per request ...", file=sys.stderr)
                results = asyncio.run(_measure(rows, options.requests, edge_address, cloud_address, echo_address))
                tables.append(_table(rows, results))
    report = "\n\n".join(tables)
    print(report)
    if options.write_results:
        command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:])
        body = (
            f"Command: `{command.strip()}`; run {datetime.date.today()} on a 2-core CPU, loopback, "
            f"Python {platform.python_version()}, {options.requests} sequential requests per path after 10 warm-up "
            "requests; the answer cache is off so every cloud-route request reaches the cloud.\n\n" + report
        )
        write_section(RESULTS, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
