"""Protobuf messages to and from the data-plane types, with every check a peer's message needs."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Protocol

from offload.oip import grpc_service_pb2 as pb
from offload.oip.errors import InvalidArgument
from offload.oip.tensors import Tensor, decode, fill_typed, needs_raw, raw_bytes
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ParameterValue, ServerMetadata

DEFAULT_MAX_ELEMENTS = 1 << 28


def parameters_from_pb(parameters: Mapping[str, pb.InferParameter], where: str) -> dict[str, ParameterValue]:
    values: dict[str, ParameterValue] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidArgument(f"{where}: parameter {key!r} has no value set")
        values[key] = getattr(parameter, choice)
    return values


def parameters_to_pb(values: Mapping[str, ParameterValue], target: MutableMapping[str, pb.InferParameter]) -> None:
    for key, value in values.items():
        parameter = target[key]
        # bool before int: bool is an int in Python.
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = value


def _raw_list(raw: list[bytes], count: int, kind: str, where: str) -> list[bytes] | None:
    if not raw:
        return None
    if len(raw) != count:
        raise InvalidArgument(
            f"{where}: {len(raw)} raw_{kind}_contents entries for {count} {kind}s; send one per {kind}"
        )
    return raw


def request_from_pb(message: pb.ModelInferRequest, max_elements: int = DEFAULT_MAX_ELEMENTS) -> InferRequest:
    if not message.model_name:
        raise InvalidArgument("model_name is empty; name the model to run")
    raw = _raw_list(list(message.raw_input_contents), len(message.inputs), "input", "request")
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for index, wire in enumerate(message.inputs):
        where = f"input {wire.name!r}" if wire.name else f"input #{index}"
        if not wire.name:
            raise InvalidArgument(f"{where}: name is empty")
        if wire.name in seen:
            raise InvalidArgument(f"{where}: given twice")
        seen.add(wire.name)
        inputs.append(decode(wire, raw[index] if raw else None, where, max_elements))
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        parameters=parameters_from_pb(message.parameters, "request"),
        outputs=[output.name for output in message.outputs],
        raw=raw is not None,
    )


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
    message: pb.ModelInferResponse, where: str = "response", max_elements: int = DEFAULT_MAX_ELEMENTS
) -> InferResponse:
    raw = _raw_list(list(message.raw_output_contents), len(message.outputs), "output", where)
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
