"""The cloud runtime's model formats and batch limits, through a real cloud server on loopback.

Each model is made here, small, in a temporary model repository: a torch.export program
with a bounded batch dimension, a TorchScript file, and a Python factory returning an
nn.Module. Answers are compared with the same module run eagerly, and exported programs' also
with the file loaded bare (`torch.export.load(path).module()`). The demo's model is run batched on
each device (CUDA where one exists: tests marked `gpu`) and in float32, float16 and bfloat16, and a
small program under torch.compile, against bare torch.
"""

from __future__ import annotations

import asyncio
import itertools
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from offload.cloud import memory as cloud_memory
from offload.cloud import settings as cloud_settings
from offload.cloud.config import ComputeDtype, ModelDefaults
from offload.cloud.dataplane import CloudDataPlane
from offload.cloud.registry import ModelRegistry
from offload.cloud.runtime import CloudModel
from offload.cloud.scheduler import Scheduler
from offload.cloud.settings import CloudSettings
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.errors import ConfigurationError
from offload.oip.repository import load_model, load_repository
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from support import reference

TIMEOUT = 60.0
EXPORT_MAX_ROWS = 1 << 16  # the bound the demo's cloud.pt2 was exported with


def _tiny() -> torch.nn.Module:
    """Four features in, three scores out; seeded, so every copy has the same weights. The dropout
    makes training mode visible: only in eval mode is the answer a function of the input."""
    torch.manual_seed(7)
    layers = torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
    return torch.nn.Sequential(*layers).eval()


def _write_model(root: Path, name: str, cloud_section: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        'inputs = [{ name = "x", datatype = "FP32", shape = [-1, 4] }]\n'
        'outputs = [{ name = "y", datatype = "FP32", shape = [-1, 3] }]\n'
        f"[cloud]\n{cloud_section}\nwarmup_rows = 2\n"
    )
    return folder


