"""Malformed requests get the right gRPC status and a message naming the field, and the server keeps serving.

Requests are crafted as raw protobuf messages (not through OipClient, which only builds
well-formed ones) and sent to the real in-process servers: the edge agent and the cloud.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import struct
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from conftest import Stack, running_stack
from offload.cloud.dataplane import CloudDataPlane
from offload.models import DEMO_REPOSITORY
from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip import server as oip_server
from offload.oip.client import OipClient
from offload.oip.errors import MAX_STATUS_MESSAGE_BYTES, InvalidArgument, UpstreamError
from offload.oip.limits import INLINE_CODEC_ELEMENTS, ServerLimits
from offload.oip.messages import CheckedRequest, decode_request, receive_infer_request, request_to_pb
from offload.oip.repository import TensorSpec
from offload.oip.request_ids import MAX_HEADER_REQUEST_ID
from offload.oip.server import OipServer, read_request
from offload.oip.tensors import Tensor, raw_bytes
from offload.oip.types import InferRequest
from offload.router.models import RoutedModel
from support import reference
from support.chaos import ChaosProxy, edge_under_test
from support.repos import SAMPLES, TEXT_BYTES, TYPED

if TYPE_CHECKING:
    # Only in the stubs: what GRPCInferenceServiceStub(an aio channel) is.
    from offload.oip.grpc_service_pb2_grpc import GRPCInferenceServiceAsyncStub as Stub

Code = grpc.StatusCode
SERVERS = ["edge", "cloud"]
TIMEOUT = 10.0

with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as _data:
    PIXELS: npt.NDArray[np.float32] = _data["inputs"][:2].astype(np.float32)
RAW = PIXELS.tobytes()  # 2 rows x 64 FP32: 512 bytes


def _address(stack: Stack, server: str) -> str:
    return stack.edge_address if server == "edge" else stack.cloud_address


@pytest.fixture(params=SERVERS)
async def stub(request: pytest.FixtureRequest, demo_stack: Stack) -> AsyncIterator[Stub]:
    """A raw stub to the edge agent or the cloud service of a demo stack."""
    async with grpc.aio.insecure_channel(_address(demo_stack, request.param)) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
async def edge_stub(demo_stack: Stack) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(demo_stack.edge_address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _digits(
    datatype: str = "FP32",
    shape: tuple[int, ...] = (2, 64),
    raw: bytes | None = RAW,
    name: str = "pixels",
    model: str = "digits",
    version: str = "",
) -> pb.ModelInferRequest:
    """A request for the demo model, well formed unless an argument says otherwise."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


@functools.cache
def _right_answers() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The bare models' answers to the good request: the edge agent's (routed by the model's threshold),
    and the cloud's."""
    routed = ["cloud" if unsure else "edge" for unsure in reference.cloud_bound(PIXELS)]
    return reference.expected_scores(PIXELS, routed), reference.cloud_scores(PIXELS)


async def _assert_serves(stub: Stub) -> None:
    """A good request to the same server is still answered, correctly shaped and right."""
    reply = await stub.ModelInfer(_digits(), timeout=TIMEOUT)
    assert [(output.name, output.datatype, list(output.shape)) for output in reply.outputs] == [
        ("scores", "FP32", [2, 10])
    ]
    assert [len(raw) for raw in reply.raw_output_contents] == [2 * 10 * 4]
    scores = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
    assert any(reference.CLOUD_TOLERANCE.close(scores, right) for right in _right_answers()), scores


async def _assert_rejected(
    stub: Stub,
    request: pb.ModelInferRequest,
    code: grpc.StatusCode,
    fragments: tuple[str, ...],
    good: Callable[[Stub], Awaitable[None]] = _assert_serves,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(request, timeout=TIMEOUT)
    details = caught.value.details() or ""
    assert caught.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} is not in the message {details!r}"
    await good(stub)


def _missing_input() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="digits")


