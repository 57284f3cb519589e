"""What the edge agent sends the cloud, seen by a recording proxy in front of a real cloud server.

Other request parameters reach the cloud unchanged (the same names, the same wire types), the
routing ones never do, and with too little of the app's deadline left once the reserve is kept
back the cloud is not called at all: the rows get the edge's answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from offload.cloud.dataplane import CloudDataPlane
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.router.models import RoutedModel
from offload.router.stats import UpstreamStats
from support import reference
from support.chaos import ChaosProxy, edge_under_test
from support.reference import assert_rows_answered_as_routed, decoded

# Parameters meant for the model server, one of each wire type, and how they must arrive.
FOR_THE_CLOUD: dict[str, ParameterValue] = {"priority": 3, "tag": "gold", "verbose": True, "ratio": 0.25}
ON_THE_WIRE = {
    "priority": ("int64_param", 3),
    "tag": ("string_param", "gold"),
    "verbose": ("bool_param", True),
    "ratio": ("double_param", 0.25),
}


@pytest.fixture
async def proxy(demo_cloud_plane: CloudDataPlane) -> AsyncIterator[ChaosProxy]:
    """A recording proxy (no faults) in front of a real cloud server."""
    cloud = OipServer(demo_cloud_plane, "test-cloud")
    await cloud.start()
    try:
        async with ChaosProxy(f"127.0.0.1:{cloud.port}") as recording:
            yield recording
    finally:
        await cloud.stop(0)


def _routes(response: InferResponse) -> list[str]:
    return decoded(response.as_dict()["offload_route"].data)


def _cloud_stats(stats: UpstreamStats | None) -> UpstreamStats:
    assert stats is not None
    return stats


async def test_other_parameters_reach_the_cloud_unchanged_and_a_string_threshold_routes(
    proxy: ChaosProxy, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    pixels = reference.demo_split("test")[0][:60]
    unsure = reference.cloud_bound(pixels, threshold=0.8)
    # 0.8 sends some rows, and fewer than the model's own threshold would: the string cannot go unnoticed.
    assert 0 < unsure.sum() < reference.cloud_bound(pixels).sum()
    async with edge_under_test(proxy.address, demo_edge_models, edge_executor) as edge:
        routed = await edge.client.infer(
            InferRequest(
                "digits",
                [Tensor.of("pixels", pixels)],
                parameters={**FOR_THE_CLOUD, "offload_threshold": "0.8", "offload_details": True},
            ),
            timeout=30,
        )
        forced = await edge.client.infer(
            InferRequest(
                "digits",
                [Tensor.of("pixels", pixels[:2])],
                parameters={**FOR_THE_CLOUD, "offload_route": "cloud", "offload_require_cloud": True},
            ),
            timeout=30,
        )
    # One cloud call each, with exactly the other parameters, as they were sent: no routing parameter.
    assert proxy.parameters == [ON_THE_WIRE, ON_THE_WIRE]
    # The string threshold took effect: the rows the bare edge model is unsure of at 0.8 went, in order.
    routes = _routes(routed)
    assert [route == "cloud" for route in routes] == unsure.tolist()
    assert_rows_answered_as_routed(routed.as_dict()["scores"].data, routes, pixels)
    assert_rows_answered_as_routed(forced.as_dict()["scores"].data, ["cloud", "cloud"], pixels[:2])


async def test_no_cloud_call_when_the_deadline_leaves_less_than_the_reserve(
    proxy: ChaosProxy, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    pixels = reference.demo_split("test")[0][:3]
    request = InferRequest(
        "digits", [Tensor.of("pixels", pixels)], parameters={"offload_route": "cloud", "offload_details": True}
    )
    # A reserve longer than the app's whole deadline: the cloud's share of it has passed before it starts.
    async with edge_under_test(
        proxy.address, demo_edge_models, edge_executor, deadline_reserve_seconds=5.0, cloud_timeout_seconds=60.0
    ) as edge:
        short = await edge.client.infer(request, timeout=2.0)
        assert proxy.calls == 0, "the cloud was called with no time left to use its answer"
        assert _cloud_stats(edge.router.stats().cloud).attempts == 0
        # The same request with time to spare beyond the reserve goes to the cloud.
        ample = await edge.client.infer(request, timeout=30.0)
        assert proxy.calls == 1
        assert _cloud_stats(edge.router.stats().cloud).attempts == 1
    assert short.parameters["offload_degraded"] is True
    assert _routes(short) == ["edge"] * 3
    assert np.all(short.as_dict()["offload_degraded"].data)
    assert_rows_answered_as_routed(short.as_dict()["scores"].data, _routes(short), pixels)
    assert not ample.parameters["offload_degraded"]
    assert_rows_answered_as_routed(ample.as_dict()["scores"].data, _routes(ample), pixels)
