"""Loading and running a cloud model: torch.export (.pt2), TorchScript, or a Python factory.

A factory returns either a torch.nn.Module or any object with
`predict(inputs: dict[str, ndarray]) -> dict[str, ndarray]` (an ArrayModel),
for models that are not tensors in, tensors out (or for tests that echo).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

from offload.cloud.config import CloudSection
from offload.oip.chunks import batch_rows, predict_in_chunks
from offload.oip.errors import ConfigurationError, Internal, one_line
from offload.oip.repository import ModelEntry, TensorSpec

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]


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
    """A loaded model with its declared tensors; `predict` blocks, so run it off the event loop."""

    def __init__(self, entry: ModelEntry, device: torch.device) -> None:
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
        self._module: torch.nn.Module | None = None
        self._array_model: ArrayModel | None = None
        program_rows: int | None = None
        if section.factory is not None:
            self.platform = "python"
            loaded = call_factory(section.factory)
        else:
            assert section.artifact is not None
            path = entry.artifact_path(section.artifact)
            if path.suffix == ".pt2":
                self.platform = "pytorch_torchexport"
                program = _load_program(path)
                program_rows = _program_max_rows(program)
                loaded = program.module()
            else:
                self.platform = "pytorch_libtorch"
                loaded = _load_torchscript(path, device)
        if isinstance(loaded, torch.nn.Module):
            self._module = loaded.to(device)
            if hasattr(self._module, "eval") and not isinstance(self._module, torch.fx.GraphModule):
                self._module.eval()
            _check_torch_datatypes(self.name, self.inputs + self.outputs)
        elif isinstance(loaded, ArrayModel):
            self._array_model = loaded
        else:
            raise ConfigurationError(
                f"model {self.name!r}: the factory returned {type(loaded).__name__}, "
                "expected a torch.nn.Module or an object with predict(inputs)"
            )
        self._warmup_rows = section.warmup_rows
        # The most rows one call of the model takes: a batch over it runs in chunks.
        limits = [rows for rows in (program_rows, section.max_batch_rows) if rows is not None]
        self.max_batch_rows: int | None = min(limits) if limits else None

    def warm_up(self) -> None:
        """Run one batch so that lazy initialisation (CUDA context, kernels) happens before ready."""
        if self._warmup_rows == 0:
            return
        inputs: Arrays = {spec.name: spec.zero_rows(self._warmup_rows) for spec in self.inputs}
        try:
            self.predict(inputs)
        except Exception as exc:
            log.debug("the warm-up batch of %r failed", self.name, exc_info=True)
            raise ConfigurationError(
                f"model {self.name!r}: the warm-up batch ({self._warmup_rows} rows of zeros shaped as model.toml "
                f"declares the inputs) failed ({one_line(exc)}); check that model.toml's inputs and outputs are "
                "what the model takes and gives (warmup_rows = 0 skips the warm-up)"
            ) from exc

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Arrays:
        # Every declared tensor is batched along its first dimension (the repository insists on it),
        # so a batch the model cannot take in one call runs in chunks, their answers written in place.
        limit = self.max_batch_rows or max(1, batch_rows(inputs))
        return predict_in_chunks(self._predict_batch, inputs, limit, [spec.name for spec in self.outputs])

    def _predict_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Arrays:
        if self._array_model is not None:
            produced = dict(self._array_model.predict(inputs))
        else:
            produced = self._run_module(inputs)
        missing = [spec.name for spec in self.outputs if spec.name not in produced]
        if missing:
            raise Internal(f"model {self.name!r} did not produce output {missing[0]!r}")
        return produced

    def _run_module(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Arrays:
        assert self._module is not None
        args = [_to_torch(inputs[spec.name], spec.datatype, self.device) for spec in self.inputs]
        with torch.inference_mode():
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
        return {spec.name: _to_numpy(tensor, spec.datatype) for spec, tensor in zip(self.outputs, results, strict=True)}


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


def _to_torch(array: npt.NDArray[Any], datatype: str, device: torch.device) -> torch.Tensor:
    # Decoded raw inputs are read-only views of the message; torch wants
    # writable memory, so copy once here (a device transfer copies anyway).
    if datatype == "BF16":
        return torch.from_numpy(np.array(array, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.array(array)).to(device)


def _to_numpy(tensor: torch.Tensor, datatype: str) -> npt.NDArray[Any]:
    tensor = tensor.detach().to("cpu")
    if datatype == "BF16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    from offload.oip.datatypes import DATATYPES

    return tensor.numpy().astype(DATATYPES[datatype].dtype.newbyteorder("="), copy=False)
