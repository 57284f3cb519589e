"""Tensors between NumPy and the wire: typed `contents` and raw bytes.

Every size a peer declares (shape, element count, raw length, BYTES element
lengths) is checked before it is used, so a malformed message gets an
INVALID_ARGUMENT naming the field and never a large allocation or a crash.
Checking is split from decoding: `check_wire` reads only the declared datatype,
shape and content lengths, so a server can also hold them against the model
before it pays for `decode_checked`, whose work is bounded by the checked shape.
Raw fixed-size contents decode without a copy (a read-only view of the bytes).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from offload.oip import grpc_service_pb2 as pb
from offload.oip.datatypes import DATATYPES, Datatype, datatype_for
from offload.oip.errors import InvalidArgument

_LENGTH = struct.Struct("<I")
# A tensor's raw contents: bytes, or a view of the bytes a request arrived in (offload.oip.wire).
RawContents = bytes | memoryview
# Integer types that share a wider typed field: values must fit the narrow type.
_NARROW_INTS = {"INT8", "INT16", "UINT8", "UINT16"}


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named tensor. `data` holds BF16 as uint16 bit patterns, BYTES as an object array of bytes."""

    name: str
    datatype: str
    data: npt.NDArray[Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(dim) for dim in self.data.shape)

    @classmethod
    def of(cls, name: str, data: npt.ArrayLike, datatype: str | None = None) -> Tensor:
        """A tensor from array-like data; the datatype is inferred unless given (BF16 must be)."""
        array = np.asarray(data)
        if array.dtype.kind in ("S", "U"):
            array = _as_bytes_array(array)
        return cls(name, datatype or datatype_for(array), array)


class DeclaredTensor(Protocol):
    """A tensor's declaration, what checks against a model need: a decoded Tensor and a protobuf
    input or output both have it."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...


class _WireTensor(DeclaredTensor, Protocol):
    """What request inputs and response outputs have in common on the wire."""

    @property
    def contents(self) -> pb.InferTensorContents: ...


def _as_bytes_array(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    flat = [item.encode() if isinstance(item, str) else bytes(item) for item in array.ravel().tolist()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def element_count(shape: Sequence[int], where: str, max_elements: int) -> int:
    """Validate a declared shape and return its element count, bounded before any use."""
    if min(shape, default=0) < 0:
        raise InvalidArgument(f"{where}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidArgument(f"{where}: shape {list(shape)} has {count} elements, over the limit of {max_elements}")
    # Each dimension too: [2**62, 0] has no elements, but NumPy cannot make that shape.
    if max(shape, default=0) > max_elements:
        raise InvalidArgument(f"{where}: shape {list(shape)} has a dimension over the limit of {max_elements}")
    return count


def datatype_spec(datatype: str, where: str) -> Datatype:
    spec = DATATYPES.get(datatype)
    if spec is None:
        raise InvalidArgument(f"{where}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    return spec


@dataclass(frozen=True, slots=True)
class CheckedTensor:
    """A wire tensor whose declared datatype, shape and content sizes are checked, not yet decoded.

    Everything here is read from protobuf fields without touching the values, so a
    request can be checked against the model before any of it is decoded. Raw contents
    are attached (`with_raw`) only after that: reading them from the message copies them.
    """

    wire: _WireTensor
    name: str  # the wire's, read once (each read of a protobuf string field makes a new str)
    spec: Datatype
    shape: tuple[int, ...]
    count: int
    where: str
    raw_given: bool
    raw: RawContents | None = None

    @property
    def datatype(self) -> str:
        return self.spec.name

    @property
    def decode_cost(self) -> int:
        """Elements that decoding touches one by one; raw fixed-size contents are a view, nearly free."""
        return 0 if self.raw_given and self.spec.name != "BYTES" else self.count


def check_wire(wire: _WireTensor, raw_given: bool, where: str, max_elements: int) -> CheckedTensor:
    """Check a wire tensor's declared datatype and shape and the form of its contents, reading no value."""
    spec = datatype_spec(wire.datatype, where)
    shape = tuple(wire.shape)
    count = element_count(shape, where, max_elements)
    # The content fields that hold values (ListFields leaves out empty repeated fields; it reads no value).
    set_fields = [field.name for field, _ in wire.contents.ListFields()]
    if raw_given:
        if set_fields:
            raise InvalidArgument(
                f"{where}: has both typed contents ({set_fields[0]}) and raw contents; send one or the other"
            )
    elif spec.contents_field is None:
        if count:
            raise InvalidArgument(f"{where}: {spec.name} can only be sent as raw contents (raw_input_contents)")
    else:
        wrong = [name for name in set_fields if name != spec.contents_field]
        if wrong:
            raise InvalidArgument(
                f"{where}: datatype {spec.name} takes contents.{spec.contents_field}, not contents.{wrong[0]}"
            )
        given = len(getattr(wire.contents, spec.contents_field))
        if given != count:
            raise InvalidArgument(
                f"{where}: contents.{spec.contents_field} has {given} elements but shape {list(shape)} needs {count}"
            )
    return CheckedTensor(wire, wire.name, spec, shape, count, where, raw_given)


