"""An ONNX model under ONNX Runtime, described in OIP terms (names, datatypes, shapes).

A large batch runs in chunks of bounded input size (`offload.oip.chunks`), so the memory a request
takes is its own size and one chunk's working set, not the model's working set for the whole
batch (the demo model's is twenty times its input).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from offload.edge.config import EdgeSection
from offload.oip.chunks import batch_rows, predict_in_chunks, rows_within
from offload.oip.errors import ConfigurationError, InvalidArgument, one_line
from offload.oip.repository import BATCH_DIM, TensorSpec

log = logging.getLogger(__name__)

# The most input bytes one ONNX Runtime call takes; a larger batch runs in chunks. 256 KiB is 1,024 rows
# of the demo model, whose working set is then 6 MB; smaller chunks add calls, larger ones memory.
DEFAULT_CHUNK_BYTES = 256 * 1024

# ONNX Runtime's type strings to OIP datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _dims(arg: Any) -> tuple[int, ...]:
    """The model's own dimensions, symbolic or unknown ones as -1 (any size)."""
    return tuple(dim if isinstance(dim, int) and dim > 0 else -1 for dim in arg.shape)


def _spec(arg: Any, path: Path) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ConfigurationError(f"{path}: tensor {arg.name!r} has type {arg.type}, which OIP cannot carry")
    dims = list(_dims(arg))
    if not dims:
        raise ConfigurationError(f"{path}: tensor {arg.name!r} is a scalar; edge models need a batch dimension")
    # The first dimension is the batch (variable); check_declared catches a model that fixes it.
    dims[0] = BATCH_DIM
    return TensorSpec(name=arg.name, datatype=datatype, shape=tuple(dims))


class OnnxModel:
    """One ONNX Runtime session. `predict` is blocking: call it off the event loop."""

    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, section: EdgeSection, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = section.intra_op_threads
        options.inter_op_num_threads = section.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A run's intermediate tensors go back to the C allocator as soon as they are used, not to an arena
        # that keeps the largest working set it ever saw, nor into one block planned for the whole run (the
        # memory pattern) that a fragmented heap cannot always place in what the last run freed.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        self.chunk_bytes = chunk_bytes
        available = ort.get_available_providers()
        providers = [name for name in section.providers if name in available]
        skipped = [name for name in section.providers if name not in available]
        if skipped:
            log.warning(
                "%s: execution providers %s are not in this onnxruntime build; using %s", path, skipped, providers
            )
        if not providers:
            raise ConfigurationError(
                f"{path}: none of the providers {list(section.providers)} is available ({available})"
            )
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            log.debug("ONNX Runtime could not load %s", path, exc_info=True)
            raise ConfigurationError(
                f"{path}: ONNX Runtime {ort.__version__} cannot load the model ({one_line(exc)}); "
                "check that the file is a whole ONNX model (export it again if it was cut short or corrupted) "
                "of an opset this onnxruntime runs"
            ) from exc
        self.path = path
        self.providers = tuple(self._session.get_providers())
        self.inputs = tuple(_spec(arg, path) for arg in self._session.get_inputs())
        self.outputs = tuple(_spec(arg, path) for arg in self._session.get_outputs())
        # Shapes as the file declares them (symbolic names kept, for messages), to check model.toml against.
        self._file_shapes = {
            arg.name: (_dims(arg), list(arg.shape))
            for arg in (*self._session.get_inputs(), *self._session.get_outputs())
        }
        self._output_names = [spec.name for spec in self.outputs]
        # Without string tensors, inputs go to ONNX Runtime and outputs come back as they are (no per-run conversion).
        self._text_inputs = any(spec.datatype == "BYTES" for spec in self.inputs)
        self._text_outputs = any(spec.datatype == "BYTES" for spec in self.outputs)
        if any(spec.datatype == "BF16" for spec in self.inputs):
            raise ConfigurationError(
                f"{path}: BF16 inputs are not supported by the edge runtime (NumPy has no bfloat16)"
            )

    def check_declared(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        """Fail at start-up if model.toml declares tensors the ONNX file does not have."""
        for kind, declared, actual in (("input", inputs, self.inputs), ("output", outputs, self.outputs)):
            by_name = {spec.name: spec for spec in actual}
            for spec in declared:
                found = by_name.get(spec.name)
                if found is None:
                    raise ConfigurationError(
                        f"{self.path}: declared {kind} {spec.name!r} is not in the model {sorted(by_name)}"
                    )
                if found.datatype != spec.datatype:
                    raise ConfigurationError(
                        f"{self.path}: {kind} {spec.name!r} is {found.datatype} in the model, "
                        f"{spec.datatype} in model.toml"
                    )
                # A symbolic dimension in the file matches -1; a fixed one must be the same number,
                # the batch included: a model fixed to one batch size cannot take routed batches.
                dims, shown = self._file_shapes[spec.name]
                if dims != spec.shape:
                    raise ConfigurationError(
                        f"{self.path}: {kind} {spec.name!r} has shape {shown} in the model, "
                        f"{list(spec.shape)} in model.toml; a symbolic dimension in the model must be -1 "
                        "there and a fixed one the same number"
                    )

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        if batch_rows(inputs) <= 1:  # one row is one run, whatever chunk_bytes says
            return self._run(inputs)
        return predict_in_chunks(self._run, inputs, rows_within(inputs, self.chunk_bytes), self._output_names)

    def _run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        feeds = {name: _to_ort(name, array) for name, array in inputs.items()} if self._text_inputs else inputs
        try:
            results = self._session.run(self._output_names, feeds)
        except Exception as exc:  # e.g. a shape the graph rejects at run time
            raise InvalidArgument(f"the edge model rejected the input: {exc}") from exc
        if not self._text_outputs:
            return dict(zip(self._output_names, results, strict=True))
        return {spec.name: _from_ort(result, spec.datatype) for spec, result in zip(self.outputs, results, strict=True)}


def _to_ort(name: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # ONNX Runtime takes strings as an object array of str and keeps them as UTF-8 text, so
    # bytes that are not UTF-8 cannot reach it: say so here, naming the input and the element.
    if array.dtype != np.dtype(object):
        return array
    text: list[str] = []
    for index, item in enumerate(array.ravel().tolist()):
        try:
            text.append(item.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"input {name!r}: BYTES element {index} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                "the edge model (ONNX Runtime string tensors) needs UTF-8 text"
            ) from exc
    out = np.empty(array.shape, dtype=object)
    out.ravel()[:] = text
    return out


def _from_ort(result: Any, datatype: str) -> npt.NDArray[Any]:
    array = np.asarray(result)
    if datatype == "BYTES":
        out = np.empty(array.shape, dtype=object)
        out.ravel()[:] = [str(item).encode("utf-8", "surrogateescape") for item in array.ravel().tolist()]
        return out
    return array
