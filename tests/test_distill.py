"""Recording the cloud's answers on the edge (offload.edge.recording) and `offload distill` (offload.tools.distill).

Recordings are checked against the bare cloud model (tests/support/reference.py), distilled models under a bare
ONNX Runtime session; the cloud is a real gRPC server on loopback, or the real `offload cloud` process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import tomllib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch.nn import functional as nnf

from conftest import SUBPROCESS_ENV
from offload.cloud.dataplane import CloudDataPlane
from offload.edge.agent import load_edge_models, open_recorder
from offload.edge.recording import CloudRows, Recorder, RecordFolder, RecordingStats, read_records, record_files
from offload.edge.settings import EdgeSettings
from offload.edge.status import StatusLog
from offload.models import DEMO_REPOSITORY
from offload.models.students import digits_mlp
from offload.oip.client import OipClient
from offload.oip.manifest import Manifest, file_digest
from offload.oip.repository import load_repository
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.router.cache import RowCache
from offload.router.calibration import Target
from offload.router.core import Router
from offload.router.fetch import CloudRowsHook
from offload.router.models import RoutedModel
from offload.router.pool import CloudPool
from offload.router.stats import AuditStats, RouterStats
from offload.tools.calibrate import CalibrateOptions, run_calibrate
from offload.tools.cli import main
from offload.tools.distill import StudentIO, export_onnx
from offload.tools.process import ServerProcess
from support import reference
from support.reference import CLOUD_TOLERANCE

ALL_TO_THE_CLOUD: dict[str, ParameterValue] = {"offload_route": "cloud"}
FACTORY = "offload.models.students:digits_mlp"


@asynccontextmanager
async def cloud_server(plane: CloudDataPlane) -> AsyncIterator[str]:
    """A real cloud gRPC server on a loopback port; yields its address."""
    server = OipServer(plane, "test-cloud")
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(0)


@asynccontextmanager
async def recording_router(
    models: dict[str, RoutedModel],
    cloud: str,
    executor: ThreadPoolExecutor,
    hook: CloudRowsHook,
    cache: RowCache | None = None,
) -> AsyncIterator[Router]:
    router = Router(models, CloudPool(cloud, 10.0, 64 * 1024 * 1024), executor, cache=cache, on_cloud_rows=hook)
    try:
        yield router
    finally:
        await router.close()


async def send(
    router: Router, pixels: npt.NDArray[np.float32], rows: int, parameters: dict[str, ParameterValue] | None = None
) -> list[InferResponse]:
    """The pixels in requests of `rows` rows, one after another."""
    return [
        await router.infer(
            InferRequest(
                model_name="digits", inputs=[Tensor.of("pixels", pixels[i : i + rows])], parameters=parameters or {}
            )
        )
        for i in range(0, len(pixels), rows)
    ]


def assert_rows_are_the_clouds(folder: Path, pixels: npt.NDArray[np.float32]) -> None:
    """The folder's recorded rows are `pixels`, in order, with the bare cloud model's answers and the names."""
    records = read_records(folder, "digits")
    np.testing.assert_array_equal(records.inputs["pixels"], pixels)
    CLOUD_TOLERANCE.assert_close(records.outputs["scores"], reference.cloud_scores(pixels))
    assert set(records.inputs) == {"pixels"}
    assert set(records.outputs) == {"scores"}
    assert dict(records.model_versions) == {"1": len(pixels)}
    assert dict(records.cloud_versions) == {"1": len(pixels)}


# --- recording ---------------------------------------------------------------------------------------------------


async def test_recording_writes_rotating_npz_files_within_the_byte_bound(
    demo_cloud_plane: CloudDataPlane,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    tmp_path: Path,
) -> None:
    pixels, _ = reference.demo_split("test")  # 450 distinct rows, 296 bytes each with the answer: 133 KB
    max_bytes, file_max_bytes = 40_000, 8_000
    recorder = Recorder(RecordFolder(tmp_path, max_bytes, file_max_bytes))
    async with (
        cloud_server(demo_cloud_plane) as cloud,
        recording_router(demo_edge_models, cloud, edge_executor, recorder.on_cloud_rows) as router,
    ):
        responses = await send(router, pixels, 16, ALL_TO_THE_CLOUD)
    await asyncio.to_thread(recorder.close)
    assert {response.parameters["offload_route"] for response in responses} == {"cloud"}

    files = record_files(tmp_path)
    sizes = [path.stat().st_size for path in files]
    assert len(files) > 2, "the recording should have rotated"
    assert max(sizes) <= file_max_bytes
    assert sum(sizes) <= max_bytes
    assert sorted(os.listdir(tmp_path)) == [path.name for path in files]  # no temporary file left
    stats = recorder.stats()
    assert (stats.rows, stats.rows_written, stats.dropped) == (450, 450, 0)
    assert stats.files_deleted == stats.files_written - len(files) > 0
    assert stats.bytes_on_disk == sum(sizes)
    # What is left is the newest rows, whole files of them, each row the cloud's answer.
    kept = sum(np.load(path)["input.pixels"].shape[0] for path in files)
    assert_rows_are_the_clouds(tmp_path, pixels[-kept:])
    with np.load(files[0]) as first:
        assert {str(first[f"meta.{key}"]) for key in ("model", "model_version", "cloud_model", "cloud_version")} == {
            "digits",
            "1",
        }

    # A recorder opened on the folder again goes on numbering after it, within a new, smaller bound.
    again = RecordFolder(tmp_path, 20_000, file_max_bytes)
    assert again.bytes_on_disk <= 20_000
    assert record_files(tmp_path) == files[-len(record_files(tmp_path)) :]
    again.add(CloudRows("digits", "1", "digits", "1", {"pixels": pixels[:3]}, {"scores": np.zeros((3, 10), "f4")}))
    again.flush()
    assert record_files(tmp_path)[-1].name == f"rec-{len(files) + stats.files_deleted + 1:08d}-digits.npz"


async def test_cache_hits_are_not_recorded(
    demo_cloud_plane: CloudDataPlane,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    tmp_path: Path,
) -> None:
    pixels = reference.demo_split("test")[0][:24]
    recorder = Recorder(RecordFolder(tmp_path, 1 << 20))
    async with (
        cloud_server(demo_cloud_plane) as cloud,
        recording_router(
            demo_edge_models, cloud, edge_executor, recorder.on_cloud_rows, RowCache(1 << 20, 300.0)
        ) as router,
    ):
        first = await send(router, pixels, 8, ALL_TO_THE_CLOUD)
        again = await send(router, pixels, 8, ALL_TO_THE_CLOUD)  # the same rows: answered from the cache
    await asyncio.to_thread(recorder.close)
    assert {response.parameters["offload_route"] for response in first} == {"cloud"}
    assert {response.parameters["offload_route"] for response in again} == {"cache"}
    assert (recorder.stats().rows, recorder.stats().rows_written) == (24, 24)
    assert_rows_are_the_clouds(tmp_path, pixels)


class _HeldFolder(RecordFolder):
    """A real record folder whose writer waits, on its first rows, until the test lets it go on."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, 1 << 20)
        self.entered = threading.Event()
        self.release = threading.Event()

    def add(self, rows: CloudRows) -> None:
        self.entered.set()
        assert self.release.wait(60), "the test never released the writer"
        super().add(rows)


