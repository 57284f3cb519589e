"""Every OIP datatype crosses real servers unchanged, typed and raw, edge and cloud."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from conftest import Stack
from offload.oip.client import OipClient
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from support.repos import SAMPLES, TEXT_BYTES, TYPED


def _request(
    model: str, datatypes: list[str], route: str | None = None, samples: dict[str, Any] = SAMPLES
) -> InferRequest:
    parameters = {} if route is None else {"offload_route": route}
    inputs = [Tensor(f"in_{d}", d, samples[d]) for d in datatypes]
    return InferRequest(model, inputs, parameters=dict(parameters))


def _assert_echoed(response: InferResponse, datatypes: list[str], samples: dict[str, Any] = SAMPLES) -> None:
    outputs = response.as_dict()
    for datatype in datatypes:
        tensor = outputs[f"out_{datatype}"]
        assert tensor.datatype == datatype
        assert tensor.shape == samples[datatype].shape
        np.testing.assert_array_equal(tensor.data, samples[datatype], err_msg=datatype)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
async def test_every_datatype_round_trips_through_the_cloud_service(echo_stack: Stack, raw: bool) -> None:
    datatypes = list(SAMPLES) if raw else TYPED
    async with OipClient(echo_stack.cloud_address) as client:
        response = await client.infer(_request("echo_all" if raw else "echo_typed", datatypes), raw=raw)
    _assert_echoed(response, datatypes)


@pytest.mark.parametrize("route", ["edge", "cloud"])
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
async def test_every_edge_datatype_round_trips_through_the_router(echo_stack: Stack, route: str, raw: bool) -> None:
    model, datatypes = ("echo", [d for d in SAMPLES if d != "BF16"]) if raw else ("echo_typed", TYPED)
    # ONNX Runtime holds strings as UTF-8 text: arbitrary bytes only cross the cloud path.
    samples = {**SAMPLES, "BYTES": TEXT_BYTES} if route == "edge" else SAMPLES
    async with OipClient(echo_stack.edge_address) as client:
        response = await client.infer(_request(model, datatypes, route, samples), raw=raw)
    assert response.parameters["offload_route"] == route
    _assert_echoed(response, datatypes, samples)


async def test_typed_request_gets_typed_answer_and_raw_gets_raw(echo_stack: Stack) -> None:
    import grpc

    from offload.oip import grpc_service_pb2 as pb
    from offload.oip import grpc_service_pb2_grpc as pb_grpc
    from offload.oip.messages import request_to_pb

    async with grpc.aio.insecure_channel(echo_stack.cloud_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        typed = await stub.ModelInfer(request_to_pb(_request("echo_typed", TYPED), raw=False))
        raw = await stub.ModelInfer(request_to_pb(_request("echo_all", list(SAMPLES)), raw=True))
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].contents.bool_contents) == SAMPLES["BOOL"].ravel().tolist()
    assert len(raw.raw_output_contents) == len(SAMPLES)
    assert isinstance(raw, pb.ModelInferResponse)
