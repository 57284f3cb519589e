"""`offload demo`: the whole system on this machine, measured on the bundled test set.

It starts a cloud service and an edge agent as real processes on free loopback
ports, sends every test sample through the edge agent's gRPC API three times
(forced to the edge, forced to the cloud, and routed), and reports accuracy,
the share offloaded and latency per route.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.repository import load_model
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, ParameterValue
from offload.router.config import RoutedConfig
from offload.router.options import RESPONSE_ROUTE, ROUTE, THRESHOLD
from offload.tools.process import ServerProcess
from offload.tools.progress import with_progress

MODEL = "digits"


@dataclass
class Pass:
    """One pass over the test set with one routing mode."""

    predictions: list[int] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def accuracy(self, labels: npt.NDArray[np.int64]) -> float:
        return float(np.mean(np.asarray(self.predictions) == labels))


def load_test_set(samples: int | None) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    with np.load(DEMO_REPOSITORY / MODEL / "test.npz") as data:
        inputs = data["inputs"].astype(np.float32)
        labels = data["labels"].astype(np.int64)
    if samples is not None:
        inputs, labels = inputs[:samples], labels[:samples]
    return inputs, labels


async def _run_pass(
    client: OipClient, inputs: npt.NDArray[np.float32], route: str, threshold: float | None, label: str
) -> Pass:
    result = Pass()
    parameters: dict[str, ParameterValue] = {ROUTE: route}
    if threshold is not None:
        parameters[THRESHOLD] = threshold
    for index in with_progress(range(len(inputs)), len(inputs), label, "req"):
        request = InferRequest(MODEL, [Tensor.of("pixels", inputs[index : index + 1])], parameters=dict(parameters))
        started = time.perf_counter()
        response = await client.infer(request, timeout=30.0)
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        scores = response.outputs[0].data
        result.predictions.append(int(np.argmax(scores[0])))
        result.routes.append(str(response.parameters[RESPONSE_ROUTE]))
    return result


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "count": 0}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "count": len(values)}


async def _measure(edge_address: str, samples: int | None, threshold: float | None) -> dict[str, Any]:
    inputs, labels = load_test_set(samples)
    async with OipClient(edge_address) as client:
        await client.wait_for_ready(timeout=60)
        # One warm-up request per route so that connection set-up is not measured.
        for route in ("edge", "cloud"):
            await _run_pass(client, inputs[:1], route, None, "warm-up")
        edge = await _run_pass(client, inputs, "edge", None, "edge only")
        cloud = await _run_pass(client, inputs, "cloud", None, "cloud only")
        routed = await _run_pass(client, inputs, "auto", threshold, "routed")
    edge_accuracy, cloud_accuracy, routed_accuracy = (p.accuracy(labels) for p in (edge, cloud, routed))
    offloaded = [route == "cloud" for route in routed.routes]
    gap = cloud_accuracy - edge_accuracy
    config = RoutedConfig.of(load_model(DEMO_REPOSITORY / MODEL))
    return {
        "model": MODEL,
        "samples": len(labels),
        "threshold": config.routing.threshold if threshold is None else threshold,
        "edge_accuracy": edge_accuracy,
        "cloud_accuracy": cloud_accuracy,
        "routed_accuracy": routed_accuracy,
        "offload_rate": float(np.mean(offloaded)),
        "gap_recovered": (routed_accuracy - edge_accuracy) / gap if gap > 0 else None,
        "latency_ms": {
            "edge_only": _percentiles(edge.latencies_ms),
            "cloud_only": _percentiles(cloud.latencies_ms),
            "routed_answered_on_edge": _percentiles(
                [ms for ms, off in zip(routed.latencies_ms, offloaded, strict=True) if not off]
            ),
            "routed_answered_in_cloud": _percentiles(
                [ms for ms, off in zip(routed.latencies_ms, offloaded, strict=True) if off]
            ),
        },
    }


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"Offload demo: model {report['model']!r}, {report['samples']} test samples, "
        f"threshold {report['threshold']:.3f}",
        "",
        f"  edge-only accuracy   {report['edge_accuracy']:7.2%}",
        f"  cloud-only accuracy  {report['cloud_accuracy']:7.2%}",
        f"  routed accuracy      {report['routed_accuracy']:7.2%}   "
        f"(offloaded {report['offload_rate']:.1%} of samples to the cloud)",
    ]
    if report["gap_recovered"] is not None:
        lines.append(f"  edge-to-cloud gap recovered by routing: {report['gap_recovered']:.0%}")
    lines += ["", f"  {'latency per request (ms)':34} {'p50':>7} {'p99':>7} {'requests':>9}"]
    for route, stats in report["latency_ms"].items():
        lines.append(f"  {route.replace('_', ' '):34} {stats['p50']:7.2f} {stats['p99']:7.2f} {stats['count']:9d}")
    return "\n".join(lines)


def run_demo(json_output: bool = False, samples: int | None = None, threshold: float | None = None) -> int:
    say = (lambda text: print(text, file=sys.stderr)) if json_output else print
    say("starting the cloud service (PyTorch) ...")
    with ServerProcess(["cloud", "--grpc-port", "0", "--log-level", "WARNING"]) as cloud:
        cloud_address = cloud.start()
        say(f"cloud service on {cloud_address}; starting the edge agent (ONNX Runtime) ...")
        # No answer cache: each pass must measure the models, not answers an earlier pass cached.
        edge_args = ["edge", "--grpc-port", "0", "--cloud", cloud_address, "--log-level", "WARNING"]
        with ServerProcess(edge_args, env={"OFFLOAD_EDGE_CACHE_MAX_BYTES": "0"}) as edge:
            edge_address = edge.start()
            say(f"edge agent on {edge_address}; routing the test set through its gRPC API ...")
            report = asyncio.run(_measure(edge_address, samples, threshold))
            codes = (edge.terminate(), cloud.terminate())
    if any(codes):
        print(f"a server exited with {codes} on SIGTERM; expected 0", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if json_output else _table(report))
    return 0