async def test_rows_are_dropped_and_counted_while_the_writer_is_behind_and_requests_go_on(
    demo_cloud_plane: CloudDataPlane,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    tmp_path: Path,
) -> None:
    pixels = reference.demo_split("test")[0][:40]
    store = _HeldFolder(tmp_path)
    recorder = Recorder(store, queue_batches=2)
    try:
        async with (
            cloud_server(demo_cloud_plane) as cloud,
            recording_router(demo_edge_models, cloud, edge_executor, recorder.on_cloud_rows) as router,
        ):
            (held,) = await send(router, pixels[:10], 10, ALL_TO_THE_CLOUD)
            assert await asyncio.to_thread(store.entered.wait, 60)  # the writer is stuck on these 10 rows
            # Two batches fill the queue; the next is dropped: every request is answered by the cloud all the same.
            queued = await send(router, pixels[10:30], 10, ALL_TO_THE_CLOUD)
            dropped = await send(router, pixels[30:40], 10, ALL_TO_THE_CLOUD)
            assert [r.parameters["offload_route"] for r in [held, *queued, *dropped]] == ["cloud"] * 4
            stats = recorder.stats()
            assert (stats.rows, stats.dropped, stats.rows_written) == (30, 10, 0)
    finally:
        store.release.set()
        await asyncio.to_thread(recorder.close)
    stats = recorder.stats()
    assert (stats.rows, stats.dropped, stats.rows_written) == (30, 10, 30)
    assert_rows_are_the_clouds(tmp_path, pixels[:30])


