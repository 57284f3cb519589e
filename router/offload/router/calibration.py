"""The numeric core of calibration: temperature, threshold, and what they are expected to give.

Plain functions of arrays, with no I/O: `fit_temperature`, `expected_calibration_error`,
`wilson_interval`, `routing_curve`, `oracle_correct` and `calibrate_predictions`. The
`offload calibrate` command (loading data, running the models, editing model.toml, the
report and the plot) is `offload.tools.calibrate`, built on these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from offload.oip.errors import ConfigurationError
from offload.router.confidence import as_rows, class_confidence, log_softmax, row_confidence, scaled_logits
from offload.router.config import OWN_SCORE_MEASURES, RoutingSection

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Arrays = dict[str, npt.NDArray[Any]]

# The range searched for the temperature (a golden-section search over log T).
TEMPERATURE_BOUNDS = (0.05, 20.0)
# Two-sided 95% normal quantile, for the Wilson score interval.
Z_95 = 1.959963984540054


class CalibrationError(ConfigurationError):
    """A calibration that cannot be done as asked: unusable data, a target no threshold reaches."""


# --- statistics -------------------------------------------------------------------------------------------------


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default); (0, 1) when total is 0."""
    if total <= 0:
        return 0.0, 1.0
    share = successes / total
    denominator = 1.0 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1.0 - share) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def negative_log_likelihood(logits: npt.NDArray[Any], labels: npt.NDArray[Any], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    log_probs = log_softmax(logits, temperature)
    label_index = np.asarray(labels, dtype=np.int64)
    return float(-log_probs[np.arange(log_probs.shape[0]), label_index].mean())


def fit_temperature(
    logits: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tolerance: float = 1e-6,
) -> float:
    """The temperature T in `bounds` that minimises the NLL of softmax(logits / T) on (logits, labels).

    The NLL is convex in 1/T, so it has one minimum along log T: a golden-section
    search finds it (NumPy only). For probabilities, pass their logarithms.
    Rows with non-finite logits are left out.
    """
    values = as_rows(logits)
    label_index = np.asarray(labels)
    if label_index.ndim != 1 or label_index.shape[0] != values.shape[0]:
        raise ValueError(f"labels must be one per row: {label_index.shape} for {values.shape[0]} rows")
    if not np.issubdtype(label_index.dtype, np.integer):
        raise ValueError(f"labels must be integers (class indices), not {label_index.dtype}")
    label_index = label_index.astype(np.int64)
    if values.shape[1] == 0 or np.any((label_index < 0) | (label_index >= values.shape[1])):
        raise ValueError(f"labels must be class indices in [0, {values.shape[1]})")
    finite = np.isfinite(values).all(axis=1)
    values, label_index = values[finite], label_index[finite]
    if values.shape[0] == 0:
        raise ValueError("no rows with finite scores to fit a temperature on")
    low, high = bounds
    if not 0.0 < low < high:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")

    def loss(log_temperature: float) -> float:
        return negative_log_likelihood(values, label_index, math.exp(log_temperature))

    inverse_golden = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(low), math.log(high)
    c, d = b - inverse_golden * (b - a), a + inverse_golden * (b - a)
    loss_c, loss_d = loss(c), loss(d)
    while b - a > tolerance:
        if loss_c <= loss_d:
            b, d, loss_d = d, c, loss_c
            c = b - inverse_golden * (b - a)
            loss_c = loss(c)
        else:
            a, c, loss_c = c, d, loss_d
            d = a + inverse_golden * (b - a)
            loss_d = loss(d)
    # The minimum may sit at a bound (e.g. separable data): compare with the bounds themselves.
    candidates = [(loss((a + b) / 2.0), (a + b) / 2.0), (loss(math.log(low)), math.log(low))]
    candidates.append((loss(math.log(high)), math.log(high)))
    return math.exp(min(candidates)[1])


def expected_calibration_error(
    probs_or_confidence: npt.NDArray[Any], correct: npt.NDArray[Any], bins: int = 15
) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width confidence bins, weighted by rows per bin.

    probs_or_confidence: one confidence per row, or a [rows, classes] array of
    probabilities (the row's largest is its confidence); correct: whether each
    row's prediction was right. Bins are (0, 1/bins], (1/bins, 2/bins], ... (0 goes in the first).
    """
    confidence = np.asarray(probs_or_confidence, dtype=np.float64)
    if confidence.ndim == 2:
        confidence = confidence.max(axis=1)
    hits = np.asarray(correct, dtype=np.float64).reshape(-1)
    if confidence.ndim != 1 or confidence.shape != hits.shape:
        raise ValueError(f"need one confidence and one correctness per row, got {confidence.shape} and {hits.shape}")
    if bins < 1:
        raise ValueError("bins must be at least 1")
    if confidence.size == 0:
        return 0.0
    index = np.clip(np.ceil(np.clip(confidence, 0.0, 1.0) * bins).astype(np.int64) - 1, 0, bins - 1)
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    hit_sum = np.bincount(index, weights=hits, minlength=bins)
    return float(np.abs(hit_sum - confidence_sum).sum() / confidence.size)


# --- thresholds and the accuracy-vs-offload curve ----------------------------------------------------------------


def threshold_between(low: float, high: float) -> float:
    """A short decimal t with low < t <= high, near the middle of the gap (the threshold's slack).

    Rows with confidence < t are offloaded, so every t in (low, high] splits the
    rows the same way; the middle is the choice least sensitive to new data.
    """
    if high <= low:
        raise ValueError(f"empty interval ({low}, {high}]")
    middle = (low + high) / 2.0
    quarter = (high - low) / 4.0
    for digits in range(1, 18):
        candidate = round(middle, digits)
        if low < candidate <= high and abs(candidate - middle) <= quarter:
            return candidate
    return high if middle <= low else middle


@dataclass(frozen=True)
class RoutingCurve:
    """Every split a threshold can make of one data set, ordered by offload.

    Point i offloads the `offloaded[i]` least confident rows with threshold
    `thresholds[i]` (rows with confidence < threshold go to the cloud), answering
    `correct[i]` rows right (edge answer on kept rows, cloud answer on offloaded rows).
    Ties in confidence go together, so only shares that split between distinct values appear.
    """

    thresholds: Floats
    offloaded: Ints
    correct: Ints
    rows: int

    @property
    def offload_share(self) -> Floats:
        return self.offloaded / max(self.rows, 1)

    @property
    def accuracy(self) -> Floats:
        return self.correct / max(self.rows, 1)


def routing_curve(
    confidence: npt.NDArray[Any], edge_correct: npt.NDArray[Any], cloud_correct: npt.NDArray[Any]
) -> RoutingCurve:
    """The accuracy-vs-offload curve of a confidence measure on labelled rows."""
    values = np.asarray(confidence, dtype=np.float64)
    edge_hits = np.asarray(edge_correct, dtype=bool)
    cloud_hits = np.asarray(cloud_correct, dtype=bool)
    if not values.shape == edge_hits.shape == cloud_hits.shape or values.ndim != 1:
        raise ValueError("confidence, edge_correct and cloud_correct must be 1-D and of one length")
    if np.any(~np.isfinite(values)) or np.any((values < 0.0) | (values > 1.0)):
        raise ValueError("confidences must lie in [0, 1]")
    rows = values.shape[0]
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Routed correct answers when the k least confident rows go to the cloud.
    gained = np.concatenate([[0], np.cumsum(cloud_hits[order].astype(np.int64) - edge_hits[order].astype(np.int64))])
    correct_at = int(edge_hits.sum()) + gained
    # k is reachable when a threshold separates ordered[k - 1] from ordered[k] (k = 0 always;
    # k = rows when the surest row is below 1, the largest threshold there is).
    cuts = [0, *(np.flatnonzero(ordered[1:] > ordered[:-1]) + 1).tolist()]
    thresholds = [0.0] + [threshold_between(float(ordered[k - 1]), float(ordered[k])) for k in cuts[1:]]
    if rows and ordered[-1] < 1.0:
        cuts.append(rows)
        thresholds.append(threshold_between(float(ordered[-1]), 1.0))
    offloaded = np.asarray(cuts, dtype=np.int64)
    return RoutingCurve(np.asarray(thresholds, dtype=np.float64), offloaded, correct_at[offloaded], rows)


def oracle_correct(
    offloaded: npt.NDArray[Any] | int, edge_correct: npt.NDArray[Any], cloud_correct: npt.NDArray[Any]
) -> Ints:
    """Correct answers of the oracle router that offloads k rows knowing the truth.

    It spends the budget on the rows the edge gets wrong and the cloud gets right
    first, then on rows where the two agree, and last on rows only the edge gets right.
    """
    k = np.asarray(offloaded, dtype=np.int64)
    edge_hits = np.asarray(edge_correct, dtype=bool)
    cloud_hits = np.asarray(cloud_correct, dtype=bool)
    rows = edge_hits.shape[0]
    fixable = int(np.count_nonzero(~edge_hits & cloud_hits))
    harmful = int(np.count_nonzero(edge_hits & ~cloud_hits))
    losses = np.maximum(0, k - (rows - harmful))
    return np.asarray(int(edge_hits.sum()) + np.minimum(k, fixable) - losses, dtype=np.int64)


def point_for_offload(curve: RoutingCurve, target: float) -> int:
    """Index of the curve point whose offload share is closest to target without exceeding it."""
    allowed = np.flatnonzero(curve.offloaded <= target * curve.rows + 1e-9)
    return int(allowed[-1])


def point_for_accuracy(curve: RoutingCurve, target: float) -> int | None:
    """Index of the least offload whose routed accuracy reaches target, or None if none does."""
    reached = np.flatnonzero(curve.correct >= target * curve.rows - 1e-9)
    return int(reached[0]) if reached.size else None


# --- calibration on predictions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: Literal["offload", "accuracy"]
    value: float

    def describe(self) -> str:
        return f"{'offload' if self.kind == 'offload' else 'routed accuracy'} {self.value:.1%}"


@dataclass(frozen=True)
class Calibration:
    """What a calibration chose and what it expects, all measured on the calibration rows."""

    measure: str
    target: Target
    threshold: float
    temperature: float
    temperature_fitted: bool
    rows: int
    offloaded: int
    routed_correct: int
    edge_correct: int
    cloud_correct: int
    oracle_correct: int
    ece_before: float | None  # the edge's max-probability ECE at temperature 1
    ece_after: float | None  # ... at the chosen temperature
    curve: RoutingCurve = field(repr=False)
    oracle_curve: Ints = field(repr=False)

    @property
    def offload_rate(self) -> float:
        return self.offloaded / self.rows

    @property
    def routed_accuracy(self) -> float:
        return self.routed_correct / self.rows

    @property
    def edge_accuracy(self) -> float:
        return self.edge_correct / self.rows

    @property
    def cloud_accuracy(self) -> float:
        return self.cloud_correct / self.rows

    @property
    def oracle_accuracy(self) -> float:
        return self.oracle_correct / self.rows

    @property
    def random_accuracy(self) -> float:
        """Expected accuracy of offloading the same share of rows at random."""
        share = self.offload_rate
        return (1.0 - share) * self.edge_accuracy + share * self.cloud_accuracy

    @property
    def gap_recovered(self) -> float | None:
        gap = self.cloud_accuracy - self.edge_accuracy
        return (self.routed_accuracy - self.edge_accuracy) / gap if gap > 0 else None


def predicted_classes(scores: npt.NDArray[Any]) -> Ints:
    return np.asarray(as_rows(scores).argmax(axis=1), dtype=np.int64)


def calibrate_predictions(
    edge_outputs: Mapping[str, npt.NDArray[Any]],
    cloud_scores: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    routing: RoutingSection,
    score_output: str,
    target: Target,
    fit: bool = True,
) -> Calibration:
    """Choose the temperature and threshold for `target` from the models' answers on labelled rows.

    edge_outputs: the edge model's outputs; cloud_scores: the cloud's score output;
    labels: class indices (the cloud's own answers when the data has none).
    fit=False keeps the configured temperature (measures with a score of their own, `output` and `gate`,
    have none to fit). Raises CalibrationError when the
    target accuracy is out of reach, naming the best that is reachable.
    """
    edge_scores = edge_outputs[score_output]
    label_index = np.asarray(labels, dtype=np.int64)
    edge_hits = predicted_classes(edge_scores) == label_index
    cloud_hits = predicted_classes(cloud_scores) == label_index
    class_scores = routing.confidence not in OWN_SCORE_MEASURES
    temperature = routing.temperature
    if fit and class_scores:
        fitted = fit_temperature(scaled_logits(edge_scores, routing.output_kind), label_index)
        # Written with 4 significant digits: the threshold is chosen for the value as written.
        temperature = float(f"{fitted:.4g}")
    chosen = routing.model_copy(update={"temperature": temperature})
    confidence = row_confidence(edge_outputs, chosen, score_output)
    curve = routing_curve(confidence, edge_hits, cloud_hits)
    if target.kind == "offload":
        index = point_for_offload(curve, target.value)
    else:
        found = point_for_accuracy(curve, target.value)
        if found is None:
            best = int(np.argmax(curve.correct))
            raise CalibrationError(
                f"no threshold reaches routed accuracy {target.value:.2%} on these {curve.rows} rows; the best "
                f"reachable is {curve.accuracy[best]:.2%} at {curve.offload_share[best]:.1%} offloaded "
                f"(edge alone {edge_hits.mean():.2%}, cloud alone {cloud_hits.mean():.2%})"
            )
        index = found
    ece_before = ece_after = None
    if class_scores:
        kind = routing.output_kind
        ece_before = expected_calibration_error(class_confidence(edge_scores, "max_probability", kind), edge_hits)
        ece_after = expected_calibration_error(
            class_confidence(edge_scores, "max_probability", kind, temperature), edge_hits
        )
    oracle = oracle_correct(np.arange(curve.rows + 1), edge_hits, cloud_hits)
    offloaded = int(curve.offloaded[index])
    return Calibration(
        measure=routing.confidence,
        target=target,
        threshold=float(curve.thresholds[index]),
        temperature=temperature,
        temperature_fitted=fit and class_scores,
        rows=curve.rows,
        offloaded=offloaded,
        routed_correct=int(curve.correct[index]),
        edge_correct=int(edge_hits.sum()),
        cloud_correct=int(cloud_hits.sum()),
        oracle_correct=int(oracle[offloaded]),
        ece_before=ece_before,
        ece_after=ece_after,
        curve=curve,
        oracle_curve=oracle,
    )
