"""Where the edge model runs: inline on the event loop when its measured cost is below the hand-off's, else on the
edge thread; and a request the server checked against the model's inputs is not checked again.

Runs are counted by the router's stats snapshot and by an executor that counts what it is handed; answers are
held to the bare model (support.reference). No timing is asserted: the costs are set by the tests, or so far
apart (one row against twenty thousand) that no machine could blur them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import numpy as np
import pytest

from offload.edge.agent import load_edge_models
from offload.edge.metrics import EdgeCollector
from offload.models import DEMO_REPOSITORY
from offload.oip.errors import InvalidArgument
from offload.oip.messages import ReceivedRequest, check_request, decode_request, request_to_pb
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.oip.validation import check_inputs
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.options import ROUTE
from offload.router.placement import OUTLIER, SMOOTHING, Placement, PlacementPolicy, RunCost
from offload.router.stats import EdgeRunStats
from support import reference

P = ParamSpec("P")
T = TypeVar("T")
PIXELS = reference.demo_split("test")[0]


class CountingExecutor(ThreadPoolExecutor):
    """One edge thread that counts the jobs it is handed."""

    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def fresh_models() -> dict[str, RoutedModel]:
    """The demo model loaded anew: nothing measured yet."""
    return load_edge_models(DEMO_REPOSITORY)


def _edge_request(rows: int) -> InferRequest:
    return InferRequest("digits", [Tensor.of("pixels", PIXELS[:rows])], parameters={ROUTE: "edge"})


def test_a_batch_size_never_measured_is_bounded_by_a_larger_one_or_scaled_from_a_smaller_one() -> None:
    cost = RunCost()
    assert cost.expected(1) is None
    cost.record(1, 1e-4)
    assert cost.expected(1) == 1e-4
    assert cost.expected(3) == pytest.approx(4e-4), "3 rows round up to 4: four times one row"
    cost.record(64, 5e-4)
    assert cost.expected(8) == 5e-4, "no more than the 64 rows measured"
    assert cost.expected(100) == pytest.approx(1e-3), "128 rows: twice the 64"
    assert cost.expected(0) == 1e-4


def test_one_slow_run_moves_the_estimate_a_little_and_steady_ones_move_it_all_the_way() -> None:
    cost = RunCost()
    cost.record(1, 1e-4)
    cost.record(1, 1.0)  # a garbage collection, say
    assert cost.expected(1) == pytest.approx(1e-4 + SMOOTHING * (OUTLIER - 1) * 1e-4)
    for _ in range(200):
        cost.record(1, 1e-3)
    assert cost.expected(1) == pytest.approx(1e-3)


def test_the_policy_runs_inline_only_what_it_measured_cheap_unless_told() -> None:
    cost = RunCost()
    auto = PlacementPolicy(Placement.AUTO, inline_seconds=2e-4)
    assert not auto.inline(cost, 1), "nothing measured yet: the worker measures it"
    cost.record(1, 1e-4)
    assert auto.inline(cost, 1)
    assert not auto.inline(cost, 4), "four rows scale to 4e-4 s"
    assert PlacementPolicy(Placement.INLINE).inline(RunCost(), 1_000_000)
    assert not PlacementPolicy(Placement.THREAD).inline(cost, 1)


async def test_a_warmed_small_model_runs_inline_and_a_large_batch_on_the_edge_thread(
    fresh_models: dict[str, RoutedModel],
) -> None:
    model = fresh_models["digits"]
    model.warm_up()
    assert model.cost.expected(1) is not None
    with CountingExecutor() as executor:
        # A generous bound: a few rows of the demo model take well under 10 ms anywhere; 20,000 rows scaled from
        # the one measured take seconds.
        router = Router(fresh_models, None, executor, placement=PlacementPolicy(Placement.AUTO, 0.01))
        for rows in (1, 2, 3):
            response = await router.infer(_edge_request(rows))
            reference.EDGE_TOLERANCE.assert_close(
                response.as_dict()["scores"].data, reference.edge_scores(PIXELS[:rows])
            )
        assert executor.submitted == 0
        assert router.stats().edge_runs == EdgeRunStats(inline=3, threaded=0)
        # Twenty thousand rows would hold the event loop: the edge thread runs them (in chunks).
        large = np.tile(PIXELS, (20_000 // len(PIXELS) + 1, 1))[:20_000]
        response = await router.infer(InferRequest("digits", [Tensor.of("pixels", large)], parameters={ROUTE: "edge"}))
        reference.EDGE_TOLERANCE.assert_close(response.as_dict()["scores"].data, reference.edge_scores(large))
        assert executor.submitted == 1
        assert router.stats().edge_runs == EdgeRunStats(inline=3, threaded=1)
        scraped = {
            (sample.name, sample.labels.get("place")): sample.value
            for family in EdgeCollector(router.stats).collect()
            for sample in family.samples
        }
        assert scraped[("offload_edge_model_runs_total", "inline")] == 3
        assert scraped[("offload_edge_model_runs_total", "thread")] == 1
        await router.close()


async def test_a_model_never_measured_runs_on_the_thread_first_then_inline(
    fresh_models: dict[str, RoutedModel],
) -> None:
    with CountingExecutor() as executor:
        # A generous bound: any machine runs a row of the demo model in under 10 ms.
        router = Router(fresh_models, None, executor, placement=PlacementPolicy(Placement.AUTO, 0.01))
        await router.infer(_edge_request(1))
        assert executor.submitted == 1, "nothing measured: the first run is the thread's, which measures it"
        await router.infer(_edge_request(1))
        assert executor.submitted == 1
        assert router.stats().edge_runs == EdgeRunStats(inline=1, threaded=1)
        await router.close()


@pytest.mark.parametrize(("mode", "threaded"), [(Placement.THREAD, 3), (Placement.INLINE, 0)])
async def test_the_placement_setting_forces_either(
    fresh_models: dict[str, RoutedModel], mode: Placement, threaded: int
) -> None:
    fresh_models["digits"].warm_up()
    with CountingExecutor() as executor:
        router = Router(fresh_models, None, executor, placement=PlacementPolicy(mode))
        for rows in (1, 8, 300):
            response = await router.infer(_edge_request(rows))
            reference.EDGE_TOLERANCE.assert_close(
                response.as_dict()["scores"].data, reference.edge_scores(PIXELS[:rows])
            )
        assert executor.submitted == threaded
        assert router.stats().edge_runs == EdgeRunStats(inline=3 - threaded, threaded=threaded)
        await router.close()


def _checked(specs: Any, datatype: str = "FP32") -> InferRequest:
    """A request as the server reads it: checked against `specs`, then decoded."""
    pixels = PIXELS[:2].astype(np.float64) if datatype == "FP64" else PIXELS[:2]
    message = request_to_pb(InferRequest("digits", [Tensor.of("pixels", pixels)]))
    return decode_request(check_request(ReceivedRequest.of(message), model_inputs=lambda name, version: specs))


def test_a_request_the_server_checked_against_the_models_inputs_is_not_checked_again(
    fresh_models: dict[str, RoutedModel],
) -> None:
    specs = fresh_models["digits"].edge.inputs
    request = _checked(specs)
    assert request.checked_against is specs
    assert check_inputs(request, specs) == 2
    # Against other specs (a model swapped in since the server looked), it is checked again.
    swapped = tuple(spec.model_copy(update={"datatype": "FP64"}) for spec in specs)
    with pytest.raises(InvalidArgument, match="datatype FP32, expected FP64"):
        check_inputs(request, swapped)
    # And the server's own check refuses what the model does not take, before anything is decoded.
    with pytest.raises(InvalidArgument, match="datatype FP64, expected FP32"):
        _checked(specs, "FP64")
