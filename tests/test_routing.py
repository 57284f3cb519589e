"""Per-row routing on the demo models, through the edge agent's gRPC API and in-process.

Answers are checked row by row against the bare model files (support.reference): each row is
bare ONNX Runtime's answer where its route says edge, bare torch's where it says cloud, and its
confidence the NumPy max softmax of that answer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pytest

from conftest import Stack
from offload.oip.client import OipClient
from offload.oip.errors import NotFound
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.router.core import Router
from offload.router.models import RoutedModel
from support import reference
from support.reference import assert_confidence_of_routed_rows, assert_rows_answered_as_routed, decoded

THRESHOLD = 0.9


@pytest.fixture(scope="module")
def test_set() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    return reference.demo_split("test")


@pytest.fixture(scope="module")
def mixed_batch(
    test_set: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Twelve rows, confident and unsure ones interleaved, and which rows are unsure (by the bare edge model)."""
    inputs, _ = test_set
    confidence = reference.max_softmax(reference.edge_scores(inputs))
    unsure, sure = np.flatnonzero(confidence < THRESHOLD)[:5], np.flatnonzero(confidence >= THRESHOLD)[:7]
    assert unsure.size == 5, "the demo test set should hold unsure rows"
    assert sure.size == 7, "the demo test set should hold confident rows"
    order = np.array(
        [
            sure[0],
            unsure[0],
            sure[1],
            sure[2],
            unsure[1],
            unsure[2],
            sure[3],
            sure[4],
            unsure[3],
            sure[5],
            unsure[4],
            sure[6],
        ]
    )
    return inputs[order], confidence[order] < THRESHOLD


def _request(pixels: npt.NDArray[np.float32], **parameters: ParameterValue) -> InferRequest:
    return InferRequest("digits", [Tensor.of("pixels", pixels)], id="req-1", parameters=dict(parameters))


async def _infer(stack: Stack, request: InferRequest) -> InferResponse:
    async with OipClient(stack.edge_address) as client:
        return await client.infer(request)


def _routes(response: InferResponse) -> list[str]:
    return decoded(response.as_dict()["offload_route"].data)


async def test_mixed_batch_sends_only_unsure_rows_and_merges_them_in_order(
    demo_stack: Stack,
    mixed_batch: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]],
) -> None:
    pixels, unsure = mixed_batch
    response = await _infer(demo_stack, _request(pixels, offload_threshold=THRESHOLD, offload_details=True))

    outputs = response.as_dict()
    routes = _routes(response)
    assert routes == ["cloud" if flag else "edge" for flag in unsure]
    assert response.parameters["offload_route"] == "mixed"
    assert response.parameters["offload_offloaded_rows"] == int(unsure.sum())
    assert response.id == "req-1"

    # Row by row: bare ONNX Runtime's answer on the edge rows, bare torch's on the cloud rows, in order.
    assert_rows_answered_as_routed(outputs["scores"].data, routes, pixels)
    # Per-row confidence: the edge's where it answered, the cloud's where the cloud did.
    confidence = outputs["offload_confidence"].data
    assert outputs["offload_confidence"].datatype == "FP32"
    assert_confidence_of_routed_rows(confidence, routes, pixels)
    expected = reference.max_softmax(reference.expected_scores(pixels, routes))
    assert response.parameters["offload_confidence"] == pytest.approx(float(expected.min()), rel=1e-5)


@pytest.mark.parametrize("route", ["edge", "cloud"])
async def test_forced_route_answers_every_row_there(
    demo_stack: Stack,
    mixed_batch: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]],
    route: str,
) -> None:
    pixels, _ = mixed_batch
    response = await _infer(demo_stack, _request(pixels, offload_route=route, offload_details=True))
    assert response.parameters["offload_route"] == route
    assert response.parameters["offload_offloaded_rows"] == (len(pixels) if route == "cloud" else 0)
    assert set(_routes(response)) == {route}
    assert_rows_answered_as_routed(response.as_dict()["scores"].data, [route] * len(pixels), pixels)
    assert_confidence_of_routed_rows(response.as_dict()["offload_confidence"].data, [route] * len(pixels), pixels)


async def test_threshold_override_changes_routing(
    demo_stack: Stack, mixed_batch: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]
) -> None:
    pixels, unsure = mixed_batch
    never = await _infer(demo_stack, _request(pixels, offload_threshold=0.0))
    always = await _infer(demo_stack, _request(pixels, offload_threshold=1.0))
    some = await _infer(demo_stack, _request(pixels, offload_threshold=THRESHOLD))
    assert (never.parameters["offload_route"], never.parameters["offload_offloaded_rows"]) == ("edge", 0)
    # Confidence is at most 1.0, and rows strictly below the threshold travel: 1.0 sends all but certain rows.
    offloaded = always.parameters["offload_offloaded_rows"]
    assert isinstance(offloaded, int)
    assert offloaded >= int(unsure.sum())
    assert some.parameters["offload_offloaded_rows"] == int(unsure.sum())