def _input_twice() -> pb.ModelInferRequest:
    request = _digits()
    request.inputs.add(name="pixels", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(RAW)
    return request


def _two_raw_entries() -> pb.ModelInferRequest:
    request = _digits()
    request.raw_input_contents.append(RAW)
    return request


def _typed(field: str, values: list[Any], datatype: str = "FP32", raw: bytes | None = None) -> pb.ModelInferRequest:
    request = _digits(datatype=datatype, raw=raw)
    getattr(request.inputs[0].contents, field).extend(values)
    return request


def _parameter(key: str, **value: Any) -> pb.ModelInferRequest:
    request = _digits()
    if value:
        request.parameters[key].CopyFrom(pb.InferParameter(**value))
    else:
        request.parameters[key].SetInParent()  # present on the wire, nothing in the oneof
    return request


def _outputs(*names: str) -> pb.ModelInferRequest:
    request = _digits()
    for name in names:
        request.outputs.add(name=name)
    return request


def _output_parameter(key: str, **value: Any) -> pb.ModelInferRequest:
    request = _outputs("scores")
    request.outputs[0].parameters[key].CopyFrom(pb.InferParameter(**value))
    return request


FLOATS = PIXELS.ravel().tolist()

CASES = [
    pytest.param(lambda: _digits(model="nope"), Code.NOT_FOUND, ("'nope'", "not served", "digits"), id="unknown-model"),
    pytest.param(lambda: _digits(version="7"), Code.NOT_FOUND, ("'digits'", "version '7'"), id="unknown-version"),
    pytest.param(lambda: _digits(model=""), Code.INVALID_ARGUMENT, ("model_name",), id="empty-model-name"),
    pytest.param(lambda: _digits(name="pixelz"), Code.INVALID_ARGUMENT, ("'pixelz'", "'pixels'"), id="wrong-input"),
    pytest.param(lambda: _digits(name=""), Code.INVALID_ARGUMENT, ("input #0", "name is empty"), id="unnamed-input"),
    pytest.param(_missing_input, Code.INVALID_ARGUMENT, ("needs input 'pixels'",), id="missing-input"),
    pytest.param(_input_twice, Code.INVALID_ARGUMENT, ("'pixels'", "given twice"), id="input-twice"),
    pytest.param(
        lambda: _digits(datatype="INT32"), Code.INVALID_ARGUMENT, ("'pixels'", "INT32", "expected FP32"), id="datatype"
    ),
    pytest.param(
        lambda: _digits(shape=(128,)), Code.INVALID_ARGUMENT, ("'pixels'", "shape [128]", "[-1, 64]"), id="rank"
    ),
    pytest.param(
        lambda: _digits(shape=(1, 63), raw=RAW[: 63 * 4]),
        Code.INVALID_ARGUMENT,
        ("'pixels'", "shape [1, 63]", "[-1, 64]"),
        id="fixed-dim",
    ),
    pytest.param(
        lambda: _digits(datatype="FP8"), Code.INVALID_ARGUMENT, ("'pixels'", "unknown datatype 'FP8'", "FP32"), id="FP8"
    ),
    pytest.param(
        lambda: _digits(shape=(-1, 64)), Code.INVALID_ARGUMENT, ("shape [-1, 64]", "negative"), id="negative-dim"
    ),
    pytest.param(
        lambda: _digits(raw=RAW[:-1]), Code.INVALID_ARGUMENT, ("'pixels'", "511 bytes", "needs 512"), id="raw-short"
    ),
    pytest.param(
        lambda: _digits(raw=RAW + b"\0"), Code.INVALID_ARGUMENT, ("'pixels'", "513 bytes", "needs 512"), id="raw-long"
    ),
    pytest.param(
        _two_raw_entries,
        Code.INVALID_ARGUMENT,
        ("2 raw_input_contents entries for 1 input",),
        id="raw-entries-count",
    ),
    pytest.param(
        lambda: _typed("fp32_contents", FLOATS, raw=RAW),
        Code.INVALID_ARGUMENT,
        ("'pixels'", "both typed contents (fp32_contents) and raw contents"),
        id="typed-and-raw",
    ),
    pytest.param(
        lambda: _typed("int64_contents", [1] * 128),
        Code.INVALID_ARGUMENT,
        ("'pixels'", "contents.fp32_contents", "not contents.int64_contents"),
        id="typed-wrong-field",
    ),
    pytest.param(
        lambda: _typed("fp32_contents", FLOATS[:-1]),
        Code.INVALID_ARGUMENT,
        ("'pixels'", "contents.fp32_contents has 127 elements", "needs 128"),
        id="typed-count",
    ),
    pytest.param(
        lambda: _typed("fp32_contents", FLOATS, datatype="FP16"),
        Code.INVALID_ARGUMENT,
        ("'pixels'", "FP16 can only be sent as raw contents"),
        id="typed-FP16",
    ),
    pytest.param(
        lambda: _parameter("colour"),
        Code.INVALID_ARGUMENT,
        ("parameter 'colour'", "no value set"),
        id="empty-parameter",
    ),
    pytest.param(
        lambda: _outputs("nope"), Code.INVALID_ARGUMENT, ("no output 'nope'", "'scores'"), id="unknown-output"
    ),
    pytest.param(
        lambda: _output_parameter("classification", int64_param=3),
        Code.INVALID_ARGUMENT,
        ("output 'scores'", "parameter 'classification' is not supported", "['binary_data']"),
        id="output-classification",
    ),
    pytest.param(
        lambda: _output_parameter("binary_data", string_param="yes"),
        Code.INVALID_ARGUMENT,
        ("output 'scores'", "parameter 'binary_data' must be a bool_param, got string_param"),
        id="output-binary-data-not-bool",
    ),
    pytest.param(
        lambda: _outputs("scores", "scores"),
        Code.INVALID_ARGUMENT,
        ("output 'scores'", "requested twice"),
        id="output-twice",
    ),
    # The message quotes the caller's string; clipped in the middle, it still fits a trailer and ends with what to do.
    pytest.param(
        lambda: _digits(model="m" * 100_000),
        Code.NOT_FOUND,
        ("'mmm", "characters not shown", "not served", "digits"),
        id="100k-char-model-name",
    ),
    pytest.param(
        lambda: _digits(name="\n" * 100_000),
        Code.INVALID_ARGUMENT,
        ("has no input '\\n\\n", "characters not shown", "'pixels'"),
        id="100k-newline-input-name",
    ),
]


@pytest.mark.parametrize(("build", "code", "fragments"), CASES)
async def test_bad_request_is_rejected_and_the_server_keeps_serving(
    stub: Stub, build: Callable[[], pb.ModelInferRequest], code: grpc.StatusCode, fragments: tuple[str, ...]
) -> None:
    await _assert_rejected(stub, build(), code, fragments)


@pytest.mark.parametrize("server", SERVERS)
async def test_bytes_that_are_no_protobuf_message_are_invalid_argument(demo_stack: Stack, server: str) -> None:
    async with grpc.aio.insecure_channel(_address(demo_stack, server)) as channel:
        send_bytes: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send_bytes(_digits().SerializeToString()[:-3], timeout=TIMEOUT)  # cut inside the raw contents
        assert caught.value.code() == Code.INVALID_ARGUMENT
        details = caught.value.details() or ""
        # The reason is the no-copy reader's, which names the field cut short.
        prefix = "the request is not a valid inference.ModelInferRequest protobuf message (field 7 at byte "
        assert details.startswith(prefix), details
        assert " runs past the end of the message); " in details, details
        await _assert_serves(pb_grpc.GRPCInferenceServiceStub(channel))


async def test_a_clipped_message_fits_in_a_trailer(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(_digits(model="\u00e9\n" * 100_000), timeout=TIMEOUT)
    assert caught.value.code() == Code.NOT_FOUND
    details = caught.value.details() or ""
    # As sent, percent-encoded: within the limit, far below gRPC's 8 KiB for all trailers.
    assert len(urllib.parse.quote(details, safe=" !\"#$&'()*+,/:;<=>?@[\\]^`{|}~")) <= MAX_STATUS_MESSAGE_BYTES
    assert details.endswith("is not served here; models: ['digits', 'tabular']")


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            bytes(_digits(model="digits\u00e9").SerializeToString()).replace(b"\xc3\xa9", b"\xff\xfe"), id="not-utf8"
        ),
        pytest.param(_digits().SerializeToString()[:-7], id="cut-short"),
        pytest.param(b"\xff" * 64, id="garbage"),
    ],
)
async def test_a_request_that_is_not_a_valid_message_is_invalid_argument(
    demo_stack: Stack, server: str, message: bytes
) -> None:
    async with grpc.aio.insecure_channel(_address(demo_stack, server)) as channel:
        # A raw call: the generated stub can only send well-formed messages.
        infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(message, timeout=TIMEOUT)
        assert caught.value.code() == Code.INVALID_ARGUMENT, caught.value.details()
        assert "not a valid inference.ModelInferRequest protobuf message" in (caught.value.details() or "")
        await _assert_serves(pb_grpc.GRPCInferenceServiceStub(channel))


