"""Checks of a request against a model's declared inputs and outputs, shared by every data plane.

The checks look only at each tensor's name, datatype and shape, so they run the
same on decoded tensors (`check_inputs`, for in-process callers) and on a
message's protobuf fields before anything in it is decoded (`check_declared_inputs`,
which the gRPC server calls with the model's metadata).
"""

from __future__ import annotations

from collections.abc import Sequence

from offload.oip.errors import InvalidArgument
from offload.oip.repository import TensorSpec
from offload.oip.tensors import DeclaredTensor
from offload.oip.types import InferRequest


def check_inputs(request: InferRequest, specs: Sequence[TensorSpec]) -> int:
    """Validate names, datatypes and shapes; return the shared batch size (rows).

    A request the server checked against these very specs before decoding it (`checked_against`, the
    same object: not a model swapped in since) is not checked twice; its rows are read off it.
    """
    if request.checked_against is specs:
        return int(request.inputs[0].data.shape[0]) if request.inputs else 0
    return check_declared_inputs(request.model_name, request.inputs, specs)


def check_declared_inputs(model_name: str, tensors: Sequence[DeclaredTensor], specs: Sequence[TensorSpec]) -> int:
    """Validate the names, datatypes and shapes the request declares; return the shared batch size (rows)."""
    expected = {spec.name: spec for spec in specs}
    given = {tensor.name for tensor in tensors}
    if given != expected.keys():
        unknown = sorted(given - expected.keys())
        if unknown:
            raise InvalidArgument(
                f"model {model_name!r} has no input {unknown[0]!r}; its inputs are {sorted(expected)}"
            )
        missing = sorted(expected.keys() - given)
        raise InvalidArgument(f"model {model_name!r} needs input {missing[0]!r}, which the request lacks")
    rows: int | None = None
    for tensor in tensors:
        spec = expected[tensor.name]
        check_tensor(tensor, spec, f"input {tensor.name!r}")
        if rows is None:
            rows = tensor.shape[0]
        elif tensor.shape[0] != rows:
            raise InvalidArgument(
                f"input {tensor.name!r} has {tensor.shape[0]} rows but other inputs have {rows}; "
                "the first dimension is the batch and must agree"
            )
    return rows or 0


def check_tensor(tensor: DeclaredTensor, spec: TensorSpec, where: str) -> None:
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(f"{where}: datatype {tensor.datatype}, expected {spec.datatype}")
    shape = list(tensor.shape)
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)):
        raise InvalidArgument(f"{where}: shape {shape}, expected {list(spec.shape)} (-1: any size)")


def check_requested_outputs(request: InferRequest, specs: Sequence[TensorSpec]) -> list[str]:
    """The output names to return, in the order asked (all of them if none were asked)."""
    available = [spec.name for spec in specs]
    if not request.outputs:
        return available
    seen: set[str] = set()
    for name in request.outputs:
        if name not in available:
            raise InvalidArgument(f"model {request.model_name!r} has no output {name!r}; its outputs are {available}")
        if name in seen:
            raise InvalidArgument(f"output {name!r} is requested twice")
        seen.add(name)
    return list(request.outputs)
