"""What the router knows of a model: its configuration and the edge runtime that answers for it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from offload.oip.repository import TensorSpec
from offload.oip.types import ModelMetadata
from offload.router.confidence import cloud_row_confidence, row_confidence
from offload.router.config import RoutedConfig, RoutingSection
from offload.router.placement import WARM_UP_RUNS, RunCost, timed

Arrays = dict[str, npt.NDArray[Any]]  # output (or input) name -> its rows


class LocalModel(Protocol):
    """What the router needs of the edge model (ONNX Runtime's OnnxModel is one)."""

    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]: ...


@dataclass(frozen=True, slots=True)
class RoutedModel:
    config: RoutedConfig
    edge: LocalModel
    # What the edge model's runs cost, measured: decides whether a batch runs on the event loop (placement.py).
    cost: RunCost = field(default_factory=RunCost, compare=False, repr=False)

    def warm_up(self) -> None:
        """Run the edge model on a row of zeros (shaped as declared) a few times, and the confidence on its
        answer, before it serves: the first call's lazy set-up happens here rather than in a caller's request,
        a model that cannot run is found, and what a row costs is measured (placement.py). Raises what the
        model raises."""
        inputs = {spec.name: spec.zero_rows(1) for spec in self.edge.inputs}
        for run in range(WARM_UP_RUNS):
            outputs, seconds = timed(self.edge.predict, inputs)
            if run:
                self.cost.record(1, seconds)
        self.confidence(outputs)

    @property
    def routing(self) -> RoutingSection:
        """The model's [routing] section. Router code reads it only through here, so where the
        section lives in the configuration is this one line's business."""
        return self.config.routing

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def cloud_model(self) -> str:
        """The name of the model the cloud answers this one's rows with."""
        return self.config.cloud_model_name

    @property
    def cache_scope(self) -> str:
        """What cached cloud answers of this model depend on besides the inputs: names and versions."""
        return f"{self.name}@{self.version}->{self.cloud_model}@{self.routing.cloud_version}"

    @property
    def score_output(self) -> str:
        return self.routing.output or self.edge.outputs[0].name

    @property
    def audits_classes(self) -> bool:
        """Whether edge-cloud agreement means the same top class: a classifier's [batch, classes] scores.
        Models with their own confidence output (regression, detection) have no such notion here."""
        spec = next((spec for spec in self.edge.outputs if spec.name == self.score_output), None)
        return self.routing.confidence != "output" and spec is not None and len(spec.shape) == 2

    def confidence(self, outputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
        """Each row's confidence in the edge's answer, as routing measures it."""
        return row_confidence(outputs, self.routing, self.score_output)

    def cloud_confidence(self, outputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
        """Each row's confidence in the cloud's answer (with a gate: the cloud's max probability)."""
        return cloud_row_confidence(outputs, self.routing, self.score_output)

    def answer_outputs(self, outputs: Mapping[str, npt.NDArray[Any]]) -> Arrays:
        """The edge model's own outputs: without the gate's score, which is read for the confidence only."""
        return {spec.name: outputs[spec.name] for spec in self.edge.outputs}

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(self.name, (self.version,), "offload_router", self.edge.inputs, self.edge.outputs)
