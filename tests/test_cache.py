"""The router's per-row cache of cloud answers, single-flight of identical rows, and the cloud's response cache.

Answers are checked against the bare cloud model (support.reference): a cached row must be the
cloud's answer for that very row.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from conftest import SUBPROCESS_ENV
from offload.cloud.dataplane import CloudDataPlane
from offload.edge.dataplane import RouterDataPlane
from offload.oip.client import OipClient
from offload.oip.errors import NotFound
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.router.cache import RowCache, RowOutputs, RowPlan
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.pool import CloudPool
from offload.router.stats import CacheStats, UpstreamStats
from offload.tools.process import ServerProcess
from support import counting
from support.held import HeldCloud
from support.reference import assert_rows_answered_as_routed

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


def _charge(outputs: RowOutputs) -> int:
    """What a cache charges for one entry of these outputs: read off a cache that holds just it."""
    cache = RowCache(max_bytes=1 << 20, ttl_seconds=10)
    cache.fulfil(cache.plan(cache.keys(SCOPE, [Tensor.of("pixels", _pixels(1))], {})), "digits", "1", [outputs])
    return cache.bytes_used


async def test_ttl_and_byte_bound_evict_least_recently_used() -> None:
    now = [0.0]
    row = {"scores": np.zeros(10, np.float32)}
    # Room for three entries of one 10-float row each, not four.
    cache = RowCache(max_bytes=3 * _charge(row) + _charge(row) // 2, ttl_seconds=10, timer=lambda: now[0])
    keys = cache.keys(SCOPE, [Tensor.of("pixels", _pixels(4))], {})

    def store(positions: list[int]) -> None:
        plan = cache.plan([keys[i] for i in positions])
        cache.fulfil(plan, "digits", "1", [row for _ in plan.sends])

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
    assert cache.stats().invalidations == 1
    assert not cache.plan(keys).hits


def _answer(kind: str, rows: int) -> dict[str, npt.NDArray[Any]]:
    """A cloud answer: the demo model's ten scores a row, or a BYTES output and a scalar a row."""
    if kind == "scores":
        return {"scores": np.random.default_rng(1).standard_normal((rows, 10)).astype(np.float32)}
    return {
        "text": np.array([[b"x" * (row % 50)] for row in range(rows)], dtype=object),
        "confidence": np.ones(rows, np.float32),
    }


@pytest.mark.parametrize("outputs", ["scores", "text"])
async def test_the_byte_bound_charges_at_least_the_memory_the_entries_take(outputs: str) -> None:
    """The bound is on memory, not payload: what caching the rows allocates (tracemalloc) is at most what
    the cache charges for them, and the charge is not far above it."""
    # Just past a doubling of the hash tables (2/3 of 2**15 entries), where a slot costs the most.
    rows = 21_846
    answer = _answer(outputs, rows)
    answers = [{name: values[row] for name, values in answer.items()} for row in range(rows)]
    cache = RowCache(max_bytes=1 << 30, ttl_seconds=60)
    keys = cache.keys(SCOPE, [Tensor.of("pixels", _pixels(rows))], {})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache.fulfil(cache.plan(keys), "digits", "1", answers)
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == rows
    charged = cache.bytes_used
    assert taken <= charged <= 1.5 * taken, f"a row takes {taken / rows:.0f} bytes and is charged {charged / rows:.0f}"


async def test_an_entry_holds_its_own_row_not_the_whole_answer() -> None:
    cache = RowCache(max_bytes=1 << 20, ttl_seconds=60)
    keys = cache.keys(SCOPE, [Tensor.of("pixels", _pixels(2))], {})
    answer = np.arange(20, dtype=np.float32).reshape(2, 10)
    cache.fulfil(cache.plan(keys), "digits", "1", [{"scores": answer[0]}, {"scores": answer[1]}])
    plan = cache.plan(keys)
    for position, row in plan.hits.items():
        assert row["scores"].base is None, "a view would keep the whole answer alive"
        np.testing.assert_array_equal(row["scores"], answer[position])
        assert not row["scores"].flags.writeable, "hits are shared: nobody may change them"