async def test_model_threshold_applies_without_override(
    demo_stack: Stack, test_set: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
) -> None:
    inputs, _ = test_set
    # The model.toml threshold, with the edge's confidence from the bare model.
    unsure = reference.cloud_bound(inputs, reference.THRESHOLD)
    response = await _infer(demo_stack, _request(inputs))
    assert response.parameters["offload_offloaded_rows"] == int(unsure.sum())
    routes = ["cloud" if flag else "edge" for flag in unsure]
    assert_rows_answered_as_routed(response.as_dict()["scores"].data, routes, inputs)
    # Without offload_details the answer carries only the model's outputs.
    assert [tensor.name for tensor in response.outputs] == ["scores"]


async def test_in_process_router_gives_the_same_answers_as_grpc(
    demo_stack: Stack,
    mixed_batch: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]],
) -> None:
    pixels, _ = mixed_batch
    request = _request(pixels, offload_threshold=THRESHOLD, offload_details=True)
    over_grpc = await _infer(demo_stack, request)
    in_process = await demo_stack.router.infer(request)
    assert in_process.parameters == pytest.approx(over_grpc.parameters)
    for name in ("scores", "offload_route", "offload_confidence"):
        np.testing.assert_array_equal(in_process.as_dict()[name].data, over_grpc.as_dict()[name].data)
    # And the same answers are the right ones.
    assert_rows_answered_as_routed(in_process.as_dict()["scores"].data, _routes(in_process), pixels)


async def test_edge_only_router_answers_unsure_rows_on_the_edge(
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    mixed_batch: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]],
) -> None:
    pixels, _ = mixed_batch
    router = Router(demo_edge_models, None, edge_executor)
    response = await router.infer(_request(pixels, offload_threshold=THRESHOLD))
    assert response.parameters["offload_route"] == "edge"
    assert response.parameters["offload_offloaded_rows"] == 0
    assert_rows_answered_as_routed(response.as_dict()["scores"].data, ["edge"] * len(pixels), pixels)


async def test_empty_batch_is_answered(demo_stack: Stack) -> None:
    response = await _infer(demo_stack, _request(np.zeros((0, 64), dtype=np.float32)))
    assert response.as_dict()["scores"].shape == (0, 10)
    assert response.parameters["offload_offloaded_rows"] == 0


async def test_requested_outputs_are_the_only_ones_returned(demo_stack: Stack) -> None:
    pixels = np.zeros((2, 64), dtype=np.float32)
    request = _request(pixels, offload_route="cloud")
    request.outputs = ["scores"]
    response = await _infer(demo_stack, request)
    assert [tensor.name for tensor in response.outputs] == ["scores"]
    assert_rows_answered_as_routed(response.as_dict()["scores"].data, ["cloud", "cloud"], pixels)


ROUTING_OUTPUTS = ["offload_route", "offload_confidence", "offload_degraded"]


@pytest.mark.parametrize("name", ROUTING_OUTPUTS)
async def test_a_routing_output_named_in_outputs_is_returned_like_a_model_output(
    demo_stack: Stack, mixed_batch: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]], name: str
) -> None:
    pixels, _ = mixed_batch
    detailed = await _infer(demo_stack, _request(pixels, offload_threshold=THRESHOLD, offload_details=True))
    expected = detailed.as_dict()[name]
    for outputs in ([name], ["scores", name], [name, "scores"]):
        request = _request(pixels, offload_threshold=THRESHOLD)
        request.outputs = list(outputs)
        # Only what was asked, in that order: the other routing outputs need offload_details.
        for response in (await _infer(demo_stack, request), await demo_stack.router.infer(request)):
            assert [tensor.name for tensor in response.outputs] == outputs
            tensor = response.as_dict()[name]
            assert (tensor.datatype, tensor.shape) == (expected.datatype, expected.shape)
            np.testing.assert_array_equal(tensor.data, expected.data)


async def test_offload_details_adds_the_routing_outputs_not_named_in_outputs(
    demo_stack: Stack, mixed_batch: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]
) -> None:
    pixels, _ = mixed_batch
    request = _request(pixels, offload_details=True)
    request.outputs = ["offload_confidence", "scores"]
    response = await _infer(demo_stack, request)
    assert [tensor.name for tensor in response.outputs] == [
        "offload_confidence",
        "scores",
        "offload_route",
        "offload_degraded",
    ]


async def test_the_router_counts_what_in_process_callers_asked_too(
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    mixed_batch: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]],
) -> None:
    pixels, _ = mixed_batch
    router = Router(demo_edge_models, None, edge_executor)
    await router.infer(_request(pixels))
    # Forced to a cloud this router does not have: answered on the edge, degraded.
    degraded = await router.infer(_request(pixels, offload_route="cloud"))
    assert degraded.parameters["offload_degraded"] is True
    with pytest.raises(NotFound):
        await router.infer(InferRequest("nope", [Tensor.of("pixels", pixels)]))
    stats = router.stats()
    assert (stats.requests, stats.degraded, stats.errors) == (3, 1, 1)
    assert stats.cloud is None
    assert stats.cache is None
    assert stats.thresholds == {name: model.routing.threshold for name, model in demo_edge_models.items()}
    assert stats.audit.rows == 0
