"""The learned offload gate on the device: an ONNX file run after the edge model, scoring each row.

`offload calibrate --gate` trains the gate on a validation set and writes it beside the edge
model (`[routing] confidence = "gate"`, `gate = "gate.onnx"`). Its inputs are the edge model's
score output (the same name) and, when it was trained with `--gate-inputs`, the model's own inputs
(the same names); its one output is each row's confidence, 1 - P(the edge's answer is wrong), one
value per row. `GatedModel` runs the model, then the gate on its answer, in the same worker call,
and hands the router the score as the output GATE_OUTPUT, which `confidence = "gate"` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from offload.edge.onnx_model import OnnxModel
from offload.oip.datatypes import DATATYPES
from offload.oip.errors import ConfigurationError
from offload.oip.repository import TensorSpec
from offload.router.confidence import GATE_OUTPUT

# The gate's output: a number per row (BF16 excepted: NumPy has no bfloat16).
_NUMERIC = {name for name, datatype in DATATYPES.items() if datatype.dtype.kind in "iuf" and name != "BF16"}
_RETRAIN = "train it again for this model with `offload calibrate --gate`"


class GatedModel:
    """The edge model, its answers extended by the gate's score of each row (GATE_OUTPUT)."""

    def __init__(self, model: OnnxModel, gate: OnnxModel, score_output: str) -> None:
        self.platform = model.platform
        self.inputs = model.inputs
        self.outputs = model.outputs
        self._model = model
        self._gate = gate
        self._score_output = score_output
        self._gate_output, self._model_inputs = _check_gate(gate, model, score_output)

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        outputs = self._model.predict(inputs)
        feeds = {name: inputs[name] for name in self._model_inputs}
        feeds[self._score_output] = outputs[self._score_output]
        outputs[GATE_OUTPUT] = self._gate.predict(feeds)[self._gate_output]
        return outputs


def _check_gate(gate: OnnxModel, model: OnnxModel, score_output: str) -> tuple[str, tuple[str, ...]]:
    """The gate's output name and the model inputs it reads; ConfigurationError if it does not fit the model."""
    takes: dict[str, TensorSpec] = {spec.name: spec for spec in model.inputs}
    scores = next(spec for spec in model.outputs if spec.name == score_output)
    takes[score_output] = scores
    if score_output not in {spec.name for spec in gate.inputs}:
        raise ConfigurationError(
            f"{gate.path}: the gate does not read the edge model's score output {score_output!r} "
            f"(its inputs are {[spec.name for spec in gate.inputs]}); {_RETRAIN}"
        )
    for spec in gate.inputs:
        wanted = takes.get(spec.name)
        if wanted is None:
            raise ConfigurationError(
                f"{gate.path}: gate input {spec.name!r} is neither the edge model's score output {score_output!r} "
                f"nor one of its inputs {[spec.name for spec in model.inputs]}; {_RETRAIN}"
            )
        if (spec.datatype, spec.shape) != (wanted.datatype, wanted.shape):
            raise ConfigurationError(
                f"{gate.path}: gate input {spec.name!r} is {spec.datatype} {list(spec.shape)}, the edge model's "
                f"{spec.name!r} {wanted.datatype} {list(wanted.shape)}; {_RETRAIN}"
            )
    if (
        len(gate.outputs) != 1
        or gate.outputs[0].datatype not in _NUMERIC
        or gate.outputs[0].shape not in [(-1,), (-1, 1)]
    ):
        found = [(spec.name, spec.datatype, list(spec.shape)) for spec in gate.outputs]
        raise ConfigurationError(
            f"{gate.path}: a gate has one output, a number per row ([-1] or [-1, 1]); this one has {found}; {_RETRAIN}"
        )
    reads = tuple(spec.name for spec in gate.inputs if spec.name != score_output)
    return gate.outputs[0].name, reads
