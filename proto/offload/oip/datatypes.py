"""OIP datatypes and how each maps to NumPy and to the typed contents fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Datatype:
    name: str
    # BF16 has no NumPy dtype: its values are carried as their uint16 bit
    # patterns. BYTES is an object array of `bytes`.
    dtype: np.dtype[np.generic]
    # Bytes per element on the wire; 0 for BYTES (variable length).
    itemsize: int
    # The InferTensorContents field for typed contents; None where the spec
    # allows raw contents only (FP16, BF16).
    contents_field: str | None


def _fixed(name: str, dtype: npt.DTypeLike, field: str | None) -> Datatype:
    # Little-endian on the wire whatever the host's byte order.
    wire = np.dtype(dtype).newbyteorder("<")
    return Datatype(name, wire, wire.itemsize, field)


DATATYPES: dict[str, Datatype] = {
    spec.name: spec
    for spec in (
        _fixed("BOOL", np.bool_, "bool_contents"),
        _fixed("UINT8", np.uint8, "uint_contents"),
        _fixed("UINT16", np.uint16, "uint_contents"),
        _fixed("UINT32", np.uint32, "uint_contents"),
        _fixed("UINT64", np.uint64, "uint64_contents"),
        _fixed("INT8", np.int8, "int_contents"),
        _fixed("INT16", np.int16, "int_contents"),
        _fixed("INT32", np.int32, "int_contents"),
        _fixed("INT64", np.int64, "int64_contents"),
        _fixed("FP16", np.float16, None),
        _fixed("BF16", np.uint16, None),
        _fixed("FP32", np.float32, "fp32_contents"),
        _fixed("FP64", np.float64, "fp64_contents"),
        Datatype("BYTES", np.dtype(object), 0, "bytes_contents"),
    )
}

_BY_NUMPY: dict[np.dtype[np.generic], str] = {
    spec.dtype.newbyteorder("="): spec.name for spec in DATATYPES.values() if spec.name not in ("BF16", "BYTES")
}


def datatype_for(array: npt.NDArray[np.generic]) -> str:
    """The OIP datatype of a NumPy array (uint16 is UINT16, never BF16)."""
    if array.dtype == np.dtype(object) or array.dtype.kind in ("S", "U"):
        return "BYTES"
    name = _BY_NUMPY.get(array.dtype.newbyteorder("="))
    if name is None:
        raise TypeError(f"NumPy dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


def payload_bytes(array: npt.NDArray[Any]) -> int:
    """Bytes an array holds, counting the payload of BYTES (object) elements, not just their pointers:
    what a cache bounded in bytes must charge for it."""
    values = np.asarray(array)
    if values.dtype != object:
        return int(values.nbytes)
    return int(values.nbytes) + sum(len(item) if isinstance(item, bytes | str) else 0 for item in values.flat)