async def test_the_byte_bound_counts_the_payload_of_bytes_outputs() -> None:
    cache = RowCache(max_bytes=50_000, ttl_seconds=60)
    keys = cache.keys(SCOPE, [Tensor.of("pixels", _pixels(2))], {})
    plan = cache.plan(keys)
    small, large = (np.array([b"x" * size], dtype=object) for size in (1_000, 100_000))
    cache.fulfil(plan, "digits", "1", [{"text": small}, {"text": large}])
    assert sorted(cache.plan(keys).hits) == [0], "a 100 kB answer does not fit a 50 kB cache"
    assert 1_000 < cache.bytes_used < 2_000


@pytest.fixture
async def cached_router(
    demo_cloud_plane: CloudDataPlane, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> AsyncIterator[tuple[Router, str]]:
    cloud = OipServer(demo_cloud_plane, "test-cloud")
    await cloud.start()
    endpoint = CloudPool(f"127.0.0.1:{cloud.port}", 10.0, 64 << 20)
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


def _cloud(router: Router) -> UpstreamStats:
    stats = router.stats().cloud
    assert stats is not None
    return stats


def _cache(router: Router) -> CacheStats:
    stats = router.stats().cache
    assert stats is not None
    return stats


def _routes(response: InferResponse) -> list[str]:
    return [item.decode() for item in response.as_dict()["offload_route"].data.tolist()]


async def test_a_repeated_cloud_bound_request_is_answered_from_cache(cached_router: tuple[Router, str]) -> None:
    router, address = cached_router
    pixels = _pixels(4)
    async with OipClient(address) as client:
        first = await client.infer(_cloud_request(pixels))
        attempts = _cloud(router).attempts
        second = await client.infer(_cloud_request(pixels))
    assert first.parameters["offload_route"] == "cloud"
    assert second.parameters["offload_route"] == "cache"
    assert _routes(second) == ["cache"] * 4
    assert _cloud(router).attempts == attempts, "a full hit never touches the network"
    np.testing.assert_array_equal(second.as_dict()["scores"].data, first.as_dict()["scores"].data)
    assert_rows_answered_as_routed(second.as_dict()["scores"].data, _routes(second), pixels)


async def test_only_rows_not_yet_cached_are_sent(cached_router: tuple[Router, str]) -> None:
    router, address = cached_router
    old, new = _pixels(3, seed=1), _pixels(2, seed=2)
    mixed = np.concatenate([old[:1], new[:1], old[1:], new[1:]])
    async with OipClient(address) as client:
        await client.infer(_cloud_request(old))
        response = await client.infer(_cloud_request(mixed))
    assert _routes(response) == ["cache", "cloud", "cache", "cache", "cloud"]
    # Cached and fresh rows merged back in order: each is the cloud's answer for its own row.
    assert_rows_answered_as_routed(response.as_dict()["scores"].data, _routes(response), mixed)
    assert response.parameters["offload_route"] == "mixed"
    assert _cache(router).misses == 3 + 2


async def test_identical_requests_in_flight_share_one_cloud_call(cached_router: tuple[Router, str]) -> None:
    router, address = cached_router
    pixels = _pixels(6, seed=3)
    async with OipClient(address) as client:
        responses = await asyncio.gather(*(client.infer(_cloud_request(pixels)) for _ in range(12)))
    scores = [response.as_dict()["scores"].data for response in responses]
    for other in scores[1:]:
        np.testing.assert_array_equal(other, scores[0])
    assert_rows_answered_as_routed(scores[0], _routes(responses[0]), pixels)
    # Each distinct row went to the cloud once: later requests hit the cache or waited for that call.
    cache = _cache(router)
    assert cache.misses == 6
    assert _cloud(router).attempts <= 12
    assert cache.hits + cache.shared == 11 * 6


async def test_cloud_response_cache_is_off_by_default_and_answers_repeats_when_on(
    demo_cloud_plane: CloudDataPlane,
) -> None:
    from offload.cloud.response_cache import ResponseCache

    assert demo_cloud_plane.response_cache is None
    plane = CloudDataPlane(
        demo_cloud_plane.registry, demo_cloud_plane.scheduler, response_cache=ResponseCache(1 << 20, 60)
    )
    request = InferRequest("digits", [Tensor.of("pixels", _pixels(3))], id="a")
    first = await plane.infer(request, None)
    again = await plane.infer(InferRequest("digits", [Tensor.of("pixels", _pixels(3))], id="b"), None)
    other = await plane.infer(InferRequest("digits", [Tensor.of("pixels", _pixels(3, seed=9))]), None)
    assert plane.response_cache is not None
    assert (plane.response_cache.hits, plane.response_cache.misses) == (1, 2)
    assert again.id == "b"
    np.testing.assert_array_equal(again.outputs[0].data, first.outputs[0].data)
    assert_rows_answered_as_routed(again.outputs[0].data, ["cloud"] * 3, _pixels(3))
    assert not np.array_equal(other.outputs[0].data, first.outputs[0].data)


async def test_routed_rows_answered_from_the_cache_say_cache_and_are_not_counted_as_offloaded(
    cached_router: tuple[Router, str],
) -> None:
    router, address = cached_router
    pixels = _pixels(4, seed=11)
    # Auto routing with a threshold no row reaches: every row is cloud-bound by confidence.
    request = InferRequest(
        "digits", [Tensor.of("pixels", pixels)], parameters={"offload_threshold": 1.0, "offload_details": True}
    )
    async with OipClient(address) as client:
        first = await client.infer(request)
        attempts = _cloud(router).attempts
        second = await client.infer(request)
    assert (first.parameters["offload_route"], first.parameters["offload_offloaded_rows"]) == ("cloud", 4)
    assert (second.parameters["offload_route"], second.parameters["offload_offloaded_rows"]) == ("cache", 0)
    assert _routes(second) == ["cache"] * 4
    assert _cloud(router).attempts == attempts
    np.testing.assert_array_equal(second.as_dict()["scores"].data, first.as_dict()["scores"].data)
    assert_rows_answered_as_routed(second.as_dict()["scores"].data, _routes(second), pixels)


@pytest.fixture
async def cloud_address(demo_cloud_plane: CloudDataPlane) -> AsyncIterator[str]:
    cloud = OipServer(demo_cloud_plane, "test-cloud")
    await cloud.start()
    try:
        yield f"127.0.0.1:{cloud.port}"
    finally:
        await cloud.stop(0)


def _with_config(model: RoutedModel, version: str | None = None, cloud_version: str | None = None) -> RoutedModel:
    """The same edge model under another version of itself, or pinned to a cloud version."""
    update: dict[str, object] = {}
    if version is not None:
        update["version"] = version
    if cloud_version is not None:
        update["routing"] = model.routing.model_copy(update={"cloud_version": cloud_version})
    return RoutedModel(model.config.model_copy(update=update), model.edge)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"version": "2"}, id="new-edge-model-version"),
        pytest.param({"cloud_version": "1"}, id="new-routing-cloud-version"),
    ],
)
async def test_a_new_edge_version_or_cloud_version_makes_new_keys_at_once(
    cloud_address: str,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    change: dict[str, str],
) -> None:
    """Two routers share one row cache: the model as it was, and the same model after the change. The
    changed one finds nothing cached for rows the other cached, and so asks the cloud."""
    cache = RowCache(64 << 20, 300)
    before = demo_edge_models
    after = {"digits": _with_config(demo_edge_models["digits"], **change)}
    routers = [
        Router(models, CloudPool(cloud_address, 10.0, 64 << 20), edge_executor, cache=cache)
        for models in (before, after)
    ]
    old, new = routers
    pixels = _pixels(3, seed=31)
    try:
        assert _routes(await old.infer(_cloud_request(pixels))) == ["cloud"] * 3
        assert _routes(await old.infer(_cloud_request(pixels))) == ["cache"] * 3
        changed = await new.infer(_cloud_request(pixels))
        assert _routes(changed) == ["cloud"] * 3, "the changed model's rows have new keys"
        assert _cloud(new).attempts == 1
        assert_rows_answered_as_routed(changed.as_dict()["scores"].data, _routes(changed), pixels)
        assert _routes(await new.infer(_cloud_request(pixels))) == ["cache"] * 3
    finally:
        for router in routers:
            await router.close()


