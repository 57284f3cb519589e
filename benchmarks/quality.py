"""Quality benchmark (issue 4): what routing by confidence buys at a given cloud budget, on the demo models.

On the held-out test split of the bundled `digits` model, for offload budgets of
5, 10, 20 and 30% it reports the routed accuracy (the threshold set so that the
share of test rows sent to the cloud is the largest not above the budget), the
oracle's accuracy at the same share (it offloads exactly the edge's mistakes
first), random routing's expected accuracy, and the share of the edge-to-cloud
accuracy gap recovered. It also calibrates on the validation split
(`offload calibrate --target-offload 0.15`, in-process) and reports the offload
that threshold achieves on the test split, and the edge model's expected
calibration error before and after temperature scaling.

Both models run here (edge: ONNX Runtime; cloud: PyTorch on the CPU). The
markdown it prints goes into benchmarks/RESULTS.md under "## Quality (issue 4)"
(that section is replaced; the rest of the file is kept).

    python benchmarks/quality.py                # print and write benchmarks/RESULTS.md
    python benchmarks/quality.py --no-write     # print only
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.edge.agent import load_edge_models
from offload.models import DEMO_REPOSITORY
from offload.router.calibration import (
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
from offload.router.confidence import class_confidence, row_confidence, scaled_logits
from offload.router.config import ConfidenceMeasure, RoutingSection
from offload.tools.calibrate import edge_predictions, load_inputs, local_cloud_scores
from results_file import RESULTS, write_section

HEADING = "## Quality (issue 4)"
MACHINE = "2-core CPU"
MEASURES: tuple[ConfidenceMeasure, ...] = ("max_probability", "margin", "negative_entropy")


@dataclass
class Split:
    """One data split with both models' answers."""

    name: str
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


def load_split(repository: Path, model: str, name: str) -> Split:
    routed = load_edge_models(repository)[model]
    inputs, labels = load_inputs(repository / model / f"{name}.npz", routed.edge.inputs)
    if labels is None:
        raise SystemExit(f"{name}.npz has no labels")
    edge = edge_predictions(routed.edge, inputs)
    cloud = local_cloud_scores(repository, routed.config, inputs, routed.score_output)
    return Split(name, edge, edge[routed.score_output], cloud, labels)


def _percent(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}%}"


