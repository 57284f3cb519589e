"""Quality benchmark (issue 4): what routing by confidence buys at a given cloud budget, on the bundled pairs.

Every headline figure is held out: the threshold (and the temperature) is chosen on the
validation split, as `offload calibrate --target-offload BUDGET` chooses it, and measured on
the test split, which had no say in it. For each offload budget (5, 10, 15, 20 and 30% by
default) it reports the offload that threshold gives on test (95% Wilson interval), the
routed test accuracy, the oracle router's (it offloads as many test rows, the edge's
mistakes first), random routing's expected accuracy, and the share of the edge-to-cloud
accuracy gap recovered. The headline budget is twice the edge's error rate on the
validation split. Figures for a threshold chosen on the test split itself are labelled
"oracle threshold": the same rule (the largest offload not above the budget) applied to
the test rows with hindsight, which no deployment has; it keeps to the budget on test,
which a held-out threshold need not, so it can recover less. It also reports the same
per method (the class-score measures and the learned gate, see below), the gate against max
probability on every pair at each budget, and the edge model's expected calibration error
before and after temperature scaling.

It runs on both bundled pairs by default: `digits`, whose edge model's max probability flags its
own mistakes, and `tabular`, whose edge model is confidently wrong on a region of the inputs
(models/train_tabular.py). The budget tables are for max probability (the baseline) and for the
learned gate (`offload calibrate --gate`, offload.tools.gate); the methods table has every method.
The gate is trained on the validation split only and cross-fitted: its threshold is chosen on
out-of-fold scores of the validation rows (each scored by a gate trained on the other folds), and
the gate trained on every validation row scores the test rows. Two gates per pair: on the edge's
scores alone, and on the scores and the inputs (`--gate-inputs`).

Both models run here (edge: ONNX Runtime; cloud: PyTorch on the CPU). The markdown it
prints goes into benchmarks/RESULTS.md under "## Quality (issue 4)", a subsection per model
(that section is replaced; the rest of the file is kept). With --across (digits), the headline
and the calibration landing on other splits (repositories written by `models/train_digits.py --seed N --out
DIR/digits`, each with its own models, validation and test split) go under "## Quality
across splits (issue 4)" instead.

    python benchmarks/quality.py                # both pairs; print and write benchmarks/RESULTS.md
    python benchmarks/quality.py --model tabular --no-write     # one pair, print only
    python benchmarks/quality.py --across /tmp/seeds/s1 /tmp/seeds/s2
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from offload.edge.agent import load_edge_models
from offload.models import DEMO_REPOSITORY
from offload.oip.repository import CONFIG_FILE, TensorSpec
from offload.router.calibration import (
    Calibration,
    Target,
    calibrate_predictions,
    expected_calibration_error,
    fit_temperature,
    oracle_correct,
    point_for_offload,
    predicted_classes,
    routing_curve,
    wilson_interval,
)
from offload.router.confidence import GATE_OUTPUT, class_confidence, row_confidence, scaled_logits
from offload.router.config import RoutingSection
from offload.router.models import Arrays, RoutedModel
from offload.tools.calibrate import edge_predictions, load_inputs, local_cloud_scores
from offload.tools.gate import GATE_FILE, GateFit, run_gate, train_gate
from results_file import RESULTS, write_section

HEADING = "## Quality (issue 4)"
ACROSS_HEADING = "## Quality across splits (issue 4)"
MACHINE = "2-core CPU"
# What a row's confidence comes from: a class-score measure, or the learned gate on the edge's scores (and inputs).
Method = Literal["max_probability", "margin", "negative_entropy", "gate", "gate + inputs"]
METHODS: tuple[Method, ...] = get_args(Method)
BASELINE: Method = "max_probability"
GATE: Method = "gate + inputs"  # the gate of the second budget table
DEFAULT_MODELS = ("digits", "tabular")
HELD_OUT = "held out: thresholds chosen on validation, measured on test"
# How far from its target a test offload may land and still count as on target, in the across-splits summary.
LANDING_POINTS = 3.0


@dataclass
class Split:
    """One data split with both models' answers."""

    name: str
    inputs: Arrays
    edge: dict[str, npt.NDArray[Any]]
    edge_scores: npt.NDArray[Any]
    cloud_scores: npt.NDArray[Any]
    labels: npt.NDArray[np.int64]

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def edge_correct(self) -> npt.NDArray[np.bool_]:
        return np.asarray(predicted_classes(self.edge_scores) == self.labels)

    @property
    def cloud_correct(self) -> npt.NDArray[np.bool_]:
        return np.asarray(predicted_classes(self.cloud_scores) == self.labels)

    @property
    def edge_accuracy(self) -> float:
        return float(self.edge_correct.mean())

    @property
    def cloud_accuracy(self) -> float:
        return float(self.cloud_correct.mean())

    def gap_recovered(self, correct: int) -> float:
        """(routed - edge) / (cloud - edge) for `correct` routed answers on this split (NaN without a gap)."""
        gap = self.cloud_accuracy - self.edge_accuracy
        return (correct / self.rows - self.edge_accuracy) / gap if gap > 0 else float("nan")


