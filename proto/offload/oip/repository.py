"""The model repository: one folder per model, each with a `model.toml`.

Both sides read the same folder. The edge agent uses `[edge]` and `[routing]`,
the cloud service uses `[cloud]`; a model may have either or both. Inputs and
outputs are declared once at the top, because the router forwards the very
tensors the edge model takes to the cloud model.

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
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from offload.oip.datatypes import DATATYPES
from offload.oip.errors import ConfigurationError

CONFIG_FILE = "model.toml"
# The first dimension of every tensor is the batch ("row") dimension: routing
# splits and merges along it, so it must be variable (-1).
BATCH_DIM = -1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class EdgeSection(_Strict):
    """The small model that runs on the device."""

    artifact: str
    # ONNX Runtime: threads per operator (0: ORT decides), execution providers
    # in order of preference; those missing from this build are skipped.
    intra_op_threads: Annotated[int, Field(ge=0)] = 1
    inter_op_threads: Annotated[int, Field(ge=0)] = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


class CloudSection(_Strict):
    """The large model that runs on the GPU server."""

    artifact: str | None = None
    factory: str | None = None
    # Rows of the warm-up batch run before the model reports ready.
    warmup_rows: Annotated[int, Field(ge=0)] = 8
    # Larger batches are run in chunks of at most this many rows and the outputs joined (to bound
    # memory per call). A torch.export program's own bound on its batch dimension applies anyway.
    max_batch_rows: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.artifact is None) == (self.factory is None):
            raise ValueError("give exactly one of 'artifact' (a .pt2 or TorchScript file) or 'factory' (pkg.module:fn)")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory {self.factory!r} must look like 'package.module:function'")
        return self


class OutputKind(StrEnum):
    LOGITS = "logits"
    PROBABILITIES = "probabilities"


# How a row's confidence is computed (offload.router.confidence). Every measure
# lies in [0, 1], higher meaning surer, so one threshold in [0, 1] fits them all.
ConfidenceMeasure = Literal["max_probability", "margin", "negative_entropy", "output"]


class RoutingSection(_Strict):
    output: str | None = None
    output_kind: OutputKind = OutputKind.LOGITS
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    cloud_model: str | None = None
    cloud_version: str = ""
    # max_probability: the largest softmax probability; margin: top-1 minus
    # top-2 probability; negative_entropy: 1 - H(p) / log(classes); output: the
    # model's own per-row confidence, the output named by confidence_output.
    confidence: ConfidenceMeasure = "max_probability"
    confidence_output: Annotated[str, Field(min_length=1)] | None = None
    # Logits are divided by it before the softmax (`offload calibrate` fits it).
    temperature: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0

    @model_validator(mode="after")
    def _confidence_source(self) -> Self:
        if self.confidence == "output" and self.confidence_output is None:
            raise ValueError(
                "confidence = 'output' needs confidence_output, the name of the output that holds each row's confidence"
            )
        if self.confidence != "output" and self.confidence_output is not None:
            raise ValueError(
                f"confidence_output is only used with confidence = 'output' (confidence is {self.confidence!r})"
            )
        if self.confidence == "output" and self.temperature != 1.0:
            raise ValueError("temperature scales class scores; it cannot apply to confidence = 'output'")
        return self


class ModelConfig(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    version: Annotated[str, Field(min_length=1)] = "1"
    description: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    edge: EdgeSection | None = None
    cloud: CloudSection | None = None
    routing: RoutingSection = RoutingSection()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names in {names}")
        if self.routing.output is not None and self.outputs:
            declared = [spec.name for spec in self.outputs]
            if self.routing.output not in declared:
                raise ValueError(f"routing.output {self.routing.output!r} is not among the outputs {declared}")
        if self.routing.confidence_output is not None and self.outputs:
            declared = [spec.name for spec in self.outputs]
            if self.routing.confidence_output not in declared:
                raise ValueError(
                    f"routing.confidence_output {self.routing.confidence_output!r} is not among the outputs {declared}"
                )
        return self

    @property
    def cloud_model_name(self) -> str:
        return self.routing.cloud_model or self.name


class ModelEntry(BaseModel):
    """A validated model folder: its config and where its files are."""

    model_config = ConfigDict(frozen=True)

    config: ModelConfig
    folder: Path

    def artifact_path(self, relative: str) -> Path:
        path = (self.folder / relative).resolve()
        if not path.is_file():
            raise ConfigurationError(f"{self.folder / CONFIG_FILE}: artifact {relative!r} not found at {path}")
        return path


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
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top)'}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigurationError(f"{config_path}: {problems}") from exc
    return ModelEntry(config=config, folder=folder.resolve())


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
