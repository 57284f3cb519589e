"""The router's per-row cache of cloud answers, and single-flight of identical rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pytest

from offload.cloud.dataplane import CloudDataPlane
from offload.oip.client import OipClient
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.router.cache import RowCache
from offload.router.cloud import CloudEndpoint
from offload.router.core import RoutedModel, Router
from offload.router.dataplane import RouterDataPlane

SCOPE = "digits@1->digits@"


def _pixels(rows: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).integers(0, 17, size=(rows, 64)).astype(np.float32)


class TestKeys:
    def setup_method(self) -> None:
        self.cache = RowCache(max_bytes=1 << 20, ttl_seconds=60)
        self.base = [Tensor.of("pixels", _pixels(3))]
        self.keys = self.cache.keys(SCOPE, self.base, {"priority": 1})

    def test_identical_rows_give_identical_keys_and_distinct_rows_distinct_ones(self) -> None:
        assert self.keys == self.cache.keys(SCOPE, [Tensor.of("pixels", self.base[0].data.copy())], {"priority": 1})
        assert len(set(self.keys)) == 3

    def test_one_changed_byte_changes_only_that_rows_key(self) -> None:
        data = self.base[0].data.copy()
        data[1, 17] += 1
        keys = self.cache.keys(SCOPE, [Tensor.of("pixels", data)], {"priority": 1})
        assert [a == b for a, b in zip(keys, self.keys, strict=True)] == [True, False, True]

    @pytest.mark.parametrize(
        "variant",
        [
            "shape",
            "datatype",
            "name",
            "parameter value",
            "parameter type",
            "new parameter",
            "edge version",
            "cloud version",
            "cloud model",
        ],
    )
    def test_anything_that_changes_the_answer_changes_every_key(self, variant: str) -> None:
        data = self.base[0].data
        tensors, scope = self.base, SCOPE
        parameters: dict[str, ParameterValue] = {"priority": 1}
        if variant == "shape":
            tensors = [Tensor.of("pixels", data.reshape(3, 8, 8))]
        elif variant == "datatype":
            tensors = [Tensor.of("pixels", data.astype(np.float64))]
        elif variant == "name":
            tensors = [Tensor.of("image", data)]
        elif variant == "parameter value":
            parameters = {"priority": 2}
        elif variant == "parameter type":
            parameters = {"priority": "1"}
        elif variant == "new parameter":
            parameters = {"priority": 1, "timeout": 5}
        elif variant == "edge version":
            scope = "digits@2->digits@"
        elif variant == "cloud version":
            scope = "digits@1->digits@7"
        else:
            scope = "digits@1->digits_large@"
        keys = self.cache.keys(scope, tensors, parameters)
        assert not set(keys) & set(self.keys)


async def test_ttl_and_byte_bound_evict_least_recently_used() -> None:
    now = [0.0]
    row_bytes = 10 * 4
    # Room for three entries of one 10-float row each (plus bookkeeping), not four.
    cache = RowCache(max_bytes=3 * (row_bytes + 64), ttl_seconds=10, timer=lambda: now[0])
    keys = cache.keys(SCOPE, [Tensor.of("pixels", _pixels(4))], {})

    def store(positions: list[int]) -> None:
        plan = cache.plan([keys[i] for i in positions])
        cache.fulfil(plan, "digits", "1", [{"scores": np.zeros(10, np.float32)} for _ in plan.sends])

    store([0, 1, 2])
    assert len(cache) == 3
    assert cache.bytes_used <= cache.max_bytes
    cache.plan([keys[0]])  # a hit: key 0 becomes the most recently used
    store([3])
    assert len(cache) == 3
    plan = cache.plan(keys)
    assert sorted(plan.hits) == [0, 2, 3], "key 1, least recently used, was evicted"
    cache.fail(plan, RuntimeError("not sent"))
    now[0] = 11.0
    assert not cache.plan(keys).hits, "every entry expired after the TTL"


async def test_a_new_cloud_version_drops_the_models_entries() -> None:
    cache = RowCache(max_bytes=1 << 20, ttl_seconds=60)
    keys = cache.keys(SCOPE, [Tensor.of("pixels", _pixels(2))], {})
    plan = cache.plan(keys)
    cache.fulfil(plan, "digits", "1", [{"scores": np.ones(10)} for _ in keys])
    assert len(cache) == 2
    other = cache.keys(SCOPE, [Tensor.of("pixels", _pixels(1, seed=5))], {})
    cache.fulfil(cache.plan(other), "digits", "2", [{"scores": np.ones(10)}])
    assert len(cache) == 1
    assert cache.stats.invalidations == 1
    assert not cache.plan(keys).hits


@pytest.fixture
async def cached_router(
    demo_cloud_plane: CloudDataPlane, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> AsyncIterator[tuple[Router, str]]:
    cloud = OipServer(demo_cloud_plane, "test-cloud")
    await cloud.start()
    endpoint = CloudEndpoint(f"127.0.0.1:{cloud.port}", 10.0, 64 << 20)
    router = Router(demo_edge_models, endpoint, edge_executor, cache=RowCache(64 << 20, 300))
    edge = OipServer(RouterDataPlane(router), "test-edge")
    await edge.start()
    try:
        yield router, f"127.0.0.1:{edge.port}"
    finally:
        await edge.stop(0)
        await router.close()
        await cloud.stop(0)


def _cloud_request(pixels: npt.NDArray[np.float32]) -> InferRequest:
    return InferRequest(
        "digits", [Tensor.of("pixels", pixels)], parameters={"offload_route": "cloud", "offload_details": True}
    )


def _routes(response: InferResponse) -> list[str]:
    return [item.decode() for item in response.as_dict()["offload_route"].data.tolist()]


async def test_a_repeated_cloud_bound_request_is_answered_from_cache(cached_router: tuple[Router, str]) -> None:
    router, address = cached_router
    assert router.cloud is not None
    pixels = _pixels(4)
    async with OipClient(address) as client:
        first = await client.infer(_cloud_request(pixels))
        attempts = router.cloud.stats.attempts
        second = await client.infer(_cloud_request(pixels))
    assert first.parameters["offload_route"] == "cloud"
    assert second.parameters["offload_route"] == "cache"
    assert _routes(second) == ["cache"] * 4
    assert router.cloud.stats.attempts == attempts, "a full hit never touches the network"
    np.testing.assert_array_equal(second.as_dict()["scores"].data, first.as_dict()["scores"].data)


async def test_only_rows_not_yet_cached_are_sent(cached_router: tuple[Router, str]) -> None:
    router, address = cached_router
    old, new = _pixels(3, seed=1), _pixels(2, seed=2)
    async with OipClient(address) as client:
        await client.infer(_cloud_request(old))
        response = await client.infer(_cloud_request(np.concatenate([old[:1], new[:1], old[1:], new[1:]])))
    assert _routes(response) == ["cache", "cloud", "cache", "cache", "cloud"]
    assert response.parameters["offload_route"] == "mixed"
    assert router.cache is not None
    assert router.cache.stats.misses == 3 + 2


async def test_identical_requests_in_flight_share_one_cloud_call(cached_router: tuple[Router, str]) -> None:
    router, address = cached_router
    assert router.cloud is not None
    pixels = _pixels(6, seed=3)
    async with OipClient(address) as client:
        responses = await asyncio.gather(*(client.infer(_cloud_request(pixels)) for _ in range(12)))
    scores = [response.as_dict()["scores"].data for response in responses]
    for other in scores[1:]:
        np.testing.assert_array_equal(other, scores[0])
    assert router.cache is not None
    # Each distinct row went to the cloud once: later requests hit the cache or waited for that call.
    assert router.cache.stats.misses == 6
    assert router.cloud.stats.attempts <= 12
    assert router.cache.stats.hits + router.cache.stats.shared == 11 * 6


async def test_cloud_response_cache_is_off_by_default_and_answers_repeats_when_on(
    demo_cloud_plane: CloudDataPlane,
) -> None:
    from offload.cloud.response_cache import ResponseCache

    assert demo_cloud_plane.response_cache is None
    plane = CloudDataPlane(
        demo_cloud_plane._models, demo_cloud_plane._executor, response_cache=ResponseCache(1 << 20, 60)
    )
    request = InferRequest("digits", [Tensor.of("pixels", _pixels(3))], id="a")
    first = await plane.infer(request, None)
    again = await plane.infer(InferRequest("digits", [Tensor.of("pixels", _pixels(3))], id="b"), None)
    other = await plane.infer(InferRequest("digits", [Tensor.of("pixels", _pixels(3, seed=9))]), None)
    assert plane.response_cache is not None
    assert (plane.response_cache.hits, plane.response_cache.misses) == (1, 2)
    assert again.id == "b"
    np.testing.assert_array_equal(again.outputs[0].data, first.outputs[0].data)
    assert not np.array_equal(other.outputs[0].data, first.outputs[0].data)