class RedeployedCloud:
    """The demo cloud, answering with whatever model version `version` says: a cloud redeployed on demand."""

    def __init__(self, plane: CloudDataPlane) -> None:
        self._plane = plane
        self.version = "1"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plane, name)

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        response = await self._plane.infer(request, deadline)
        response.model_version = self.version
        return response


async def test_a_cloud_version_learned_from_an_answer_drops_the_models_cached_rows(
    demo_cloud_plane: CloudDataPlane, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    cloud = RedeployedCloud(demo_cloud_plane)
    server = OipServer(cloud, "redeployed-cloud")
    await server.start()
    router = Router(
        demo_edge_models,
        CloudPool(f"127.0.0.1:{server.port}", 10.0, 64 << 20),
        edge_executor,
        cache=RowCache(64 << 20, 300),
    )
    old, other = _pixels(4, seed=41), _pixels(2, seed=42)
    try:
        await router.infer(_cloud_request(old))
        assert _routes(await router.infer(_cloud_request(old))) == ["cache"] * 4
        cloud.version = "2"
        # Until a cloud call shows the change, the cached answers are still served (README: pin cloud_version).
        assert _routes(await router.infer(_cloud_request(old))) == ["cache"] * 4
        await router.infer(_cloud_request(other))  # answered by version 2: the model's old entries go
        cache = _cache(router)
        assert (cache.invalidations, cache.entries) == (1, 2)
        again = await router.infer(_cloud_request(old))
        assert _routes(again) == ["cloud"] * 4
        assert_rows_answered_as_routed(again.as_dict()["scores"].data, _routes(again), old)
    finally:
        await router.close()
        await server.stop(0)


class PlanningCache(RowCache):
    """A row cache that hands each plan it makes to the test as well: the moment a request has looked
    its rows up (and claimed or joined their cloud calls) is an event to wait on, not a guess."""

    def __init__(self, max_bytes: int, ttl_seconds: float) -> None:
        super().__init__(max_bytes, ttl_seconds)
        self.planned = asyncio.Queue[RowPlan]()

    def plan(self, keys: list[bytes]) -> RowPlan:
        plan = super().plan(keys)
        self.planned.put_nowait(plan)
        return plan


@pytest.fixture
async def held_router(
    demo_cloud_plane: CloudDataPlane, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> AsyncIterator[tuple[Router, HeldCloud, PlanningCache]]:
    held = HeldCloud(demo_cloud_plane)
    cloud = OipServer(held, "held-cloud")
    await cloud.start()
    endpoint = CloudPool(f"127.0.0.1:{cloud.port}", 30.0, 64 << 20)
    cache = PlanningCache(64 << 20, 300)
    router = Router(demo_edge_models, endpoint, edge_executor, cache=cache)
    try:
        yield router, held, cache
    finally:
        held.gate.set()
        await router.close()
        await cloud.stop(0)


@pytest.mark.parametrize("how", ["deadline", "cancelled"])
async def test_a_request_waiting_on_an_identical_row_is_not_failed_by_its_senders_impatience(
    held_router: tuple[Router, HeldCloud, PlanningCache], how: str
) -> None:
    router, held, cache = held_router
    pixels = _pixels(2, seed=21)
    request = _cloud_request(pixels)
    required = InferRequest(
        "digits",
        [Tensor.of("pixels", pixels)],
        parameters={"offload_route": "cloud", "offload_details": True, "offload_require_cloud": True},
    )
    # The sender: a short deadline (or a caller who goes away) while its call is held in the cloud.
    sender = asyncio.create_task(router.infer(request, time.monotonic() + 0.3 if how == "deadline" else None))
    await held.arrived.get()
    assert len((await cache.planned.get()).sends) == 2, "the sender sends both rows"
    waiter = asyncio.create_task(router.infer(required))  # no deadline; the same rows, so it waits
    assert len((await cache.planned.get()).waits) == 2, "the waiter waits on the sender's call for both rows"
    assert _cache(router).shared == 2
    if how == "cancelled":
        sender.cancel()
    else:
        answer = await sender
        assert answer.parameters["offload_degraded"], "the sender ran out of time and fell back to the edge"
    await held.arrived.get()  # the waiter sends the rows itself ...
    held.gate.set()  # ... and both calls may now finish
    response = await waiter
    assert response.parameters["offload_route"] == "cloud"
    assert not response.parameters["offload_degraded"]
    assert_rows_answered_as_routed(response.as_dict()["scores"].data, _routes(response), pixels)
    if how == "cancelled":
        with pytest.raises(asyncio.CancelledError):
            await sender


async def test_a_cloud_failure_is_shared_with_the_requests_waiting_on_its_rows(
    held_router: tuple[Router, HeldCloud, PlanningCache],
) -> None:
    router, held, cache = held_router
    pixels = _pixels(2, seed=22)
    sender = asyncio.create_task(router.infer(_cloud_request(pixels)))
    await held.arrived.get()
    assert len((await cache.planned.get()).sends) == 2, "the sender sends both rows"
    waiter = asyncio.create_task(router.infer(_cloud_request(pixels)))
    assert len((await cache.planned.get()).waits) == 2, "the waiter waits on the sender's call for both rows"
    assert _cache(router).shared == 2
    held.failure = NotFound("model 'digits' was unloaded")  # not retried: one failed call
    held.gate.set()
    answers = await asyncio.gather(sender, waiter)
    assert [answer.parameters["offload_degraded"] for answer in answers] == [True, True]
    assert held.arrived.qsize() == 0, "the waiter took the sender's failure instead of calling again"
    assert _cloud(router).attempts == 1


async def test_the_cloud_command_caches_whole_answers_when_its_environment_says_so(tmp_path: Path) -> None:
    """A real `offload cloud` with OFFLOAD_CLOUD_RESPONSE_CACHE_BYTES; its model counts the calls that reach it."""
    count_file = tmp_path / "calls"
    repository = counting.write_repository(tmp_path / "repository")
    env = {**SUBPROCESS_ENV, counting.COUNT_ENV: str(count_file), "OFFLOAD_CLOUD_RESPONSE_CACHE_BYTES": "1000000"}
    rows, other = np.array([[1.0, 2.0]], np.float32), np.array([[3.0, 4.0]], np.float32)
    with ServerProcess(["cloud", "--grpc-port", "0", "--model-repository", str(repository)], env=env) as cloud:
        async with OipClient(cloud.start()) as client:

            async def infer(x: npt.NDArray[np.float32], request_id: str) -> InferResponse:
                return await client.infer(InferRequest("counted", [Tensor.of("x", x)], id=request_id), timeout=30)

            first = await infer(rows, "a")
            assert counting.calls(count_file) == 1
            again = await infer(rows, "b")  # another device's identical request: answered from the cache
            assert counting.calls(count_file) == 1, "the repeated request reached the model"
            fresh = await infer(other, "c")
            assert counting.calls(count_file) == 2
    assert again.id == "b"
    for response, x in ((first, rows), (again, rows), (fresh, other)):
        np.testing.assert_array_equal(response.as_dict()["y"].data, 2 * x)


def test_the_cloud_response_cache_counts_the_payload_of_bytes_outputs() -> None:
    from offload.cloud.response_cache import ResponseCache

    cache = ResponseCache(max_bytes=50_000, ttl_seconds=60)
    for key, size in ((b"small", 1_000), (b"large", 100_000)):
        cache.put(key, [Tensor.of("text", np.array([b"x" * size], dtype=object))])
    assert cache.get(b"small") is not None
    assert cache.get(b"large") is None, "a 100 kB answer does not fit a 50 kB cache"


def test_the_cloud_response_cache_keys_the_whole_request_whatever_its_id_and_input_order() -> None:
    from offload.cloud.response_cache import ResponseCache

    pixels, mask = Tensor.of("pixels", _pixels(2)), Tensor.of("mask", np.ones((2, 1), np.float32))
    key = ResponseCache.key(InferRequest("digits", [pixels, mask], id="a", parameters={"p": 1}), "1", ["scores"])
    same = InferRequest("digits", [mask, pixels], id="b", parameters={"p": 1})
    assert ResponseCache.key(same, "1", ["scores"]) == key
    changed = [
        ResponseCache.key(same, "2", ["scores"]),
        ResponseCache.key(same, "1", ["scores", "other"]),
        ResponseCache.key(InferRequest("digits", [pixels, mask], parameters={"p": "1"}), "1", ["scores"]),
        ResponseCache.key(InferRequest("digits", [pixels], parameters={"p": 1}), "1", ["scores"]),
        ResponseCache.key(InferRequest("digits_large", [pixels, mask], parameters={"p": 1}), "1", ["scores"]),
    ]
    assert len({key, *changed}) == 1 + len(changed)
