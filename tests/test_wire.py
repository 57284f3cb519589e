"""A ModelInfer request as a server reads it: raw contents left in the bytes received, the rest to protobuf."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from offload.oip import grpc_service_pb2 as pb
from offload.oip.messages import PARSE_WHOLE_BYTES, ReceivedRequest, receive_infer_request
from offload.oip.wire import MAX_FIELDS, split_field

# Past PARSE_WHOLE_BYTES, so that the raw contents are split off (a smaller request is parsed whole).
RAW = [b"\x00\x01" * (PARSE_WHOLE_BYTES // 2 + 1), b"", b"text"]


def _request(parameters: int = 1) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", model_version="2", id="request-1")
    for index in range(parameters):
        message.parameters[f"p{index}"].int64_param = index
    for index, raw in enumerate(RAW):
        message.inputs.add(name=f"in{index}", datatype="UINT8", shape=[len(raw)])
        message.raw_input_contents.append(raw)
    message.outputs.add(name="out")
    return message


def _without_raw(message: pb.ModelInferRequest) -> pb.ModelInferRequest:
    rest = pb.ModelInferRequest()
    rest.CopyFrom(message)
    rest.ClearField("raw_input_contents")
    return rest


def test_raw_contents_are_views_of_the_bytes_received_and_the_rest_is_the_message() -> None:
    message = _request()
    data = message.SerializeToString()
    received = receive_infer_request(data)
    assert received.message == _without_raw(message)
    assert [bytes(raw) for raw in received.raw_contents] == RAW
    for raw in received.raw_contents:
        assert isinstance(raw, memoryview)
        assert raw.obj is data, "a view of the received bytes, not a copy"
    assert received.size == len(data)


def test_a_small_request_is_parsed_whole_with_its_raw_contents_read_out() -> None:
    message = pb.ModelInferRequest(model_name="m", id="small")
    message.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(b"\x00" * 8)
    data = message.SerializeToString()
    assert len(data) <= PARSE_WHOLE_BYTES
    received = receive_infer_request(data)
    assert received == ReceivedRequest(message, [b"\x00" * 8], len(data))


def test_a_small_request_cut_short_is_refused_with_the_field_at_fault() -> None:
    message = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x01" * 16])
    with pytest.raises(DecodeError, match=r"field 7 at byte \d+ runs past the end of the message"):
        receive_infer_request(message.SerializeToString()[:-3])


def test_fields_in_any_order_read_as_protobuf_reads_them() -> None:
    # Protobuf reads concatenated messages as one: here the raw contents come first, between other fields.
    message = _request()
    raw_only = pb.ModelInferRequest(raw_input_contents=RAW[:2])
    middle = pb.ModelInferRequest(id="request-1", raw_input_contents=RAW[2:])
    data = raw_only.SerializeToString() + middle.SerializeToString() + _without_raw(message).SerializeToString()
    received = receive_infer_request(data)
    assert received.message == _without_raw(message)
    assert [bytes(raw) for raw in received.raw_contents] == RAW


def test_a_message_of_very_many_fields_is_left_to_protobuf_whole() -> None:
    message = _request(parameters=MAX_FIELDS)
    data = message.SerializeToString()
    assert split_field(data, 7) is None
    assert receive_infer_request(data) == ReceivedRequest(message, RAW, len(data))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        pytest.param(b"\x0a\x05ab", "field 1 at byte 0 runs past the end of the message", id="length-past-end"),
        pytest.param(b"\x08" + b"\xff" * 11, "a truncated or overlong varint at byte 1", id="overlong-varint"),
        pytest.param(b"\x08\x80", "a truncated or overlong varint at byte 1", id="truncated-varint"),
        pytest.param(b"\x0b", "field 1 at byte 0 has wire type 3, which proto3 never uses", id="group"),
        pytest.param(b"\x3a\x01", "field 7 at byte 0 runs past the end of the message", id="raw-past-end"),
    ],
)
def test_malformed_bytes_are_unreadable_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        split_field(data, 7)
    # The server's reader raises as protobuf's parser does; the server refuses that as INVALID_ARGUMENT.
    with pytest.raises(DecodeError, match=why):
        receive_infer_request(data)
