"""The learned offload gate: trained on a validation set by `offload calibrate --gate`, written as ONNX.

Max probability is a good offload signal only for an edge model whose confidence drops where it
is wrong. The gate learns the signal instead: a logistic regression that scores each row's chance
that the edge's answer is wrong (its class differs from the label; without labels, from the
cloud's answer). It reads features of the edge model's score output (the log of the largest
probability, log(-log) of it, which spreads out the confident rows, the log-odds between the two
likeliest classes, the normalised entropy and every class probability) and, with inputs=True
(`--gate-inputs`), the model's inputs themselves, flattened. The written gate is one small ONNX
graph: those features from the raw score output (and inputs), standardised, a linear score z and
confidence = sigmoid(-z) = 1 - P(wrong) per row, in float64. The edge runs it after the model
(`offload.edge.gate`); the features used for training are computed by the same graph under ONNX
Runtime, so training and serving cannot drift apart.

The weight of log(-log max probability) is all but unpenalised, the others are (L2): the stronger the
penalty, the nearer the gate comes to ranking rows by max probability alone, which it falls back
to where nothing else is learnt (on the digits pair, whose max probability already flags the
edge's mistakes, the cross-fitting picks the strongest penalty).

Cross-fitting keeps the threshold off the gate's training rows: the rows are dealt into FOLDS
folds (stratified by wrongness, seeded), each fold is scored by a gate trained on the other folds,
and the L2 strength (from REGULARISATION) is the one with the least out-of-fold log loss. The
threshold is then chosen on these out-of-fold scores; the gate written is trained on all the rows
with that strength.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from offload.oip.datatypes import DATATYPES
from offload.oip.repository import TensorSpec
from offload.router.calibration import CalibrationError
from offload.router.confidence import GATE_OUTPUT
from offload.router.config import OutputKind

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

GATE_FILE = "gate.onnx"  # written beside the edge model
FOLDS = 5
FOLD_SEED = 0
# L2 strengths tried, on standardised features (the loss is summed over rows), strongest first: among
# equal out-of-fold losses the strongest wins. The strongest leaves max probability all but alone.
REGULARISATION = (1e5, 1e4, 1e3, 100.0, 10.0, 1.0, 0.1, 0.01)
# The feature whose weight is all but unpenalised: log(-log max probability), the max-probability ranking. Its
# small penalty keeps the weight finite where that feature alone separates the rows.
_BASELINE_PENALTY = 1e-3
# More features than this (a large input with --gate-inputs) would make Newton's method slow and the gate
# no longer small.
MAX_FEATURES = 4096
NEWTON_STEPS = 100
NEWTON_TOLERANCE = 1e-10
OPSET = 17
# -log(max probability) is floored here before its logarithm: finite for a probability of exactly 1.
_DOUBT_FLOOR = 1e-30
# Probabilities are floored here before their logarithm (a class at 0 stays very unlikely, not -inf).
_PROBABILITY_FLOOR = float(np.finfo(np.float64).tiny)
_BASELINE = "log(-log max probability)"
# The features of the scores, in the order the graph computes them; then the class probabilities and the inputs.
_SCORE_FEATURES = ("log max probability", _BASELINE, "log-odds of the top two", "entropy")


@dataclass(frozen=True)
class GateFit:
    """A gate trained on a validation set, and what the threshold is chosen on."""

    model: onnx.ModelProto  # the gate trained on every row, to save as GATE_FILE
    out_of_fold: Floats  # each row's confidence from the gate that did not train on it (NaN: non-finite features)
    regularisation: float  # the L2 strength chosen
    features: int
    rows: int  # rows trained on (finite features)
    wrong: int  # ... of which the edge got wrong
    reads_inputs: bool
    folds: int = FOLDS  # the cross-fitting's

    def describe(self) -> str:
        reads = "the edge's scores and the inputs" if self.reads_inputs else "the edge's scores"
        return f"logistic regression on {self.features} features ({reads}), L2 strength {self.regularisation:g}"


def train_gate(
    edge_outputs: Mapping[str, npt.NDArray[Any]],
    inputs: Mapping[str, npt.NDArray[Any]],
    score: TensorSpec,
    kind: OutputKind,
    input_specs: Sequence[TensorSpec],
    wrong: npt.NDArray[Any],
    read_inputs: bool = False,
) -> GateFit:
    """Train a gate that predicts `wrong` (the edge's answer is wrong, per row) and cross-fit it.

    edge_outputs: the edge model's outputs (its score output `score` among them); inputs: the
    model's inputs by name (read with read_inputs); kind: how the scores are read.
    """
    specs = tuple(input_specs) if read_inputs else ()
    _check_gateable(score, specs)
    feature_graph = _graph(score, kind, specs, head=None)
    features = run_gate(feature_graph, edge_outputs, inputs)
    if features.shape[1] > MAX_FEATURES:
        raise CalibrationError(
            f"the gate would read {features.shape[1]} features (more than {MAX_FEATURES}); "
            "leave out --gate-inputs for a model with inputs this large"
        )
    target = np.asarray(wrong, dtype=bool)
    usable = np.isfinite(features).all(axis=1)
    x, y = features[usable], target[usable].astype(np.float64)
    positives = int(y.sum())
    if min(positives, y.size - positives) < FOLDS:
        raise CalibrationError(
            f"a gate learns from rows the edge gets wrong and rows it gets right, at least {FOLDS} of each; "
            f"these {y.size} rows have {positives} wrong"
        )
    folds = _folds(y.astype(bool))
    best: tuple[float, float, Floats] | None = None
    for strength in REGULARISATION:
        z = np.empty(y.size)  # the linear score: P(wrong) = sigmoid(z)
        for fold in range(FOLDS):
            held = folds == fold
            z[held] = _fit(x[~held], y[~held], strength).z(x[held])
        loss = float(np.mean(_log_loss(_sigmoid(z), y)))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, strength, z)
    assert best is not None
    _, strength, z = best
    out_of_fold = np.full(target.shape[0], np.nan)
    out_of_fold[usable] = _sigmoid(-z)  # as the graph computes it
    final = _fit(x, y, strength)
    return GateFit(
        model=_graph(score, kind, specs, head=final),
        out_of_fold=out_of_fold,
        regularisation=strength,
        features=int(x.shape[1]),
        rows=int(y.size),
        wrong=positives,
        reads_inputs=bool(specs),
    )


def run_gate(
    model: onnx.ModelProto, edge_outputs: Mapping[str, npt.NDArray[Any]], inputs: Mapping[str, npt.NDArray[Any]]
) -> Floats:
    """The gate's (or its feature graph's) output on these rows, under ONNX Runtime as on the device."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    arrays = {**inputs, **edge_outputs}
    feeds = {arg.name: arrays[arg.name] for arg in session.get_inputs()}
    return np.asarray(session.run(None, feeds)[0], dtype=np.float64)


