"""Dynamic batching in the cloud's scheduler, made deterministic with gated models.

A gated model (tests/support/gate.py) holds each call until the test lets it through, so
the test can line requests up in a model's queue behind a call in flight and know exactly
which batches form when the gate opens. Batching is proved with the scheduler's counters
(`SchedulerStats`), never with timings. The answers are checked against the model run on
each request alone: bare torch on the demo's cloud.pt2, or the gate's echo (exact).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import torch

from offload.cloud.dataplane import CloudDataPlane
from offload.cloud.registry import ModelRegistry
from offload.cloud.runtime import Arrays, CloudModel
from offload.cloud.scheduler import Scheduler
from offload.cloud.settings import CloudSettings
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, UpstreamError
from offload.oip.repository import load_repository
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from support import gate
from support.chaos import eventually

TIMEOUT = 60.0


@pytest.fixture
def gate_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "gate"
    folder.mkdir()
    monkeypatch.setenv(gate.MARKER_ENV, str(folder))
    yield folder
    (folder / "open").touch()  # never leave a model thread held


def _gate_model(root: Path, width: int = 1, **settings: object) -> CloudModel:
    repository = gate.write_repository(root / "repository", width=width)
    defaults = CloudSettings(model_repository=repository, **settings).model_defaults  # type: ignore[arg-type]
    return ModelRegistry.load(load_repository(repository), torch.device("cpu"), repository, defaults).model("gate", "")


def _rows(first: float, count: int, width: int = 1) -> npt.NDArray[np.float32]:
    """`count` rows whose values are all distinct and start at `first`: a mix-up would show."""
    return (first + np.arange(count * width, dtype=np.float32)).reshape(count, width)


def _run(
    scheduler: Scheduler, model: CloudModel, x: npt.NDArray[np.float32], deadline: float | None = None
) -> asyncio.Task[Arrays]:
    return asyncio.create_task(scheduler.run(model, {"x": x}, deadline))


async def _hold_the_model(scheduler: Scheduler, model: CloudModel, gate_dir: Path) -> asyncio.Task[Arrays]:
    """One 1-row call in the model, held at the gate (call 0): what comes next queues behind it."""
    held = _run(scheduler, model, _rows(-1, 1))
    await eventually((gate_dir / "call-0").exists, "the first call reached the model")
    return held


async def _queued(scheduler: Scheduler, rows: int) -> None:
    await eventually(lambda: scheduler.stats().admitted_rows == rows, f"{rows} rows admitted")


async def test_concurrent_requests_of_random_rows_get_their_unbatched_answers(tmp_path: Path, gate_dir: Path) -> None:
    """Requests of random sizes, batched through a real server, against bare torch on each request alone."""
    repository = gate.write_digits_repository(tmp_path / "repository")
    settings = CloudSettings(model_repository=repository, inference_threads=1, max_batch_rows=16)
    plane = CloudDataPlane.load(load_repository(repository), settings, torch.device("cpu"))
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        pixels = data["inputs"].astype(np.float32)  # 450 distinct rows
    sizes = np.random.default_rng(11).integers(1, 40, size=18)
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] <= len(pixels)
    requests = [pixels[start:stop] for start, stop in itertools.pairwise(bounds)]
    server = OipServer(plane, "batching-cloud")
    await server.start()
    try:
        async with OipClient(f"127.0.0.1:{server.port}") as client:

            def infer(rows: npt.NDArray[np.float32]) -> asyncio.Task[npt.NDArray[np.float32]]:
                async def call() -> npt.NDArray[np.float32]:
                    response = await client.infer(InferRequest("digits", [Tensor.of("pixels", rows)]), timeout=TIMEOUT)
                    scores: npt.NDArray[np.float32] = response.as_dict()["scores"].data
                    return scores

                return asyncio.create_task(call())

            first = infer(requests[0])
            await eventually((gate_dir / "call-0").exists, "the first request reached the model")
            rest = [infer(rows) for rows in requests[1:]]
            await _queued(plane.scheduler, int(bounds[-1]))
            (gate_dir / "open").touch()
            answers = await asyncio.gather(first, *rest)
    finally:
        await server.stop(0)
        plane.close()

    reference_model = torch.export.load(str(DEMO_REPOSITORY / "digits" / "cloud.pt2")).module()
    for rows, answer in zip(requests, answers, strict=True):
        with torch.inference_mode():
            expected = reference_model(torch.from_numpy(rows)).numpy()
        assert answer.shape == expected.shape
        np.testing.assert_array_equal(answer.argmax(axis=1), expected.argmax(axis=1))
        np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-5)
    stats = plane.scheduler.stats()
    queued_rows = int(bounds[-1] - bounds[1])
    # The first request ran alone; the rest, all queued when the gate opened, in full batches of 16 rows.
    assert stats.batches == 1 + math.ceil(queued_rows / 16)
    assert stats.largest_batch == 16
    assert stats.most_requests > 1
    assert stats.batched_rows == bounds[-1]
    assert (stats.requests, stats.started, stats.dropped, stats.failed) == (len(requests), len(requests), 0, 0)


async def test_each_request_gets_exactly_its_own_rows_back_in_order(tmp_path: Path, gate_dir: Path) -> None:
    model = _gate_model(tmp_path, max_batch_rows=8)
    scheduler = Scheduler(instances=1, max_rows=10_000, max_bytes=1 << 20)
    sizes = np.random.default_rng(5).integers(1, 20, size=25)
    try:
        held = await _hold_the_model(scheduler, model, gate_dir)
        inputs = [_rows(1000 * index, int(size)) for index, size in enumerate(sizes)]
        tasks = [_run(scheduler, model, x) for x in inputs]
        await _queued(scheduler, 1 + int(sizes.sum()))
        (gate_dir / "open").touch()
        answers = await asyncio.gather(*tasks)
        await held
    finally:
        scheduler.close()
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], x)
    stats = scheduler.stats()
    full, tail = divmod(int(sizes.sum()), 8)
    assert stats.batches == 1 + full + (tail > 0), "full batches of 8 rows, requests split across them"
    assert stats.most_requests > 1
    assert stats.batch_rows.counts[3] == full + (tail > 4), "batches of 5 to 8 rows: the full ones (and the tail)"
    assert stats.admitted_rows == 0


async def test_with_batching_off_each_request_is_its_own_model_call(tmp_path: Path, gate_dir: Path) -> None:
    model = _gate_model(tmp_path, max_batch_rows=8, batching=False)
    scheduler = Scheduler(instances=1, max_rows=10_000, max_bytes=1 << 20)
    sizes = [3, 12, 1, 8]
    try:
        held = await _hold_the_model(scheduler, model, gate_dir)
        inputs = [_rows(1000 * index, size) for index, size in enumerate(sizes)]
        tasks = [_run(scheduler, model, x) for x in inputs]
        await _queued(scheduler, 1 + sum(sizes))
        (gate_dir / "open").touch()
        answers = await asyncio.gather(*tasks)
        await held
    finally:
        scheduler.close()
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], x)
    stats = scheduler.stats()
    # One call each, the 12-row request in two pieces (8 + 4).
    assert (stats.batches, stats.most_requests, stats.largest_batch) == (1 + 5, 1, 8)


async def test_a_cancelled_request_fails_alone_whether_queued_or_in_a_running_batch(
    tmp_path: Path, gate_dir: Path
) -> None:
    model = _gate_model(tmp_path)
    scheduler = Scheduler(instances=1, max_rows=10_000, max_bytes=1 << 20)
    try:
        held = await _hold_the_model(scheduler, model, gate_dir)
        a, b, c = (_rows(1000 * index, 2) for index in (1, 2, 3))
        in_batch, queued, stays = _run(scheduler, model, a), _run(scheduler, model, b), _run(scheduler, model, c)
        await _queued(scheduler, 7)
        # Cancelled while queued: dropped at once, and its rows are free again.
        queued.cancel()
        await _queued(scheduler, 5)
        # The held call ends; the next batch (a and c) reaches the model and is held there; a's caller leaves.
        (gate_dir / "pass-0").touch()
        await held
        await eventually((gate_dir / "call-1").exists, "the batch of a and c reached the model")
        in_batch.cancel()
        (gate_dir / "open").touch()
        np.testing.assert_array_equal((await stays)["y"], c)
        with pytest.raises(asyncio.CancelledError):
            await in_batch
        with pytest.raises(asyncio.CancelledError):
            await queued
        await _queued(scheduler, 0)
    finally:
        scheduler.close()
    stats = scheduler.stats()
    assert gate.started(gate_dir) == {gate.started_marker(-1), gate.started_marker(1000)}
    assert (stats.batches, stats.most_requests, stats.batched_rows) == (2, 2, 5), "b never ran"
    assert (stats.started, stats.dropped, stats.cut_short, stats.failed) == (3, 1, 0, 0)


async def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_from_its_batch_and_never_run(
    tmp_path: Path, gate_dir: Path
) -> None:
    model = _gate_model(tmp_path)
    now = [1000.0]  # the scheduler's clock, moved by hand
    scheduler = Scheduler(instances=1, max_rows=10_000, max_bytes=1 << 20, clock=lambda: now[0])
    try:
        held = await _hold_the_model(scheduler, model, gate_dir)
        late = _run(scheduler, model, _rows(1000, 2), deadline=now[0] + 1)
        patient = _run(scheduler, model, _rows(2000, 3))
        await _queued(scheduler, 6)
        now[0] += 2
        (gate_dir / "open").touch()
        with pytest.raises(DeadlineExceeded, match="deadline passed while the request waited in the model's queue"):
            await late
        np.testing.assert_array_equal((await patient)["y"], _rows(2000, 3))
        await held
    finally:
        scheduler.close()
    stats = scheduler.stats()
    assert gate.started(gate_dir) == {gate.started_marker(-1), gate.started_marker(2000)}, "late never ran"
    assert (stats.batches, stats.batched_rows) == (2, 4)
    assert (stats.requests, stats.started, stats.dropped, stats.admitted_rows) == (3, 2, 1, 0)


async def test_a_request_that_cannot_start_before_its_deadline_is_refused_at_once(
    tmp_path: Path, gate_dir: Path
) -> None:
    model = _gate_model(tmp_path)
    now = [1000.0]  # the scheduler's clock: it stands still, so only the work ahead counts
    scheduler = Scheduler(instances=1, max_rows=10_000, max_bytes=1 << 20, pushback_ms=7, clock=lambda: now[0])
    try:
        # One timed call teaches the scheduler what a row costs (its time at the gate: more than nothing).
        (gate_dir / "pass-0").touch()
        await _run(scheduler, model, _rows(0, 1))
        # A call held in the model and 5 rows queued behind it: work ahead of any new request.
        (gate_dir / "pass-0").unlink()
        held = _run(scheduler, model, _rows(-1, 1))
        await eventually((gate_dir / "call-1").exists, "the second call reached the model")
        queued = _run(scheduler, model, _rows(100, 5))
        await _queued(scheduler, 6)
        with pytest.raises(
            ResourceExhausted, match="cannot start before its deadline: 6 rows for model 'gate'"
        ) as late:
            await scheduler.run(model, {"x": _rows(200, 1)}, now[0] + 1e-9)
        assert late.value.pushback_ms is not None
        assert late.value.pushback_ms >= 7
        patient = _run(scheduler, model, _rows(300, 1), deadline=now[0] + 1e9)
        await _queued(scheduler, 7)
        (gate_dir / "open").touch()
        np.testing.assert_array_equal((await patient)["y"], _rows(300, 1))
        await asyncio.gather(held, queued)
    finally:
        scheduler.close()
    stats = scheduler.stats()
    assert (stats.rejected_late, stats.rejected, stats.requests) == (1, 0, 4)
    assert gate.started_marker(200) not in gate.started(gate_dir)


async def test_admission_counts_rows_and_bytes_and_a_larger_request_runs_alone(tmp_path: Path, gate_dir: Path) -> None:
    model = _gate_model(tmp_path, max_batch_rows=4)
    row_bytes = 4  # one FP32 value per row
    scheduler = Scheduler(instances=1, max_rows=10, max_bytes=9 * row_bytes, pushback_ms=25)
    try:
        held = await _hold_the_model(scheduler, model, gate_dir)
        first = _run(scheduler, model, _rows(100, 5))
        await _queued(scheduler, 6)
        with pytest.raises(ResourceExhausted, match="at capacity") as over_rows:
            await scheduler.run(model, {"x": _rows(200, 5)}, None)  # 11 rows: over 10
        assert over_rows.value.pushback_ms == 25
        fits = _run(scheduler, model, _rows(300, 3))  # 9 rows, 36 bytes: at both limits
        await _queued(scheduler, 9)
        with pytest.raises(ResourceExhausted, match="at capacity"):
            await scheduler.run(model, {"x": _rows(400, 1)}, None)  # 10 rows would fit; 40 bytes do not
        (gate_dir / "open").touch()
        await asyncio.gather(held, first, fits)
        # Alone, a request over both limits is admitted, and runs in pieces of 4 rows.
        large = _rows(500, 30)
        np.testing.assert_array_equal((await scheduler.run(model, {"x": large}, None))["y"], large)
    finally:
        scheduler.close()
    stats = scheduler.stats()
    assert (stats.rejected, stats.requests) == (2, 4)
    assert (stats.peak_rows, stats.peak_bytes) == (30, 30 * row_bytes), "only the lone request went past"
    assert stats.largest_batch == 4


async def test_a_model_error_in_a_batch_fails_only_the_request_that_causes_it(tmp_path: Path, gate_dir: Path) -> None:
    model = _gate_model(tmp_path)
    scheduler = Scheduler(instances=1, max_rows=10_000, max_bytes=1 << 20)
    poison = _rows(2000, 3)
    poison[1, 0] = np.nan
    try:
        held = await _hold_the_model(scheduler, model, gate_dir)
        tasks = [_run(scheduler, model, x) for x in (_rows(1000, 2), poison, _rows(3000, 4))]
        await _queued(scheduler, 10)
        (gate_dir / "open").touch()
        before, bad, after = await asyncio.gather(*tasks, return_exceptions=True)
        await held
    finally:
        scheduler.close()
    assert isinstance(bad, InvalidArgument)
    assert "NaN" in str(bad)
    assert not isinstance(before, BaseException)
    assert not isinstance(after, BaseException)
    np.testing.assert_array_equal(before["y"], _rows(1000, 2))
    np.testing.assert_array_equal(after["y"], _rows(3000, 4))
    stats = scheduler.stats()
    # The batch of three failed, was rerun one request at a time, and only the poisoned one failed.
    assert (stats.batches, stats.most_requests, stats.reruns, stats.failed) == (2, 3, 1, 1)
    assert gate.calls(gate_dir) == 1 + 1 + 3


async def test_requests_that_cannot_be_joined_run_in_separate_batches(tmp_path: Path, gate_dir: Path) -> None:
    model = _gate_model(tmp_path, width=-1)  # x: [-1, -1], so widths may differ between requests
    scheduler = Scheduler(instances=1, max_rows=10_000, max_bytes=1 << 20)
    inputs = [_rows(1000, 2, width=2), _rows(2000, 1, width=2), _rows(3000, 2, width=3), _rows(4000, 3, width=3)]
    try:
        held = await _hold_the_model(scheduler, model, gate_dir)
        tasks = [_run(scheduler, model, x) for x in inputs]
        await _queued(scheduler, 1 + 8)
        (gate_dir / "open").touch()
        answers = await asyncio.gather(*tasks)
        await held
    finally:
        scheduler.close()
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], x)
    stats = scheduler.stats()
    assert (stats.batches, stats.most_requests) == (3, 2)  # [held], [width 2, width 2], [width 3, width 3]
    assert gate.started(gate_dir) == {gate.started_marker(value) for value in (-1, 1000, 3000)}


async def test_a_queue_delay_holds_a_batch_for_more_rows_but_not_a_request_that_finds_the_model_idle(
    tmp_path: Path, gate_dir: Path
) -> None:
    model = _gate_model(tmp_path, max_batch_rows=4, max_queue_delay_us=600_000_000)  # ten minutes
    scheduler = Scheduler(instances=1, max_rows=10_000, max_bytes=1 << 20)
    try:
        # Nothing queued and the model idle: it runs at once, the delay notwithstanding.
        (gate_dir / "pass-0").touch()
        np.testing.assert_array_equal((await _run(scheduler, model, _rows(7, 1)))["y"], _rows(7, 1))
        (gate_dir / "pass-0").unlink()
        held = _run(scheduler, model, _rows(-1, 1))
        await eventually((gate_dir / "call-1").exists, "the held call reached the model")
        waiting = [_run(scheduler, model, _rows(1000 * index, 1)) for index in (1, 2)]
        await _queued(scheduler, 3)
        (gate_dir / "open").touch()
        await held
        # Two rows wait for more (the delay has not passed); two more make the batch full.
        completing = _run(scheduler, model, _rows(3000, 2))
        answers = await asyncio.gather(*waiting, completing)
    finally:
        scheduler.close()
    np.testing.assert_array_equal(answers[2]["y"], _rows(3000, 2))
    stats = scheduler.stats()
    assert (stats.batches, stats.most_requests, stats.largest_batch) == (3, 3, 4)


async def test_grpc_refuses_rpcs_past_max_concurrent_rpcs_with_resource_exhausted(
    tmp_path: Path, gate_dir: Path
) -> None:
    repository = gate.write_repository(tmp_path / "repository")
    settings = CloudSettings(model_repository=repository, max_concurrent_rpcs=1)
    plane = CloudDataPlane.load(load_repository(repository), settings, torch.device("cpu"))
    server = OipServer(plane, "capped-cloud", settings.limits)
    await server.start()
    try:
        async with OipClient(f"127.0.0.1:{server.port}") as client:
            request = InferRequest("gate", [Tensor.of("x", _rows(1, 1))])
            held = asyncio.create_task(client.infer(request, timeout=TIMEOUT))
            await eventually((gate_dir / "call-0").exists, "the first call reached the model")
            with pytest.raises(UpstreamError) as refused:
                await client.infer(request, timeout=TIMEOUT)
            (gate_dir / "open").touch()
            await held
    finally:
        await server.stop(0)
        plane.close()
    assert refused.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Concurrent RPC limit exceeded" in str(refused.value)
    assert plane.scheduler.stats().requests == 1, "the refused call never reached the data plane"
