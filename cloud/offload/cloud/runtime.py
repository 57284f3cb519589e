"""Loading and running a cloud model: torch.export (.pt2), TorchScript, or a Python factory.

A factory returns either a torch.nn.Module or any object with
`predict(inputs: dict[str, ndarray]) -> dict[str, ndarray]` (an ArrayModel),
for models that are not tensors in, tensors out (or for tests that echo).

One call of a model runs one batch: the rows of several requests, joined in order
(`run_batch`). On CUDA the rows are joined straight into pinned host memory and copied
to the device without blocking, each inference thread on its own CUDA stream, so one
batch's copies overlap another's compute. Torch models may run in float16 or bfloat16
and under torch.compile (`ModelOptions`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

from offload.cloud.config import CloudSection, ModelDefaults
from offload.oip.datatypes import DATATYPES
from offload.oip.errors import ConfigurationError, Internal
from offload.oip.repository import ModelEntry, TensorSpec

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
_COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@runtime_checkable
class ArrayModel(Protocol):
    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Mapping[str, npt.NDArray[Any]]: ...


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device {requested!r} was asked for but this torch build sees no CUDA device")
    return device


class CloudModel:
    """A loaded model with its declared tensors; `run_batch` blocks, so run it off the event loop."""

    def __init__(self, entry: ModelEntry, device: torch.device, defaults: ModelDefaults | None = None) -> None:
        config = entry.config
        section = entry.section("cloud", CloudSection)
        if section is None:
            raise ConfigurationError(f"model {config.name!r} has no [cloud] section")
        if not config.inputs or not config.outputs:
            raise ConfigurationError(f"model {config.name!r}: a cloud model must declare its inputs and outputs")
        self.name = config.name
        self.version = config.version
        self.inputs: tuple[TensorSpec, ...] = config.inputs
        self.outputs: tuple[TensorSpec, ...] = config.outputs
        self.device = device
        self._module: Callable[..., Any] | None = None
        self._array_model: ArrayModel | None = None
        # The largest batch a torch.export program takes (Dim(max=...)), if it has a bound.
        self.program_rows: int | None = None
        if section.factory is not None:
            self.platform = "python"
            loaded = _call_factory(section.factory)
        else:
            assert section.artifact is not None
            path = entry.artifact_path(section.artifact)
            if path.suffix == ".pt2":
                self.platform = "pytorch_torchexport"
                program = torch.export.load(str(path))
                self.program_rows = _program_max_rows(program)
                loaded = program.module()
            else:
                self.platform = "pytorch_libtorch"
                loaded = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        self.options = (defaults or ModelDefaults()).resolve(section, self.program_rows)
        # The most rows one call runs: the batcher never hands the model more.
        self.max_batch_rows = self.options.max_batch_rows
        self._compute_dtype: torch.dtype | None = None
        if isinstance(loaded, torch.nn.Module):
            _check_torch_datatypes(self.name, self.inputs + self.outputs)
            self._module = self._prepare(loaded)
        elif isinstance(loaded, ArrayModel):
            self._array_model = loaded
        else:
            raise ConfigurationError(
                f"model {self.name!r}: the factory returned {type(loaded).__name__}, "
                "expected a torch.nn.Module or an object with predict(inputs)"
            )
        self._pinned = device.type == "cuda"
        self._streams = threading.local()
        # (rows, seconds) of the largest warm-up batch: the first estimate of what a row costs.
        self.warmup_cost: tuple[int, float] | None = None

    def _prepare(self, module: torch.nn.Module) -> Callable[..., Any]:
        module = module.to(self.device)
        if not isinstance(module, torch.fx.GraphModule):
            module.eval()
        if self.options.dtype is not None and self.options.dtype != "float32":
            self._compute_dtype = _COMPUTE_DTYPES[self.options.dtype]
            module = module.to(self._compute_dtype)
        if self.options.compile:
            # Dynamic shapes: one compiled graph serves every batch size the warm-up has not seen.
            return torch.compile(module, backend=self.options.compile, dynamic=True)
        return module

    def warm_up(self) -> None:
        """Run batches of 1, 2, 4, ... up to `warmup_rows` rows, so that lazy initialisation (CUDA
        context, kernels for each size, torch.compile's graphs) happens before the model reports
        ready; the largest one is timed."""
        largest = min(self.options.warmup_rows, self.max_batch_rows)
        sizes = list(_powers_of_two(largest))
        if largest and largest not in sizes:
            sizes.append(largest)
        for rows in sizes:
            started = time.perf_counter()
            self.predict(self._zeros(rows))
            self.warmup_cost = (rows, time.perf_counter() - started)

    def _zeros(self, rows: int) -> Arrays:
        inputs: Arrays = {}
        for spec in self.inputs:
            shape = (rows, *(dim if dim > 0 else 1 for dim in spec.shape[1:]))
            dtype = DATATYPES[spec.datatype].dtype
            inputs[spec.name] = np.zeros(shape, dtype=dtype if spec.datatype == "BYTES" else dtype.newbyteorder("="))
        return inputs

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Arrays:
        """The outputs for `inputs`, in calls of at most `max_batch_rows` rows joined in order: for
        callers outside the scheduler (calibration, benchmarks), which hands out such calls itself."""
        rows, limit = _rows(inputs), self.max_batch_rows
        if rows <= limit:
            return self.run_batch([inputs])
        chunks = [
            self.run_batch([{name: array[start : start + limit] for name, array in inputs.items()}])
            for start in range(0, rows, limit)
        ]
        return {spec.name: np.concatenate([chunk[spec.name] for chunk in chunks]) for spec in self.outputs}

    def run_batch(self, parts: Sequence[Mapping[str, npt.NDArray[Any]]]) -> Arrays:
        """One model call on the rows of `parts` joined in order; every output has one row per row in.

        The parts share each input's datatype and trailing dimensions (the batcher sees to it).
        """
        rows = sum(_rows(part) for part in parts)
        if self._array_model is not None:
            joined = parts[0] if len(parts) == 1 else {spec.name: _join(parts, spec.name) for spec in self.inputs}
            produced = dict(self._array_model.predict(joined))
        else:
            produced = self._run_module(parts)
        for spec in self.outputs:
            if spec.name not in produced:
                raise Internal(f"model {self.name!r} did not produce output {spec.name!r}")
            shape = np.shape(produced[spec.name])
            if not shape or shape[0] != rows:
                raise Internal(
                    f"model {self.name!r} returned output {spec.name!r} with shape {list(shape)} "
                    f"for a batch of {rows} rows; every output must have one row per input row"
                )
        return produced

    def _run_module(self, parts: Sequence[Mapping[str, npt.NDArray[Any]]]) -> Arrays:
        assert self._module is not None
        with self._stream(), torch.inference_mode():
            args = [self._stage(parts, spec) for spec in self.inputs]
            result = self._module(*args)
            if isinstance(result, torch.Tensor):
                results: list[torch.Tensor] = [result]
            elif isinstance(result, dict):
                results = [result[spec.name] for spec in self.outputs]
            else:
                results = list(result)
            if len(results) != len(self.outputs):
                raise Internal(
                    f"model {self.name!r} returned {len(results)} tensors for {len(self.outputs)} declared outputs"
                )
            return {
                spec.name: _to_numpy(tensor, spec.datatype) for spec, tensor in zip(self.outputs, results, strict=True)
            }

    def _stream(self) -> contextlib.AbstractContextManager[Any]:
        """On CUDA, this thread's own stream: batches of different inference threads overlap."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        return torch.cuda.stream(stream)

    def _stage(self, parts: Sequence[Mapping[str, npt.NDArray[Any]]], spec: TensorSpec) -> torch.Tensor:
        """One input of the batch on the model's device: the parts joined by one copy into (pinned,
        on CUDA) host memory that torch owns, then moved without blocking."""
        arrays = [part[spec.name] for part in parts]
        shape = (sum(array.shape[0] for array in arrays), *arrays[0].shape[1:])
        bits = spec.datatype == "BF16"  # carried as uint16 bit patterns; torch reads them as bfloat16
        host_dtype = DATATYPES[spec.datatype].dtype.newbyteorder("=")
        tensor = torch.empty(shape, dtype=torch.int16 if bits else _torch_dtype(host_dtype), pin_memory=self._pinned)
        target = tensor.numpy().view(host_dtype)
        if len(arrays) == 1:
            target[...] = arrays[0]
        else:
            np.concatenate(arrays, out=target)
        staged = tensor.view(torch.bfloat16) if bits else tensor
        staged = staged.to(self.device, non_blocking=True)
        if self._compute_dtype is not None and staged.is_floating_point():
            staged = staged.to(self._compute_dtype)
        return staged


def _powers_of_two(limit: int) -> Iterator[int]:
    rows = 1
    while rows <= limit:
        yield rows
        rows *= 2


def _rows(inputs: Mapping[str, npt.NDArray[Any]]) -> int:
    return int(next(iter(inputs.values())).shape[0]) if inputs else 0


def _join(parts: Sequence[Mapping[str, npt.NDArray[Any]]], name: str) -> npt.NDArray[Any]:
    return np.concatenate([part[name] for part in parts])


def _program_max_rows(program: torch.export.ExportedProgram) -> int | None:
    """The largest batch an exported program takes: the least upper bound of its inputs' first
    dimensions (`Dim(max=...)` at export time), or None where the batch is unbounded or static."""
    user_inputs = {
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
        and isinstance(spec.arg, torch.export.graph_signature.TensorArgument)
    }
    bounds: list[int] = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op != "placeholder" or node.name not in user_inputs or not isinstance(value, torch.Tensor):
            continue
        batch = value.shape[0] if value.dim() else None
        if not isinstance(batch, torch.SymInt):
            continue
        value_range = program.range_constraints.get(batch.node.expr)
        # sympy Integer for a finite bound; torch's int_oo (no bound) is not one.
        if value_range is not None and getattr(value_range.upper, "is_Integer", False):
            bounds.append(int(value_range.upper))
    return min(bounds) if bounds else None


def _call_factory(reference: str) -> Any:
    module_name, _, function_name = reference.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"factory {reference!r} cannot be imported: {exc}") from exc
    return function()


def _check_torch_datatypes(name: str, specs: tuple[TensorSpec, ...]) -> None:
    for spec in specs:
        if spec.datatype == "BYTES":
            raise ConfigurationError(
                f"model {name!r}: tensor {spec.name!r} is BYTES, which a torch module cannot take; "
                "use a factory that returns an ArrayModel"
            )


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _to_numpy(tensor: torch.Tensor, datatype: str) -> npt.NDArray[Any]:
    """An output as its declared datatype, cast on the device before the one copy back."""
    if datatype == "BF16":
        return tensor.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    dtype = DATATYPES[datatype].dtype.newbyteorder("=")
    return tensor.detach().to("cpu", _torch_dtype(dtype)).numpy()