def test_the_status_line_reports_recording_since_the_previous_line() -> None:
    router_stats = RouterStats(0, 0, 0, {}, AuditStats(), None, None, {})
    snapshots = iter(
        [
            RecordingStats("/r", 0, 0, 0, 0, 0, 0, 0),
            RecordingStats("/r", 12, 2, 10, 3_100, 1, 0, 3_100),
        ]
    )
    status = StatusLog(lambda: router_stats, 60.0, clock=lambda: 0.0, recording=lambda: next(snapshots))
    line = status.line()
    assert line is not None
    assert line.endswith("recording: 12 rows (2 dropped), 10 written (3,100 bytes), 3,100 bytes on disk")


def test_recording_is_off_unless_a_folder_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("OFFLOAD_EDGE_RECORD_DIR", "OFFLOAD_EDGE_RECORD_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)
    assert EdgeSettings().record_dir is None
    assert open_recorder(EdgeSettings()) is None
    monkeypatch.setenv("OFFLOAD_EDGE_RECORD_DIR", str(tmp_path / "records"))
    recorder = open_recorder(EdgeSettings())
    assert recorder is not None
    recorder.close()
    assert recorder.stats().folder == str(tmp_path / "records")
    assert (tmp_path / "records").is_dir()


async def _send_to(address: str, pixels: npt.NDArray[np.float32]) -> None:
    async with OipClient(address) as client:
        for i in range(0, len(pixels), 15):
            request = InferRequest(
                model_name="digits", inputs=[Tensor.of("pixels", pixels[i : i + 15])], parameters=ALL_TO_THE_CLOUD
            )
            await client.infer(request, timeout=30.0)


def test_the_edge_agent_records_with_its_flags_and_nothing_without_them(tmp_path: Path) -> None:
    pixels = reference.demo_split("test")[0][:300]  # 89 KB of rows and answers, past the bound
    records = tmp_path / "records"
    home = tmp_path / "home"  # where an agent could write on its own: home, state, temporary files
    home.mkdir()
    quiet = {**SUBPROCESS_ENV, "HOME": str(home), "XDG_STATE_HOME": str(home), "TMPDIR": str(home)}
    with ServerProcess(["cloud", "--grpc-port", "0", "--device", "cpu"], env=SUBPROCESS_ENV) as cloud:
        cloud_address = cloud.start()
        edge_args = ["edge", "--grpc-port", "0", "--cloud", cloud_address]
        with (
            ServerProcess([*edge_args, "--record-dir", str(records), "--record-max-bytes", "65536"]) as recording,
            ServerProcess(edge_args, env=quiet) as plain,
        ):
            asyncio.run(_send_to(recording.start(), pixels))
            asyncio.run(_send_to(plain.start(), pixels))
            assert recording.terminate() == 0
            assert plain.terminate() == 0
    files = record_files(records)
    assert sum(path.stat().st_size for path in files) <= 65536
    assert max(path.stat().st_size for path in files) <= 65536 // 8
    kept = sum(np.load(path)["input.pixels"].shape[0] for path in files)
    assert 0 < kept < 300
    assert_rows_are_the_clouds(records, pixels[-kept:])
    line = recording.wait_for_output("status over the last")
    assert "recording: 300 rows (0 dropped), 300 written" in line
    assert "recording" not in plain.wait_for_output("status over the last")
    assert not list(home.rglob("*.npz"))


# --- distill -----------------------------------------------------------------------------------------------------

WEAK_ROWS = 60  # labelled rows the weak start is trained on (the first of the validation split)


@dataclass(frozen=True)
class WeakStart:
    repository: Path
    weights: Path
    labelled: Path
    records: Path
    recorded_rows: int


def _train_weak(pixels: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> torch.nn.Module:
    """The student architecture fitted to a few labelled rows, with plain torch."""
    torch.manual_seed(0)
    module = digits_mlp()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(pixels), torch.from_numpy(labels)
    for _ in range(150):
        optimizer.zero_grad()
        torch.autograd.backward(nnf.cross_entropy(module(inputs), targets))
        optimizer.step()
    return module.eval()


async def _record_traffic(
    plane: CloudDataPlane, repository: Path, folder: Path, pixels: npt.NDArray[np.float32]
) -> int:
    recorder = Recorder(RecordFolder(folder, 16 << 20))
    with ThreadPoolExecutor(1) as executor:
        async with (
            cloud_server(plane) as cloud,
            recording_router(load_edge_models(repository), cloud, executor, recorder.on_cloud_rows) as router,
        ):
            await send(router, pixels, 16)  # routed by the weak model's threshold: its unsure rows are recorded
    await asyncio.to_thread(recorder.close)
    return recorder.stats().rows_written


@pytest.fixture(scope="module")
def weak_start(tmp_path_factory: pytest.TempPathFactory, demo_cloud_plane: CloudDataPlane) -> WeakStart:
    """A repository whose digits edge model is the student MLP trained on 60 labelled rows, calibrated, and the
    cloud's answers to the test split's rows that it was unsure of, recorded as an edge agent records them."""
    root = tmp_path_factory.mktemp("weak")
    folder = root / "repository" / "digits"
    shutil.copytree(DEMO_REPOSITORY / "digits", folder)
    with (folder / "model.toml").open("a") as toml:
        toml.write(f'\n[distill]\nfactory = "{FACTORY}"  # the student architecture\n')
    pixels, labels = reference.demo_split("validation")
    weak = _train_weak(pixels[:WEAK_ROWS], labels[:WEAK_ROWS])
    io = StudentIO.of(load_repository(folder.parent)["digits"])
    export_onnx(weak, io, {"pixels": pixels[:4]}, folder / "edge.onnx")
    weights = root / "weak.pt"
    torch.save(weak.state_dict(), weights)
    labelled = root / "labelled.npz"
    np.savez(labelled, inputs=pixels[:WEAK_ROWS], labels=labels[:WEAK_ROWS])
    run_calibrate(CalibrateOptions(folder.parent, "digits", folder / "validation.npz", Target("offload", 0.3)))
    records = root / "records"
    recorded = asyncio.run(_record_traffic(demo_cloud_plane, folder.parent, records, reference.demo_split("test")[0]))
    return WeakStart(folder.parent, weights, labelled, records, recorded)


def _distill(weak: WeakStart, out: Path, *extra: str) -> int:
    return main(
        [
            "distill",
            "--model-repository",
            str(weak.repository),
            "--model",
            "digits",
            "--records",
            str(weak.records),
            "--data",
            str(weak.repository / "digits" / "validation.npz"),
            "--target-offload",
            "0.3",
            "--out",
            str(out),
            "--epochs",
            "60",
            "--learning-rate",
            "0.01",
            "--device",
            "cpu",
            *extra,
        ]
    )


def _cloud_agreement(edge_file: Path, pixels: npt.NDArray[np.float32]) -> float:
    edge = reference.onnx_outputs(edge_file, {"pixels": pixels})["scores"].argmax(axis=1)
    return float(np.mean(edge == reference.cloud_scores(pixels).argmax(axis=1)))


@pytest.fixture(scope="module")
def distilled(weak_start: WeakStart, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distilled")
    code = _distill(
        weak_start,
        out,
        "--weights",
        str(weak_start.weights),
        "--labelled",
        str(weak_start.labelled),
        "--manifest",
        "--save-weights",
        str(out.parent / f"{out.name}.pt"),
    )
    assert code == 0
    return out


def test_the_weak_start_records_the_rows_it_is_unsure_of(weak_start: WeakStart) -> None:
    # Its calibrated threshold offloads about 30% of rows: those, and only those, were recorded.
    pixels = reference.demo_split("test")[0]
    routing = tomllib.loads((weak_start.repository / "digits" / "model.toml").read_text())["routing"]
    scores = reference.onnx_outputs(weak_start.repository / "digits" / "edge.onnx", {"pixels": pixels})["scores"]
    unsure = reference.max_softmax(scores, routing["temperature"]) < routing["threshold"]
    assert 0.15 < unsure.mean() < 0.5
    assert weak_start.recorded_rows == unsure.sum()
    assert_rows_are_the_clouds(weak_start.records, pixels[unsure])


def test_distill_writes_a_new_version_that_loads_in_the_edge_and_agrees_more_with_the_cloud(
    weak_start: WeakStart, distilled: Path
) -> None:
    folder = distilled / "digits"
    # Validation rows neither model trained on: the distilled one agrees with the cloud more than its start did.
    pixels = reference.demo_split("validation")[0][WEAK_ROWS:]
    before = _cloud_agreement(weak_start.repository / "digits" / "edge.onnx", pixels)
    after = _cloud_agreement(folder / "edge.onnx", pixels)
    assert after >= before + 0.04, (before, after)
    assert after >= 0.9, (before, after)

    # It loads and runs in the edge (ONNX Runtime via OnnxModel), any batch size, answering as the bare file does.
    model = load_edge_models(distilled)["digits"]
    for rows in (1, 7, 64):
        got = model.edge.predict({"pixels": pixels[:rows]})["scores"]
        reference.EDGE_TOLERANCE.assert_close(
            got, reference.onnx_outputs(folder / "edge.onnx", {"pixels": pixels[:rows]})["scores"]
        )
    assert model.version == "2"


def test_distill_recalibrates_and_keeps_the_rest_of_model_toml(weak_start: WeakStart, distilled: Path) -> None:
    old_text = (weak_start.repository / "digits" / "model.toml").read_text()
    new_text = (distilled / "digits" / "model.toml").read_text()
    old, new = tomllib.loads(old_text), tomllib.loads(new_text)
    assert (old["version"], new["version"]) == ("1", "2")
    assert new["routing"]["threshold"] != old["routing"]["threshold"]
    for table in ("distill", "cloud", "edge"):
        assert new[table] == old[table]
    assert [line for line in new_text.splitlines() if line.lstrip().startswith("#")] == [
        line for line in old_text.splitlines() if line.lstrip().startswith("#")
    ]
    # The threshold is the new model's: at it, about the target share of validation rows go to the cloud.
    pixels = reference.demo_split("validation")[0]
    scores = reference.onnx_outputs(distilled / "digits" / "edge.onnx", {"pixels": pixels})["scores"]
    confidence = reference.max_softmax(scores, new["routing"]["temperature"])
    assert 0.25 <= float(np.mean(confidence < new["routing"]["threshold"])) <= 0.3
    # The other files came along; the manifest describes the new version's files as they are.
    assert {path.name for path in (distilled / "digits").iterdir()} == {
        path.name for path in (weak_start.repository / "digits").iterdir()
    }
    manifest = Manifest.parse((distilled / "manifest.json").read_bytes(), "manifest.json")
    (entry,) = manifest.models
    assert (entry.name, entry.version) == ("digits", "2")
    onnx = next(file for file in entry.files if file.path == "digits/edge.onnx")
    assert (onnx.size, onnx.sha256) == file_digest(distilled / "digits" / "edge.onnx")
    assert (distilled.parent / f"{distilled.name}.pt").is_file()
    assert not [path for path in distilled.iterdir() if path.name.startswith(".")]  # no staging left behind


def test_distill_replaces_the_model_in_place_and_bumps_again(
    weak_start: WeakStart, distilled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Distilling the distilled repository into itself from scratch (no weights, no labelled rows) makes v3 there.
    assert _distill(weak_start, distilled, "--model-repository", str(distilled), "--version", "3") == 0
    assert tomllib.loads((distilled / "digits" / "model.toml").read_text())["version"] == "3"
    assert load_edge_models(distilled)["digits"].version == "3"
    output = capsys.readouterr().out
    assert "v2 -> v3" in output
    assert "agreement with the cloud on the" in output


def test_distill_says_what_is_missing(
    weak_start: WeakStart, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _distill(weak_start, tmp_path / "out", "--model-repository", str(DEMO_REPOSITORY)) == 2
    assert "no [distill] section" in capsys.readouterr().err
    assert _distill(weak_start, tmp_path / "out", "--factory", "offload.models.students:nothing") == 2
    assert "has no function 'nothing'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _distill(weak_start, tmp_path / "out", "--records", str(empty)) == 2
    assert "no recorded rows of model 'digits'" in capsys.readouterr().err
    assert _distill(weak_start, tmp_path / "out", "--version", "1") == 2
    assert "needs a new version; '1' is the current one" in capsys.readouterr().err
    assert not (tmp_path / "out" / "digits").exists()


class _Model:
    """Enough of a RoutedModel for the recorder's hook: its names and versions."""

    name, version, cloud_model = "wide", "1", "wide"


def test_rows_that_cannot_be_recorded_are_counted_not_written(tmp_path: Path) -> None:
    recorder = Recorder(RecordFolder(tmp_path, 64 * 1024, 4096))
    wide = np.zeros((3, 2048), dtype=np.float32)  # 8 KB a row: no 4 KB file holds one
    text = np.array([[b"a"], [b"b"]], dtype=object)  # BYTES: an .npz without pickles cannot hold it
    model: Any = _Model()
    recorder.on_cloud_rows(model, {"x": wide}, {"y": wide[:, :1]}, "1")
    recorder.on_cloud_rows(model, {"x": text}, {"y": np.zeros((2, 1), "f4")}, "1")
    recorder.on_cloud_rows(model, {"x": wide[:0]}, {"y": wide[:0, :1]}, "1")  # no rows: nothing to do
    recorder.close()
    stats = recorder.stats()
    assert (stats.rows, stats.dropped, stats.rows_written, stats.files_written) == (3, 5, 0, 0)
    assert record_files(tmp_path) == []
