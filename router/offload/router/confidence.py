"""Per-row confidence from a model's outputs, in [0, 1], higher meaning surer.

The measure is chosen per model in `model.toml` (`[routing] confidence`):

- `max_probability`: the largest softmax probability.
- `margin`: the largest probability minus the second largest.
- `negative_entropy`: 1 - H(p) / log(K) for K classes (1: one-hot, 0: uniform).
- `output`: an output the model computes itself (`confidence_output`), one value
  per row, used as is, clipped to [0, 1].
- `gate`: a learned gate's score, 1 - P(the edge's answer is wrong), which the
  edge wing adds to the edge model's answer as the output GATE_OUTPUT (the gate
  is an ONNX file the edge runs after the model; the router never runs it).
  Rows the cloud answered carry no edge answer to score: their confidence is the
  cloud's max softmax probability (cloud_row_confidence).

The class measures read the score output (`[routing] output`) as logits or as
probabilities (`output_kind`). `temperature` divides the logits before the
softmax (for probabilities: the log-probabilities). Because every measure lies
in [0, 1], one threshold in [0, 1] works with each. A row whose confidence is
undefined (non-finite scores) gets 0, so it is offloaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.oip.errors import Internal
from offload.router.config import ConfidenceMeasure, OutputKind, RoutingSection

Floats = npt.NDArray[np.float64]
# Scores a class measure works on at once: its float64 temporaries (several, alive together) stay at 1 MiB
# each however large the batch; the 200,000 rows of ten classes of a large request would make 16 MB ones.
_BLOCK_ELEMENTS = 1 << 17

# The output that carries the gate's score in the edge's answer (confidence = "gate"): a name of the
# router's own, like the offload_* outputs, so it cannot clash with a model's. Read for the confidence,
# never returned to the caller nor merged with the cloud's rows.
GATE_OUTPUT = "offload_gate_confidence"


def max_probability(scores: npt.NDArray[Any], kind: OutputKind, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    """Max softmax probability per row of a [rows, classes] array after temperature scaling (probabilities at
    T = 1 are used as given); NaN for a row with non-finite scores."""
    if kind is OutputKind.PROBABILITIES and temperature == 1.0:
        values = as_rows(scores)
        if values.shape[1] == 0:
            return np.ones(values.shape[0])
        return np.asarray(np.clip(values.max(axis=1), 0.0, 1.0), dtype=np.float64)
    # One errstate for the whole (entering one costs more than the arithmetic on a row or two).
    with np.errstate(invalid="ignore", over="ignore"):
        logits = _widened(scores) if kind is OutputKind.LOGITS else scaled_logits(scores, kind)
        if logits.shape[1] == 0:
            return np.ones(logits.shape[0])
        # Stable softmax, without the whole of it: max(softmax(z)) = 1 / sum(exp(z - max(z))) for z = logits / T.
        if temperature != 1.0:
            logits = logits / temperature
        shifted = logits - logits.max(axis=1, keepdims=True)
        return np.asarray(1.0 / np.exp(shifted).sum(axis=1), dtype=np.float64)


def as_rows(scores: npt.NDArray[Any]) -> Floats:
    """A [rows, ...] array as float64 [rows, width] (explicit width: an empty batch cannot infer it)."""
    # A signalling NaN among the scores (a caller's random bytes, echoed) raises the "invalid" flag as it is
    # widened, and NumPy would print a RuntimeWarning: here it is a NaN like any other (confidence 0).
    with np.errstate(invalid="ignore"):
        return _widened(scores)


def _widened(scores: npt.NDArray[Any]) -> Floats:
    """as_rows without its errstate, for a caller inside one that ignores "invalid"."""
    width = math.prod(scores.shape[1:])
    return np.asarray(scores, dtype=np.float64).reshape(scores.shape[0], width)


def log_softmax(logits: npt.NDArray[Any], temperature: float = 1.0) -> Floats:
    """Row-wise log-softmax of logits / temperature, computed stably."""
    values = as_rows(logits) / temperature
    if values.shape[1] == 0:
        return values
    # Non-finite scores give NaN rows (inf - inf), which the measures turn into confidence 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        shifted = values - values.max(axis=1, keepdims=True)
        return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)), dtype=np.float64)


def scaled_logits(scores: npt.NDArray[Any], kind: OutputKind) -> Floats:
    """Scores as logits: logits as they are, probabilities as their logarithms (0 stays very negative)."""
    values = as_rows(scores)
    if kind is OutputKind.LOGITS:
        return values
    tiny = np.finfo(np.float64).tiny
    return np.asarray(np.log(np.clip(values, tiny, None)), dtype=np.float64)


def probabilities(scores: npt.NDArray[Any], kind: OutputKind, temperature: float = 1.0) -> Floats:
    """Class probabilities per row after temperature scaling.

    Logits go through a softmax of logits / T. Probabilities at T = 1 are used as
    given (clipped to [0, 1]); at another T they become softmax(log(p) / T).
    """
    if kind is OutputKind.PROBABILITIES and temperature == 1.0:
        return np.asarray(np.clip(as_rows(scores), 0.0, 1.0), dtype=np.float64)
    return np.exp(log_softmax(scaled_logits(scores, kind), temperature))


def class_confidence(
    scores: npt.NDArray[Any],
    measure: ConfidenceMeasure,
    kind: OutputKind = OutputKind.LOGITS,
    temperature: float = 1.0,
) -> Floats:
    """One of the class-score measures (`max_probability`, `margin`, `negative_entropy`) per row."""
    if measure == "output":
        raise ValueError("the 'output' measure reads the model's own confidence output; use row_confidence")
    rows = scores.shape[0]
    block = max(1, _BLOCK_ELEMENTS // max(1, math.prod(scores.shape[1:])))
    if rows <= block:
        return _class_confidence(scores, measure, kind, temperature)
    # Each row's confidence depends on that row alone, so blocks of rows give the same answer as the whole.
    result = np.empty(rows)
    for start in range(0, rows, block):
        result[start : start + block] = _class_confidence(scores[start : start + block], measure, kind, temperature)
    return result


def _class_confidence(
    scores: npt.NDArray[Any], measure: ConfidenceMeasure, kind: OutputKind, temperature: float
) -> Floats:
    if measure == "max_probability":
        return _bounded(max_probability(scores, kind, temperature))
    probs = probabilities(scores, kind, temperature)
    rows, classes = probs.shape
    if classes == 0:
        return np.ones(rows)
    if measure == "margin":
        if classes == 1:
            result = probs[:, 0]
        else:
            top = np.partition(probs, classes - 2, axis=1)
            result = top[:, -1] - top[:, -2]
    else:
        result = _negative_entropy(probs)
    return _bounded(result)


def _negative_entropy(probs: Floats) -> Floats:
    classes = probs.shape[1]
    if classes == 1:
        return np.ones(probs.shape[0])
    totals = probs.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Probabilities given by a model may not sum to exactly 1; entropy needs a distribution.
        normalised = probs / totals
        terms = np.where(normalised > 0.0, normalised * np.log(normalised), 0.0)
    entropy = -terms.sum(axis=1)
    result = 1.0 - entropy / np.log(classes)
    # A row of zeros has no distribution at all: not confident.
    return np.where(totals[:, 0] > 0.0, result, 0.0)


def _bounded(values: npt.NDArray[Any]) -> Floats:
    """Clip to [0, 1]; an undefined (NaN) confidence becomes 0, the least confident (fmax drops NaN)."""
    return np.fmin(np.fmax(np.asarray(values, dtype=np.float64), 0.0), 1.0)


def output_confidence(values: npt.NDArray[Any], name: str) -> Floats:
    """A model's own confidence output: one value per row, used as is, clipped to [0, 1]."""
    array = np.asarray(values)
    if array.ndim == 0 or int(np.prod(array.shape[1:])) != 1:
        raise Internal(
            f"confidence output {name!r} has shape {list(array.shape)}; "
            "expected one value per row ([rows] or [rows, 1])"
        )
    if array.dtype == np.dtype(object) or array.dtype.kind not in "biuf":
        raise Internal(f"confidence output {name!r} is {array.dtype}, not numbers")
    return _bounded(array.reshape(array.shape[0]))


