"""Protobuf messages to and from the data-plane types, with every check a peer's message needs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import DecodeError

from offload.oip import grpc_service_pb2 as pb
from offload.oip.errors import InvalidArgument
from offload.oip.limits import MAX_ELEMENTS
from offload.oip.repository import TensorSpec
from offload.oip.tensors import (
    CheckedTensor,
    RawContents,
    Tensor,
    check_wire,
    decode,
    decode_checked,
    fill_typed,
    needs_raw,
    raw_bytes,
    with_raw,
)
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ParameterValue, ServerMetadata
from offload.oip.validation import check_declared_inputs
from offload.oip.wire import split_field

_RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


def parameters_from_pb(parameters: Mapping[str, pb.InferParameter], where: str) -> dict[str, ParameterValue]:
    values: dict[str, ParameterValue] = {}
    for key in parameters:  # a protobuf map's items() is collections.abc's, in Python; its keys are C's
        parameter = parameters[key]
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidArgument(f"{where}: parameter {key!r} has no value set")
        values[key] = getattr(parameter, choice)
    return values


INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


def parameters_to_pb(values: Mapping[str, ParameterValue], target: MutableMapping[str, pb.InferParameter]) -> None:
    for key, value in values.items():
        parameter = target[key]
        # bool before int: bool is an int in Python.
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            # A uint64_param over int64's range (a caller's, forwarded to the cloud) stays a uint64.
            if INT64_MIN <= value <= INT64_MAX:
                parameter.int64_param = value
            elif 0 <= value <= UINT64_MAX:
                parameter.uint64_param = value
            else:
                raise InvalidArgument(f"parameter {key!r}: {value} fits neither int64_param nor uint64_param")
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = value


def _raw_given(entries: int, count: int, kind: str, where: str) -> bool:
    """Whether the message uses raw contents: then it has exactly one entry per tensor."""
    if entries and entries != count:
        raise InvalidArgument(
            f"{where}: {entries} raw_{kind}_contents entries for {count} {kind}s; send one per {kind}"
        )
    return entries > 0


# Output parameters this server understands. tritonclient's HTTP client sends binary_data to choose
# binary or JSON output encoding; over gRPC outputs are always protobuf, so it changes nothing here.
# Anything else (Triton's classification, shared-memory regions) asks for an answer we do not give,
# so it is refused rather than silently ignored.
_OUTPUT_PARAMETERS = {"binary_data": "bool_param"}
_UNSUPPORTED_WHY = {
    "classification": " (Triton's classification extension is not implemented; take the top classes "
    "from the full output)",
    "shared_memory_region": " (shared memory is not implemented; outputs travel in the response)",
    "shared_memory_byte_size": " (shared memory is not implemented; outputs travel in the response)",
    "shared_memory_offset": " (shared memory is not implemented; outputs travel in the response)",
}

# The model's declared inputs, by model name and version; raises NotFound for a model not served.
ModelInputs = Callable[[str, str], Sequence[TensorSpec]]


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A ModelInfer request as a server received it: the message without its raw contents, and those as views
    of the bytes received (protobuf would copy them into the message, and again out of it)."""

    message: pb.ModelInferRequest
    raw_contents: Sequence[RawContents]
    size: int  # bytes on the wire

    @classmethod
    def of(cls, message: pb.ModelInferRequest, size: int | None = None) -> ReceivedRequest:
        """A message already parsed: its raw contents are read out of it. `size`: its bytes on the wire, where
        known (else counted)."""
        return cls(message, list(message.raw_input_contents), message.ByteSize() if size is None else size)


# Up to this size a request is parsed whole by protobuf (C): copying its raw contents costs less than walking its
# fields in Python (split_field), which only pays off for large contents.
PARSE_WHOLE_BYTES = 64 * 1024


def receive_infer_request(data: bytes) -> ReceivedRequest:
    """A server's reader of ModelInfer requests: the raw contents stay in the bytes received. Raises
    DecodeError, with the reason, for bytes that are no ModelInferRequest (as protobuf's parser does)."""
    if len(data) <= PARSE_WHOLE_BYTES:
        try:
            message = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            split_field(data, _RAW_INPUT_CONTENTS)  # raises DecodeError naming the field at fault, where it can
            raise
        return ReceivedRequest.of(message, len(data))
    split = split_field(data, _RAW_INPUT_CONTENTS)
    if split is None:
        return ReceivedRequest.of(pb.ModelInferRequest.FromString(data), len(data))
    rest, raw_contents = split
    return ReceivedRequest(pb.ModelInferRequest.FromString(rest), raw_contents, len(data))


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    """A request whose names, parameters and declared sizes are checked, its tensors not yet decoded."""

    message: pb.ModelInferRequest
    inputs: list[CheckedTensor]
    parameters: dict[str, ParameterValue]
    outputs: list[str]
    raw: bool
    specs: Sequence[TensorSpec] | None  # the model's inputs the request was checked against, if any

    @property
    def decode_cost(self) -> int:
        """Elements decoding touches one by one: what decides whether it runs off the event loop."""
        return sum(tensor.decode_cost for tensor in self.inputs)


