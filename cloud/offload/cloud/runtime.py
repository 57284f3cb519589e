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
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

from offload.cloud.config import CloudSection, ModelDefaults
from offload.oip.chunks import batch_rows, predict_in_chunks
from offload.oip.datatypes import DATATYPES
from offload.oip.errors import ConfigurationError, Internal, one_line
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
            loaded = call_factory(section.factory)
        else:
            assert section.artifact is not None
            path = entry.artifact_path(section.artifact)
            if path.suffix == ".pt2":
                self.platform = "pytorch_torchexport"
                program = _load_program(path)
                self.program_rows = _program_max_rows(program)
                loaded = program.module()
            else:
                self.platform = "pytorch_libtorch"
                loaded = _load_torchscript(path, device)
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
            inputs: Arrays = {spec.name: spec.zero_rows(rows) for spec in self.inputs}
            started = time.perf_counter()
            try:
                self.predict(inputs)
            except Exception as exc:
                log.debug("the warm-up batch of %r failed", self.name, exc_info=True)
                raise ConfigurationError(
                    f"model {self.name!r}: the warm-up batch ({rows} rows of zeros shaped as model.toml "
                    f"declares the inputs) failed ({one_line(exc)}); check that model.toml's inputs and outputs are "
                    "what the model takes and gives (warmup_rows = 0 skips the warm-up)"
                ) from exc
            self.warmup_cost = (rows, time.perf_counter() - started)

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Arrays:
        """The outputs for `inputs`, in calls of at most `max_batch_rows` rows written in place: for
        callers outside the scheduler (calibration, benchmarks), which hands out such calls itself."""
        return predict_in_chunks(self._run_one, inputs, self.max_batch_rows, [spec.name for spec in self.outputs])

    def _run_one(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Arrays:
        return self.run_batch([inputs])

    def run_batch(self, parts: Sequence[Mapping[str, npt.NDArray[Any]]]) -> Arrays:
        """One model call on the rows of `parts` joined in order; every output has one row per row in.

        The parts share each input's datatype and trailing dimensions (the batcher sees to it).
        """
        rows = sum(batch_rows(part) for part in parts)
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


# Every artifact that fails to load stops the server with one line: the file (or factory), what
# failed, and what to do. The library's traceback goes to the DEBUG log, for whoever needs it.
_DEBUG_HINT = "(--log-level DEBUG shows the traceback)"


class _Swallowed(logging.Filter):
    """Keeps a logger's records that carry an exception from being written, and keeps the exception."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
            return False
        return True


@contextlib.contextmanager
def _swallowing(logger_name: str) -> Iterator[_Swallowed]:
    swallowed = _Swallowed()
    logger = logging.getLogger(logger_name)
    logger.addFilter(swallowed)
    try:
        yield swallowed
    finally:
        logger.removeFilter(swallowed)


def _load_program(path: Path) -> torch.export.ExportedProgram:
    # torch.export.load logs the archive reader's error with its traceback at WARNING, then tries
    # an older format and fails again: that first error is the one that says what is wrong.
    with _swallowing("torch.export") as swallowed:
        try:
            return torch.export.load(str(path))
        except Exception as exc:
            cause = swallowed.errors[0] if swallowed.errors else exc
            log.debug("torch.export could not load %s", path, exc_info=True)
            raise ConfigurationError(
                f"{path}: torch.export.load cannot read the program ({one_line(cause)}); check that the file is "
                f"a whole .pt2 saved by torch.export.save with torch {torch.__version__} or older (save it again "
                f"if it was cut short or corrupted) {_DEBUG_HINT}"
            ) from exc


def _load_torchscript(path: Path, device: torch.device) -> Any:
    try:
        return torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    except Exception as exc:
        log.debug("torch.jit could not load %s", path, exc_info=True)
        raise ConfigurationError(
            f"{path}: torch.jit.load cannot read the TorchScript model ({one_line(exc)}); check that the file is "
            f"a whole TorchScript archive saved by torch.jit.save (save it again if it was cut short or corrupted; "
            f"a torch.export program must end in .pt2) {_DEBUG_HINT}"
        ) from exc


def call_factory(reference: str) -> Any:
    """What the factory 'package.module:function' returns when called with no arguments (also `offload distill`'s
    edge architectures); ConfigurationError with one actionable line when it cannot be imported or raises."""
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises as it runs
        log.debug("factory module %s failed to import", module_name, exc_info=True)
        raise ConfigurationError(
            f"factory {reference!r}: module {module_name!r} cannot be imported ({one_line(exc)}); check that it is "
            f"installed or on PYTHONPATH and that `python -c 'import {module_name}'` works {_DEBUG_HINT}"
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigurationError(
            f"factory {reference!r}: module {module_name!r} has no function {function_name!r}; "
            "write the factory as 'package.module:function'"
        )
    try:
        return function()
    except Exception as exc:
        log.debug("factory %s raised", reference, exc_info=True)
        raise ConfigurationError(
            f"factory {reference!r} raised {one_line(exc)} when called; fix the factory (it is called with no "
            f"arguments and returns the model) {_DEBUG_HINT}"
        ) from exc


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
