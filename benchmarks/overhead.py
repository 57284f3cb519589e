"""What each layer of Offload costs, against a bare baseline in the same run.

    python benchmarks/overhead.py [--requests 500] [--rows 1 64] [--write-results]

Baselines, none of them through Offload's own code:

- a bare `onnxruntime.InferenceSession(...).run` on the edge model's file, with the
  thread counts and providers the edge runs it with (the model's [edge] section);
- a bare call of `torch.export.load(...).module()` on the cloud model's file, on a
  tensor made once, under `torch.inference_mode()`, with the torch intra-op threads the
  cloud service gives each of its inference threads, on the device it serves on;
- a bare gRPC echo server (transport only: it answers every ModelInfer with the
  request's own bytes, no decoding; `offload.tools.bare_echo`).

Measured against them: Offload's model wrappers (`OnnxModel.predict`,
`CloudModel.predict`), the in-process router, the edge agent over gRPC (edge route
and cloud route), and the cloud service over gRPC. Servers are real child processes
on loopback; requests are sequential, so latencies are per request; ratios compare
medians. The thread counts used are printed with the tables.
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
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from offload.cloud.config import CloudSection
from offload.cloud.runtime import CloudModel, pick_device
from offload.cloud.service import size_torch_threads
from offload.cloud.settings import CloudSettings
from offload.edge.agent import load_edge_models
from offload.edge.config import EdgeSection
from offload.models import DEMO_REPOSITORY
from offload.oip import grpc_service_pb2 as pb
from offload.oip.client import OipClient
from offload.oip.messages import request_to_pb
from offload.oip.repository import ModelEntry, load_repository
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.router.core import Router
from offload.tools.bare_echo import BareEchoProcess
from offload.tools.process import ServerProcess
from results_file import RESULTS, write_section

SECTION = "## Overhead (issue 2)"
MODEL = "digits"
WARM_UP = 10
BARE_ORT = "bare onnxruntime InferenceSession.run (edge model)"
BARE_TORCH = "bare torch.export module call (cloud model, unbatched)"
BARE_ECHO_NAME = "bare gRPC echo (transport only)"


@dataclass(frozen=True)
class Baselines:
    """The bare models, loaded as the served paths load theirs (threads, providers, device)."""

    session: ort.InferenceSession
    session_options: ort.SessionOptions
    providers: tuple[str, ...]
    module: torch.nn.Module
    device: torch.device
    torch_threads: int
    inference_threads: int

    @classmethod
    def load(cls, entry: ModelEntry, device: torch.device) -> Baselines:
        edge, cloud = entry.section("edge", EdgeSection), entry.section("cloud", CloudSection)
        if edge is None or cloud is None or cloud.artifact is None:
            raise SystemExit(f"model {entry.config.name!r} needs an [edge] section and a [cloud] artifact")
        options = ort.SessionOptions()
        options.intra_op_num_threads = edge.intra_op_threads
        options.inter_op_num_threads = edge.inter_op_threads
        # The section's providers that this build has, in its order: what the edge's session gets.
        providers = [name for name in edge.providers if name in ort.get_available_providers()]
        session = ort.InferenceSession(str(entry.artifact_path(edge.artifact)), options, providers=providers)
        # The cloud service sizes torch's intra-op pool per inference thread; size this process's the same way.
        settings = CloudSettings()
        size_torch_threads(settings, device)
        module = torch.export.load(str(entry.artifact_path(cloud.artifact))).module().to(device)
        return cls(
            session,
            options,
            tuple(session.get_providers()),
            module,
            device,
            torch.get_num_threads(),
            settings.instances(device),
        )

    def describe(self) -> str:
        threads = (
            f"{self.torch_threads} torch intra-op thread(s), as the cloud service gives each of its "
            f"{self.inference_threads} inference threads"
            if self.device.type == "cpu"
            else f"on {self.device}, synchronised after each call"
        )
        return (
            f"Baselines: `onnxruntime.InferenceSession.run` on the edge model's file with intra_op_num_threads "
            f"{self.session_options.intra_op_num_threads}, inter_op_num_threads "
            f"{self.session_options.inter_op_num_threads} and providers {', '.join(self.providers)}, as the edge "
            "runs it (the model's [edge] section); a call of `torch.export.load(...).module()` on the cloud "
            f"model's file, on a tensor made once, under `torch.inference_mode()`, {threads}; a bare gRPC echo "
            "server (it answers with the request's own bytes, no decoding). The paths through Offload below each "
            "baseline are compared with it."
        )

    def run_onnx(self, feeds: dict[str, npt.NDArray[Any]]) -> object:
        return self.session.run(None, feeds)

    def torch_call(self, inputs: torch.Tensor) -> Callable[[], object]:
        module, synchronise = self.module, self.device.type == "cuda"

        def call() -> object:
            with torch.inference_mode():
                result = module(inputs)
            if synchronise:
                torch.cuda.synchronize(self.device)
            return result

        return call


def _stats(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _time_async(call: Callable[[], Awaitable[object]], requests: int) -> list[float]:
    for _ in range(WARM_UP):
        await call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _time_sync(call: Callable[[], object], requests: int) -> list[float]:
    for _ in range(WARM_UP):
        call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def _measure(
    rows: int, requests: int, edge: str, cloud: str, echo: str, device: torch.device
) -> tuple[Baselines, list[tuple[str, str, float, float]]]:
    with np.load(DEMO_REPOSITORY / MODEL / "test.npz") as data:
        pixels: npt.NDArray[np.float32] = data["inputs"][:rows].astype(np.float32)
    models = load_edge_models(DEMO_REPOSITORY)
    onnx = models[MODEL].edge
    entry = load_repository(DEMO_REPOSITORY)[MODEL]
    bare = Baselines.load(entry, device)
    cloud_model = CloudModel(entry, device)
    feeds = {"pixels": pixels}
    tensor = torch.from_numpy(pixels).to(device)

    def request(route: str) -> InferRequest:
        return InferRequest(MODEL, [Tensor.of("pixels", pixels)], parameters={"offload_route": route})

    results: list[tuple[str, str, float, float]] = []

    def record(name: str, baseline: str, samples: list[float]) -> None:
        results.append((name, baseline, *_stats(samples)))

    record(BARE_ORT, "", _time_sync(lambda: bare.run_onnx(feeds), requests))
    record("Offload's OnnxModel.predict", BARE_ORT, _time_sync(lambda: onnx.predict(feeds), requests))
    with ThreadPoolExecutor(1) as executor:
        router = Router(models, None, executor)
        record(
            "in-process router, edge route",
            BARE_ORT,
            await _time_async(lambda: router.infer(request("edge")), requests),
        )
    record(BARE_TORCH, "", _time_sync(bare.torch_call(tensor), requests))
    record("Offload's CloudModel.predict", BARE_TORCH, _time_sync(lambda: cloud_model.predict(feeds), requests))

    async with grpc.aio.insecure_channel(echo) as channel:
        stub = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        message = request_to_pb(request("edge"))
        record(BARE_ECHO_NAME, "", await _time_async(lambda: stub(message), requests))

    async with OipClient(edge) as edge_client, OipClient(cloud) as cloud_client:
        record(
            "edge agent over gRPC, edge route",
            BARE_ECHO_NAME,
            await _time_async(lambda: edge_client.infer(request("edge")), requests),
        )
        record(
            "cloud service over gRPC",
            BARE_TORCH,
            await _time_async(lambda: cloud_client.infer(request("cloud")), requests),
        )
        record(
            "edge agent over gRPC, cloud route",
            "cloud service over gRPC",
            await _time_async(lambda: edge_client.infer(request("cloud")), requests),
        )
    return bare, results


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
    if options.requests < 1 or min(options.rows) < 1:
        parser.error("--requests and --rows must be at least 1")

    device = pick_device("auto")
    tables = []
    described = ""
    cloud_args = ["cloud", "--grpc-port", "0", "--device", str(device), "--log-level", "WARNING"]
    with ServerProcess(cloud_args) as cloud, BareEchoProcess() as echo:
        cloud_address = cloud.start()
        echo_address = echo.start()
        edge_args = ["edge", "--grpc-port", "0", "--cloud", cloud_address, "--log-level", "WARNING"]
        with ServerProcess(edge_args, env={"OFFLOAD_EDGE_CACHE_MAX_BYTES": "0"}) as edge:
            edge_address = edge.start()
            for rows in options.rows:
                print(f"measuring {rows} row(s) per request ...", file=sys.stderr)
                bare, results = asyncio.run(
                    _measure(rows, options.requests, edge_address, cloud_address, echo_address, device)
                )
                described = bare.describe()
                tables.append(_table(rows, results))
    report = described + "\n\n" + "\n\n".join(tables)
    print(report)
    if options.write_results:
        command = shlex.join(["python", "benchmarks/overhead.py", *sys.argv[1:]])
        body = (
            f"Command: `{command}`; run {datetime.date.today()} on a 2-core CPU, loopback, "
            f"Python {platform.python_version()}, ONNX Runtime {ort.__version__}, torch {torch.__version__} "
            f"({device}), {options.requests} sequential requests per path after {WARM_UP} warm-up requests; the "
            "answer cache is off so every cloud-route request reaches the cloud.\n\n" + report
        )
        write_section(RESULTS, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
