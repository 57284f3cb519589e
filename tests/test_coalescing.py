"""Coalescing: the unsure rows of concurrent requests travel to the cloud in shared calls.

A real cloud server, held on demand (support.held: a call whose request id starts with "held-" waits
for the test's gate), behind a recording proxy that counts the calls. A request held in flight makes
the next requests' rows wait (window 0: rows wait while a call of theirs is in flight), the stats
snapshot's gauge says when they wait, and the gate lets them go: no timing is asserted. Every answer
is checked row by row against the bare models (support.reference).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from offload.cloud.dataplane import CloudDataPlane
from offload.edge.agent import build_router
from offload.edge.metrics import EdgeCollector
from offload.edge.settings import EdgeSettings
from offload.oip.errors import InvalidArgument
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.router.coalesce import CoalescePolicy
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.options import DETAILS, REQUIRE_CLOUD, RESPONSE_DEGRADED, RESPONSE_ROUTE, THRESHOLD
from offload.router.pool import CloudPool
from offload.router.stats import CoalesceStats
from offload.router.upstream import CloudFailure
from support import reference
from support.chaos import ChaosProxy, eventually
from support.held import HeldCloud
from support.reference import assert_rows_answered_as_routed, decoded

PIXELS = reference.demo_split("test")[0]
# Threshold 1: every row is unsure, so every row of every request goes to the cloud.
TO_THE_CLOUD: dict[str, ParameterValue] = {THRESHOLD: 1.0, DETAILS: True}


def _held(request: InferRequest) -> bool:
    return request.id.startswith("held-")


class Rig:
    """A router with coalescing, a held cloud behind a recording proxy."""

    def __init__(self, router: Router, cloud: HeldCloud, proxy: ChaosProxy) -> None:
        self.router = router
        self.cloud = cloud
        self.proxy = proxy
        self._next = 0

    def send(self, rows: int, request_id: str, deadline: float | None = None, **parameters: Any) -> Call:
        """Send `rows` new test rows in a request of their own, in a task."""
        pixels = PIXELS[self._next : self._next + rows]
        self._next += rows
        request = InferRequest(
            "digits", [Tensor.of("pixels", pixels)], id=request_id, parameters={**TO_THE_CLOUD, **parameters}
        )
        return Call(pixels, asyncio.create_task(self.router.infer(request, deadline)))

    @property
    def coalescing(self) -> CoalesceStats:
        stats = self.router.stats().coalescing
        assert stats is not None
        return stats

    async def wait_until_held(self, requests: int) -> None:
        await eventually(lambda: self.coalescing.held_requests == requests, f"{requests} requests wait to be sent")

    def arrivals(self) -> dict[str, InferRequest]:
        """The cloud calls that arrived so far, by request id."""
        arrived = {}
        while not self.cloud.arrived.empty():
            request = self.cloud.arrived.get_nowait()
            arrived[request.id] = request
        return arrived


class Call:
    def __init__(self, pixels: npt.NDArray[np.float32], task: asyncio.Task[InferResponse]) -> None:
        self.pixels = pixels
        self.task = task

    async def answer(self) -> InferResponse:
        return await self.task

    async def assert_from_the_cloud(self) -> None:
        """Every row is the cloud's answer for that row, in order, none degraded."""
        response = await self.task
        outputs = response.as_dict()
        routes = decoded(outputs[RESPONSE_ROUTE].data)
        assert routes == ["cloud"] * len(self.pixels)
        assert not response.parameters[RESPONSE_DEGRADED]
        assert_rows_answered_as_routed(outputs["scores"].data, routes, self.pixels)

    async def assert_degraded(self) -> None:
        """Every row is the edge's answer, flagged degraded."""
        response = await self.task
        outputs = response.as_dict()
        routes = decoded(outputs[RESPONSE_ROUTE].data)
        assert routes == ["edge"] * len(self.pixels)
        assert outputs[RESPONSE_DEGRADED].data.all()
        assert_rows_answered_as_routed(outputs["scores"].data, routes, self.pixels)


@asynccontextmanager
async def coalescing(
    plane: CloudDataPlane, models: dict[str, RoutedModel], executor: ThreadPoolExecutor, **policy: Any
) -> AsyncIterator[Rig]:
    held = HeldCloud(plane, _held)
    cloud = OipServer(held, "held-cloud")
    await cloud.start()
    proxy = ChaosProxy(f"127.0.0.1:{cloud.port}")
    await proxy.start()
    # Window 0 unless a test sets one: rows wait while a call of theirs is in flight, until the gate lets it end.
    coalesce = CoalescePolicy(**{"window_seconds": 0.0, **policy})
    router = Router(models, CloudPool(proxy.address, 30.0, 64 << 20), executor, coalesce=coalesce)
    try:
        yield Rig(router, held, proxy)
    finally:
        held.gate.set()
        await router.close()
        await proxy.stop()
        await cloud.stop(0)


