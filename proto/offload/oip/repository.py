"""The model repository: one folder per model, each with a `model.toml`.

Both sides read the same folder. The edge agent uses `[edge]` and `[routing]`,
the cloud service uses `[cloud]`; a model may have either or both. Inputs and
outputs are declared once at the top, because the router forwards the very
tensors the edge model takes to the cloud model.

This module reads the top (name, version, description, inputs, outputs) and keeps
each section as a raw table; the wing that uses a section validates it with its own
model (`ModelEntry.section`): [edge] offload.edge.config, [cloud] offload.cloud.config,
[routing] offload.router.config, [distill] offload.tools.distill.

    name = "digits"              # default: the folder's name
    version = "1"
    inputs  = [{ name = "pixels", datatype = "FP32", shape = [-1, 64] }]
    outputs = [{ name = "scores", datatype = "FP32", shape = [-1, 10] }]

    [edge]
    artifact = "edge.onnx"       # an ONNX file, relative to the folder

    [cloud]
    artifact = "cloud.pt2"       # torch.export program (.pt2), TorchScript (.pt/.ts)
    # factory = "pkg.module:fn"  # or a Python factory returning an nn.Module
    # max_batch_rows = 4096      # run larger batches in chunks of this many rows

    [routing]
    output = "scores"            # the output that confidence is computed from
    output_kind = "logits"       # or "probabilities"
    threshold = 0.9              # rows below go to the cloud
    cloud_model = "digits"       # the model's name on the cloud server

    [distill]
    factory = "pkg.module:fn"    # `offload distill`: returns the untrained edge nn.Module
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from offload.oip.datatypes import DATATYPES
from offload.oip.errors import ConfigurationError

CONFIG_FILE = "model.toml"
# The first dimension of every tensor is the batch ("row") dimension: routing
# splits and merges along it, so it must be variable (-1).
BATCH_DIM = -1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Section(_Strict):
    """Base of a wing's model of its section: unknown keys are errors, values are read-only."""


# The sections a model.toml may have, each owned by the wing that uses it: [edge] by offload.edge,
# [cloud] by offload.cloud, [routing] by offload.router, [distill] by offload.tools.
SectionName = Literal["edge", "cloud", "routing", "distill"]
SectionT = TypeVar("SectionT", bound=BaseModel)


class TensorSpec(_Strict):
    name: Annotated[str, Field(min_length=1)]
    datatype: str
    shape: tuple[int, ...]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype {value!r}; expected one of {', '.join(DATATYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _batched_shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or value[0] != BATCH_DIM:
            raise ValueError(f"shape {list(value)} must start with the batch dimension -1")
        if any(dim < -1 or dim == 0 for dim in value[1:]):
            raise ValueError(f"shape {list(value)}: dimensions must be positive or -1")
        return value

    def zero_rows(self, rows: int) -> npt.NDArray[Any]:
        """`rows` rows of zeros (empty bytes for BYTES) shaped as declared, variable dimensions 1: a warm-up batch."""
        shape = (rows, *(dim if dim > 0 else 1 for dim in self.shape[1:]))
        if self.datatype == "BYTES":
            return np.full(shape, b"", dtype=object)
        return np.zeros(shape, dtype=DATATYPES[self.datatype].dtype.newbyteorder("="))


class ModelConfig(_Strict):
    """What the wire needs of a model: its name, version and tensors. The wings' sections are kept
    as raw tables; each wing validates its own with `ModelEntry.section`."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    version: Annotated[str, Field(min_length=1)] = "1"
    description: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    edge: dict[str, Any] | None = None
    cloud: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names in {names}")
        return self


class ModelEntry(BaseModel):
    """A validated model folder: its config and where its files are."""

    model_config = ConfigDict(frozen=True)

    config: ModelConfig
    folder: Path

    @property
    def config_file(self) -> Path:
        return self.folder / CONFIG_FILE

    def artifact_path(self, relative: str) -> Path:
        path = (self.folder / relative).resolve()
        if not path.is_file():
            raise self.error(f"artifact {relative!r} not found at {path}")
        return path

    def section(self, name: SectionName, schema: type[SectionT]) -> SectionT | None:
        """The [name] table validated with a wing's model, or None when the file has none.

        Errors name the file and the field, as the rest of the file's do:
        `.../model.toml: routing.threshold: Input should be less than or equal to 1`.
        """
        table = getattr(self.config, name)
        if table is None:
            return None
        try:
            return schema.model_validate(table)
        except ValidationError as exc:
            raise self.error(_problems(exc, name)) from exc

    def error(self, problem: str) -> ConfigurationError:
        """A configuration error in this model's file, naming it."""
        return ConfigurationError(f"{self.config_file}: {problem}")


def load_model(folder: Path) -> ModelEntry:
    """Read and validate one model folder; errors name the file and the field."""
    config_path = folder / CONFIG_FILE
    try:
        raw = tomllib.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{folder}: no {CONFIG_FILE} in the model folder") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{config_path}: not valid TOML: {exc}") from exc
    raw.setdefault("name", folder.name)
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(f"{config_path}: {_problems(exc)}") from exc
    return ModelEntry(config=config, folder=folder.resolve())


def _problems(exc: ValidationError, *within: str) -> str:
    """Every problem pydantic found, each as `field.path: message`; `within` is the section's name."""
    return "; ".join(
        f"{'.'.join(str(part) for part in (*within, *error['loc'])) or '(top)'}: {error['msg']}"
        for error in exc.errors()
    )


def load_repository(root: Path) -> dict[str, ModelEntry]:
    """Every model folder under root, by model name; at least one is required."""
    if not root.is_dir():
        raise ConfigurationError(f"model repository {root} is not a folder")
    models: dict[str, ModelEntry] = {}
    for folder in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
        entry = load_model(folder)
        if entry.config.name in models:
            raise ConfigurationError(f"model name {entry.config.name!r} is used by two folders in {root}")
        models[entry.config.name] = entry
    if not models:
        raise ConfigurationError(f"model repository {root} has no model folders (each needs a {CONFIG_FILE})")
    return models