def with_raw(checked: CheckedTensor, raw: RawContents) -> CheckedTensor:
    """Attach a tensor's raw contents, checking their size against the shape for fixed-size datatypes."""
    assert checked.raw_given, "with_raw on a tensor sent with typed contents"
    expected = checked.count * checked.spec.itemsize
    if checked.spec.name != "BYTES" and len(raw) != expected:
        raise InvalidArgument(
            f"{checked.where}: raw contents are {len(raw)} bytes but shape {list(checked.shape)} "
            f"of {checked.spec.name} needs {expected}"
        )
    return CheckedTensor(
        checked.wire, checked.name, checked.spec, checked.shape, checked.count, checked.where, True, raw
    )


def decode(wire: _WireTensor, raw: bytes | None, where: str, max_elements: int) -> Tensor:
    """One wire tensor (with its raw bytes if the message used raw contents) to a Tensor."""
    checked = check_wire(wire, raw is not None, where, max_elements)
    return decode_checked(checked if raw is None else with_raw(checked, raw))


def decode_checked(checked: CheckedTensor) -> Tensor:
    """The values of a checked wire tensor; the work is bounded by its checked element count."""
    spec, shape, count, where = checked.spec, checked.shape, checked.count, checked.where
    if checked.raw_given:
        assert checked.raw is not None, "decode_checked before with_raw"
        data = _decode_raw(spec, checked.raw, shape, count, where)
    elif spec.contents_field is None:
        data = np.empty(shape, dtype=spec.dtype)  # no elements (check_wire refused any)
    else:
        data = _decode_typed(spec, getattr(checked.wire.contents, spec.contents_field), shape, where)
    return Tensor(checked.name, spec.name, data)


def _decode_raw(spec: Datatype, raw: RawContents, shape: tuple[int, ...], count: int, where: str) -> npt.NDArray[Any]:
    if spec.name == "BYTES":
        return _decode_raw_bytes(raw, shape, count, where)
    array = np.frombuffer(raw, dtype=spec.dtype).reshape(shape)
    if spec.name == "BOOL" and array.size and int(array.view(np.uint8).max()) > 1:
        raise InvalidArgument(f"{where}: raw BOOL contents must be bytes 0 or 1")
    return array


def _decode_raw_bytes(raw: RawContents, shape: tuple[int, ...], count: int, where: str) -> npt.NDArray[Any]:
    # At most count + 1 trips (and at most one per 4 bytes): the checked shape bounds the work,
    # whatever the contents claim. Each element is copied once, into a bytes object of its own.
    items: list[bytes] = []
    append, unpack, prefix = items.append, _LENGTH.unpack_from, _LENGTH.size
    end = len(raw)
    offset = 0
    while offset < end:
        if len(items) == count:
            raise InvalidArgument(f"{where}: raw BYTES contents hold more than the {count} elements of the shape")
        if offset + prefix > end:
            raise InvalidArgument(f"{where}: raw BYTES contents end inside a 4-byte length prefix at byte {offset}")
        (length,) = unpack(raw, offset)
        offset += prefix
        if offset + length > end:
            raise InvalidArgument(
                f"{where}: raw BYTES element {len(items)} declares {length} bytes but only {end - offset} remain"
            )
        append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidArgument(
            f"{where}: raw BYTES contents hold {len(items)} elements but shape {list(shape)} needs {count}"
        )
    return _object_array(items, shape)


def _object_array(items: list[bytes], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def _decode_typed(spec: Datatype, values: Sequence[Any], shape: tuple[int, ...], where: str) -> npt.NDArray[Any]:
    if spec.name == "BYTES":
        return _object_array(list(values), shape)
    if spec.name in _NARROW_INTS:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(spec.dtype.str)
        outside = np.flatnonzero((wide < info.min) | (wide > info.max))
        if outside.size:
            first = int(outside[0])
            raise InvalidArgument(
                f"{where}: values outside the range of {spec.name} [{info.min}, {info.max}]: "
                f"{int(wide[first])} at element {first}"
            )
        return wide.astype(spec.dtype).reshape(shape)
    return np.array(values, dtype=spec.dtype).reshape(shape)


def raw_bytes(tensor: Tensor) -> bytes:
    """The raw wire form of a tensor: row-major, little-endian, BYTES length-prefixed."""
    if tensor.datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(item)) + item for item in _bytes_items(tensor))
    spec = DATATYPES[tensor.datatype]
    return np.ascontiguousarray(tensor.data, dtype=spec.dtype).tobytes()


def _bytes_items(tensor: Tensor) -> Iterable[bytes]:
    for item in tensor.data.ravel().tolist():
        yield item.encode() if isinstance(item, str) else bytes(item)


def needs_raw(tensors: Iterable[Tensor]) -> bool:
    """Whether typed contents cannot carry these tensors (FP16/BF16 travel raw only)."""
    return any(DATATYPES[tensor.datatype].contents_field is None for tensor in tensors)


def fill_typed(contents: pb.InferTensorContents, tensor: Tensor) -> None:
    """Write a tensor into typed contents (the caller checked `needs_raw` first)."""
    field = DATATYPES[tensor.datatype].contents_field
    assert field is not None, f"{tensor.datatype} has no typed contents"
    values = _bytes_items(tensor) if tensor.datatype == "BYTES" else tensor.data.ravel().tolist()
    getattr(contents, field).extend(values)