REQUEST_IDS = [  # the id, and whether the header carries it as it is
    pytest.param("\n" * 50, False, id="50-newlines"),
    pytest.param("x" * 100_000, False, id="100k-chars"),
    pytest.param("na\u00efve-\u65e5\u672c-\U0001f600", False, id="non-ascii"),
    pytest.param("\x00\x7f\r\n", False, id="nul-del-crlf"),
    pytest.param(" padded ", False, id="surrounding-blanks"),
    pytest.param("x" * (MAX_HEADER_REQUEST_ID + 1), False, id="one-over-the-header-limit"),
    pytest.param("req-42.a/b:c d", True, id="plain"),
    pytest.param("y" * MAX_HEADER_REQUEST_ID, True, id="at-the-header-limit"),
]


@pytest.mark.parametrize(("request_id", "as_is"), REQUEST_IDS)
async def test_any_request_id_reaches_the_cloud_and_the_answer_is_the_clouds(
    request_id: str,
    as_is: bool,
    demo_stack: Stack,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
) -> None:
    """Whatever an app puts in `id`, its cloud-bound rows are answered by the cloud, never degraded by our header."""
    async with (
        ChaosProxy(demo_stack.cloud_address) as proxy,
        edge_under_test(proxy.address, demo_edge_models, edge_executor, cloud_timeout_seconds=30.0) as edge,
        grpc.aio.insecure_channel(edge.address) as channel,
    ):
        request = _digits()
        request.id = request_id
        request.parameters["offload_threshold"].double_param = 1.0  # every row short of certainty: to the cloud
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    assert reply.id == request_id
    assert reply.parameters["offload_route"].string_param == "cloud"
    assert not reply.parameters["offload_degraded"].bool_param
    # One call, the body's id unchanged; the header is the id where that is legal, else its digest.
    assert proxy.message_ids == [request_id]
    digest = "sha256:" + hashlib.sha256(request_id.encode()).hexdigest()[:32]
    assert proxy.request_ids == [request_id if as_is else digest]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"uint64_param": 2**64 - 1}, id="uint64-max"),
        pytest.param({"int64_param": -(2**63)}, id="int64-min"),
        pytest.param({"string_param": "\n\x00" * 50_000}, id="100k-control-chars"),
        pytest.param({"double_param": float("nan")}, id="nan"),
    ],
)
async def test_any_parameter_an_app_sends_is_forwarded_to_the_cloud(edge_stub: Stub, value: dict[str, Any]) -> None:
    request = _digits()
    request.parameters["offload_threshold"].double_param = 1.0  # every row short of certainty: to the cloud
    request.parameters["sequence_id"].CopyFrom(pb.InferParameter(**value))
    reply = await edge_stub.ModelInfer(request, timeout=TIMEOUT)
    assert reply.parameters["offload_route"].string_param == "cloud"
    assert not reply.parameters["offload_degraded"].bool_param