def _requested_outputs(message: pb.ModelInferRequest) -> list[str]:
    names: list[str] = []
    for wire in message.outputs:
        for key, parameter in wire.parameters.items():
            choice = parameter.WhichOneof("parameter_choice")
            wanted = _OUTPUT_PARAMETERS.get(key)
            if wanted is None:
                raise InvalidArgument(
                    f"output {wire.name!r}: parameter {key!r} is not supported{_UNSUPPORTED_WHY.get(key, '')}; "
                    f"the output parameters understood are {sorted(_OUTPUT_PARAMETERS)}"
                )
            if choice != wanted:
                raise InvalidArgument(
                    f"output {wire.name!r}: parameter {key!r} must be a {wanted}, got {choice or 'no value'}"
                )
        names.append(wire.name)
    return names


def check_request(
    received: ReceivedRequest, max_elements: int = MAX_ELEMENTS, model_inputs: ModelInputs | None = None
) -> CheckedRequest:
    """Every check that needs no tensor value: the model (with `model_inputs`), parameters, each
    input's name, datatype, shape and content sizes, and the inputs against the model's.

    Cheap in the size of the message (it reads lengths, never values), so a wrong request is
    refused before anything in it is decoded, however large it is.
    """
    message = received.message
    model_name = message.model_name
    if not model_name:
        raise InvalidArgument("model_name is empty; name the model to run")
    specs = None if model_inputs is None else model_inputs(model_name, message.model_version)
    parameters = parameters_from_pb(message.parameters, "request")
    outputs = _requested_outputs(message)
    raw_given = _raw_given(len(received.raw_contents), len(message.inputs), "input", "request")
    inputs: list[CheckedTensor] = []
    seen: set[str] = set()
    for index, wire in enumerate(message.inputs):
        name = wire.name
        where = f"input {name!r}" if name else f"input #{index}"
        if not name:
            raise InvalidArgument(f"{where}: name is empty")
        if name in seen:
            raise InvalidArgument(f"{where}: given twice")
        seen.add(name)
        inputs.append(check_wire(wire, raw_given, where, max_elements))
    if specs is not None:
        check_declared_inputs(model_name, inputs, specs)
    if raw_given:
        inputs = [with_raw(tensor, raw) for tensor, raw in zip(inputs, received.raw_contents, strict=True)]
    return CheckedRequest(message, inputs, parameters, outputs, raw_given, specs)


def decode_request(checked: CheckedRequest) -> InferRequest:
    """Decode the tensors of a checked request (blocking; proportional to `decode_cost`)."""
    message = checked.message
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=[decode_checked(tensor) for tensor in checked.inputs],
        parameters=checked.parameters,
        outputs=checked.outputs,
        raw=checked.raw,
        checked_against=checked.specs,
    )


def request_from_pb(
    message: pb.ModelInferRequest, max_elements: int = MAX_ELEMENTS, model_inputs: ModelInputs | None = None
) -> InferRequest:
    return decode_request(check_request(ReceivedRequest.of(message), max_elements, model_inputs))


class _WireList(Protocol):
    """`inputs` of a request or `outputs` of a response: repeated tensors with a name, datatype, shape."""

    def add(self, *, name: str, datatype: str, shape: tuple[int, ...]) -> Any: ...


def _encode_tensors(tensors: list[Tensor], wire: _WireList, raw_contents: list[bytes] | Any, raw: bool) -> None:
    # Raw contents are all or nothing, so one FP16/BF16 tensor makes every tensor raw.
    use_raw = raw or needs_raw(tensors)
    for tensor in tensors:
        entry = wire.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if use_raw:
            raw_contents.append(raw_bytes(tensor))
        else:
            fill_typed(entry.contents, tensor)


def encode_cost(tensors: Iterable[Tensor], raw: bool) -> int:
    """Elements that encoding touches one by one (typed contents, BYTES); raw fixed-size is one copy."""
    tensors = list(tensors)
    use_raw = raw or needs_raw(tensors)
    return sum(tensor.data.size for tensor in tensors if not use_raw or tensor.datatype == "BYTES")


def request_to_pb(request: InferRequest, raw: bool = True) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=request.model_name, model_version=request.model_version, id=request.id)
    parameters_to_pb(request.parameters, message.parameters)
    _encode_tensors(request.inputs, message.inputs, message.raw_input_contents, raw)
    for name in request.outputs:
        message.outputs.add(name=name)
    return message


def response_to_pb(response: InferResponse, raw: bool) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    parameters_to_pb(response.parameters, message.parameters)
    _encode_tensors(response.outputs, message.outputs, message.raw_output_contents, raw)
    return message


def response_from_pb(
    message: pb.ModelInferResponse, where: str = "response", max_elements: int = MAX_ELEMENTS
) -> InferResponse:
    raw_given = _raw_given(len(message.raw_output_contents), len(message.outputs), "output", where)
    raw = list(message.raw_output_contents) if raw_given else None
    outputs = [
        decode(wire, raw[index] if raw else None, f"{where} output {wire.name!r}", max_elements)
        for index, wire in enumerate(message.outputs)
    ]
    return InferResponse(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        outputs=outputs,
        parameters=parameters_from_pb(message.parameters, where),
    )


def model_metadata_to_pb(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    message = pb.ModelMetadataResponse(name=metadata.name, versions=metadata.versions, platform=metadata.platform)
    for target, specs in ((message.inputs, metadata.inputs), (message.outputs, metadata.outputs)):
        for spec in specs:
            target.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    return message


def server_metadata_to_pb(metadata: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)