def load_split(repository: Path, model: str, routed: RoutedModel, name: str) -> Split:
    """The `name` split (`name`.npz in the model's folder) with both models' answers."""
    inputs, labels = load_inputs(repository / model / f"{name}.npz", routed.edge.inputs)
    if labels is None:
        raise SystemExit(f"{name}.npz has no labels")
    edge = edge_predictions(routed.edge, inputs)
    cloud = local_cloud_scores(repository, routed.config, inputs, routed.score_output)
    return Split(name, inputs, edge, edge[routed.score_output], cloud, labels)


@dataclass(frozen=True)
class HeldOut:
    """A threshold chosen on the validation split for an offload budget, and what it does on the test split."""

    budget: float
    method: Method
    chosen: Calibration  # on validation: threshold, temperature, validation offload
    test: Split
    offloaded: int  # test rows below the threshold
    correct: int  # test rows routed right (cloud's answer on offloaded rows, the edge's on the rest)
    oracle_router_correct: int  # offloading as many test rows, the edge's mistakes first
    # The oracle threshold: the largest test offload not above the budget, chosen on the test rows themselves.
    oracle_threshold_offloaded: int
    oracle_threshold_correct: int

    @property
    def share(self) -> float:
        return self.offloaded / self.test.rows

    @property
    def accuracy(self) -> float:
        return self.correct / self.test.rows

    @property
    def recovered(self) -> float:
        return self.test.gap_recovered(self.correct)

    @property
    def random_accuracy(self) -> float:
        """Expected test accuracy of offloading the same share of rows at random."""
        return (1 - self.share) * self.test.edge_accuracy + self.share * self.test.cloud_accuracy

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.offloaded, self.test.rows)