def row_confidence(outputs: Mapping[str, npt.NDArray[Any]], routing: RoutingSection, score_output: str) -> Floats:
    """Each row's confidence under the model's configured measure and temperature.

    outputs: the model's outputs by name (the edge's or the cloud's answer);
    score_output: the output that holds the class scores (`[routing] output`,
    or the model's first output).
    """
    if routing.confidence == "gate":
        if GATE_OUTPUT not in outputs:
            raise Internal(
                f"the edge's answer lacks the gate's score {GATE_OUTPUT!r} (confidence = 'gate'); it has "
                f"{sorted(outputs)}: the edge model was loaded without its gate"
            )
        return output_confidence(outputs[GATE_OUTPUT], GATE_OUTPUT)
    if routing.confidence == "output":
        name = routing.confidence_output
        assert name is not None  # RoutingSection guarantees it
        if name not in outputs:
            raise Internal(f"the model's answer lacks its confidence output {name!r}; it has {sorted(outputs)}")
        return output_confidence(outputs[name], name)
    if score_output not in outputs:
        raise Internal(f"the model's answer lacks its score output {score_output!r}; it has {sorted(outputs)}")
    return class_confidence(outputs[score_output], routing.confidence, routing.output_kind, routing.temperature)


def cloud_row_confidence(outputs: Mapping[str, npt.NDArray[Any]], routing: RoutingSection, score_output: str) -> Floats:
    """Each row's confidence in the cloud's answer (rows the cloud or the row cache answered).

    Under the model's measure, except for `gate`: the gate scores the edge's answer, which these
    rows do not carry, so they get the largest softmax probability of the cloud's own scores
    (the temperature is 1 with a gate).
    """
    if routing.confidence == "gate":
        routing = routing.model_copy(update={"confidence": "max_probability", "gate": None})
    return row_confidence(outputs, routing, score_output)