Parts = tuple[CloudDataPlane, dict[str, RoutedModel], ThreadPoolExecutor]


@pytest.fixture
def rig_parts(
    demo_cloud_plane: CloudDataPlane, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> Parts:
    """What a rig is made of: the real cloud model, the edge models, the edge thread."""
    return demo_cloud_plane, demo_edge_models, edge_executor


async def test_requests_that_wait_for_a_call_in_flight_share_the_next_and_get_exactly_their_rows(
    rig_parts: Parts,
) -> None:
    async with coalescing(*rig_parts) as rig:
        first = rig.send(2, "held-first")
        await rig.cloud.arrived.get()  # its call is in flight, held by the cloud
        # Four requests of 1 to 4 rows while it is: their rows wait for it.
        waiting = [rig.send(rows, f"app-{rows}") for rows in (1, 2, 3, 4)]
        await rig.wait_until_held(4)
        assert rig.proxy.calls == 1
        rig.cloud.gate.set()
        for call in (first, *waiting):
            await call.assert_from_the_cloud()
        (shared,) = rig.arrivals().values()
        assert shared.inputs[0].data.shape[0] == 10, "one call carried the four requests' rows"
        assert rig.proxy.calls == 2
        assert rig.coalescing == CoalesceStats(
            calls=2, coalesced_calls=1, coalesced_requests=4, coalesced_rows=10, held_requests=0
        )
        cloud = rig.router.stats().cloud
        assert cloud is not None
        assert cloud.calls == 2, "two cloud requests for five app requests"
        # The agent's metrics read the same snapshot.
        families = EdgeCollector(rig.router.stats).collect()
        scraped = {sample.name: sample.value for family in families for sample in family.samples}
        assert scraped["offload_edge_coalesced_calls_total"] == 1
        assert scraped["offload_edge_coalesced_requests_total"] == 4
        assert scraped["offload_edge_coalesced_rows_total"] == 10
        assert scraped["offload_edge_coalescing_held_requests"] == 0


async def test_requests_whose_forwarded_parameters_differ_never_share_a_call(rig_parts: Parts) -> None:
    async with coalescing(*rig_parts) as rig:
        # 1 and True are equal in Python, but travel as int64_param and bool_param: different requests.
        firsts = [rig.send(3, "held-int", tenant=1), rig.send(3, "held-bool", tenant=True)]
        for _ in firsts:
            await rig.cloud.arrived.get()  # both in flight, held: they did not wait for each other
        later = [rig.send(3, "int-1", tenant=1), rig.send(3, "int-2", tenant=1), rig.send(3, "bool-1", tenant=True)]
        await rig.wait_until_held(3)
        rig.cloud.gate.set()
        for call in (*firsts, *later):
            await call.assert_from_the_cloud()
        arrived = rig.arrivals()
        wire = dict(zip(rig.proxy.message_ids, rig.proxy.parameters, strict=True))
        calls = sorted(
            (wire[request_id]["tenant"][0], request.inputs[0].data.shape[0]) for request_id, request in arrived.items()
        )
        assert calls == [("bool_param", 3), ("int64_param", 6)], "int-1 and int-2 together, bool-1 alone"
        assert rig.proxy.calls == 4
        assert rig.coalescing.coalesced_calls == 1
        assert rig.coalescing.coalesced_requests == 2


async def test_a_request_whose_deadline_cannot_wait_for_the_call_in_flight_is_sent_before_it(rig_parts: Parts) -> None:
    async with coalescing(*rig_parts) as rig:
        first = rig.send(3, "held-first")  # no deadline; held until the gate opens
        await rig.cloud.arrived.get()
        hurried = rig.send(3, "hurried", deadline=time.monotonic() + 1.0)
        # It could wait for the held call past its deadline; it goes early instead, and the cloud answers it.
        await hurried.assert_from_the_cloud()
        assert not first.task.done(), "the held call is still in flight"
        (sent,) = rig.arrivals().values()
        assert (sent.id, sent.inputs[0].data.shape[0]) == ("hurried", 3)
        rig.cloud.gate.set()
        await first.assert_from_the_cloud()
        assert rig.coalescing.coalesced_calls == 0


async def test_a_failed_shared_call_degrades_each_request_or_fails_it_as_its_own_options_say(
    rig_parts: Parts,
) -> None:
    async with coalescing(*rig_parts) as rig:
        first = rig.send(2, "held-first")
        await rig.cloud.arrived.get()
        plain = rig.send(2, "plain")
        required = rig.send(1, "required", **{REQUIRE_CLOUD: True})
        other = rig.send(3, "other")
        await rig.wait_until_held(3)
        rig.cloud.failure = InvalidArgument("injected: the cloud refuses this call")  # not retried
        rig.cloud.gate.set()
        await first.assert_degraded()
        await plain.assert_degraded()
        await other.assert_degraded()
        with pytest.raises(CloudFailure) as failed:
            await required.answer()
        assert failed.value.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "injected" in str(failed.value)
        assert rig.proxy.calls == 2
        assert rig.coalescing.coalesced_requests == 3


async def test_a_batch_that_reaches_its_most_rows_goes_at_once(rig_parts: Parts) -> None:
    async with coalescing(*rig_parts, max_rows=6) as rig:
        first = rig.send(3, "held-first")
        await rig.cloud.arrived.get()
        pair = [rig.send(3, "pair-1"), rig.send(3, "pair-2")]
        for call in pair:  # six rows: sent without waiting for the held call
            await call.assert_from_the_cloud()
        assert not first.task.done()
        (shared,) = rig.arrivals().values()
        assert shared.inputs[0].data.shape[0] == 6
        last = rig.send(3, "last")
        await rig.wait_until_held(1)
        rig.cloud.gate.set()
        await first.assert_from_the_cloud()
        await last.assert_from_the_cloud()
        assert rig.proxy.calls == 3
        assert rig.coalescing.coalesced_rows == 6


async def test_with_a_window_rows_wait_for_others_and_a_deadline_sends_them_early(rig_parts: Parts) -> None:
    # A window of a minute: while the held call is in flight, only the third request's deadline can send the
    # batch within the test (the held call ends only when the rig closes).
    async with coalescing(*rig_parts, window_seconds=60.0) as rig:
        travelling = rig.send(2, "held-first")
        await rig.cloud.arrived.get()
        patient = rig.send(2, "patient")
        await rig.wait_until_held(1)
        hurried = rig.send(3, "hurried", deadline=time.monotonic() + 1.0)
        await hurried.assert_from_the_cloud()
        await patient.assert_from_the_cloud()
        assert rig.proxy.calls == 2
        assert rig.coalescing == CoalesceStats(
            calls=2, coalesced_calls=1, coalesced_requests=2, coalesced_rows=5, held_requests=0
        )
        rig.cloud.gate.set()
        await travelling.assert_from_the_cloud()


async def test_with_a_window_a_request_alone_goes_at_once_and_the_next_wait_at_most_the_window(
    rig_parts: Parts,
) -> None:
    # Nothing in flight: the first request's call leaves at once (it is held in the cloud, so it stays in
    # flight). The next two wait for it or for the window, the window being the shorter: they go together
    # without the held call having ended.
    async with coalescing(*rig_parts, window_seconds=0.5) as rig:
        first = rig.send(2, "held-alone")
        await rig.cloud.arrived.get()
        assert rig.coalescing.held_requests == 0
        second, third = rig.send(1, "second"), rig.send(2, "third")
        await second.assert_from_the_cloud()
        await third.assert_from_the_cloud()
        assert not first.task.done()
        assert rig.proxy.calls == 2
        assert rig.coalescing == CoalesceStats(
            calls=2, coalesced_calls=1, coalesced_requests=2, coalesced_rows=3, held_requests=0
        )
        rig.cloud.gate.set()
        await first.assert_from_the_cloud()


async def test_closing_the_router_answers_waiting_and_travelling_rows_on_the_edge(rig_parts: Parts) -> None:
    async with coalescing(*rig_parts) as rig:
        travelling = rig.send(2, "held-first")
        await rig.cloud.arrived.get()
        waiting = rig.send(2, "waiting")
        await rig.wait_until_held(1)
        await rig.router.close()
        await travelling.assert_degraded()
        await waiting.assert_degraded()


async def test_the_agent_coalesces_by_default_and_not_with_zero_rows(demo_edge_models: dict[str, RoutedModel]) -> None:
    on = build_router(EdgeSettings(cloud="127.0.0.1:1"), models=demo_edge_models)
    off = build_router(EdgeSettings(cloud="127.0.0.1:1", coalesce_max_rows=0), models=demo_edge_models)
    try:
        assert on.stats().coalescing == CoalesceStats()
        assert off.stats().coalescing is None
    finally:
        await on.close()
        await off.close()
