"""NVIDIA's tritonclient, an independent OIP client, against the real `offload edge` and `offload cloud` processes.

tritonclient brings its own generated protobuf code (in the default descriptor pool; ours
lives in a private one), so passing these tests means the wire format is the standard's.
Besides accuracy floors, every answer is checked row by row against the bare model files
(support.reference): the cloud's rows are bare torch's answer, the edge agent's rows bare
ONNX Runtime's where the bare edge model is sure at the model's threshold and bare torch's
where it is not.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import Processes
from support import reference
from support.reference import assert_confidence_of_routed_rows, assert_rows_answered_as_routed, decoded

ROWS = 50
SERVER_NAMES = {"edge": "offload-edge", "cloud": "offload-cloud"}
# Accuracy floors on the first 50 test rows (the whole test split: edge 94.9%, routed 99.3%, cloud 99.6%).
MIN_ACCURACY = {"edge": 0.90, "cloud": 0.97}
TIMEOUT = 30.0

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


@pytest.fixture(scope="module")
def test_set() -> TestSet:
    pixels, labels = reference.demo_split("test")
    return pixels[:ROWS], labels[:ROWS]


@pytest.fixture(params=["edge", "cloud"])
def server(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _address(processes: Processes, server: str) -> str:
    return processes.edge.address if server == "edge" else processes.cloud.address


@pytest.fixture
def client(demo_processes: Processes, server: str) -> Iterator[Any]:
    """A tritonclient InferenceServerClient to the edge agent or the cloud service."""
    with triton.InferenceServerClient(url=_address(demo_processes, server)) as connection:
        yield connection


def _inputs(pixels: npt.NDArray[np.float32]) -> list[Any]:
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return [tensor]


def _accuracy(scores: npt.NDArray[Any], labels: npt.NDArray[np.int64]) -> float:
    assert scores.shape == (labels.size, 10)
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def _expected_routes(pixels: npt.NDArray[np.float32], server: str) -> list[str]:
    """Where each row is answered: the cloud service answers all; the edge agent sends the rows the bare
    edge model is unsure of at the model's threshold (the cloud's answer, fresh or from the row cache)."""
    if server == "cloud":
        return ["cloud"] * len(pixels)
    return ["cloud" if unsure else "edge" for unsure in reference.cloud_bound(pixels)]


def _assert_answers(scores: npt.NDArray[Any], pixels: npt.NDArray[np.float32], server: str) -> None:
    assert_rows_answered_as_routed(scores, _expected_routes(pixels, server), pixels)


def test_health_and_metadata(client: Any, server: str) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert client.get_server_metadata().name == SERVER_NAMES[server]
    assert client.get_server_metadata().version == importlib.metadata.version("offload")
    metadata = client.get_model_metadata("digits")
    assert metadata.name == "digits"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("pixels", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("scores", "FP32", [-1, 10])]
    # The same through tritonclient's JSON rendering of the protobuf message.
    assert client.get_model_metadata("digits", as_json=True)["inputs"][0]["shape"] == ["-1", "64"]


def test_unknown_model_metadata_is_not_found(client: Any) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert "NOT_FOUND" in str(caught.value.status())
    assert "'nope'" in caught.value.message()


def test_raw_infer_is_accurate(client: Any, server: str, test_set: TestSet) -> None:
    pixels, labels = test_set
    result = client.infer(
        "digits",
        _inputs(pixels),
        outputs=[triton.InferRequestedOutput("scores")],
        request_id="r-1",
        client_timeout=TIMEOUT,
    )
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32
    assert _accuracy(scores, labels) >= MIN_ACCURACY[server]
    _assert_answers(scores, pixels, server)
    response = result.get_response()
    assert response.model_name == "digits"
    assert response.id == "r-1"
    assert len(response.raw_output_contents) == 1
    if server == "edge":
        parameters = response.parameters
        assert parameters["offload_route"].string_param in {"edge", "cloud", "mixed"}
        offloaded = parameters["offload_offloaded_rows"].int64_param
        # At most the unsure rows travel (fewer when an earlier test's request left some in the row cache).
        assert 0 <= offloaded <= int(reference.cloud_bound(pixels).sum())
        assert parameters["offload_route"].string_param == ("edge" if offloaded == 0 else "mixed")
        assert 0.0 <= parameters["offload_confidence"].double_param <= 1.0


def test_routing_parameters_from_tritonclient(demo_processes: Processes, test_set: TestSet) -> None:
    pixels, labels = test_set
    with triton.InferenceServerClient(url=demo_processes.edge.address) as client:
        result = client.infer(
            "digits",
            _inputs(pixels),
            # tritonclient sends a float as double_param and a bool as bool_param.
            parameters={"offload_route": "cloud", "offload_threshold": 0.99, "offload_details": True},
            client_timeout=TIMEOUT,
        )
    parameters = result.get_response().parameters
    assert _accuracy(result.as_numpy("scores"), labels) >= MIN_ACCURACY["cloud"]
    routes = result.as_numpy("offload_route")
    assert routes.shape == (ROWS,)
    # Every row is the cloud model's answer: fresh, or cached by an earlier test's request.
    assert set(routes.tolist()) <= {b"cloud", b"cache"}
    assert_rows_answered_as_routed(result.as_numpy("scores"), decoded(routes), pixels)
    assert parameters["offload_offloaded_rows"].int64_param == routes.tolist().count(b"cloud")
    expected_route = {b"cloud": "cloud", b"cache": "cache"}[routes[0]] if len(set(routes.tolist())) == 1 else "mixed"
    assert parameters["offload_route"].string_param == expected_route
    confidence = result.as_numpy("offload_confidence")
    assert confidence.dtype == np.float32
    assert confidence.shape == (ROWS,)
    assert np.all((confidence >= 0.0) & (confidence <= 1.0))
    assert_confidence_of_routed_rows(confidence, decoded(routes), pixels)
    assert parameters["offload_confidence"].double_param == pytest.approx(float(confidence.min()), rel=1e-6)


def test_bad_routing_parameter_from_tritonclient_is_invalid_argument(
    demo_processes: Processes, test_set: TestSet
) -> None:
    with triton.InferenceServerClient(url=demo_processes.edge.address) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("digits", _inputs(test_set[0]), parameters={"offload_threshold": 1.5}, client_timeout=TIMEOUT)
        assert "INVALID_ARGUMENT" in str(caught.value.status())
        assert "'offload_threshold'" in caught.value.message()
        assert client.is_server_ready()


def _shared_memory_output() -> Any:
    output = triton.InferRequestedOutput("scores")
    output.set_shared_memory("region", 4 * 10 * ROWS)
    return output


@pytest.mark.parametrize(
    ("requested", "fragments"),
    [
        pytest.param(
            lambda: triton.InferRequestedOutput("scores", class_count=3),
            ("output 'scores'", "parameter 'classification' is not supported", "classification extension"),
            id="classification",
        ),
        pytest.param(
            _shared_memory_output,
            ("output 'scores'", "is not supported", "shared memory is not implemented"),
            id="shared-memory",
        ),
    ],
)
def test_requested_output_parameters_we_do_not_implement_are_invalid_argument(
    client: Any, test_set: TestSet, requested: Any, fragments: tuple[str, ...]
) -> None:
    """Answering FP32 [N, 10] to a request for the top 3 classes would be a wrong answer, not a fallback."""
    pixels, _ = test_set
    with pytest.raises(InferenceServerException) as caught:
        client.infer("digits", _inputs(pixels), outputs=[requested()], client_timeout=TIMEOUT)
    assert "INVALID_ARGUMENT" in str(caught.value.status())
    for fragment in fragments:
        assert fragment in caught.value.message()
    plain = client.infer("digits", _inputs(pixels), outputs=[triton.InferRequestedOutput("scores")])
    assert plain.as_numpy("scores").shape == (ROWS, 10)


def test_typed_contents_get_a_typed_answer(
    client: Any, demo_processes: Processes, server: str, test_set: TestSet
) -> None:
    """tritonclient's InferInput always sends raw contents; its own protobuf stubs can send typed ones."""
    pixels, labels = test_set
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
    with grpc.insecure_channel(_address(demo_processes, server)) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    assert not response.raw_output_contents
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("scores", "FP32", [ROWS, 10])]
    typed = np.array(response.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(ROWS, 10)
    assert _accuracy(typed, labels) >= MIN_ACCURACY[server]
    _assert_answers(typed, pixels, server)
    # Typed and raw requests get the same answer.
    raw = client.infer("digits", _inputs(pixels), client_timeout=TIMEOUT).as_numpy("scores")
    np.testing.assert_array_equal(typed, raw)


async def test_concurrent_infers_through_the_aio_client(demo_processes: Processes, test_set: TestSet) -> None:
    """20 requests in flight at once: two passes over the 50 rows, 5 rows each."""
    pixels, labels = test_set
    starts = [(k * 5) % ROWS for k in range(20)]
    async with triton_aio.InferenceServerClient(url=demo_processes.edge.address) as client:
        assert await client.is_server_ready()
        results = await asyncio.gather(
            *(
                client.infer("digits", _inputs(pixels[start : start + 5]), request_id=f"r-{k}", client_timeout=TIMEOUT)
                for k, start in enumerate(starts)
            )
        )
    predictions = []
    for k, result in enumerate(results):
        response = result.get_response()
        assert response.id == f"r-{k}"
        assert response.parameters["offload_route"].string_param in {"edge", "cloud", "mixed"}
        scores = result.as_numpy("scores")
        assert scores.shape == (5, 10)
        # Each answer is its own request's rows, in order, however the 20 interleaved.
        _assert_answers(scores, pixels[starts[k] : starts[k] + 5], "edge")
        predictions.append(np.argmax(scores, axis=1))
    expected = np.concatenate([labels[start : start + 5] for start in starts])
    assert float(np.mean(np.concatenate(predictions) == expected)) >= MIN_ACCURACY["edge"]


@pytest.mark.parametrize(
    ("name", "datatype"), [("offload_route", "BYTES"), ("offload_confidence", "FP32"), ("offload_degraded", "BOOL")]
)
def test_a_routing_output_named_in_outputs_comes_back_with_the_others_named(
    demo_processes: Processes, test_set: TestSet, name: str, datatype: str
) -> None:
    pixels, labels = test_set
    with triton.InferenceServerClient(url=demo_processes.edge.address) as client:
        result = client.infer(
            "digits",
            _inputs(pixels),
            outputs=[triton.InferRequestedOutput(name), triton.InferRequestedOutput("scores")],
            client_timeout=TIMEOUT,
        )
    response = result.get_response()
    # In the order asked, and only those: no offload_details, so not the other two routing outputs.
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        (name, datatype, [ROWS]),
        ("scores", "FP32", [ROWS, 10]),
    ]
    assert _accuracy(result.as_numpy("scores"), labels) >= MIN_ACCURACY["edge"]
    _assert_answers(result.as_numpy("scores"), pixels, "edge")
    values = result.as_numpy(name)
    parameters = response.parameters
    if name == "offload_route":
        assert set(values.tolist()) <= {b"edge", b"cloud", b"cache"}
        assert values.tolist().count(b"cloud") == parameters["offload_offloaded_rows"].int64_param
        assert [route in reference.FROM_THE_CLOUD for route in decoded(values)] == reference.cloud_bound(
            pixels
        ).tolist()
    elif name == "offload_confidence":
        assert values.dtype == np.float32
        assert_confidence_of_routed_rows(values, _expected_routes(pixels, "edge"), pixels)
        assert parameters["offload_confidence"].double_param == pytest.approx(float(values.min()), rel=1e-6)
    else:
        assert values.dtype == np.bool_
        assert bool(values.any()) == parameters["offload_degraded"].bool_param