def save_gate(model: onnx.ModelProto, path: str) -> None:
    """Write the gate (its weights inside the file) after checking the graph."""
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


# --- logistic regression ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Logistic:
    """Standardisation and weights of a fitted logistic regression."""

    mean: Floats
    scale: Floats
    weights: Floats
    bias: float

    def z(self, x: Floats) -> Floats:
        """The linear score of each row: P(the edge is wrong) = sigmoid(z)."""
        return np.asarray(((x - self.mean) / self.scale) @ self.weights + self.bias, dtype=np.float64)


def _sigmoid(z: Floats) -> Floats:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)


def _log_loss(chance: Floats, y: Floats) -> Floats:
    clipped = np.clip(chance, 1e-15, 1.0 - 1e-15)
    return np.asarray(-(y * np.log(clipped) + (1.0 - y) * np.log(1.0 - clipped)), dtype=np.float64)


def _fit(x: Floats, y: Floats, strength: float) -> _Logistic:
    """L2-penalised logistic regression (the intercept and the baseline feature not penalised) by Newton's method
    with step halving."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    design = np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))])
    penalty = np.full(design.shape[1], strength)
    penalty[-1] = 0.0
    penalty[_SCORE_FEATURES.index(_BASELINE)] = _BASELINE_PENALTY
    theta = np.zeros(design.shape[1])
    base = float(np.clip(y.mean(), 1e-6, 1.0 - 1e-6))
    theta[-1] = math.log(base / (1.0 - base))

    def objective(values: Floats) -> float:
        z = design @ values
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * values * values))

    current = objective(theta)
    for _ in range(NEWTON_STEPS):
        chance = _sigmoid(design @ theta)
        gradient = design.T @ (chance - y) + penalty * theta
        curvature = (design.T * (chance * (1.0 - chance))) @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(curvature, gradient)
        length = 1.0
        while length > 1e-6:
            candidate = theta - length * step
            value = objective(candidate)
            if value <= current:
                break
            length /= 2.0
        else:
            break  # no step lowers the objective: at the minimum to rounding
        theta, current = candidate, value
        if float(np.max(np.abs(length * step))) < NEWTON_TOLERANCE:
            break
    return _Logistic(mean=mean, scale=scale, weights=theta[:-1], bias=float(theta[-1]))


def _folds(wrong: Bools) -> npt.NDArray[np.int64]:
    """A fold per row: the wrong rows and the right ones each shuffled (seeded) and dealt round the folds."""
    rng = np.random.default_rng(FOLD_SEED)
    folds = np.empty(wrong.size, dtype=np.int64)
    for group in (np.flatnonzero(wrong), np.flatnonzero(~wrong)):
        shuffled = rng.permutation(group)
        folds[shuffled] = np.arange(shuffled.size) % FOLDS
    return folds


# --- the ONNX graph --------------------------------------------------------------------------------------------


def _check_gateable(score: TensorSpec, inputs: Sequence[TensorSpec]) -> None:
    classes = math.prod(dim for dim in score.shape[1:])
    if classes < 2:
        raise CalibrationError(
            f"a gate reads class scores of at least two classes; the score output {score.name!r} has shape "
            f"{list(score.shape)}"
        )
    for spec in (score, *inputs):
        if spec.datatype in ("BYTES", "BF16"):
            raise CalibrationError(f"a gate reads numbers; {spec.name!r} is {spec.datatype}")


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    dims: list[int | str] = [
        "batch" if index == 0 else (dim if dim > 0 else f"{spec.name}_{index}") for index, dim in enumerate(spec.shape)
    ]
    element = helper.np_dtype_to_tensor_dtype(DATATYPES[spec.datatype].dtype.newbyteorder("="))
    return helper.make_tensor_value_info(spec.name, element, dims)


class _Builder:
    """Nodes and constants of one graph. Their names start with "gate/", so none clashes with a tensor of the
    model's (an input called "features" or "p")."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []

    def constant(self, name: str, value: npt.ArrayLike, dtype: npt.DTypeLike = np.float64) -> str:
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"gate/{name}"))
        return f"gate/{name}"

    def node(self, op: str, inputs: Sequence[str], output: str, outputs: int = 1, **attributes: Any) -> str:
        """Add a node; its (first) output is `gate/<output>`, further ones `gate/<output>:<i>`."""
        name = output if output == GATE_OUTPUT else f"gate/{output}"
        names = [name, *(f"{name}:{index}" for index in range(1, outputs))]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=name, **attributes))
        return name

    def as_double(self, tensor: str) -> str:
        """A [batch, ...] tensor of the model's as [batch, width] float64."""
        flat = self.node("Flatten", [tensor], f"{tensor}/flat", axis=1)
        return self.node("Cast", [flat], f"{tensor}/double", to=TensorProto.DOUBLE)