async def test_a_peers_status_message_cannot_forge_a_log_line() -> None:
    """A cloud (any OIP server) may put newlines in its status message; it reaches our logs and messages escaped."""

    async def forge(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.abort(Code.INVALID_ARGUMENT, "bad row\n2026-01-01 00:00:00 INFO forged: all is well\u2028")
        raise AssertionError("unreachable")

    server = grpc.aio.server()
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(forge)
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with OipClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(UpstreamError) as caught:
                await client.infer(InferRequest("digits", [Tensor.of("pixels", PIXELS)]), timeout=TIMEOUT)
    finally:
        await server.stop(0)
    message = str(caught.value)
    assert caught.value.status == Code.INVALID_ARGUMENT
    assert message.isprintable(), message
    assert "bad row\\n2026-01-01 00:00:00 INFO forged: all is well\\u2028" in message


async def test_huge_declared_shape_is_refused_before_any_allocation(stub: Stub) -> None:
    start = time.monotonic()
    await _assert_rejected(
        stub,
        _digits(shape=(2**40, 64), raw=RAW),
        Code.INVALID_ARGUMENT,
        ("'pixels'", f"{2**46} elements", "over the limit of"),
    )
    # 2**46 floats would be 256 TiB: answering at all, within seconds, means nothing was allocated.
    assert time.monotonic() - start < 5.0


ROUTING_CASES = [
    pytest.param("offload_threshold", {"double_param": 1.5}, ("'offload_threshold'", "1.5"), id="threshold-1.5"),
    pytest.param("offload_threshold", {"double_param": -0.1}, ("'offload_threshold'", "-0.1"), id="threshold-negative"),
    pytest.param(
        "offload_threshold", {"double_param": float("nan")}, ("'offload_threshold'", "nan"), id="threshold-nan"
    ),
    pytest.param("offload_threshold", {"int64_param": 2}, ("'offload_threshold'", "2"), id="threshold-int-2"),
    pytest.param("offload_threshold", {"string_param": "abc"}, ("'offload_threshold'", "'abc'"), id="threshold-string"),
    pytest.param("offload_threshold", {"bool_param": True}, ("'offload_threshold'", "bool"), id="threshold-bool"),
    pytest.param("offload_route", {"string_param": "sideways"}, ("'offload_route'", "'sideways'"), id="route-sideways"),
    pytest.param("offload_route", {"int64_param": 1}, ("'offload_route'", "must be a string"), id="route-int"),
    pytest.param("offload_details", {"string_param": "yes"}, ("'offload_details'", "bool", "'yes'"), id="details-yes"),
    pytest.param("offload_details", {"int64_param": 1}, ("'offload_details'", "bool"), id="details-int"),
    pytest.param("offload_foo", {"bool_param": True}, ("unknown routing parameter 'offload_foo'",), id="unknown"),
]


@pytest.mark.parametrize(("key", "value", "fragments"), ROUTING_CASES)
async def test_bad_routing_parameter_is_rejected_by_the_edge_agent(
    edge_stub: Stub, key: str, value: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    await _assert_rejected(edge_stub, _parameter(key, **value), Code.INVALID_ARGUMENT, fragments)


async def test_good_routing_parameters_are_accepted(edge_stub: Stub) -> None:
    """The counterpart of the cases above: the same parameters, well formed, work (int 0/1 and strings too)."""
    request = _digits()
    request.parameters["offload_route"].string_param = "edge"
    request.parameters["offload_threshold"].string_param = "0.5"
    request.parameters["offload_details"].bool_param = True
    reply = await edge_stub.ModelInfer(request, timeout=TIMEOUT)
    assert reply.parameters["offload_route"].string_param == "edge"
    assert [output.name for output in reply.outputs] == [
        "scores",
        "offload_route",
        "offload_confidence",
        "offload_degraded",
    ]
    request.parameters["offload_threshold"].int64_param = 1
    request.parameters["offload_route"].string_param = "auto"
    reply = await edge_stub.ModelInfer(request, timeout=TIMEOUT)
    # Threshold 1: every row short of certainty goes to the cloud.
    assert reply.parameters["offload_offloaded_rows"].int64_param >= 1


# Raw BYTES: echo models take every datatype, so a valid request differs from a bad one in the BYTES entry only.


def _echo_request(server: str) -> tuple[pb.ModelInferRequest, int]:
    """A valid raw request for the echo model of `server`, and the index of its BYTES input."""
    if server == "cloud":
        model, samples, parameters = "echo_all", SAMPLES, {}
    else:
        # The edge echo has no BF16; ONNX Runtime keeps strings as text.
        model, parameters = "echo", {"offload_route": "edge"}
        samples = {name: data for name, data in SAMPLES.items() if name != "BF16"} | {"BYTES": TEXT_BYTES}
    inputs = [Tensor(f"in_{datatype}", datatype, data) for datatype, data in samples.items()]
    message = request_to_pb(InferRequest(model, inputs, parameters=dict(parameters)), raw=True)
    return message, list(samples).index("BYTES")


def _assert_echo_serves(server: str) -> Callable[[Stub], Awaitable[None]]:
    async def check(stub: Stub) -> None:
        request, index = _echo_request(server)
        reply = await stub.ModelInfer(request, timeout=TIMEOUT)
        by_name = {output.name: raw for output, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)}
        assert by_name["out_BYTES"] == request.raw_input_contents[index]

    return check


LENGTH = struct.Struct("<I")
BYTES_CASES = [
    pytest.param(b"\x05\x00", ("'in_BYTES'", "inside a 4-byte length prefix at byte 0"), id="prefix-truncated"),
    pytest.param(
        LENGTH.pack(1) + b"a" + LENGTH.pack(7)[:3],
        ("'in_BYTES'", "inside a 4-byte length prefix at byte 5"),
        id="second-prefix-truncated",
    ),
    pytest.param(LENGTH.pack(1000) + b"abc", ("'in_BYTES'", "declares 1000 bytes but only 3 remain"), id="too-long"),
    pytest.param(LENGTH.pack(1) + b"a", ("'in_BYTES'", "hold 1 elements", "shape [2, 3] needs 6"), id="too-few"),
    pytest.param(b"".join(LENGTH.pack(0) for _ in range(7)), ("'in_BYTES'", "more than the 6 elements"), id="too-many"),
]


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(("raw", "fragments"), BYTES_CASES)
async def test_malformed_raw_bytes_are_rejected(
    echo_stack: Stack, server: str, raw: bytes, fragments: tuple[str, ...]
) -> None:
    request, index = _echo_request(server)
    request.raw_input_contents[index] = raw
    async with grpc.aio.insecure_channel(_address(echo_stack, server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await _assert_rejected(stub, request, Code.INVALID_ARGUMENT, fragments, good=_assert_echo_serves(server))


async def test_binary_data_on_a_requested_output_is_accepted(stub: Stub) -> None:
    # tritonclient's HTTP client sends it; over gRPC outputs are protobuf either way.
    reply = await stub.ModelInfer(_output_parameter("binary_data", bool_param=True), timeout=TIMEOUT)
    assert [(output.name, list(output.shape)) for output in reply.outputs] == [("scores", [2, 10])]


async def test_bytes_that_are_not_utf8_are_refused_by_the_edge_model_naming_the_input(echo_stack: Stack) -> None:
    request, index = _echo_request("edge")
    # Element 1 of SAMPLES' BYTES is b"\x00\xff binary": 0xff never occurs in UTF-8.
    request.raw_input_contents[index] = raw_bytes(Tensor("in_BYTES", "BYTES", SAMPLES["BYTES"]))
    async with grpc.aio.insecure_channel(echo_stack.edge_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await _assert_rejected(
            stub,
            request,
            Code.INVALID_ARGUMENT,
            ("input 'in_BYTES'", "element 1 is not UTF-8", "byte 1", "ONNX Runtime string tensors", "needs UTF-8 text"),
            good=_assert_echo_serves("edge"),
        )


def _typed_echo_request() -> pb.ModelInferRequest:
    """A valid typed request for `echo_typed`, which both servers serve and which takes INT8."""
    samples = {**SAMPLES, "BYTES": TEXT_BYTES}  # the edge model holds strings as UTF-8 text
    inputs = [Tensor(f"in_{datatype}", datatype, samples[datatype]) for datatype in TYPED]
    return request_to_pb(InferRequest("echo_typed", inputs, parameters={"offload_route": "edge"}), raw=False)


@pytest.mark.parametrize("server", SERVERS)
async def test_typed_values_outside_a_narrow_integer_range_are_rejected(echo_stack: Stack, server: str) -> None:
    # Values are checked when they are decoded, after the request has been held against the
    # model, so this takes a model whose input is INT8.
    request = _typed_echo_request()
    int8 = next(wire for wire in request.inputs if wire.name == "in_INT8")
    int8.contents.int_contents[0] = 300

    async def serves(stub: Stub) -> None:
        reply = await stub.ModelInfer(_typed_echo_request(), timeout=TIMEOUT)
        by_name = {output.name: output for output in reply.outputs}
        assert list(by_name["out_INT8"].contents.int_contents) == SAMPLES["INT8"].ravel().tolist()

    async with grpc.aio.insecure_channel(_address(echo_stack, server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await _assert_rejected(
            stub, request, Code.INVALID_ARGUMENT, ("'in_INT8'", "outside the range of INT8", "300"), good=serves
        )


# A large request of the wrong kind: the repro of a ~50 MB BYTES `pixels` that once froze the
# server for seconds while every element was decoded, only to be told the model takes FP32.
HUGE_ROWS = 4_000_000  # 16 MB of 4-byte length prefixes


def _huge_wrong_datatype() -> pb.ModelInferRequest:
    # The payload ends with one stray byte, malformed BYTES: a server that decoded before checking
    # against the model would walk every element and then answer about that byte, not the datatype.
    raw = LENGTH.pack(0) * HUGE_ROWS + b"\0"
    return _digits(datatype="BYTES", shape=(HUGE_ROWS, 1), raw=raw)


async def test_a_huge_request_of_the_wrong_datatype_is_refused_before_decoding_and_others_are_served(
    stub: Stub,
) -> None:
    async def bad() -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(_huge_wrong_datatype(), timeout=TIMEOUT)
        return caught.value

    rejected, good = await asyncio.gather(bad(), stub.ModelInfer(_digits(), timeout=TIMEOUT))
    assert rejected.code() == Code.INVALID_ARGUMENT, rejected.details()
    assert rejected.details() == "input 'pixels': datatype BYTES, expected FP32"
    assert [(output.name, list(output.shape)) for output in good.outputs] == [("scores", [2, 10])]
    await _assert_serves(stub)


async def test_a_large_request_is_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # The element count puts decoding in a worker thread: the event loop must stay free while it
    # runs. The decoder (the real one, wrapped) waits until the loop lets it go. In a worker, the
    # loop runs on, sees it start and releases it; run on the loop itself, it would block the loop
    # so that nothing could release it, and it reports that it timed out instead.
    rows = INLINE_CODEC_ELEMENTS + 1
    items = [str(row).encode() for row in range(rows)]
    message = pb.ModelInferRequest(model_name="words")
    message.inputs.add(name="text", datatype="BYTES", shape=[rows, 1])
    message.raw_input_contents.append(b"".join(LENGTH.pack(len(item)) + item for item in items))
    spec = TensorSpec(name="text", datatype="BYTES", shape=(-1, 1))

    started, released = threading.Event(), threading.Event()
    seen: list[tuple[int, bool]] = []  # the decoding thread, and whether the loop released it

    def held_decode(checked: CheckedRequest) -> InferRequest:
        started.set()
        seen.append((threading.get_ident(), released.wait(timeout=10)))
        return decode_request(checked)

    monkeypatch.setattr(oip_server, "decode_request", held_decode)
    received = receive_infer_request(message.SerializeToString())
    read = asyncio.create_task(read_request(received, 1 << 26, lambda name, version: (spec,)))
    assert await asyncio.to_thread(started.wait, 10), "decoding never started"
    released.set()
    request = await read
    assert seen == [(seen[0][0], True)], "decoding held the event loop: the loop could not release it"
    assert seen[0][0] != threading.get_ident(), "decoded on the event loop's thread"
    assert request.inputs[0].data.ravel().tolist() == items


async def test_unknown_model_in_metadata_and_readiness_is_not_found(stub: Stub) -> None:
    calls: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=TIMEOUT), "'nope'"),
        (lambda: stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=TIMEOUT), "'nope'"),
        (lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="digits", version="7"), timeout=TIMEOUT), "'7'"),
        (lambda: stub.ModelReady(pb.ModelReadyRequest(name="digits", version="7"), timeout=TIMEOUT), "'7'"),
    ]
    for call, fragment in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == Code.NOT_FOUND
        assert fragment in (caught.value.details() or "")
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=TIMEOUT)).ready
    metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="digits", version="1"), timeout=TIMEOUT)
    assert metadata.name == "digits"


