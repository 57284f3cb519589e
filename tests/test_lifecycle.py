"""The commands as users run them: start, serve, shut down gracefully, report."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import SUBPROCESS_ENV
from offload.oip.client import OipClient
from offload.oip.errors import UpstreamError
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.router.options import RESPONSE_DEGRADED, RESPONSE_ROUTE, ROUTE
from offload.tools.process import ServerProcess
from support import gate

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    """Poll for a file the server writes (readiness, not a sleep-as-synchronisation)."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


async def _wait_until_not_serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(3000):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("health never reported NOT_SERVING")


async def _drain_with_a_call_in_flight(
    address: str, request: InferRequest, gate_dir: Path, send_signal: Callable[[], None]
) -> InferResponse:
    """Hold a call in the gate model, signal the server, check that it drains (NOT_SERVING; new calls
    refused with UNAVAILABLE rather than queued), then open the gate and return the held call's answer."""
    async with OipClient(address) as client:
        in_flight = asyncio.create_task(client.infer(request, timeout=60))
        await asyncio.to_thread(_wait_for, gate_dir / "arrived")
        send_signal()
        await _wait_until_not_serving(address)
        with pytest.raises(UpstreamError) as refused:
            await client.infer(request, timeout=5)
        assert refused.value.status == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in str(refused.value)
        (gate_dir / "open").touch()
        return await in_flight


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_answers_calls_in_flight_refuses_new_ones_and_exits_zero(
    tmp_path: Path, signum: signal.Signals
) -> None:
    repository = gate.write_repository(tmp_path / "repository")
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    env = {**SUBPROCESS_ENV, gate.MARKER_ENV: str(gate_dir)}
    with ServerProcess(
        ["cloud", "--grpc-port", "0", "--model-repository", str(repository), "--grace-seconds", "30"], env=env
    ) as server:
        address = server.start()
        request = InferRequest("gate", [Tensor.of("x", np.ones((1, 1), dtype=np.float32))])
        response = await _drain_with_a_call_in_flight(address, request, gate_dir, lambda: server.signal(signum))
        np.testing.assert_array_equal(response.outputs[0].data, [[1.0]])
        # The one signal above is all it takes: the server exits by itself once drained.
        code = await asyncio.to_thread(server.wait)
    assert code == 0, server.output()


async def test_cloud_exits_after_its_grace_period_even_with_a_model_call_stuck(tmp_path: Path) -> None:
    repository = gate.write_repository(tmp_path / "repository")
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    env = {**SUBPROCESS_ENV, gate.MARKER_ENV: str(gate_dir), "OFFLOAD_CLOUD_MAX_INFLIGHT_ROWS": "2"}
    args = ["cloud", "--grpc-port", "0", "--model-repository", str(repository), "--inference-threads", "1"]
    with ServerProcess([*args, "--grace-seconds", "1"], env=env) as server:
        address = server.start()

        def request(value: float) -> InferRequest:
            return InferRequest("gate", [Tensor.of("x", np.full((1, 1), value, dtype=np.float32))])

        async with OipClient(address) as client:
            # One call stuck in the model (the gate never opens), one queued behind it: capacity is 2,
            # so of two more calls one is queued and the other refused, whichever comes first.
            stuck = asyncio.create_task(client.infer(request(0), timeout=60))
            await asyncio.to_thread(_wait_for, gate_dir / gate.started_marker(0))
            more = [asyncio.create_task(client.infer(request(value), timeout=60)) for value in (1, 2)]
            done, _ = await asyncio.wait(more, return_when=asyncio.FIRST_COMPLETED)
            (refused,) = done
            error = refused.exception()
            assert isinstance(error, UpstreamError)
            assert error.status == grpc.StatusCode.RESOURCE_EXHAUSTED
            queued_value = 2 if refused is more[0] else 1

            server.signal(signal.SIGTERM)
            # The process ends by itself: the grace period is over and the stuck call is abandoned.
            code = await asyncio.to_thread(server.wait, 30.0)
            for call in (stuck, *more):
                with pytest.raises(UpstreamError):
                    await call
    assert code == 0, server.output()
    assert "1 model call(s) still running after the 1.0s grace period; exiting without waiting" in server.output()
    assert gate.started(gate_dir) == {gate.started_marker(0)}, (
        f"the queued call ({queued_value}) was dropped, never run"
    )


async def test_edge_agent_drains_on_sigterm(tmp_path: Path) -> None:
    repository = gate.write_repository(tmp_path / "repository", edge=True)
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    env = {**SUBPROCESS_ENV, gate.MARKER_ENV: str(gate_dir)}
    common = ["--grpc-port", "0", "--model-repository", str(repository), "--grace-seconds", "30"]
    with ServerProcess(["cloud", *common], env=env) as cloud:
        cloud_address = cloud.start()
        # A long cloud deadline, so that the call held in the cloud stays in flight at the edge.
        edge_args = ["edge", *common, "--cloud", cloud_address, "--cloud-timeout-seconds", "60"]
        with ServerProcess(edge_args, env=env) as edge:
            address = edge.start()
            request = InferRequest(
                "gate",
                [Tensor.of("x", np.ones((1, 1), dtype=np.float32))],
                parameters={ROUTE: "cloud"},
            )
            # The call waits in the cloud's model while the edge drains.
            response = await _drain_with_a_call_in_flight(
                address, request, gate_dir, lambda: edge.signal(signal.SIGTERM)
            )
            assert response.parameters[RESPONSE_ROUTE] == "cloud", "answered by the cloud while the edge drained"
            assert not response.parameters[RESPONSE_DEGRADED]
            code = await asyncio.to_thread(edge.wait)
        assert code == 0, edge.output()


def test_demo_json_meets_the_acceptance_figures() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "offload.tools.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    for key in ("edge_accuracy", "cloud_accuracy", "routed_accuracy", "offload_rate"):
        assert 0.0 <= report[key] <= 1.0
    assert report["samples"] > 0
    assert report["cloud_accuracy"] >= report["edge_accuracy"] + 0.015
    assert report["routed_accuracy"] >= report["cloud_accuracy"] - 0.005
    assert report["offload_rate"] <= 0.30


def test_generated_protocol_code_is_up_to_date() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr


def test_edge_side_never_imports_torch() -> None:
    code = (
        "import sys, offload.router, offload.edge.agent, offload.edge, offload.tools.cli; "
        "from offload.edge.agent import load_edge_models; from offload.models import DEMO_REPOSITORY; "
        "load_edge_models(DEMO_REPOSITORY); "
        "assert 'torch' not in sys.modules and 'offload.cloud' not in sys.modules, 'edge imported torch'"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["edge"], ["cloud"]])
def test_every_command_has_help(command: list[str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "offload.tools.cli", *command, "--help"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0
    assert "usage: offload" in completed.stdout


# Each wing validates the sections it uses: the edge agent [edge] and [routing], the cloud [cloud].
@pytest.mark.parametrize(
    ("command", "config", "field"),
    [
        ("edge", '[routing]\nthreshold = 2.0\n[edge]\nartifact = "missing.onnx"\n', "routing.threshold"),
        ("cloud", '[cloud]\nartifact = "missing.pt2"\nwarmup_rows = -1\n', "cloud.warmup_rows"),
    ],
)
def test_bad_model_repository_is_a_clear_start_up_error(tmp_path: Path, command: str, config: str, field: str) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.toml").write_text(config)
    completed = subprocess.run(
        [sys.executable, "-m", "offload.tools.cli", command, "--grpc-port", "0", "--model-repository", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert "model.toml" in completed.stderr
    assert field in completed.stderr