@dataclass
class Evaluation:
    """One model's validation and test splits, with both models' answers, and the routing in its model.toml."""

    model: str
    routing: RoutingSection
    score_output: str
    score_spec: TensorSpec
    input_specs: tuple[TensorSpec, ...]
    validation: Split
    test: Split
    _gates: dict[bool, tuple[GateFit, npt.NDArray[np.float64]]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, repository: Path, model: str) -> Evaluation:
        routed = load_edge_models(repository)[model]
        return cls(
            model,
            routed.routing,
            routed.score_output,
            next(spec for spec in routed.edge.outputs if spec.name == routed.score_output),
            routed.edge.inputs,
            load_split(repository, model, routed, "validation"),
            load_split(repository, model, routed, "test"),
        )

    @property
    def headline_budget(self) -> float:
        """Twice the edge's error rate on the validation split (test labels play no part in it)."""
        return 2.0 * (1.0 - self.validation.edge_accuracy)

    def gate(self, read_inputs: bool) -> tuple[GateFit, npt.NDArray[np.float64]]:
        """The gate trained (cross-fitted) on the validation split, and its scores of the test rows."""
        if read_inputs not in self._gates:
            validation = self.validation
            fit = train_gate(
                validation.edge,
                validation.inputs,
                self.score_spec,
                self.routing.output_kind,
                self.input_specs,
                ~validation.edge_correct,
                read_inputs,
            )
            self._gates[read_inputs] = (fit, run_gate(fit.model, self.test.edge, self.test.inputs))
        return self._gates[read_inputs]

    def _sources(self, method: Method) -> tuple[Arrays, Arrays, RoutingSection]:
        """The edge outputs to choose on (validation) and to apply to (test), and the routing, for `method`.
        For the gate, the validation rows carry their out-of-fold scores and the test rows the scores of
        the gate trained on all the validation rows (a gate shipped with the model plays no part)."""
        if method.startswith("gate"):
            fit, test_scores = self.gate(read_inputs=method == "gate + inputs")
            routing = self.routing.model_copy(
                update={"confidence": "gate", "gate": GATE_FILE, "confidence_output": None, "temperature": 1.0}
            )
            return (
                {**self.validation.edge, GATE_OUTPUT: fit.out_of_fold},
                {**self.test.edge, GATE_OUTPUT: test_scores},
                routing,
            )
        routing = self.routing.model_copy(update={"confidence": method, "gate": None})
        return self.validation.edge, self.test.edge, routing

    def held_out(self, budget: float, method: Method = BASELINE) -> HeldOut:
        """Choose temperature and threshold for `budget` on validation (as `offload calibrate` does); apply to test."""
        validation, test = self.validation, self.test
        choose_on, apply_to, base = self._sources(method)
        chosen = calibrate_predictions(
            choose_on,
            validation.cloud_scores,
            validation.labels,
            base,
            self.score_output,
            Target("offload", budget),
        )
        routing = base.model_copy(update={"temperature": chosen.temperature, "threshold": chosen.threshold})
        confidence = row_confidence(apply_to, routing, self.score_output)
        offloaded = confidence < chosen.threshold
        routed = np.where(offloaded, test.cloud_correct, test.edge_correct)
        count = int(offloaded.sum())
        curve = routing_curve(confidence, test.edge_correct, test.cloud_correct)
        oracle_index = point_for_offload(curve, budget)
        return HeldOut(
            budget=budget,
            method=method,
            chosen=chosen,
            test=test,
            offloaded=count,
            correct=int(routed.sum()),
            oracle_router_correct=int(oracle_correct(count, test.edge_correct, test.cloud_correct)),
            oracle_threshold_offloaded=int(curve.offloaded[oracle_index]),
            oracle_threshold_correct=int(curve.correct[oracle_index]),
        )


def _percent(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}%}"


def _oracle_threshold(point: HeldOut) -> str:
    test = point.test
    share = point.oracle_threshold_offloaded / test.rows
    return (
        f"{_percent(share)}, {_percent(point.oracle_threshold_correct / test.rows, 2)}, "
        f"{_percent(test.gap_recovered(point.oracle_threshold_correct), 0)}"
    )


