"""Live-traffic features of the router: the online offload budget and audit sampling."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pytest

from offload.cloud.dataplane import CloudDataPlane
from offload.models import DEMO_REPOSITORY
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.router.audit import MAX_AUDITS_IN_FLIGHT
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.pool import CloudPool
from support import reference
from support.held import HeldCloud
from support.reference import assert_rows_answered_as_routed


@pytest.fixture(scope="module")
def traffic() -> npt.NDArray[np.float32]:
    with (
        np.load(DEMO_REPOSITORY / "digits" / "validation.npz") as validation,
        np.load(DEMO_REPOSITORY / "digits" / "test.npz") as test,
    ):
        return np.concatenate([validation["inputs"], test["inputs"]]).astype(np.float32)


@pytest.fixture
async def cloud_address(demo_cloud_plane: CloudDataPlane) -> AsyncIterator[str]:
    server = OipServer(demo_cloud_plane, "test-cloud")
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(0)


def _router(
    models: dict[str, RoutedModel],
    executor: ThreadPoolExecutor,
    address: str,
    target_offload: float | None = None,
    audit_share: float = 0.0,
) -> Router:
    return Router(
        models,
        CloudPool(address, 10.0, 64 << 20),
        executor,
        target_offload=target_offload,
        audit_share=audit_share,
        rng=np.random.default_rng(7),
    )


async def _offload_share(router: Router, batches: list[npt.NDArray[np.float32]]) -> float:
    offloaded = rows = 0
    for batch in batches:
        response = await router.infer(InferRequest("digits", [Tensor.of("pixels", batch)]))
        value = response.parameters["offload_offloaded_rows"]
        assert isinstance(value, int)
        offloaded += value
        rows += len(batch)
    return offloaded / rows


def _shifted(pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Traffic the edge model is less sure about: faded, noisy strokes (a new camera, say)."""
    noise = np.random.default_rng(3).integers(0, 6, size=pixels.shape)
    shifted: npt.NDArray[np.float32] = np.clip(pixels * 0.5 + noise, 0, 16).astype(np.float32)
    return shifted


async def test_online_budget_keeps_the_offload_share_near_its_target_when_traffic_shifts(
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    cloud_address: str,
    traffic: npt.NDArray[np.float32],
) -> None:
    target = 0.15
    shifted = _shifted(traffic)
    batches = [shifted[i : i + 16] for i in range(0, len(shifted), 16)]
    static = _router(demo_edge_models, edge_executor, cloud_address)
    adaptive = _router(demo_edge_models, edge_executor, cloud_address, target_offload=target)
    try:
        # Let the budget see the new traffic, then measure on what follows.
        await _offload_share(adaptive, batches[:20])
        adaptive_share = await _offload_share(adaptive, batches[20:])
        static_share = await _offload_share(static, batches[20:])
    finally:
        await static.close()
        await adaptive.close()
    assert static_share > 2 * target, "the shift should blow a static threshold's budget"
    assert adaptive_share == pytest.approx(target, abs=0.05)
    # The snapshot says which threshold each router judges rows by now: the budget's follows the
    # traffic it saw (all of it fits the budget's window), the static one is the model's.
    model = demo_edge_models["digits"]
    assert static.stats().thresholds == {name: each.routing.threshold for name, each in demo_edge_models.items()}
    threshold = adaptive.stats().thresholds["digits"]
    assert threshold != model.routing.threshold
    confidence = reference.max_softmax(reference.edge_scores(shifted))
    assert float(np.mean(confidence < threshold)) == pytest.approx(target, abs=0.01)


async def test_audit_sends_confident_rows_to_the_cloud_in_the_background_and_reports_agreement(
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    cloud_address: str,
    traffic: npt.NDArray[np.float32],
) -> None:
    pixels = traffic[:200]
    router = _router(demo_edge_models, edge_executor, cloud_address, audit_share=1.0)
    try:
        response = await router.infer(InferRequest("digits", [Tensor.of("pixels", pixels)]))
        await router.wait_for_audits()
    finally:
        await router.close()
    edge_scores = reference.edge_scores(pixels)
    confident = ~reference.cloud_bound(pixels)
    cloud_scores = reference.cloud_scores(pixels[confident])
    expected = int(np.sum(edge_scores[confident].argmax(axis=1) == cloud_scores.argmax(axis=1)))
    # Every confident row was audited; the audit does not change the answer's routing.
    audit = router.stats().audit
    assert audit.rows == int(confident.sum())
    assert audit.agreed == expected
    assert audit.agreement is not None
    assert 0.9 < audit.agreement <= 1.0
    assert response.parameters["offload_offloaded_rows"] == int((~confident).sum())
    routes = ["edge" if sure else "cloud" for sure in confident]
    assert_rows_answered_as_routed(response.as_dict()["scores"].data, routes, pixels)


async def test_audits_waiting_on_a_slow_cloud_are_capped_and_the_rest_skipped(
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    demo_cloud_plane: CloudDataPlane,
    traffic: npt.NDArray[np.float32],
) -> None:
    held = HeldCloud(demo_cloud_plane)
    server = OipServer(held, "held-cloud")
    await server.start()
    router = _router(demo_edge_models, edge_executor, f"127.0.0.1:{server.port}", audit_share=1.0)
    rows = 40
    try:
        for row in range(rows):  # one row a request, every row confident (threshold 0): an audit call each
            request = InferRequest(
                "digits", [Tensor.of("pixels", traffic[row : row + 1])], parameters={"offload_threshold": 0.0}
            )
            response = await router.infer(request)
            assert response.parameters["offload_route"] == "edge"
        held.gate.set()
        await router.wait_for_audits()
    finally:
        await router.close()
        await server.stop(0)
    # While the cloud held them, at most MAX_AUDITS_IN_FLIGHT audit calls were outstanding; the rest were skipped.
    audit = router.stats().audit
    assert audit.rows == MAX_AUDITS_IN_FLIGHT
    assert audit.skipped == rows - MAX_AUDITS_IN_FLIGHT