@pytest.mark.parametrize("server", SERVERS)
async def test_message_over_the_size_limit_is_resource_exhausted(
    server: str,
    demo_cloud_plane: CloudDataPlane,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
) -> None:
    limits = ServerLimits(max_message_bytes=64 * 1024)
    rows = np.resize(PIXELS, (1000, 64))  # 256,000 bytes of raw FP32
    async with (
        running_stack(demo_cloud_plane, demo_edge_models, edge_executor, limits=limits) as stack,
        grpc.aio.insecure_channel(_address(stack, server)) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await _assert_rejected(
            stub, _digits(shape=(1000, 64), raw=rows.tobytes()), Code.RESOURCE_EXHAUSTED, ("larger than max",)
        )


async def test_zero_element_shape_with_a_huge_dimension_is_invalid_argument(stub: Stub) -> None:
    await _assert_rejected(stub, _digits(shape=(2**62, 0), raw=b""), Code.INVALID_ARGUMENT, ("'pixels'", "shape"))


async def test_rows_with_an_undefined_edge_confidence_are_offloaded(edge_stub: Stub) -> None:
    request = _digits(shape=(1, 64), raw=np.full((1, 64), np.nan, dtype=np.float32).tobytes())
    reply = await edge_stub.ModelInfer(request, timeout=TIMEOUT)
    assert reply.parameters["offload_offloaded_rows"].int64_param == 1
    assert reply.parameters["offload_route"].string_param == "cloud"


async def test_a_client_holds_a_peers_answer_to_its_own_element_limit(demo_cloud_plane: CloudDataPlane) -> None:
    server = OipServer(demo_cloud_plane, "limit-cloud")
    await server.start()
    try:
        request = InferRequest("digits", [Tensor.of("pixels", np.zeros((4, 64), dtype=np.float32))])
        async with OipClient(f"127.0.0.1:{server.port}", max_elements=256) as client:
            # 4 x 64 inputs fit the limit; the answer's 4 x 10 scores do too.
            assert (await client.infer(request)).outputs[0].shape == (4, 10)
        async with OipClient(f"127.0.0.1:{server.port}", max_elements=39) as client:
            with pytest.raises(InvalidArgument, match="40 elements, over the limit of 39"):
                await client.infer(InferRequest("digits", [Tensor.of("pixels", np.zeros((4, 64), np.float32))]))
    finally:
        await server.stop(0)
