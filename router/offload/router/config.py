"""The [routing] section of a model.toml, and a model's config as the router reads it."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from offload.oip.repository import ModelEntry, Section


class OutputKind(StrEnum):
    LOGITS = "logits"
    PROBABILITIES = "probabilities"


# How a row's confidence is computed (offload.router.confidence). Every measure
# lies in [0, 1], higher meaning surer, so one threshold in [0, 1] fits them all.
ConfidenceMeasure = Literal["max_probability", "margin", "negative_entropy", "output", "gate"]
# The measures that read a score of their own rather than the class scores: temperature cannot apply to them.
OWN_SCORE_MEASURES: tuple[ConfidenceMeasure, ...] = ("output", "gate")


class RoutingSection(Section):
    output: str | None = None
    output_kind: OutputKind = OutputKind.LOGITS
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    cloud_model: str | None = None
    cloud_version: str = ""
    # max_probability: the largest softmax probability; margin: top-1 minus
    # top-2 probability; negative_entropy: 1 - H(p) / log(classes); output: the
    # model's own per-row confidence, the output named by confidence_output;
    # gate: a learned gate's score, 1 - P(the edge's answer is wrong), from the
    # ONNX file named by gate (in the model's folder), which the edge runs after
    # the model (`offload calibrate --gate` trains and writes it).
    confidence: ConfidenceMeasure = "max_probability"
    confidence_output: Annotated[str, Field(min_length=1)] | None = None
    gate: Annotated[str, Field(min_length=1)] | None = None
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
        if self.confidence == "gate" and self.gate is None:
            raise ValueError(
                "confidence = 'gate' needs gate, the gate's ONNX file in the model's folder "
                "(offload calibrate --gate writes one)"
            )
        if self.confidence != "gate" and self.gate is not None:
            raise ValueError(f"gate is only used with confidence = 'gate' (confidence is {self.confidence!r})")
        if self.confidence in OWN_SCORE_MEASURES and self.temperature != 1.0:
            raise ValueError(f"temperature scales class scores; it cannot apply to confidence = {self.confidence!r}")
        return self


class RoutedConfig(BaseModel):
    """What the router needs of a model's config: its name and version, and its [routing] section."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    routing: RoutingSection = RoutingSection()

    @property
    def cloud_model_name(self) -> str:
        return self.routing.cloud_model or self.name

    @classmethod
    def of(cls, entry: ModelEntry) -> RoutedConfig:
        """The model's [routing] table validated (defaults when it has none), its outputs checked
        against the ones the file declares; errors name the file and the field."""
        routing = entry.section("routing", RoutingSection) or RoutingSection()
        declared = [spec.name for spec in entry.config.outputs]
        for field in ("output", "confidence_output"):
            named = getattr(routing, field)
            if named is not None and declared and named not in declared:
                raise entry.error(f"routing.{field} {named!r} is not among the outputs {declared}")
        return cls(name=entry.config.name, version=entry.config.version, routing=routing)
