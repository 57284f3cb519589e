"""Independent references for what Offload answers: the model files run bare, and a softmax written in NumPy.

Tests check answers against these, row by row, and never against Offload's own wrappers
(OnnxModel, CloudModel, the router's confidence code): a fault shared by the system and a
wrapper it is compared with would pass unseen. The edge's reference is
`onnxruntime.InferenceSession(path).run`, the cloud's `torch.export.load(path).module()`, a
row's confidence the largest softmax probability of its scores divided by the temperature,
and the demo model's threshold and temperature are read from its model.toml with tomllib.

A row answered by the edge must carry the bare ONNX Runtime answer, a row answered by the
cloud or from the row cache (which holds the cloud's answers) the bare torch answer; the
routes say which, so rows merged back in the wrong order fail.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from offload.models import DEMO_REPOSITORY

DIGITS = DEMO_REPOSITORY / "digits"
EDGE_FILE = DIGITS / "edge.onnx"
CLOUD_FILE = DIGITS / "cloud.pt2"
_ROUTING: dict[str, Any] = tomllib.loads((DIGITS / "model.toml").read_text())["routing"]
THRESHOLD: float = _ROUTING["threshold"]  # the demo model's routing threshold
TEMPERATURE: float = _ROUTING.get("temperature", 1.0)
FROM_THE_CLOUD = ("cloud", "cache")  # the row cache holds the cloud's answers

Floats = npt.NDArray[np.float64]
Scores = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Tolerance:
    rtol: float
    atol: float

    def close(self, actual: npt.NDArray[Any], expected: npt.NDArray[Any]) -> bool:
        return bool(np.allclose(actual, expected, rtol=self.rtol, atol=self.atol))

    def assert_close(self, actual: npt.NDArray[Any], expected: npt.NDArray[Any]) -> None:
        np.testing.assert_allclose(actual, expected, rtol=self.rtol, atol=self.atol)


# The edge's answer is the same file under the same runtime: equal to float rounding. The cloud's
# rows are sent as a sub-batch, and torch's kernels round a little differently by batch size.
EDGE_TOLERANCE = Tolerance(rtol=1e-5, atol=1e-6)
CLOUD_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)
CONFIDENCE_TOLERANCE = Tolerance(rtol=1e-5, atol=1e-6)


def demo_split(name: str = "test") -> tuple[Scores, npt.NDArray[np.int64]]:
    """The demo model's `test` or `validation` split: pixels (FP32) and labels."""
    with np.load(DIGITS / f"{name}.npz") as data:
        return data["inputs"].astype(np.float32), data["labels"].astype(np.int64)


@functools.cache
def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_outputs(path: Path, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """Every output of the ONNX file at `path`, by name, from a bare ONNX Runtime session."""
    session = _session(path)
    results = session.run(None, dict(inputs))
    return {output.name: np.asarray(result) for output, result in zip(session.get_outputs(), results, strict=True)}


@functools.cache
def _program(path: Path) -> Any:
    import torch

    return torch.export.load(str(path)).module()


def export_output(path: Path, *inputs: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The single output of the torch.export program at `path`, called bare on CPU."""
    import torch

    with torch.inference_mode():
        result = _program(path)(*(torch.from_numpy(np.array(array)) for array in inputs))
    return np.asarray(result.numpy())


def edge_scores(pixels: Scores) -> Scores:
    """The demo edge model's scores (bare ONNX Runtime)."""
    return onnx_outputs(EDGE_FILE, {"pixels": pixels})["scores"]


def cloud_scores(pixels: Scores) -> Scores:
    """The demo cloud model's scores (bare torch.export)."""
    return export_output(CLOUD_FILE, pixels)


def softmax(scores: npt.NDArray[Any], temperature: float = 1.0) -> Floats:
    """Row-wise softmax of scores / temperature, in float64."""
    logits = np.asarray(scores, dtype=np.float64) / temperature
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float64)


def max_softmax(scores: npt.NDArray[Any], temperature: float = TEMPERATURE) -> Floats:
    """Each row's confidence as the README defines the default measure: its largest softmax probability."""
    return np.asarray(softmax(scores, temperature).max(axis=1), dtype=np.float64)


def cloud_bound(
    pixels: Scores, threshold: float = THRESHOLD, temperature: float = TEMPERATURE
) -> npt.NDArray[np.bool_]:
    """Which rows the router must send to the cloud: the edge's confidence below the threshold."""
    return np.asarray(max_softmax(edge_scores(pixels), temperature) < threshold)


def expected_scores(pixels: Scores, routes: Sequence[str]) -> Scores:
    """Per row, the bare edge or cloud answer, as `routes` says the row was answered."""
    unknown = sorted(set(routes) - {"edge", *FROM_THE_CLOUD})
    assert not unknown, f"unknown routes {unknown}"
    assert len(routes) == len(pixels), f"{len(routes)} routes for {len(pixels)} rows"
    from_cloud = np.array([route in FROM_THE_CLOUD for route in routes], dtype=bool)
    expected = edge_scores(pixels)
    if from_cloud.any():
        expected[from_cloud] = cloud_scores(pixels[from_cloud])
    return expected


def assert_rows_answered_as_routed(scores: npt.NDArray[Any], routes: Sequence[str], pixels: Scores) -> None:
    """Every row is the bare reference of where its route says it was answered, in order."""
    expected = expected_scores(pixels, routes)
    assert scores.shape == expected.shape, f"scores {scores.shape}, expected {expected.shape}"
    wrong = [
        f"row {row} (route {route})"
        for row, route in enumerate(routes)
        if not (CLOUD_TOLERANCE if route in FROM_THE_CLOUD else EDGE_TOLERANCE).close(scores[row], expected[row])
    ]
    assert not wrong, f"rows that are not the bare model's answer for their route: {wrong}"


def assert_confidence_of_routed_rows(
    confidence: npt.NDArray[Any], routes: Sequence[str], pixels: Scores, temperature: float = TEMPERATURE
) -> None:
    """Each row's confidence is the NumPy max softmax of the bare answer of where it was answered."""
    expected = max_softmax(expected_scores(pixels, routes), temperature)
    CONFIDENCE_TOLERANCE.assert_close(np.asarray(confidence, dtype=np.float64), expected)


def decoded(routes: npt.NDArray[Any]) -> list[str]:
    """A BYTES `offload_route` output as text."""
    return [item.decode() if isinstance(item, bytes) else str(item) for item in routes.tolist()]
