"""The commands as users run them: start, serve, shut down gracefully, report."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import SUBPROCESS_ENV, Processes
from offload.edge.settings import EdgeSettings
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.errors import ConfigurationError, UpstreamError
from offload.oip.settings import load_settings
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.router.options import RESPONSE_DEGRADED, RESPONSE_ROUTE, ROUTE, THRESHOLD
from offload.tools.cli import main
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


STATUS_LINE = "offload.edge.status: status over the last"


@pytest.mark.parametrize(
    ("status_log_seconds", "requests", "lines"),
    [
        pytest.param("60", 1, 1, id="something-happened"),
        pytest.param("60", 0, 0, id="nothing-happened"),
        pytest.param("0", 1, 0, id="status-lines-off"),
    ],
)
async def test_the_edge_agent_writes_a_last_status_line_at_shutdown_when_something_happened(
    status_log_seconds: str, requests: int, lines: int
) -> None:
    """The periodic line (every 60 s) does not come within the test; the last one, written at shutdown,
    covers what happened since the start. status_log_seconds = 0 turns every line off, that one too."""
    env = {**SUBPROCESS_ENV, "OFFLOAD_EDGE_STATUS_LOG_SECONDS": status_log_seconds}
    with ServerProcess(["edge", "--grpc-port", "0"], env=env) as edge:
        address = edge.start()
        async with OipClient(address) as client:
            for _ in range(requests):
                await client.infer(InferRequest("digits", [Tensor.of("pixels", np.zeros((2, 64), np.float32))]))
        code = await asyncio.to_thread(edge.terminate)
        output = edge.output()
    assert code == 0, output
    status = [line for line in output.splitlines() if STATUS_LINE in line]
    assert len(status) == lines, output
    if lines:
        assert " INFO " in status[0]
        assert f"{requests} requests (0 degraded, 0 errors); cloud: none" in status[0], status[0]


@pytest.mark.parametrize("server", ["edge", "cloud"])
def test_both_servers_describe_oip_and_health_through_server_reflection(demo_processes: Processes, server: str) -> None:
    """grpc_reflection's own client lists the services and fetches their descriptors (as grpcurl does)."""
    address = demo_processes.edge.address if server == "edge" else demo_processes.cloud.address
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services, services
        pool = descriptor_pool.DescriptorPool(database)
        oip = {method.name for method in pool.FindServiceByName("inference.GRPCInferenceService").methods}
        health = {method.name for method in pool.FindServiceByName("grpc.health.v1.Health").methods}
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} <= oip
    assert {"Check", "Watch"} <= health


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


@pytest.mark.parametrize("command", [[], ["demo"], ["edge"], ["cloud"], ["manifest"]])
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