def _graph(
    score: TensorSpec, kind: OutputKind, inputs: Sequence[TensorSpec], head: _Logistic | None
) -> onnx.ModelProto:
    """The gate: features of the scores (and inputs); with `head`, the confidence sigmoid(-z) as GATE_OUTPUT,
    else the features as gate/features."""
    build = _Builder()
    scores = build.as_double(score.name)
    if kind is OutputKind.PROBABILITIES:
        floored = build.node("Max", [scores, build.constant("probability_floor", _PROBABILITY_FLOOR)], "floored")
        scores = build.node("Log", [floored], "log_probabilities")
    log_p = build.node("LogSoftmax", [scores], "log_p", axis=1)
    p = build.node("Exp", [log_p], "p")
    top = build.node("TopK", [log_p, build.constant("k", [2], np.int64)], "top", outputs=2, axis=1)
    index = {value: build.constant(f"index_{value}", [value], np.int64) for value in (0, 1, 2)}
    axis = index[1]
    log_max = build.node("Slice", [top, index[0], index[1], axis], "log_max")
    log_second = build.node("Slice", [top, index[1], index[2], axis], "log_second")
    doubt = build.node(
        "Max", [build.node("Neg", [log_max], "minus_log_max"), build.constant("floor", _DOUBT_FLOOR)], "doubt"
    )
    log_doubt = build.node("Log", [doubt], "log_doubt")
    log_odds = build.node("Sub", [log_max, log_second], "log_odds")
    p_log_p = build.node("ReduceSum", [build.node("Mul", [p, log_p], "p_log_p"), axis], "sum_p_log_p", keepdims=1)
    classes = math.prod(score.shape[1:])
    entropy = build.node("Mul", [p_log_p, build.constant("entropy_scale", -1.0 / math.log(classes))], "entropy")
    parts = [log_max, log_doubt, log_odds, entropy, p, *(build.as_double(spec.name) for spec in inputs)]
    features = build.node("Concat", parts, "features", axis=1)
    if head is None:
        output = helper.make_tensor_value_info(features, TensorProto.DOUBLE, ["batch", "features"])
    else:
        standard = build.node(
            "Div",
            [
                build.node("Sub", [features, build.constant("mean", head.mean)], "centred"),
                build.constant("scale", head.scale),
            ],
            "standardised",
        )
        wx = build.node("MatMul", [standard, build.constant("weights", head.weights.reshape(-1, 1))], "wx")
        z = build.node("Add", [wx, build.constant("bias", [head.bias])], "z")
        sure = build.node("Sigmoid", [build.node("Neg", [z], "minus_z")], "sure")
        build.node("Squeeze", [sure, axis], GATE_OUTPUT)
        output = helper.make_tensor_value_info(GATE_OUTPUT, TensorProto.DOUBLE, ["batch"])
    graph = helper.make_graph(
        build.nodes,
        "offload_gate",
        [_value_info(score), *(_value_info(spec) for spec in inputs)],
        [output],
        build.constants,
    )
    described = ", ".join([*_SCORE_FEATURES, "the class probabilities", *(["the inputs"] if inputs else [])])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="offload calibrate --gate",
        doc_string=f"1 - P(the edge's answer is wrong) per row, by logistic regression on: {described}",
    )
    model.ir_version = 8
    return model