def budget_table(
    split: Split, routing: RoutingSection, score_output: str, budgets: list[float]
) -> tuple[list[str], dict[str, Any]]:
    """Routed / oracle / random accuracy and gap recovered at each budget, on one split."""
    edge_accuracy = float(split.edge_correct.mean())
    cloud_accuracy = float(split.cloud_correct.mean())
    gap = cloud_accuracy - edge_accuracy
    confidence = row_confidence(split.edge, routing, score_output)
    curve = routing_curve(confidence, split.edge_correct, split.cloud_correct)
    lines = [
        "| budget | offloaded | threshold | routed accuracy | oracle accuracy | random routing | gap recovered "
        "| oracle gap recovered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    figures: dict[str, Any] = {}
    for budget in budgets:
        index = point_for_offload(curve, budget)
        offloaded = int(curve.offloaded[index])
        share = offloaded / split.rows
        routed = float(curve.accuracy[index])
        oracle = int(oracle_correct(offloaded, split.edge_correct, split.cloud_correct)) / split.rows
        random = (1 - share) * edge_accuracy + share * cloud_accuracy
        recovered = (routed - edge_accuracy) / gap if gap > 0 else float("nan")
        oracle_recovered = (oracle - edge_accuracy) / gap if gap > 0 else float("nan")
        figures[f"{budget:.2f}"] = {"offload": share, "routed": routed, "recovered": recovered}
        lines.append(
            f"| {_percent(budget, 0)} | {_percent(share)} ({offloaded}) | {float(curve.thresholds[index])!r} "
            f"| {_percent(routed, 2)} | {_percent(oracle, 2)} | {_percent(random, 2)} | {_percent(recovered, 0)} "
            f"| {_percent(oracle_recovered, 0)} |"
        )
    figures["edge"], figures["cloud"] = edge_accuracy, cloud_accuracy
    return lines, figures


def measures_table(split: Split, routing: RoutingSection, score_output: str, budgets: list[float]) -> list[str]:
    """Gap recovered per confidence measure at each budget."""
    edge_accuracy = float(split.edge_correct.mean())
    gap = float(split.cloud_correct.mean()) - edge_accuracy
    lines = [
        "| measure | " + " | ".join(f"{_percent(b, 0)} budget" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for measure in MEASURES:
        section = routing.model_copy(update={"confidence": measure})
        curve = routing_curve(
            row_confidence(split.edge, section, score_output), split.edge_correct, split.cloud_correct
        )
        cells = []
        for budget in budgets:
            accuracy = float(curve.accuracy[point_for_offload(curve, budget)])
            cells.append(f"{_percent(accuracy, 2)} ({_percent((accuracy - edge_accuracy) / gap, 0)})")
        lines.append(f"| {measure} | " + " | ".join(cells) + " |")
    return lines


def held_out_table(
    validation: Split, test: Split, base: RoutingSection, score_output: str, targets: list[float]
) -> list[str]:
    """Per offload target: the threshold `offload calibrate` picks on validation, and what it does on test."""
    edge_accuracy, cloud_accuracy = float(test.edge_correct.mean()), float(test.cloud_correct.mean())
    lines = [
        "| target | threshold | offload on validation | offload on test (95% CI) | test - target "
        "| routed accuracy on test | gap recovered on test |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in targets:
        calibration = calibrate_predictions(
            validation.edge, validation.cloud_scores, validation.labels, base, score_output, Target("offload", target)
        )
        routing = base.model_copy(update={"temperature": calibration.temperature, "threshold": calibration.threshold})
        offloaded = row_confidence(test.edge, routing, score_output) < calibration.threshold
        share = float(offloaded.mean())
        low, high = wilson_interval(int(offloaded.sum()), test.rows)
        routed = float(np.where(offloaded, test.cloud_correct, test.edge_correct).mean())
        recovered = (routed - edge_accuracy) / (cloud_accuracy - edge_accuracy)
        lines.append(
            f"| {_percent(target, 0)} | {calibration.threshold!r} | {_percent(calibration.offload_rate)} "
            f"| {_percent(share)} ({_percent(low)} to {_percent(high)}) | {(share - target) * 100:+.1f} points "
            f"| {_percent(routed, 2)} | {_percent(recovered, 0)} |"
        )
    return lines


def run(repository: Path, model: str, budgets: list[float], target: float) -> tuple[str, dict[str, Any]]:
    routed = load_edge_models(repository)[model]
    base = routed.routing
    score_output = routed.score_output
    validation = load_split(repository, model, "validation")
    test = load_split(repository, model, "test")

    # Calibrate on validation (what `offload calibrate --target-offload` does), apply on test.
    calibration = calibrate_predictions(
        validation.edge, validation.cloud_scores, validation.labels, base, score_output, Target("offload", target)
    )
    routing = base.model_copy(update={"temperature": calibration.temperature, "threshold": calibration.threshold})
    test_confidence = row_confidence(test.edge, routing, score_output)
    test_offloaded = test_confidence < calibration.threshold
    test_routed = np.where(test_offloaded, test.cloud_correct, test.edge_correct)
    low, high = wilson_interval(int(test_offloaded.sum()), test.rows)

    budget_lines, figures = budget_table(test, routing, score_output, budgets)
    held_out_lines = held_out_table(validation, test, base, score_output, sorted({*budgets, target}))
    measure_lines = measures_table(test, routing, score_output, budgets)

    # ECE of the edge's max probability, before (T = 1) and after (T fitted on validation) temperature scaling.
    temperature = fit_temperature(scaled_logits(validation.edge_scores, base.output_kind), validation.labels)
    ece_rows = []
    for split in (validation, test):
        before = expected_calibration_error(
            class_confidence(split.edge_scores, "max_probability", base.output_kind), split.edge_correct
        )
        after = expected_calibration_error(
            class_confidence(split.edge_scores, "max_probability", base.output_kind, temperature), split.edge_correct
        )
        ece_rows.append(f"| {split.name} ({split.rows} rows) | {before:.4f} | {after:.4f} |")

    edge_error = 1.0 - figures["edge"]
    done_budget = 2.0 * edge_error
    done_curve = routing_curve(test_confidence, test.edge_correct, test.cloud_correct)
    done_index = point_for_offload(done_curve, done_budget)
    done_recovered = (done_curve.accuracy[done_index] - figures["edge"]) / (figures["cloud"] - figures["edge"])

    lines = [
        f"Model `{model}`; test split {test.rows} rows, validation split {validation.rows} rows. "
        f"Edge-only accuracy on test {_percent(figures['edge'], 2)}, cloud-only {_percent(figures['cloud'], 2)}. "
        f"Confidence: `{base.confidence}`, temperature {calibration.temperature:g} (fitted on validation).",
        "",
        "**Accuracy at a cloud budget (test split).** For each budget the threshold is the one whose offload share "
        "on the test rows is the largest not above the budget (ties in confidence move together). The oracle "
        "offloads the same number of rows, the edge's mistakes first; random routing offloads them at random "
        "(expected value). Gap recovered: (routed - edge) / (cloud - edge); the oracle can recover more than "
        "all of it, since it keeps on the edge the rows only the edge gets right.",
        "",
        *budget_lines,
        "",
        f"At an offload of at most twice the edge's error rate ({_percent(done_budget)}), routing recovers "
        f"{_percent(done_recovered, 0)} of the edge-to-cloud gap "
        f"({_percent(float(done_curve.offload_share[done_index]))} offloaded, "
        f"{_percent(float(done_curve.accuracy[done_index]), 2)} accurate).",
        "",
        "**Confidence measures (test split)**: routed accuracy (gap recovered) at each budget, same temperature.",
        "",
        *measure_lines,
        "",
        f"**Calibration on validation, applied to test.** Target offload {_percent(target)}: threshold "
        f"{calibration.threshold!r}, temperature {calibration.temperature:g}; expected offload on validation "
        f"{_percent(calibration.offload_rate)}. On test: offload {_percent(float(test_offloaded.mean()))} "
        f"(95% CI {_percent(low)} to {_percent(high)}; {int(test_offloaded.sum())} of {test.rows} rows), "
        f"{(float(test_offloaded.mean()) - target) * 100:+.1f} points from the target; routed accuracy "
        f"{_percent(float(test_routed.mean()), 2)}.",
        "",
        "The same for other targets (threshold chosen on the 269 validation rows, applied to the 450 test rows; "
        "one standard error of the difference between two such samples is about 3 points at 15-30%):",
        "",
        *held_out_lines,
        "",
        "**Edge calibration error** (ECE of the max softmax probability, 15 equal-width bins; temperature "
        f"{temperature:.4g} fitted on validation by least log loss):",
        "",
        "| split | ECE at temperature 1 | ECE after temperature scaling |",
        "|---|---:|---:|",
        *ece_rows,
    ]
    if abs(temperature - 1.0) < 0.02:
        lines += [
            "",
            "The bundled edge model already has a temperature fitted on this validation split folded into its "
            "weights (models/train_digits.py), so refitting finds about 1 and the error barely moves; on a model "
            "made over- or under-confident (logits x3 or x0.3) the fit recovers 3 or 0.3 and brings the error back "
            "to the values above (tests/test_calibration.py).",
        ]
    summary = {
        "test_offload": float(test_offloaded.mean()),
        "temperature": calibration.temperature,
        "threshold": calibration.threshold,
        "done_recovered": float(done_recovered),
    }
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Quality benchmark: routed vs oracle vs random accuracy at offload budgets on the demo "
        "models; calibration target vs achieved offload on held-out data; ECE before/after temperature scaling."
    )
    parser.add_argument("--model-repository", type=Path, default=DEMO_REPOSITORY, help="default: the bundled demo")
    parser.add_argument("--model", default="digits", help="model folder with validation.npz and test.npz (digits)")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=[0.05, 0.10, 0.20, 0.30], help="offload budgets (shares)"
    )
    parser.add_argument("--target-offload", type=float, default=0.15, help="calibration target on validation (0.15)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write (benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    options = parser.parse_args(argv)

    body, _ = run(options.model_repository, options.model, options.budgets, options.target_offload)
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    import onnxruntime
    import torch

    header = (
        f"Command: `{command}`; run {datetime.date.today().isoformat()} on a {MACHINE} "
        f"(Python {platform.python_version()}, ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__}, "
        "cloud model on the CPU). Deterministic: the same models and data give the same figures."
    )
    report = f"{header}\n\n{body}"
    print(f"{HEADING}\n\n{report}")
    if not options.no_write:
        write_section(options.results, HEADING, report)
        print(f"\nwritten to {options.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