def _rows(count: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(3).normal(size=(count, 4)).astype(np.float32)


def _eager(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    with torch.inference_mode():
        scores: npt.NDArray[np.float32] = _tiny()(torch.from_numpy(rows)).numpy()
    return scores


@asynccontextmanager
async def _cloud(
    repository: Path, device: str = "cpu", **settings: Any
) -> AsyncIterator[tuple[OipClient, CloudDataPlane]]:
    plane = CloudDataPlane.load(
        load_repository(repository), CloudSettings(model_repository=repository, **settings), torch.device(device)
    )
    server = OipServer(plane, "test-cloud")
    try:
        await server.start()
        async with OipClient(f"127.0.0.1:{server.port}") as client:
            yield client, plane
    finally:
        await server.stop(0)
        plane.close()


async def _scores(client: OipClient, model: str, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    response = await client.infer(InferRequest(model, [Tensor.of("x", rows)]), timeout=TIMEOUT)
    scores: npt.NDArray[np.float32] = response.as_dict()["y"].data
    return scores


async def test_the_demo_cloud_model_answers_as_its_program_run_bare(demo_cloud_plane: CloudDataPlane) -> None:
    pixels, _ = reference.demo_split("test")
    server = OipServer(demo_cloud_plane, "test-cloud")
    await server.start()
    try:
        async with OipClient(f"127.0.0.1:{server.port}") as client:
            response = await client.infer(InferRequest("digits", [Tensor.of("pixels", pixels)]), timeout=TIMEOUT)
    finally:
        await server.stop(0)
    scores = response.as_dict()["scores"].data
    reference.assert_rows_answered_as_routed(scores, ["cloud"] * len(pixels), pixels)


def test_the_demo_programs_batch_bound_is_read_from_its_range_constraints() -> None:
    model = CloudModel(
        load_model(DEMO_REPOSITORY / "digits"), torch.device("cpu"), ModelDefaults(max_batch_rows=1 << 20)
    )
    assert model.program_rows == EXPORT_MAX_ROWS
    assert model.max_batch_rows == EXPORT_MAX_ROWS, "the program's bound, below the server's"
    bounded = CloudModel(load_model(DEMO_REPOSITORY / "digits"), torch.device("cpu"), ModelDefaults(max_batch_rows=100))
    assert bounded.max_batch_rows == 100, "the server's bound, below the program's"
    # Called directly (as calibration does), the model runs a larger batch in calls of its bound.
    pixels = np.random.default_rng(4).integers(0, 17, size=(250, 64)).astype(np.float32)
    whole = model.predict({"pixels": pixels})["scores"]
    np.testing.assert_allclose(bounded.predict({"pixels": pixels})["scores"], whole, rtol=1e-5, atol=1e-6)


async def test_a_batch_over_the_exported_programs_bound_is_answered_in_chunks(tmp_path: Path) -> None:
    folder = _write_model(tmp_path, "exported", 'artifact = "cloud.pt2"')
    _export(folder / "cloud.pt2")
    rows = _rows(70_000)

    # The server's own bound is set above the program's, so the program's is what chunks the call.
    async with _cloud(tmp_path, max_batch_rows=1 << 20) as (client, plane):
        whole = await _scores(client, "exported", rows)
        assert plane.scheduler.stats().batches == 2, "one call of the program's bound, one of the rest"
        assert plane.scheduler.stats().largest_batch == EXPORT_MAX_ROWS
        first = await _scores(client, "exported", rows[:EXPORT_MAX_ROWS])
        rest = await _scores(client, "exported", rows[EXPORT_MAX_ROWS:])

    assert whole.shape == (70_000, 3)
    np.testing.assert_array_equal(whole, np.concatenate([first, rest]))
    np.testing.assert_allclose(whole, _eager(rows), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first, reference.export_output(folder / "cloud.pt2", rows[:EXPORT_MAX_ROWS]), rtol=1e-5)


def _export(path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=EXPORT_MAX_ROWS)
    program = torch.export.export(_tiny(), (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


async def test_max_batch_rows_in_model_toml_chunks_batches_below_the_programs_bound(tmp_path: Path) -> None:
    folder = _write_model(tmp_path, "bounded", 'artifact = "cloud.pt2"\nmax_batch_rows = 3')
    _export(folder / "cloud.pt2")
    rows = _rows(7)

    # The model's own max_batch_rows overrides the server's (1024 here).
    async with _cloud(tmp_path, max_batch_rows=1024) as (client, plane):
        whole = await _scores(client, "bounded", rows)
        assert (plane.scheduler.stats().batches, plane.scheduler.stats().largest_batch) == (3, 3)
        chunks = [await _scores(client, "bounded", rows[start : start + 3]) for start in (0, 3, 6)]

    np.testing.assert_array_equal(whole, np.concatenate(chunks))
    np.testing.assert_allclose(whole, _eager(rows), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole, reference.export_output(folder / "cloud.pt2", rows), rtol=1e-5, atol=1e-6)


# torch deprecates TorchScript in favour of torch.export, but files made with it are still served.
@pytest.mark.filterwarnings("ignore:`torch.jit.(script|load)` is deprecated:DeprecationWarning")
async def test_a_torchscript_file_is_served(tmp_path: Path) -> None:
    folder = _write_model(tmp_path, "scripted", 'artifact = "model.pt"')
    torch.jit.script(_tiny()).save(str(folder / "model.pt"))  # type: ignore[no-untyped-call]
    rows = _rows(7)

    async with _cloud(tmp_path) as (client, _):
        metadata = await client.model_metadata("scripted", timeout=TIMEOUT)
        scores = await _scores(client, "scripted", rows)

    assert metadata.platform == "pytorch_libtorch"
    np.testing.assert_allclose(scores, _eager(rows), rtol=1e-5, atol=1e-6)


async def test_a_factory_returning_a_torch_module_is_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The factory is a real module on the import path, as a user's would be.
    (tmp_path / "tiny_cloud_factory.py").write_text(
        textwrap.dedent(
            """
            import torch


            def make() -> torch.nn.Module:
                torch.manual_seed(7)
                layers = torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
                return torch.nn.Sequential(*layers)  # in training mode, as nn.Modules are made
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    repository = tmp_path / "repository"
    _write_model(repository, "factory", 'factory = "tiny_cloud_factory:make"')
    rows = _rows(5)

    async with _cloud(repository) as (client, _):
        metadata = await client.model_metadata("factory", timeout=TIMEOUT)
        scores = await _scores(client, "factory", rows)

    assert metadata.platform == "python"
    # The runtime put the module in eval mode and ran it under inference_mode: the eager answer.
    np.testing.assert_allclose(scores, _eager(rows), rtol=1e-5, atol=1e-6)


# The same code on each device: the CUDA path (pinned staging, non-blocking copies, a stream per
# instance thread) where a GPU exists, the CPU path everywhere.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
# How far a half-precision answer may be from float32's, in the model's log-probabilities.
TOLERANCE = {None: 1e-5, "float16": 0.05, "bfloat16": 0.3}


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
async def test_the_demo_model_batched_on_each_device_and_dtype_answers_as_bare_torch(
    device: str, dtype: ComputeDtype | None
) -> None:
    defaults = ModelDefaults(max_batch_rows=32, dtype=dtype)
    model = ModelRegistry.load(load_repository(DEMO_REPOSITORY), torch.device(device), DEMO_REPOSITORY, defaults).model(
        "digits", ""
    )
    assert model.warmup_cost is not None
    assert model.warmup_cost[0] == 8, "warm-up batches of 1, 2, 4 and 8 rows"
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        pixels = data["inputs"].astype(np.float32)
    sizes = np.random.default_rng(2).integers(1, 50, size=12)
    bounds = np.cumsum([0, *sizes])
    scheduler = Scheduler(instances=2, max_rows=10_000, max_bytes=1 << 30)
    try:
        answers = await asyncio.gather(
            *(scheduler.run(model, {"pixels": pixels[start:stop]}, None) for start, stop in itertools.pairwise(bounds))
        )
    finally:
        scheduler.close()
    reference = torch.export.load(str(DEMO_REPOSITORY / "digits" / "cloud.pt2")).module()
    with torch.inference_mode():
        expected = reference(torch.from_numpy(pixels[: bounds[-1]])).numpy()
    scores = np.concatenate([answer["scores"] for answer in answers])
    assert scores.dtype == np.float32, "outputs keep their declared datatype"
    # cuDNN may run float32 convolutions in TF32, which keeps about 3 decimal digits.
    exact = device == "cpu" and dtype is None
    tolerance = TOLERANCE[dtype] if device == "cpu" else max(TOLERANCE[dtype], 2e-3)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=tolerance)
    agreement = float((scores.argmax(axis=1) == expected.argmax(axis=1)).mean())
    assert agreement >= (1.0 if exact else 0.98)
    assert scheduler.stats().batched_rows == bounds[-1]


# torch.compile's own imports use the TorchScript API that torch deprecates.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
async def test_a_compiled_model_answers_as_the_eager_one(tmp_path: Path, device: str) -> None:
    folder = _write_model(tmp_path, "compiled", 'artifact = "cloud.pt2"\ncompile = "inductor"')
    _export(folder / "cloud.pt2")
    rows = _rows(37)

    async with _cloud(tmp_path, device=device) as (client, plane):
        scores = await _scores(client, "compiled", rows)
        model = plane.registry.model("compiled", "")

    assert model.options.compile == "inductor"
    assert model.warmup_cost is not None
    assert model.warmup_cost[0] == 2, "warm-up batches of 1 and 2 rows: the compiled graph's sizes"
    np.testing.assert_allclose(scores, _eager(rows), rtol=1e-4, atol=1e-5 if device == "cpu" else 1e-4)


def test_a_compute_dtype_that_is_not_a_float_is_refused_naming_the_field(tmp_path: Path) -> None:
    folder = _write_model(tmp_path, "wrong", 'artifact = "cloud.pt2"\ndtype = "int8"')
    with pytest.raises(ConfigurationError, match=r"model.toml: cloud.dtype: Input should be 'float32'"):
        CloudModel(load_model(folder), torch.device("cpu"))


@pytest.mark.parametrize(
    ("cores", "batching", "cpu_instances", "cpu_threads"),
    [(2, True, 1, 1), (16, True, 2, 7), (2, False, 2, 1), (16, False, 2, 7)],
)
def test_instances_and_torch_threads_default_to_the_device_and_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, batching: bool, cpu_instances: int, cpu_threads: int
) -> None:
    monkeypatch.setattr(cloud_settings, "cpu_count", lambda: cores)
    settings = CloudSettings(batching=batching)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (settings.instances(cpu), settings.intra_op_threads(cpu)) == (cpu_instances, cpu_threads)
    assert settings.instances(cuda) == 2
    given = CloudSettings(batching=batching, inference_threads=3, torch_threads=5)
    assert (given.instances(cpu), given.intra_op_threads(cpu), given.instances(cuda)) == (3, 5, 3)


def test_the_memory_bounds_default_to_the_machines_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloud_memory, "process_memory_bytes", lambda: 256 << 30)
    large = CloudSettings()
    assert large.max_inflight_bytes == 16 << 30, "1/16 of the memory"
    assert large.max_concurrent_rpcs == 512, "64 MiB messages in 1/8 of the memory"
    monkeypatch.setattr(cloud_memory, "process_memory_bytes", lambda: 8 << 30)
    assert CloudSettings().max_concurrent_rpcs == 128, "never fewer than 128"
    assert CloudSettings(max_message_bytes=1 << 20).max_concurrent_rpcs == 1024
    assert CloudSettings(max_concurrent_rpcs=5).max_concurrent_rpcs == 5
    assert CloudSettings(max_concurrent_rpcs=None).max_concurrent_rpcs is None, "no limit, when asked for"
