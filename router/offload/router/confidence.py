"""Per-row confidence from a model's class scores."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from offload.oip.repository import OutputKind


def max_probability(scores: npt.NDArray[Any], kind: OutputKind) -> npt.NDArray[np.float64]:
    """Max softmax probability per row of a [rows, classes] array (probabilities are used as given)."""
    # Explicit width: reshape(-1) cannot infer it for an empty batch.
    width = int(np.prod(scores.shape[1:]))
    values = np.asarray(scores, dtype=np.float64).reshape(scores.shape[0], width)
    if values.shape[1] == 0:
        return np.ones(values.shape[0])
    if kind is OutputKind.PROBABILITIES:
        return np.asarray(np.clip(values.max(axis=1), 0.0, 1.0), dtype=np.float64)
    # Stable softmax: max(softmax(x)) = 1 / sum(exp(x - max(x))).
    shifted = values - values.max(axis=1, keepdims=True)
    return np.asarray(1.0 / np.exp(shifted).sum(axis=1), dtype=np.float64)
