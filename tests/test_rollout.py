"""Models rolled out over HTTP: the manifest, the download, the swap under load, the failures that keep the
old model serving, the kept repository after a restart.

Every repository is published on a real HTTP server on loopback (tests/support/http_repository.py) and loaded
into real ONNX Runtime sessions; version 2 of the digits model has its classes reversed, so its answers differ.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import SUBPROCESS_ENV
from offload.cloud.dataplane import CloudDataPlane
from offload.edge.agent import load_edge_models
from offload.edge.downloads import DownloadPolicy
from offload.edge.model_cache import ModelCache
from offload.edge.rollout import ModelRollout, Outcome
from offload.edge.settings import EdgeSettings
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.errors import ConfigurationError
from offload.oip.manifest import Manifest
from offload.oip.server import OipServer
from offload.oip.settings import load_settings
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.router.cache import RowCache
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.options import RESPONSE_ROUTE, ROUTE, THRESHOLD
from offload.router.placement import Placement, PlacementPolicy
from offload.router.pool import CloudPool
from offload.tools.cli import main
from offload.tools.process import ServerProcess
from support.http_repository import RepositoryServer, digits_version, serving

P = ParamSpec("P")
T = TypeVar("T")
# Quick retries: the backoff is recorded by `Waits`, not slept.
POLICY = DownloadPolicy(attempts=3, initial_backoff_seconds=0.5, max_backoff_seconds=2.0, timeout_seconds=30.0)


class Waits:
    """Stands in for asyncio.sleep in the rollout's retries: records the backoff, returns at once."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def _pixels(rows: int = 32) -> npt.NDArray[np.float32]:
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        return np.asarray(data["inputs"][:rows], dtype=np.float32)


def _edge_request(pixels: npt.NDArray[np.float32]) -> InferRequest:
    return InferRequest("digits", [Tensor.of("pixels", pixels)], parameters={ROUTE: "edge"})


def _classes(response: InferResponse) -> npt.NDArray[Any]:
    scores = response.output("scores")
    assert scores is not None
    classes: npt.NDArray[Any] = np.asarray(scores.data).argmax(axis=1)
    return classes


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RepositoryServer]:
    with serving(tmp_path / "published") as published:
        yield published


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return digits_version(tmp_path / "v1", "1")


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    return digits_version(tmp_path / "v2", "2", reversed_classes=True)


def _settings(url: str, cache: Path, **more: Any) -> EdgeSettings:
    return EdgeSettings(model_repository_url=url, model_cache_dir=cache, **more)


@pytest.fixture
async def rollout(server: RepositoryServer, tmp_path: Path) -> AsyncIterator[ModelRollout]:
    opened = ModelRollout.open(_settings(server.url, tmp_path / "cache"), load_edge_models, POLICY, Waits())
    yield opened
    await opened.close()


async def _serving_v1(rollout: ModelRollout, server: RepositoryServer, v1: Path) -> dict[str, RoutedModel]:
    server.publish(v1)
    models = await rollout.start(DEMO_REPOSITORY)
    assert models["digits"].version == "1"
    return models


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def _kept_folders(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir() if path.is_dir())


# The manifest and `offload manifest`.