def budget_table(points: list[HeldOut]) -> list[str]:
    """Per budget: the threshold chosen on validation, and its offload, accuracy and gap recovered on test."""
    lines = [
        "| budget | threshold (from validation) | offload on validation | offload on test (95% CI) | test - budget "
        "| routed accuracy | oracle router | random routing | gap recovered "
        "| oracle threshold: offload, accuracy, gap recovered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        low, high = point.interval
        lines.append(
            f"| {_percent(point.budget, 0)} | {point.chosen.threshold!r} | {_percent(point.chosen.offload_rate)} "
            f"| {_percent(point.share)} ({_percent(low)} to {_percent(high)}) "
            f"| {(point.share - point.budget) * 100:+.1f} points | {_percent(point.accuracy, 2)} "
            f"| {_percent(point.oracle_router_correct / point.test.rows, 2)} | {_percent(point.random_accuracy, 2)} "
            f"| {_percent(point.recovered, 0)} | {_oracle_threshold(point)} |"
        )
    return lines


def methods_table(evaluation: Evaluation, budgets: list[float]) -> list[str]:
    """Held-out routed accuracy, gap recovered and test offload per method at each budget, and the oracle router's."""
    lines = [
        "| method | " + " | ".join(f"{_percent(b, 0)} budget" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for method in METHODS:
        cells = []
        for budget in budgets:
            point = evaluation.held_out(budget, method)
            cells.append(f"{_percent(point.accuracy, 2)} ({_percent(point.recovered, 0)}; {_percent(point.share)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    test = evaluation.test
    oracle = [oracle_correct(round(budget * test.rows), test.edge_correct, test.cloud_correct) for budget in budgets]
    cells = [
        f"{_percent(int(correct) / test.rows, 2)} ({_percent(test.gap_recovered(int(correct)), 0)}; {_percent(budget)})"
        for correct, budget in zip(oracle, budgets, strict=True)
    ]
    lines.append(
        "| oracle router (the budget's share of test rows, the edge's mistakes first) | " + " | ".join(cells) + " |"
    )
    return lines


def ece_lines(evaluation: Evaluation) -> list[str]:
    """ECE of the edge's max probability, before (T = 1) and after (T fitted on validation) temperature scaling."""
    kind = evaluation.routing.output_kind
    validation = evaluation.validation
    temperature = fit_temperature(scaled_logits(validation.edge_scores, kind), validation.labels)
    rows = []
    for split in (validation, evaluation.test):
        before = expected_calibration_error(
            class_confidence(split.edge_scores, "max_probability", kind), split.edge_correct
        )
        after = expected_calibration_error(
            class_confidence(split.edge_scores, "max_probability", kind, temperature), split.edge_correct
        )
        rows.append(f"| {split.name} ({split.rows} rows) | {before:.4f} | {after:.4f} |")
    lines = [
        "**Edge calibration error** (ECE of the max softmax probability, 15 equal-width bins; temperature "
        f"{temperature:.4g} fitted on validation by least log loss):",
        "",
        "| split | ECE at temperature 1 | ECE after temperature scaling |",
        "|---|---:|---:|",
        *rows,
    ]
    if abs(temperature - 1.0) < 0.02:
        lines += [
            "",
            "The bundled edge model already has a temperature fitted on this validation split folded into its "
            "weights (models/train_digits.py), so refitting finds about 1 and the error barely moves; on a model "
            "made over- or under-confident (logits x3 or x0.3) the fit recovers 3 or 0.3 and brings the error back "
            "to the values above (tests/test_calibration.py).",
        ]
    return lines


def headline(evaluation: Evaluation) -> str:
    point = evaluation.held_out(evaluation.headline_budget)
    gate = evaluation.held_out(evaluation.headline_budget, GATE)
    error = 1.0 - evaluation.validation.edge_accuracy
    return (
        f"**Headline ({HELD_OUT}).** At a budget of twice the edge's error rate on validation "
        f"(2 x {_percent(error, 2)} = {_percent(point.budget)}), the max-probability threshold chosen on validation "
        f"({point.chosen.threshold!r}) offloads {_percent(point.share)} of the test rows and recovers "
        f"{_percent(point.recovered, 0)} of the edge-to-cloud gap on test ({_percent(point.accuracy, 2)} accurate). "
        f"Oracle threshold (chosen on the test rows themselves, at the same budget): "
        f"{_oracle_threshold(point)} (offload, accuracy, gap recovered). The learned gate on the scores and the "
        f"inputs, at the same budget: {_percent(gate.share)} offloaded, {_percent(gate.recovered, 0)} of the gap "
        f"recovered ({_percent(gate.accuracy, 2)} accurate)."
    )


BUDGET_TABLE_NOTE = (
    "For each budget, the temperature and the threshold are the ones `offload calibrate --target-offload BUDGET` "
    "chooses on the validation split (the largest validation offload not above the budget; ties in confidence move "
    "together); the other columns are that threshold on the test split. The oracle router offloads as many test "
    "rows, the edge's mistakes first; random routing offloads them at random (expected value). Gap recovered: "
    "(routed - edge) / (cloud - edge) on test. The *oracle threshold* is chosen on the test rows themselves (the "
    "largest test offload not above the budget): hindsight, not a deployable figure; it keeps to the budget on test, "
    "which the held-out threshold need not, so it can recover less."
)


def report(evaluation: Evaluation, budgets: list[float], target: float) -> str:
    validation, test = evaluation.validation, evaluation.test
    points = [evaluation.held_out(budget) for budget in sorted({*budgets, target})]
    gate_points = [evaluation.held_out(budget, GATE) for budget in budgets]
    calibrated = next(point for point in points if point.budget == target)
    low, high = calibrated.interval
    difference_se = _difference_se(target, validation.rows, test.rows)
    gate_fit = evaluation.gate(read_inputs=True)[0]
    lines = [
        f"Model `{evaluation.model}`; validation split {validation.rows} rows, test split {test.rows} rows. "
        f"Edge-only accuracy on test {_percent(test.edge_accuracy, 2)} (validation "
        f"{_percent(validation.edge_accuracy, 2)}), cloud-only {_percent(test.cloud_accuracy, 2)} (validation "
        f"{_percent(validation.cloud_accuracy, 2)}). Every figure below is {HELD_OUT}, unless labelled "
        "*oracle threshold*.",
        "",
        headline(evaluation),
        "",
        f"**Accuracy at a cloud budget, max probability ({HELD_OUT}).** {BUDGET_TABLE_NOTE}",
        "",
        *budget_table(points),
        "",
        f"**Accuracy at a cloud budget, learned gate on the scores and the inputs ({HELD_OUT}).** The gate: "
        f"{gate_fit.describe()} (least out-of-fold log loss), trained on the {gate_fit.rows} validation rows "
        f"({gate_fit.wrong} with the edge wrong) and cross-fitted ({gate_fit.folds} folds): its threshold is chosen "
        "on the validation rows' out-of-fold scores, and the gate trained on every validation row scores the test "
        "rows. Columns as above.",
        "",
        *budget_table(gate_points),
        "",
        f"**Methods ({HELD_OUT})**: routed test accuracy (gap recovered; test offload) at each budget, temperature "
        "(class-score measures) and threshold chosen on validation for each method. *gate*: the learned gate on the "
        "edge's scores alone; *gate + inputs*: on the scores and the inputs.",
        "",
        *methods_table(evaluation, budgets),
        "",
        f"**Calibration target {_percent(target)}, max probability ({HELD_OUT}).** "
        f"`offload calibrate --target-offload {target:g}` on "
        f"the {validation.rows} validation rows chooses threshold {calibrated.chosen.threshold!r}, temperature "
        f"{calibrated.chosen.temperature:g}; expected offload on validation "
        f"{_percent(calibrated.chosen.offload_rate)}. "
        f"On test: offload {_percent(calibrated.share)} (95% CI {_percent(low)} to {_percent(high)}; "
        f"{calibrated.offloaded} of {test.rows} rows), {(calibrated.share - target) * 100:+.1f} points from the "
        f"target; routed accuracy {_percent(calibrated.accuracy, 2)}. One standard error of the difference between "
        f"two such samples' offload shares at {_percent(target, 0)} is {difference_se:.1f} points.",
        "",
        *ece_lines(evaluation),
    ]
    return "\n".join(lines)


def comparison(evaluations: list[Evaluation], budgets: list[float], focus: float) -> str:
    """The learned gate against max probability on every pair: gap recovered per budget, and the ratio at `focus`."""
    lines = [
        f"**Learned gate vs max probability ({HELD_OUT}).** Share of the edge-to-cloud gap recovered on test "
        "(test offload), each method's threshold chosen on validation for the budget; the gates trained on "
        "validation only, cross-fitted (see each model's gate table).",
        "",
        "| model | budget | max_probability | gate (scores) | gate + inputs | oracle router |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    verdicts: list[str] = []
    at_least: dict[Method, int] = {"gate": 0, "gate + inputs": 0}
    pairs = 0
    for evaluation in evaluations:
        test = evaluation.test
        for budget in budgets:
            points = {method: evaluation.held_out(budget, method) for method in (BASELINE, "gate", "gate + inputs")}
            oracle = int(oracle_correct(round(budget * test.rows), test.edge_correct, test.cloud_correct))
            lines.append(
                f"| {evaluation.model} | {_percent(budget, 0)} | "
                + " | ".join(f"{_percent(p.recovered, 0)} ({_percent(p.share)})" for p in points.values())
                + f" | {_percent(test.gap_recovered(oracle), 0)} |"
            )
            pairs += 1
            for method in at_least:
                at_least[method] += points[method].recovered >= points[BASELINE].recovered
            if budget == focus:
                base, gate = points[BASELINE].recovered, points["gate + inputs"].recovered
                ratio = f"{gate / base:.2f}x" if base > 0 else "n/a: max probability recovers nothing"
                verdicts.append(
                    f"`{evaluation.model}`: the gate on scores and inputs recovers {_percent(gate, 0)} of the gap "
                    f"against max probability's {_percent(base, 0)} ({ratio}); on scores alone "
                    f"{_percent(points['gate'].recovered, 0)}"
                )
    lines += [
        "",
        f"At a {_percent(focus, 0)} budget: " + "; ".join(verdicts) + ". Across the "
        f"{pairs} (model, budget) cells above, the gate on scores and inputs recovers at least as much as max "
        f"probability in {at_least['gate + inputs']}, the gate on scores alone in {at_least['gate']}.",
    ]
    return "\n".join(lines)


def _difference_se(share: float, rows_a: int, rows_b: int) -> float:
    """One standard error, in points, of the difference between two independent samples' shares."""
    return 100 * math.sqrt(share * (1 - share) * (1 / rows_a + 1 / rows_b))


def split_label(repository: Path, model: str) -> str:
    """The seed models/train_digits.py wrote into the model.toml's first line, else the folder's name."""
    found = re.search(r"\(seed (\d+)\)", (repository / model / CONFIG_FILE).read_text())
    return found.group(1) if found else repository.name


def across_report(evaluations: list[tuple[str, Evaluation]], targets: list[float], target: float) -> str:
    """Per split: the held-out headline (and the oracle threshold's), and the test offload at each target."""
    lines = [
        "| seed | edge (test) | cloud (test) | budget: 2x validation edge error | test offload there "
        "| gap recovered there | oracle threshold: gap recovered | "
        + " | ".join(f"test offload at target {_percent(t, 0)}" for t in targets)
        + " |",
        "|---:|" + "---:|" * (6 + len(targets)),
    ]
    recovered: list[float] = []
    oracle: list[float] = []
    landings: list[float] = []
    excess: list[float] = []  # test offload over the headline budget, in points
    for label, evaluation in evaluations:
        point = evaluation.held_out(evaluation.headline_budget)
        shares = {t: evaluation.held_out(t).share for t in targets}
        recovered.append(point.recovered)
        oracle.append(point.test.gap_recovered(point.oracle_threshold_correct))
        landings.append(shares[target])
        excess.append((point.share - point.budget) * 100)
        test = evaluation.test
        lines.append(
            f"| {label} | {_percent(test.edge_accuracy, 2)} | {_percent(test.cloud_accuracy, 2)} "
            f"| {_percent(point.budget)} | {_percent(point.share)} | {_percent(point.recovered, 0)} "
            f"| {_percent(oracle[-1], 0)} | " + " | ".join(_percent(shares[t]) for t in targets) + " |"
        )
    on_target = [share for share in landings if abs(share - target) * 100 <= LANDING_POINTS]
    above = sum(share > target for share in landings)
    first = evaluations[0][1]
    summary = (
        f"Held out, at twice the validation edge error rate, routing recovers {_percent(min(recovered), 0)} to "
        f"{_percent(max(recovered), 0)} of the gap on test across the {len(evaluations)} splits (mean "
        f"{_percent(float(np.mean(recovered)), 0)}), with a test offload above that budget on "
        f"{sum(points > 0 for points in excess)} of them (by up to {max(excess):.1f} points); the oracle "
        "threshold, chosen on each test split itself, "
        f"{_percent(min(oracle), 0)} to {_percent(max(oracle), 0)} (mean {_percent(float(np.mean(oracle)), 0)}). "
        f"Calibrated to {_percent(target, 0)} on validation, the test offload lands within {LANDING_POINTS:g} points "
        f"on {len(on_target)} of the {len(landings)} splits ({_percent(min(landings))} to {_percent(max(landings))}; "
        f"mean {_percent(float(np.mean(landings)))}; {above} above the target, {len(landings) - above} below); one "
        f"standard error of the difference between a {first.validation.rows}-row and a {first.test.rows}-row "
        f"sample's share is {_difference_se(target, first.validation.rows, first.test.rows):.1f} points."
    )
    return "\n".join(lines) + "\n\n" + summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Quality benchmark, held out (thresholds chosen on validation, measured on test): routed vs "
        "oracle vs random accuracy at offload budgets on the demo models; calibration target vs achieved offload; "
        "ECE before/after temperature scaling. With --across, the headline on other splits."
    )
    parser.add_argument("--model-repository", type=Path, default=DEMO_REPOSITORY, help="default: the bundled demo")
    parser.add_argument(
        "--model",
        nargs="+",
        help="model folders with validation.npz and test.npz (default: digits and tabular; with --across: digits)",
    )
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=[0.05, 0.10, 0.20, 0.30], help="offload budgets (shares)"
    )
    parser.add_argument("--target-offload", type=float, default=0.15, help="calibration target on validation (0.15)")
    parser.add_argument(
        "--focus", type=float, default=0.2, help="the budget at which the gate is compared with max probability (0.2)"
    )
    parser.add_argument(
        "--across",
        type=Path,
        nargs="+",
        metavar="REPOSITORY",
        help="other repositories (models/train_digits.py --seed N --out REPOSITORY/digits): write the across-splits "
        "section, the --model-repository first, instead of the main one",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write (benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    options = parser.parse_args(argv)

    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    import onnxruntime
    import torch

    versions = (
        f"Python {platform.python_version()}, ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__}, "
        "cloud model on the CPU"
    )
    today = datetime.date.today().isoformat()
    if options.across:
        models = options.model or ["digits"]
        if len(models) != 1:
            parser.error("--across takes one model")
        repositories = [options.model_repository, *options.across]
        evaluations = [(split_label(r, models[0]), Evaluation.load(r, models[0])) for r in repositories]
        heading = ACROSS_HEADING
        report_text = (
            f"The headline and the calibration landing on {len(repositories)} random splits, each with its own models "
            "trained from scratch on its own train split, thresholds and temperature chosen on its own validation "
            f"split and measured on its own test split ({HELD_OUT}), to tell the method from the luck of one split. "
            "Each repository was written by `python models/train_digits.py --seed N --out REPOSITORY/digits` (N in "
            f"the table). Command: `{command}`; run {today} on a {MACHINE} ({versions}).\n\n"
            + across_report(evaluations, sorted({*options.budgets, options.target_offload}), options.target_offload)
        )
    else:
        heading = HEADING
        budgets = sorted({*options.budgets, options.focus})
        models = [Evaluation.load(options.model_repository, model) for model in options.model or DEFAULT_MODELS]
        report_text = (
            f"Command: `{command}`; run {today} on a {MACHINE} ({versions}). Deterministic: the same models and data "
            "give the same figures.\n\n"
            + comparison(models, budgets, options.focus)
            + "".join(
                f"\n\n### Model `{evaluation.model}`\n\n" + report(evaluation, budgets, options.target_offload)
                for evaluation in models
            )
        )
    print(f"{heading}\n\n{report_text}")
    if not options.no_write:
        write_section(options.results, heading, report_text)
        print(f"\nwritten to {options.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
