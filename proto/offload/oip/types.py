"""Transport-free data-plane types: what servers, routers and in-process callers exchange.

The gRPC layer converts protobuf messages to these (`offload.oip.messages`) and
back; everything in between, the router included, works on these alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from offload.oip.repository import TensorSpec
from offload.oip.tensors import Tensor

ParameterValue = bool | int | float | str


@dataclass(slots=True)
class InferRequest:
    model_name: str
    inputs: list[Tensor]
    model_version: str = ""
    id: str = ""
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    # Requested output names; empty means every output of the model.
    outputs: list[str] = field(default_factory=list)
    # The caller sent raw contents, so the answer goes back raw too.
    raw: bool = False
    # The model inputs a server already checked the request against, before decoding it (the very object
    # its data plane declared): check_inputs does not check it again against the same object.
    checked_against: Sequence[TensorSpec] | None = None

    def input(self, name: str) -> Tensor | None:
        return next((tensor for tensor in self.inputs if tensor.name == name), None)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str = ""
    id: str = ""
    parameters: dict[str, ParameterValue] = field(default_factory=dict)

    def output(self, name: str) -> Tensor | None:
        return next((tensor for tensor in self.outputs if tensor.name == name), None)

    def as_dict(self) -> dict[str, Tensor]:
        return {tensor.name: tensor for tensor in self.outputs}


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...] = ()


class DataPlane(Protocol):
    """What a server does, without the transport (MLServer's split).

    Implementations raise `offload.oip.errors.OffloadError` subclasses; the gRPC
    layer maps them to statuses in one place.
    """

    def live(self) -> bool: ...
    def ready(self) -> bool: ...
    def model_ready(self, name: str, version: str) -> bool: ...
    def server_metadata(self) -> ServerMetadata: ...
    def model_metadata(self, name: str, version: str) -> ModelMetadata: ...

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        """Answer a request; `deadline` is the caller's, in time.monotonic() seconds, or None."""
        ...

    def health_details(self) -> Mapping[str, str]:
        """Human-readable state for logs and health detail (circuit breakers, queues)."""
        ...