def _edge_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offload.tools.cli", "edge", "--grpc-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("not a host", "it has no port"),
        ("gpu-host", "it has no port"),
        ("gpu-host:", "the port '' is not a number"),
        ("gpu-host:0", "the port '0' is not a number from 1 to 65535"),
        ("gpu-host:8101x", "the port '8101x' is not a number"),
        ("not a host:8101", "'not a host' is neither an IP address nor a DNS name"),
        ("10.0.0.300:8101", "'10.0.0.300' is not an IPv4 address"),
        ("::1:8101", "an IPv6 address goes in brackets, as in [::1]:8101"),
        ("[::1]8101", "an IPv6 address goes in brackets, then the port"),
        ("[gpu-host]:8101", "'gpu-host' in brackets is not an IPv6 address"),
    ],
)
def test_a_cloud_address_that_is_not_host_port_is_a_configuration_error(address: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(EdgeSettings, cloud=address)
    message = str(caught.value)
    assert message.startswith("invalid EdgeSettings: cloud: ")
    assert f"{address!r} is not HOST:PORT: {fragment}" in message
    assert "\n" not in message


@pytest.mark.parametrize("address", ["not a host", "gpu-host"])
def test_a_cloud_address_that_is_not_host_port_stops_the_agent_with_one_line(address: str) -> None:
    completed = _edge_command("--cloud", address)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.splitlines() == [
        f"offload edge: invalid EdgeSettings: cloud: Value error, {address!r} is not HOST:PORT: it has no port "
        "(gpu-host:8101, 10.0.0.5:8101 or [fd00::5]:8101)"
    ]
    assert "listening" not in completed.stdout


def test_a_cloud_address_from_the_environment_is_checked_too() -> None:
    completed = _edge_command(env={"OFFLOAD_EDGE_CLOUD": "gpu-host"})
    assert completed.returncode == 2, completed.stderr
    assert "cloud: Value error, 'gpu-host' is not HOST:PORT: it has no port" in completed.stderr


@pytest.mark.parametrize(
    "address", ["gpu-host:8101", "localhost:1", "10.0.0.5:65535", "[fd00::5]:8101", "[::1]:8101", "svc_1.ns.svc.:8101"]
)
def test_a_cloud_address_of_host_and_port_is_accepted(address: str) -> None:
    assert EdgeSettings(cloud=address).cloud == address


def test_an_empty_cloud_address_means_no_cloud() -> None:
    assert EdgeSettings(cloud="").cloud is None


def test_an_agent_whose_cloud_answers_says_so_at_start(demo_processes: Processes) -> None:
    line = demo_processes.edge.wait_for_output(f"cloud {demo_processes.cloud.address} is ready")
    assert "INFO" in line
    assert "does not answer" not in demo_processes.edge.output()


def test_calibrate_checks_its_cloud_address_too(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["calibrate", "--model", "digits", "--data", "x.npz", "--target-offload", "0.1", "--cloud", "gpu-host"]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert "argument --cloud: 'gpu-host' is not HOST:PORT: it has no port" in capsys.readouterr().err


def _closed_loopback_port() -> int:
    """A port nothing listens on: bound by the OS for us, then let go."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_agent_whose_cloud_does_not_answer_warns_once_and_serves_on_the_edge() -> None:
    cloud = f"127.0.0.1:{_closed_loopback_port()}"
    with ServerProcess(["edge", "--grpc-port", "0", "--cloud", cloud], env=SUBPROCESS_ENV) as edge:
        address = edge.start()
        # The warning comes from a look beside the server, which served before the look ended.
        warning = await asyncio.to_thread(edge.wait_for_output, "does not answer at start-up")
        assert "WARNING" in warning
        assert f"cloud {cloud} does not answer at start-up" in warning
        assert "UNAVAILABLE" in warning
        assert "serving on the edge meanwhile" in warning
        with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
            pixels = data["inputs"][:4].astype(np.float32)
        async with OipClient(address) as client:
            response = await client.infer(
                InferRequest("digits", [Tensor.of("pixels", pixels)], parameters={THRESHOLD: 1.0}), timeout=30
            )
        assert response.parameters[RESPONSE_DEGRADED], "rows meant for the cloud got the edge's answer"
        assert response.output("scores") is not None
        said = [line for line in edge.output().splitlines() if "does not answer at start-up" in line]
        assert said == [warning], "said once"


# Artifacts that do not load: one line naming the file (or factory), what failed and what to do; exit code 2.
DIGITS = DEMO_REPOSITORY / "digits"
_TENSORS = (
    'inputs = [{ name = "x", datatype = "FP32", shape = [-1, 5] }]\n'
    'outputs = [{ name = "y", datatype = "FP32", shape = [-1, 2] }]\n'
)
_FACTORIES = {
    "fails_at_import.py": 'raise RuntimeError("no GPU driver found")\n',
    "raises.py": 'def make():\n    raise ValueError("weights file\\nmissing")\n',
    "wrong_shape.py": "import torch\n\ndef make():\n    return torch.nn.Linear(3, 2)\n",
}


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _digits_copy(root: Path, damage: str) -> None:
    folder = root / "digits"
    shutil.copytree(DIGITS, folder)
    _cut_in_half(folder / damage)


def _factory_model(root: Path, factory: str) -> None:
    folder = root / "model"
    folder.mkdir()
    (folder / "model.toml").write_text(f'{_TENSORS}[cloud]\nfactory = "{factory}"\nwarmup_rows = 2\n')


def _torchscript_model(root: Path) -> None:
    folder = root / "model"
    folder.mkdir()
    (folder / "model.toml").write_text(f'{_TENSORS}[cloud]\nartifact = "model.pt"\n')
    (folder / "model.pt").write_bytes(b"PK\x03\x04 not really a zip archive" * 64)


ARTIFACT_CASES = [
    pytest.param(
        "cloud",
        lambda root: _digits_copy(root, "cloud.pt2"),
        (
            "digits/cloud.pt2:",
            "torch.export.load cannot read the program",
            "failed finding central directory",
            "save it again",
        ),
        id="truncated-pt2",
    ),
    pytest.param(
        "cloud",
        _torchscript_model,
        ("model/model.pt:", "torch.jit.load cannot read the TorchScript model", "torch.jit.save", "save it again"),
        id="garbage-torchscript",
    ),
    pytest.param(
        "cloud",
        lambda root: _factory_model(root, "no_such_module_here:make"),
        ("factory 'no_such_module_here:make'", "ModuleNotFoundError", "on PYTHONPATH"),
        id="factory-not-installed",
    ),
    pytest.param(
        "cloud",
        lambda root: _factory_model(root, "fails_at_import:make"),
        ("factory 'fails_at_import:make'", "cannot be imported", "RuntimeError: no GPU driver found"),
        id="factory-fails-at-import",
    ),
    pytest.param(
        "cloud",
        lambda root: _factory_model(root, "raises:make"),
        ("factory 'raises:make' raised ValueError: weights file missing when called", "fix the factory"),
        id="factory-raises",
    ),
    pytest.param(
        "cloud",
        lambda root: _factory_model(root, "raises:nope"),
        ("factory 'raises:nope'", "has no function 'nope'"),
        id="factory-function-missing",
    ),
    pytest.param(
        "cloud",
        lambda root: _factory_model(root, "wrong_shape:make"),
        ("model 'model': the warm-up batch", "RuntimeError", "check that model.toml's inputs and outputs"),
        id="warm-up-fails",
    ),
    pytest.param(
        "edge",
        lambda root: _digits_copy(root, "edge.onnx"),
        ("digits/edge.onnx:", "cannot load the model", "INVALID_PROTOBUF", "export it again"),
        id="truncated-onnx",
    ),
]


@pytest.mark.parametrize(("command", "damage", "fragments"), ARTIFACT_CASES)
def test_an_artifact_that_does_not_load_stops_the_server_with_one_line(
    tmp_path: Path, command: str, damage: Callable[[Path], None], fragments: tuple[str, ...]
) -> None:
    repository = tmp_path / "repository"
    repository.mkdir()
    damage(repository)
    factories = tmp_path / "factories"
    factories.mkdir()
    for name, source in _FACTORIES.items():
        (factories / name).write_text(source)
    args = [command, "--grpc-port", "0", "--model-repository", str(repository), "--log-level", "WARNING"]
    completed = subprocess.run(
        [sys.executable, "-m", "offload.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(factories), os.environ.get("PYTHONPATH", "")])},
    )
    assert completed.returncode == 2, completed.stderr
    # Nothing else: no traceback, and no library warning that carries one.
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"offload {command}: ")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} is not in {lines[0]!r}"
    assert "listening" not in completed.stdout