def test_offload_manifest_lists_every_file_with_its_size_and_sha256(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["manifest", str(v1)]) == 0
    assert f"wrote {v1 / 'manifest.json'}: version sha256:" in capsys.readouterr().out
    written = json.loads((v1 / "manifest.json").read_text())
    (model,) = written["models"]
    assert (model["name"], model["version"], model["folder"]) == ("digits", "1", "digits")
    for file in model["files"]:
        data = (v1 / file["path"]).read_bytes()
        assert file["size"] == len(data)
        assert file["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(file["path"] for file in model["files"]) == ["digits/edge.onnx", "digits/model.toml"]
    # The default version is a digest of the files: the same files, the same version; a change, a new one.
    assert main(["manifest", str(v1)]) == 0
    assert json.loads((v1 / "manifest.json").read_text())["version"] == written["version"]
    (v1 / "digits" / "notes.txt").write_text("changed")
    assert main(["manifest", str(v1), "--version", "2024-06-01"]) == 0
    assert json.loads((v1 / "manifest.json").read_text())["version"] == "2024-06-01"
    assert main(["manifest", str(v1)]) == 0
    assert json.loads((v1 / "manifest.json").read_text())["version"] not in (written["version"], "2024-06-01")


def test_offload_manifest_of_a_folder_that_is_no_repository_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.toml").write_text("version = \n")
    assert main(["manifest", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("offload manifest: ")
    assert "model.toml: not valid TOML" in error
    assert error.count("\n") == 1
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../outside/edge.onnx", "must be relative"),
        ("digits/../../etc/passwd", "must be relative"),
        ("/etc/passwd", "must be relative"),
        ("digits/a\\b", "backslashes"),
        ("digits//edge.onnx", "empty parts"),
        ("other/edge.onnx", "is not inside its folder"),
    ],
)
def test_a_manifest_cannot_point_outside_its_model_folders(path: str, problem: str) -> None:
    sha = "0" * 64
    manifest = {
        "version": "1",
        "models": [
            {
                "name": "digits",
                "version": "1",
                "folder": "digits",
                "files": [
                    {"path": "digits/model.toml", "size": 1, "sha256": sha},
                    {"path": path, "size": 1, "sha256": sha},
                ],
            }
        ],
    }
    with pytest.raises(ConfigurationError, match=r"not a valid manifest\.json") as raised:
        Manifest.parse(json.dumps(manifest).encode(), "URL/manifest.json")
    assert problem in str(raised.value)


# Downloading, keeping, and looking again.


async def test_start_downloads_what_the_edge_needs_verifies_and_keeps_it_then_a_304_costs_nothing(
    rollout: ModelRollout, server: RepositoryServer, v1: Path, tmp_path: Path, edge_executor: ThreadPoolExecutor
) -> None:
    # A file the edge does not need (the cloud's, a data set) stays on the server.
    shutil.copyfile(DEMO_REPOSITORY / "digits" / "test.npz", v1 / "digits" / "test.npz")
    manifest = server.publish(v1)
    models = await rollout.start(DEMO_REPOSITORY)
    assert models["digits"].version == "1"
    assert server.fetched("digits/model.toml") == 1
    assert server.fetched("digits/edge.onnx") == 1
    assert server.fetched("digits/test.npz") == 0
    stats = rollout.stats()
    assert (stats.version, stats.updates, stats.failures, stats.files_downloaded) == (manifest.version, 1, 0, 2)

    (kept,) = _kept_folders(tmp_path / "cache")
    for path in ("digits/model.toml", "digits/edge.onnx"):
        assert (tmp_path / "cache" / kept / path).read_bytes() == (v1 / path).read_bytes()
    assert Manifest.parse((tmp_path / "cache" / kept / "manifest.json").read_bytes(), "kept") == manifest

    router = Router(models, None, edge_executor)
    assert await rollout.check(router) is Outcome.UNCHANGED
    last = server.served()[-1]
    assert (last.path, last.status) == ("manifest.json", 304)
    assert last.if_none_match is not None
    assert server.fetched("digits/edge.onnx") == 1, "nothing downloaded when unchanged"
    assert router.model("digits") is models["digits"]
    assert rollout.stats().unchanged == 1


async def test_a_swap_under_load_fails_no_call_and_new_calls_get_the_new_version(
    rollout: ModelRollout, server: RepositoryServer, v1: Path, v2: Path, edge_executor: ThreadPoolExecutor
) -> None:
    router = Router(await _serving_v1(rollout, server, v1), None, edge_executor)
    pixels = _pixels()
    expected_v2 = load_edge_models(v2)["digits"].edge.predict({"pixels": pixels})["scores"].argmax(axis=1)
    before = _classes(await router.infer(_edge_request(pixels)))
    assert not np.array_equal(before, expected_v2), "version 2 answers differently"

    answered: list[list[str]] = [[] for _ in range(4)]
    under_way, enough = asyncio.Event(), asyncio.Event()

    async def caller(seen: list[str]) -> None:
        while not enough.is_set():
            # A small model runs inline (offload.router.placement), and an answer computed inline is returned
            # without a pause: a caller that loops lets the others (and the rollout) take their turn.
            await asyncio.sleep(0)
            response = await router.infer(_edge_request(pixels))
            seen.append(response.model_version)
            np.testing.assert_array_equal(_classes(response), expected_v2 if response.model_version == "2" else before)
            if all(len(each) >= 5 for each in answered):
                under_way.set()
            if all(each.count("2") >= 5 for each in answered):
                enough.set()

    callers = [asyncio.create_task(caller(seen)) for seen in answered]
    await under_way.wait()  # every caller has answers of version 1 before version 2 is published
    server.publish(v2)
    assert await rollout.check(router) is Outcome.UPDATED
    await asyncio.gather(*callers)  # any failed call fails the test here
    for seen in answered:
        # Each caller's calls are sequential: once one got version 2, none after it got version 1.
        assert seen == sorted(seen)
        assert seen[0] == "1"
        assert seen[-1] == "2"
    assert router.model("digits").version == "2"
    assert router.stats().errors == 0


class WatchedExecutor(ThreadPoolExecutor):
    """One edge thread; `submitted` is set each time a job is handed to it (on the event loop's thread)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = asyncio.Event()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future = super().submit(fn, *args, **kwargs)
        self.submitted.set()
        return future


async def test_a_call_in_flight_at_the_swap_finishes_on_the_old_model_and_teaches_the_new_budget_nothing(
    rollout: ModelRollout, server: RepositoryServer, v1: Path, v2: Path, demo_cloud_plane: CloudDataPlane
) -> None:
    cloud = OipServer(demo_cloud_plane, "test-cloud")
    await cloud.start()
    endpoint = CloudPool(f"127.0.0.1:{cloud.port}", 10.0, 64 << 20)
    # One edge thread, held busy: a call that has picked its model waits for it, across the swap (so the edge
    # model runs on the thread, never inline).
    with WatchedExecutor() as executor:
        router = Router(
            await _serving_v1(rollout, server, v1),
            endpoint,
            executor,
            target_offload=0.2,
            placement=PlacementPolicy(Placement.THREAD),
        )
        try:
            release = threading.Event()
            executor.submit(release.wait)
            executor.submitted.clear()
            # Routed by the online budget: 128 rows, more than the 64 a budget needs to move off 0.999.
            request = InferRequest("digits", [Tensor.of("pixels", _pixels(128))])
            in_flight = asyncio.create_task(router.infer(request))
            await executor.submitted.wait()  # the call has chosen its model and waits for the edge thread
            server.publish(v2)
            assert await rollout.check(router) is Outcome.UPDATED
            release.set()
            assert (await in_flight).model_version == "1"
            assert router.stats().thresholds == {"digits": 0.999}, "the old model's rows stay out of the new budget"
            assert (await router.infer(_edge_request(_pixels(4)))).model_version == "2"
        finally:
            await router.close()
            await cloud.stop(0)


async def test_the_answer_cache_serves_no_answer_of_the_old_version(
    rollout: ModelRollout,
    server: RepositoryServer,
    v1: Path,
    v2: Path,
    demo_cloud_plane: CloudDataPlane,
    edge_executor: ThreadPoolExecutor,
) -> None:
    cloud = OipServer(demo_cloud_plane, "test-cloud")
    await cloud.start()
    endpoint = CloudPool(f"127.0.0.1:{cloud.port}", 10.0, 64 << 20)
    cache = RowCache(64 << 20, 300)
    router = Router(await _serving_v1(rollout, server, v1), endpoint, edge_executor, cache=cache)
    # Threshold 1: every row is unsure, so every row's answer is the cloud's, through the cache.
    request = InferRequest("digits", [Tensor.of("pixels", _pixels(8))], parameters={THRESHOLD: 1.0})
    try:
        assert (await router.infer(request)).parameters[RESPONSE_ROUTE] == "cloud"
        assert (await router.infer(request)).parameters[RESPONSE_ROUTE] == "cache"
        old_scope = router.model("digits").cache_scope
        assert cache.stats().entries == 8

        server.publish(v2)
        assert await rollout.check(router) is Outcome.UPDATED
        # The keys name the edge model's version, and the old version's entries are gone.
        assert router.model("digits").cache_scope != old_scope
        assert cache.stats().entries == 0
        response = await router.infer(request)
        assert (response.model_version, response.parameters[RESPONSE_ROUTE]) == ("2", "cloud")
        assert (await router.infer(request)).parameters[RESPONSE_ROUTE] == "cache"
    finally:
        await router.close()
        await cloud.stop(0)


async def test_only_changed_models_are_downloaded_and_loaded_again_and_only_they_lose_their_budget(
    rollout: ModelRollout,
    server: RepositoryServer,
    v1: Path,
    v2: Path,
    tmp_path: Path,
    demo_cloud_plane: CloudDataPlane,
    edge_executor: ThreadPoolExecutor,
) -> None:
    # A second model, the same in both versions.
    for repository in (v1, v2):
        shutil.copytree(repository / "digits", repository / "twin")
        config = (repository / "twin" / "model.toml").read_text()
        (repository / "twin" / "model.toml").write_text(config.replace('name = "digits"', 'name = "twin"'))
    shutil.copyfile(v1 / "twin" / "edge.onnx", v2 / "twin" / "edge.onnx")
    shutil.copyfile(v1 / "twin" / "model.toml", v2 / "twin" / "model.toml")
    models = await _serving_v1(rollout, server, v1)
    cloud = OipServer(demo_cloud_plane, "test-cloud")
    await cloud.start()
    endpoint = CloudPool(f"127.0.0.1:{cloud.port}", 10.0, 64 << 20)
    # An online budget per model, learned from the traffic (64 rows before it replaces the configured 0.999).
    router = Router(models, endpoint, edge_executor, target_offload=0.2)
    try:
        for name in ("digits", "twin"):
            await router.infer(InferRequest(name, [Tensor.of("pixels", _pixels(128))]))
        learned = router.stats().thresholds
        assert all(threshold != 0.999 for threshold in learned.values())

        server.publish(v2)
        assert await rollout.check(router) is Outcome.UPDATED
        assert server.fetched("twin/edge.onnx") == 1, "linked from the kept repository, not downloaded again"
        assert server.fetched("digits/edge.onnx") == 2
        assert router.model("twin") is models["twin"], "an unchanged model is kept as it is"
        assert router.model("digits").version == "2"
        # The new version's confidences are its own: its budget starts again; the unchanged model keeps its own.
        assert router.stats().thresholds == {"digits": 0.999, "twin": learned["twin"]}
        assert len(_kept_folders(tmp_path / "cache")) == 1, "the previous repository is removed once kept"
    finally:
        await router.close()
        await cloud.stop(0)


# Failures: the old model keeps serving.


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


async def _rejected(
    rollout: ModelRollout, router: Router, caplog: pytest.LogCaptureFixture, tmp_path: Path, kept: list[str]
) -> str:
    """Check once, expect a failure; the old version still serves and is still the one kept. The warning."""
    caplog.clear()
    assert await rollout.check(router) is Outcome.FAILED
    (warning,) = _warnings(caplog)
    assert "(still serving version " in warning
    assert (await router.infer(_edge_request(_pixels(2)))).model_version == "1"
    assert _kept_folders(tmp_path / "cache") == kept, "nothing half-downloaded is left, nothing kept changed"
    return warning


async def test_a_checksum_mismatch_is_rejected_and_tried_again_at_the_next_look(
    rollout: ModelRollout,
    server: RepositoryServer,
    v1: Path,
    v2: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    edge_executor: ThreadPoolExecutor,
) -> None:
    router = Router(await _serving_v1(rollout, server, v1), None, edge_executor)
    kept = _kept_folders(tmp_path / "cache")
    server.publish(v2)
    _corrupt(server.root / "digits" / "edge.onnx")
    warning = await _rejected(rollout, router, caplog, tmp_path, kept)
    assert "digits/edge.onnx: checksum mismatch" in warning
    assert "publish the files first and the manifest last" in warning
    # Not the manifest's fault: once the file is right, the same manifest rolls out.
    shutil.copyfile(v2 / "digits" / "edge.onnx", server.root / "digits" / "edge.onnx")
    assert await rollout.check(router) is Outcome.UPDATED
    assert router.model("digits").version == "2"


async def test_a_download_cut_short_is_retried_with_backoff_then_rejected(
    server: RepositoryServer,
    v1: Path,
    v2: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    edge_executor: ThreadPoolExecutor,
) -> None:
    waits = Waits()
    rollout = ModelRollout.open(_settings(server.url, tmp_path / "cache"), load_edge_models, POLICY, waits)
    try:
        router = Router(await _serving_v1(rollout, server, v1), None, edge_executor)
        kept = _kept_folders(tmp_path / "cache")
        server.publish(v2)
        server.cut_short.add("digits/edge.onnx")
        warning = await _rejected(rollout, router, caplog, tmp_path, kept)
        assert "digits/edge.onnx: RemoteProtocolError" in warning
        assert "(after 3 attempts)" in warning
        assert server.fetched("digits/edge.onnx") == 1 + 3
        assert len(waits.seconds) == 2
        assert all(0 <= wait <= POLICY.max_backoff_seconds for wait in waits.seconds)
    finally:
        await rollout.close()


@pytest.mark.parametrize(("sized", "said"), [(True, "the server declares"), (False, "longer than the")])
async def test_a_file_larger_than_the_manifest_says_is_refused_before_or_while_reading(
    rollout: ModelRollout,
    server: RepositoryServer,
    v1: Path,
    v2: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sized: bool,
    said: str,
    edge_executor: ThreadPoolExecutor,
) -> None:
    router = Router(await _serving_v1(rollout, server, v1), None, edge_executor)
    kept = _kept_folders(tmp_path / "cache")
    server.publish(v2)
    served = server.root / "digits" / "edge.onnx"
    served.write_bytes(served.read_bytes() + b"\0" * 4096)
    if not sized:
        server.unsized.add("digits/edge.onnx")
    warning = await _rejected(rollout, router, caplog, tmp_path, kept)
    assert f"digits/edge.onnx: {said}" in warning
    assert "offload manifest DIR" in warning


async def test_a_model_that_does_not_load_is_rejected_and_not_tried_again_until_it_changes(
    rollout: ModelRollout,
    server: RepositoryServer,
    v1: Path,
    v2: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    edge_executor: ThreadPoolExecutor,
) -> None:
    router = Router(await _serving_v1(rollout, server, v1), None, edge_executor)
    kept = _kept_folders(tmp_path / "cache")
    onnx_file = v2 / "digits" / "edge.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])  # published as it is: the manifest agrees
    server.publish(v2)
    warning = await _rejected(rollout, router, caplog, tmp_path, kept)
    assert "repository version " in warning
    assert " rejected" in warning
    assert "does not load" in warning
    assert "cannot load the model" in warning
    assert "fix the model and publish it again" in warning
    # The same manifest is not downloaded again: the next look is a 304, and quiet.
    caplog.clear()
    downloads = server.fetched("digits/edge.onnx")
    assert await rollout.check(router) is Outcome.UNCHANGED
    assert server.served()[-1].status == 304
    assert server.fetched("digits/edge.onnx") == downloads
    assert _warnings(caplog) == []


def _write_failing_at_run_time(path: Path) -> None:
    """An ONNX model with the digits model's tensors that loads but fails on any one row: 64 values do not
    reshape into rows of 3."""
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [2], [-1, 3])),
        helper.make_node("Reshape", ["pixels", "shape"], ["rows_of_3"]),
        helper.make_node("ReduceSum", ["rows_of_3"], ["total"], keepdims=0),
        helper.make_node("Constant", [], ["starts"], value=helper.make_tensor("a", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["ends"], value=helper.make_tensor("b", TensorProto.INT64, [1], [10])),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("c", TensorProto.INT64, [1], [1])),
        helper.make_node("Slice", ["pixels", "starts", "ends", "axes"], ["first_10"]),
        helper.make_node("Add", ["first_10", "total"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fails_at_run_time",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


async def test_a_model_that_fails_its_warm_up_is_rejected(
    rollout: ModelRollout,
    server: RepositoryServer,
    v1: Path,
    v2: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    edge_executor: ThreadPoolExecutor,
) -> None:
    router = Router(await _serving_v1(rollout, server, v1), None, edge_executor)
    kept = _kept_folders(tmp_path / "cache")
    _write_failing_at_run_time(v2 / "digits" / "edge.onnx")
    server.publish(v2)
    warning = await _rejected(rollout, router, caplog, tmp_path, kept)
    assert "model 'digits' v2 failed its warm-up" in warning
    assert "check that model.toml's inputs and outputs are what the model takes" in warning


async def test_a_manifest_over_the_download_budget_is_refused_before_any_download(
    server: RepositoryServer, v1: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(server.url, tmp_path / "cache", model_download_max_bytes=10_000)
    rollout = ModelRollout.open(settings, load_edge_models, POLICY, Waits())
    try:
        server.publish(v1)
        models = await rollout.start(DEMO_REPOSITORY)
        assert models["digits"].version == "1"  # the seed's (model_repository), until a download succeeds
        assert rollout.stats().version is None
        assert server.fetched("digits/edge.onnx") == 0
        (refused, seed) = _warnings(caplog)
        assert "more than model_download_max_bytes (10000); raise it or publish smaller models" in refused
        assert "(still serving model_repository)" in refused
        assert f"serving model_repository {DEMO_REPOSITORY} until a download succeeds" in seed
    finally:
        await rollout.close()


async def test_a_manifest_that_is_not_one_is_rejected_with_what_to_do(
    rollout: ModelRollout,
    server: RepositoryServer,
    v1: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    edge_executor: ThreadPoolExecutor,
) -> None:
    router = Router(await _serving_v1(rollout, server, v1), None, edge_executor)
    kept = _kept_folders(tmp_path / "cache")
    (server.root / "manifest.json").write_text('{"version": "3", "models": []}')
    warning = await _rejected(rollout, router, caplog, tmp_path, kept)
    assert "manifest.json: not a valid manifest.json: models: " in warning
    assert "publish one written by `offload manifest DIR`" in warning


# Restarts.


async def test_a_restart_offline_serves_the_kept_repository(
    server: RepositoryServer,
    v1: Path,
    v2: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    edge_executor: ThreadPoolExecutor,
) -> None:
    settings = _settings(server.url, tmp_path / "cache")
    first = ModelRollout.open(settings, load_edge_models, POLICY, Waits())
    router = Router(await _serving_v1(first, server, v1), None, edge_executor)
    server.publish(v2)
    assert await first.check(router) is Outcome.UPDATED
    version = first.stats().version
    await first.close()
    server.stop()

    caplog.clear()
    caplog.set_level(logging.INFO, logger="offload.edge.rollout")
    again = ModelRollout.open(settings, load_edge_models, POLICY, Waits())
    try:
        models = await again.start(DEMO_REPOSITORY)
        assert models["digits"].version == "2"
        assert again.stats().version == version
        assert any(f"serving the kept repository version {version}" in line for line in caplog.messages)
        # Offline, a look fails and changes nothing.
        router = Router(models, None, edge_executor)
        assert await again.check(router) is Outcome.FAILED
        assert router.model("digits") is models["digits"]
        assert "ConnectError" in (again.stats().last_failure or "")
    finally:
        await again.close()


async def test_a_kept_repository_changed_on_disk_is_not_served(
    server: RepositoryServer, v1: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(server.url, tmp_path / "cache")
    first = ModelRollout.open(settings, load_edge_models, POLICY, Waits())
    await _serving_v1(first, server, v1)
    await first.close()
    (kept,) = _kept_folders(tmp_path / "cache")
    _corrupt(tmp_path / "cache" / kept / "digits" / "edge.onnx")

    again = ModelRollout.open(settings, load_edge_models, POLICY, Waits())
    try:
        models = await again.start(DEMO_REPOSITORY)
        (warning,) = _warnings(caplog)
        assert "the kept repository cannot be used" in warning
        assert "changed on disk" in warning
        assert models["digits"].version == "1"
        assert server.fetched("digits/edge.onnx") == 2, "fetched again"
        assert _kept_folders(tmp_path / "cache") != [kept]
    finally:
        await again.close()


def test_a_model_cache_folder_serves_one_agent_at_a_time(tmp_path: Path) -> None:
    first = ModelCache(tmp_path / "cache")
    try:
        with pytest.raises(ConfigurationError, match="is in use by another edge agent; give each agent its own"):
            ModelCache(tmp_path / "cache")
    finally:
        first.close()
    ModelCache(tmp_path / "cache").close()


# Settings.


def test_the_rollout_settings_come_from_flags_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OFFLOAD_EDGE_MODEL_REPOSITORY_URL", "https://models.example.com/edge/")
    monkeypatch.setenv("OFFLOAD_EDGE_MODEL_POLL_SECONDS", "15")
    settings = load_settings(EdgeSettings, model_cache_dir=tmp_path)
    assert settings.model_repository_url == "https://models.example.com/edge/"
    assert settings.model_poll_seconds == 15
    assert settings.model_cache_folder() == tmp_path
    with pytest.raises(ConfigurationError, match="model_repository_url: Value error, 'ftp://host/x' is not an http"):
        load_settings(EdgeSettings, model_repository_url="ftp://host/x")


def test_the_model_cache_defaults_to_a_state_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'systemd'}:{tmp_path / 'other'}")
    assert EdgeSettings().model_cache_folder() == tmp_path / "systemd" / "model-cache"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert EdgeSettings().model_cache_folder() == tmp_path / "xdg" / "offload" / "model-cache"


# The real agent.


async def _first_of(awaitable: Coroutine[Any, Any, object], callers: list[asyncio.Task[None]]) -> None:
    """Wait for `awaitable`, raising at once the error of a caller that fails first."""
    waiting = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([waiting, *callers], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not waiting and task.exception() is not None:
            waiting.cancel()
            raise task.exception()  # type: ignore[misc]
    await waiting


async def test_the_edge_agent_swaps_under_load_and_serves_the_kept_version_after_an_offline_restart(
    server: RepositoryServer, v1: Path, v2: Path, tmp_path: Path
) -> None:
    manifest_v1 = server.publish(v1)
    args = [
        "edge",
        "--grpc-port",
        "0",
        "--model-repository-url",
        server.url,
        "--model-poll-seconds",
        "0.2",
        "--model-cache-dir",
        str(tmp_path / "cache"),
    ]
    pixels = _pixels(16)
    with ServerProcess(args, env=SUBPROCESS_ENV) as edge:
        address = edge.start()
        assert f"serving repository version {manifest_v1.version}" in edge.output()
        answered: list[list[str]] = [[] for _ in range(3)]
        started, enough = asyncio.Event(), asyncio.Event()
        async with OipClient(address) as client:

            async def caller(seen: list[str]) -> None:
                while not enough.is_set():
                    seen.append((await client.infer(_edge_request(pixels), timeout=30)).model_version)
                    if all(len(each) >= 5 for each in answered):
                        started.set()
                    if all(each.count("2") >= 5 for each in answered):
                        enough.set()

            callers = [asyncio.create_task(caller(seen)) for seen in answered]
            # A caller that fails ends the wait at once with its error, rather than leaving the test
            # waiting for answers that will never come.
            await _first_of(started.wait(), callers)
            manifest_v2 = server.publish(v2)
            await _first_of(
                asyncio.to_thread(edge.wait_for_output, f"serving repository version {manifest_v2.version}"), callers
            )
            await asyncio.gather(*callers)  # a failed call fails the test here
        for seen in answered:
            assert seen == sorted(seen)
            assert seen[0] == "1"
            assert seen[-1] == "2"
        assert "WARNING" not in edge.output()
        assert edge.terminate() == 0

    server.stop()
    with ServerProcess(args, env=SUBPROCESS_ENV) as edge:
        address = edge.start()
        assert f"serving the kept repository version {manifest_v2.version}" in edge.output()
        async with OipClient(address) as client:
            response = await client.infer(_edge_request(pixels), timeout=30)
        assert response.model_version == "2"
