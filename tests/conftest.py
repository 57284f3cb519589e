"""Shared fixtures: models are loaded once per session; servers are real gRPC servers on loopback, port 0."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from offload.cloud.dataplane import CloudDataPlane
from offload.cloud.settings import CloudSettings
from offload.edge.agent import load_edge_models
from offload.edge.dataplane import RouterDataPlane
from offload.models import DEMO_REPOSITORY
from offload.oip.limits import ServerLimits
from offload.oip.repository import load_repository
from offload.oip.server import OipServer
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.pool import CloudPool
from offload.tools.process import ServerProcess
from support.repos import write_echo_repository

TESTS = Path(__file__).resolve().parent
# Server subprocesses import the echo model's factory from tests/support.
SUBPROCESS_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where torch sees a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def echo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_echo_repository(tmp_path_factory.mktemp("echo-repository"))


def _cloud_plane(repository: Path) -> CloudDataPlane:
    import torch

    settings = CloudSettings(model_repository=repository)
    return CloudDataPlane.load(load_repository(repository), settings, torch.device("cpu"))


@pytest.fixture(scope="session")
def demo_cloud_plane() -> Iterator[CloudDataPlane]:
    plane = _cloud_plane(DEMO_REPOSITORY)
    yield plane
    plane.close()


@pytest.fixture(scope="session")
def echo_cloud_plane(echo_repository: Path) -> Iterator[CloudDataPlane]:
    plane = _cloud_plane(echo_repository)
    yield plane
    plane.close()


@pytest.fixture(scope="session")
def demo_edge_models() -> dict[str, RoutedModel]:
    return load_edge_models(DEMO_REPOSITORY)


@pytest.fixture(scope="session")
def echo_edge_models(echo_repository: Path) -> dict[str, RoutedModel]:
    return load_edge_models(echo_repository)


@pytest.fixture(scope="session")
def edge_executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="test-edge") as executor:
        yield executor


@dataclass
class Stack:
    """A cloud server and an edge agent in this process, on loopback ports."""

    cloud: OipServer
    edge: OipServer
    router: Router

    @property
    def cloud_address(self) -> str:
        return f"127.0.0.1:{self.cloud.port}"

    @property
    def edge_address(self) -> str:
        return f"127.0.0.1:{self.edge.port}"


@asynccontextmanager
async def running_stack(
    cloud_plane: CloudDataPlane,
    edge_models: dict[str, RoutedModel],
    executor: ThreadPoolExecutor,
    limits: ServerLimits | None = None,
) -> AsyncIterator[Stack]:
    limits = limits or ServerLimits()
    cloud = OipServer(cloud_plane, "test-cloud", limits)
    await cloud.start()
    router = Router(edge_models, CloudPool(f"127.0.0.1:{cloud.port}", 10.0, limits.max_message_bytes), executor)
    edge = OipServer(RouterDataPlane(router), "test-edge", limits)
    await edge.start()
    try:
        yield Stack(cloud, edge, router)
    finally:
        await edge.stop(0)
        await router.close()
        await cloud.stop(0)


@pytest.fixture
async def demo_stack(
    demo_cloud_plane: CloudDataPlane, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> AsyncIterator[Stack]:
    async with running_stack(demo_cloud_plane, demo_edge_models, edge_executor) as stack:
        yield stack


@pytest.fixture
async def echo_stack(
    echo_cloud_plane: CloudDataPlane, echo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> AsyncIterator[Stack]:
    async with running_stack(echo_cloud_plane, echo_edge_models, edge_executor) as stack:
        yield stack


@dataclass
class Processes:
    """The real `offload cloud` and `offload edge` commands, as child processes."""

    cloud: ServerProcess
    edge: ServerProcess


def start_processes(repository: Path, edge_args: Sequence[str] = ()) -> Processes:
    """`offload cloud`, then `offload edge` pointed at it (with `edge_args` besides), on free ports."""
    cloud = ServerProcess(["cloud", "--grpc-port", "0", "--model-repository", str(repository)], env=SUBPROCESS_ENV)
    cloud_address = cloud.start()
    edge = ServerProcess(
        ["edge", "--grpc-port", "0", "--model-repository", str(repository), "--cloud", cloud_address, *edge_args],
        env=SUBPROCESS_ENV,
    )
    try:
        edge.start()
    except Exception:
        cloud.kill()
        raise
    return Processes(cloud, edge)


@pytest.fixture(scope="session")
def demo_processes() -> Iterator[Processes]:
    processes = start_processes(DEMO_REPOSITORY)
    yield processes
    processes.edge.kill()
    processes.cloud.kill()


@pytest.fixture(scope="session")
def echo_processes(echo_repository: Path) -> Iterator[Processes]:
    processes = start_processes(echo_repository)
    yield processes
    processes.edge.kill()
    processes.cloud.kill()
