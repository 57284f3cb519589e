"""Distillation benchmark: what `offload distill` on recorded cloud answers buys an edge model trained on little data.

    python benchmarks/distillation.py [--seeds 0 1 2 3 4] [--labelled-share 0.1] [--target-accuracy 0.99]
                                      [--write-results]

End to end, with real processes, once per seed:

1. The digits data split as models/train_digits.py splits it (its `load_splits`: scikit-learn's bundled digits,
   stratified 60% train, 15% validation, 25% test, seed 0: the split the bundled cloud model was trained on).
2. The weak start: the digits student MLP (offload.models.students) trained on a small stratified share of the
   train split with its labels (the seed picks the share and the initialisation); threshold and temperature
   chosen on validation by `offload calibrate`'s code for a routed accuracy target.
3. Device traffic: the rest of the train split, without labels, through a real `offload edge` process started with
   `--record-dir`, in front of a real `offload cloud` process (the bundled cloud model, one for every seed); the
   rows the weak model is unsure of go to the cloud and are recorded with its answers.
4. `offload distill` once (its Python entry point) on the recordings and the labelled share, calibrated on
   validation for the same target.
5. Held out: thresholds are chosen on validation, every figure is measured on test: edge accuracy, agreement with
   the cloud, the offload share a routed accuracy target takes and the routed accuracy an offload budget gives,
   before and after; per seed and their mean.

Needs torch, onnxruntime and scikit-learn (`pip install -c constraints.txt scikit-learn`). With --write-results the
report replaces its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from sklearn.model_selection import train_test_split
from train_digits import Splits, load_splits

from offload.edge.agent import load_edge_models
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.repository import load_repository
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.router.calibration import Target, calibrate_predictions, predicted_classes
from offload.router.confidence import class_confidence
from offload.router.models import RoutedModel
from offload.tools.calibrate import CalibrateOptions, edge_predictions, local_cloud_scores, run_calibrate
from offload.tools.distill import (
    DistillOptions,
    Rows,
    StudentIO,
    Training,
    build_student,
    export_onnx,
    run_distill,
    train_student,
)
from offload.tools.process import ServerProcess
from results_file import RESULTS, write_section

SECTION = "## Distillation (edge model from recorded cloud answers)"
FACTORY = "offload.models.students:digits_mlp"
MODEL = "digits"
SPLIT_SEED = 0  # the bundled cloud model's split: its validation and test rows are held out from it too
TRAFFIC_ROWS_PER_REQUEST = 16
# The weak start: as long as it takes to fit its few rows (full batches, about 400 steps).
WEAK_TRAINING = Training(epochs=200, learning_rate=1e-2, batch_size=64)
BUDGETS = (0.1, 0.2, 0.3)

Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class Shared:
    """What every seed shares: the splits, the files, the cloud's answers, the running cloud."""

    splits: Splits
    validation: Path  # validation.npz (inputs, labels)
    test: Path
    validation_inputs: Arrays
    test_inputs: Arrays
    clouds: tuple[npt.NDArray[Any], npt.NDArray[Any]]  # the cloud's scores on validation and test
    labels: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
    cloud: str  # the running cloud's address


@dataclass(frozen=True)
class Measured:
    """One edge model's outputs on validation and test."""

    routed: RoutedModel
    validation: Arrays
    test: Arrays

    @classmethod
    def of(cls, repository: Path, shared: Shared) -> Measured:
        routed = load_edge_models(repository)[MODEL]
        return cls(
            routed,
            edge_predictions(routed.edge, shared.validation_inputs),
            edge_predictions(routed.edge, shared.test_inputs),
        )

    @property
    def test_classes(self) -> npt.NDArray[np.int64]:
        return predicted_classes(self.test[self.routed.score_output])


@dataclass(frozen=True)
class HeldOut:
    """A threshold and temperature chosen on validation for a target, measured on test."""

    threshold: float
    temperature: float
    offload: float
    accuracy: float


def held_out(model: Measured, shared: Shared, target: Target) -> HeldOut:
    score, routing = model.routed.score_output, model.routed.routing
    chosen = calibrate_predictions(model.validation, shared.clouds[0], shared.labels[0], routing, score, target)
    confidence = class_confidence(model.test[score], routing.confidence, routing.output_kind, chosen.temperature)
    offload = confidence < chosen.threshold
    routed = np.where(offload, predicted_classes(shared.clouds[1]), model.test_classes)
    return HeldOut(
        chosen.threshold, chosen.temperature, float(offload.mean()), float(np.mean(routed == shared.labels[1]))
    )


@dataclass(frozen=True)
class SeedRun:
    seed: int
    labelled: int
    traffic: int
    offloaded: int  # traffic rows the agent sent to the cloud
    recording: str  # the agent's last status line's recording part
    trained: int  # recorded rows distill trained on
    before: Measured
    after: Measured


def run_seed(seed: int, shared: Shared, options: argparse.Namespace, root: Path) -> SeedRun:
    weak, records, out = root / "weak", root / "records", root / "distilled"
    target = Target("accuracy", options.target_accuracy)
    train = shared.splits.train
    traffic, labelled_x, _, labelled_y = train_test_split(
        train.inputs, train.labels, test_size=options.labelled_share, stratify=train.labels, random_state=seed
    )
    traffic = traffic.astype(np.float32)
    labelled = root / "labelled.npz"
    np.savez(labelled, inputs=labelled_x, labels=labelled_y)
    weights = write_weak_start(weak, Rows({"pixels": labelled_x.astype(np.float32)}, labelled_y), seed)
    print(f"seed {seed}: the weak start, calibrated on validation:", file=sys.stderr)
    run_calibrate(CalibrateOptions(weak, MODEL, shared.validation, target, cloud=shared.cloud))
    offloaded, recording = record(weak, records, traffic, shared.cloud)
    result = run_distill(
        DistillOptions(
            repository=weak,
            model=MODEL,
            records=records,
            data=shared.validation,
            target=target,
            out=out,
            weights=weights if options.from_weak else None,
            labelled=labelled,
            training=Training(epochs=options.epochs, alpha=options.alpha, seed=seed),
            cloud=shared.cloud,
            device="cpu",
        )
    )
    return SeedRun(
        seed,
        len(labelled_y),
        len(traffic),
        offloaded,
        recording,
        result.trained_rows,
        Measured.of(weak, shared),
        Measured.of(out, shared),
    )


def write_weak_start(repository: Path, labelled: Rows, seed: int) -> Path:
    """The weak edge model in repository/digits, the bundled model's files beside it; returns its weights."""
    folder = repository / MODEL
    folder.mkdir(parents=True)
    for name in ("model.toml", "cloud.pt2"):
        shutil.copyfile(DEMO_REPOSITORY / MODEL / name, folder / name)
    with (folder / "model.toml").open("a") as toml:
        toml.write(f'\n[distill]\nfactory = "{FACTORY}"\n')
    io = StudentIO.of(load_repository(repository)[MODEL])
    module = build_student(FACTORY, None, seed)
    train_student(module, io, None, labelled, Training(**{**WEAK_TRAINING.__dict__, "seed": seed}), torch.device("cpu"))
    export_onnx(module, io, {"pixels": labelled.inputs["pixels"][:8]}, folder / "edge.onnx")
    weights = repository.parent / "weak.pt"
    torch.save(module.state_dict(), weights)
    return weights


async def send_traffic(address: str, pixels: npt.NDArray[np.float32]) -> int:
    """The rows as device traffic, TRAFFIC_ROWS_PER_REQUEST a request; returns the rows the agent offloaded."""
    offloaded = 0
    async with OipClient(address) as client:
        await client.wait_for_ready(timeout=30.0)
        for start in range(0, len(pixels), TRAFFIC_ROWS_PER_REQUEST):
            rows = pixels[start : start + TRAFFIC_ROWS_PER_REQUEST]
            request = InferRequest(model_name=MODEL, inputs=[Tensor.of("pixels", rows)])
            response = await client.infer(request, timeout=30.0)
            offloaded += int(response.parameters.get("offload_offloaded_rows", 0))
    return offloaded


def record(repository: Path, records: Path, traffic: npt.NDArray[np.float32], cloud: str) -> tuple[int, str]:
    """The traffic through a real edge agent recording in front of the cloud: the rows it offloaded and the
    recording part of its last status line."""
    arguments = ["edge", "--grpc-port", "0", "--model-repository", str(repository), "--cloud", cloud]
    with ServerProcess([*arguments, "--record-dir", str(records)]) as edge:
        offloaded = asyncio.run(send_traffic(edge.start(), traffic))
        if edge.terminate() != 0:
            raise SystemExit(f"the edge agent did not stop cleanly:\n{edge.output()}")
        line = edge.wait_for_output("status over the last")
    return offloaded, line.split("recording: ", 1)[1].strip()


def prepare(root: Path, cloud: str) -> Shared:
    splits = load_splits(SPLIT_SEED)
    validation, test = root / "validation.npz", root / "test.npz"
    np.savez(validation, inputs=splits.validation.inputs, labels=splits.validation.labels)
    np.savez(test, inputs=splits.test.inputs, labels=splits.test.labels)
    validation_inputs, test_inputs = {"pixels": splits.validation.pixels}, {"pixels": splits.test.pixels}
    config = load_edge_models(DEMO_REPOSITORY)[MODEL].config
    clouds = (
        local_cloud_scores(DEMO_REPOSITORY, config, validation_inputs, "scores"),
        local_cloud_scores(DEMO_REPOSITORY, config, test_inputs, "scores"),
    )
    labels = (splits.validation.labels, splits.test.labels)
    return Shared(splits, validation, test, validation_inputs, test_inputs, clouds, labels, cloud)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="one run per seed (0 1 2 3 4): the labelled share, the initialisations, the batches",
    )
    parser.add_argument(
        "--labelled-share", type=float, default=0.1, help="share of the train split the weak start learns from (0.1)"
    )
    parser.add_argument(
        "--target-accuracy", type=float, default=0.99, help="routed accuracy the agent's thresholds are for (0.99)"
    )
    parser.add_argument(
        "--targets", type=float, nargs="+", default=[0.97, 0.98, 0.99], help="routed accuracies of the table"
    )
    parser.add_argument("--epochs", type=int, default=100, help="distillation epochs (100)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the labelled rows in distillation (0.5)")
    parser.add_argument("--from-weak", action="store_true", help="distill from the weak start's weights, not scratch")
    parser.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in {RESULTS.name}")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs: list[SeedRun] = []
    with (
        tempfile.TemporaryDirectory(prefix="offload-distillation-") as scratch,
        ServerProcess(["cloud", "--grpc-port", "0", "--device", "cpu", "--log-level", "WARNING"]) as cloud,
    ):
        shared = prepare(Path(scratch), cloud.start())
        for seed in options.seeds:
            folder = Path(scratch) / f"seed-{seed}"
            folder.mkdir()
            runs.append(run_seed(seed, shared, options, folder))
    report = _report(options, shared, runs)
    elapsed = time.perf_counter() - started
    print(report)
    if options.write_results:
        command = shlex.join(["python", "benchmarks/distillation.py", *(sys.argv[1:] if argv is None else argv)])
        body = (
            f"Command: `{command}`; run {datetime.date.today()} on a 2-core CPU in {elapsed:.0f} s (Python "
            f"{platform.python_version()}, ONNX Runtime {ort.__version__}, torch {torch.__version__}, one torch "
            "thread, cloud model on the CPU). Deterministic for the seeds on one machine.\n\n" + report
        )
        write_section(RESULTS, SECTION, body)
    return 0


def _percent(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def _cells(row: tuple[float, ...]) -> str:
    """Edge accuracy, agreement, offload and routed accuracy, each as "before → after" cells."""
    digits = (2, 2, 1, 2)
    return " | ".join(
        f"{_percent(row[2 * i], places)} → {_percent(row[2 * i + 1], places)}" for i, places in enumerate(digits)
    )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def _report(options: argparse.Namespace, shared: Shared, runs: list[SeedRun]) -> str:
    labels, clouds = shared.labels, shared.clouds
    cloud_accuracy = float(np.mean(predicted_classes(clouds[1]) == labels[1]))
    cloud_classes = predicted_classes(clouds[1])
    target = Target("accuracy", options.target_accuracy)
    first = runs[0]
    lines = [
        "Held out: thresholds chosen on validation, every figure measured on test "
        f"({len(labels[1])} rows; cloud-only accuracy {_percent(cloud_accuracy, 2)}). The digits data are split as "
        f"`models/train_digits.py` splits them (seed {SPLIT_SEED}: {len(shared.splits.train)} train, "
        f"{len(labels[0])} validation, {len(labels[1])} test rows). Per seed, the weak start is the student MLP "
        f"(`{FACTORY}`, 64-32-10) trained on {first.labelled} labelled train rows "
        f"({_percent(options.labelled_share, 0)}, stratified, picked by the seed); the other {first.traffic} train "
        f"rows, without labels, went as device traffic through a real `offload edge --record-dir` in front of a real "
        f"`offload cloud`, {TRAFFIC_ROWS_PER_REQUEST} rows a request, routed at the weak start's threshold for "
        f"{_percent(options.target_accuracy)} routed accuracy on validation; the rows it sent to the cloud were "
        f"recorded. `offload distill` then trained the same architecture "
        f"{'from the weak start' if options.from_weak else 'from scratch'} on 90% of them (10% held out for its "
        f"agreement report), with the cloud's outputs as soft targets (temperature 4) and the labelled rows "
        f"(alpha {options.alpha:g}), {options.epochs} epochs, and calibrated it on validation for the same target.",
        "",
        f"**At the agent's target, {_percent(options.target_accuracy)} routed accuracy on validation**, before → "
        "after distillation:",
        "",
        "| seed | traffic to the cloud | edge accuracy | agreement with the cloud | offload on test | "
        "routed accuracy on test |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    columns: list[tuple[float, ...]] = []
    for run in runs:
        before, after = held_out(run.before, shared, target), held_out(run.after, shared, target)
        row = (
            float(np.mean(run.before.test_classes == labels[1])),
            float(np.mean(run.after.test_classes == labels[1])),
            float(np.mean(run.before.test_classes == cloud_classes)),
            float(np.mean(run.after.test_classes == cloud_classes)),
            before.offload,
            after.offload,
            before.accuracy,
            after.accuracy,
        )
        columns.append(row)
        # The agent's own count: "519 rows (0 dropped)".
        recorded = run.recording.split(",", 1)[0]
        lines.append(f"| {run.seed} | {_percent(run.offloaded / run.traffic)}; recorded {recorded} | {_cells(row)} |")
    means = tuple(_mean(column) for column in zip(*columns, strict=True))
    lines.append(f"| mean | {_percent(_mean([run.offloaded / run.traffic for run in runs]))} | {_cells(means)} |")
    allowed = int((1.0 - options.target_accuracy) * len(labels[0]) + 1e-9)
    lines += [
        "",
        f"Mean over the {len(runs)} seeds: edge accuracy on test {_percent(means[0], 2)} → {_percent(means[1], 2)}, "
        f"agreement with the cloud {_percent(means[2], 2)} → {_percent(means[3], 2)}; at the agent's target the test "
        f"offload {_percent(means[4])} → {_percent(means[5])}, routed accuracy {_percent(means[6], 2)} → "
        f"{_percent(means[7], 2)}. A {_percent(options.target_accuracy)} target on {len(labels[0])} validation rows "
        f"allows {allowed} errors there, so its threshold rests on a handful of rows and its test offload varies "
        "widely from seed to seed: read the means.",
    ]
    lines += [
        "",
        f"**The offload a routed accuracy target takes** (mean over the {len(runs)} seeds; threshold and temperature "
        "for the target chosen on validation, offload and accuracy measured on test):",
        "",
        "| target (validation) | offload before | offload after | routed accuracy before | after |",
        "|---:|---:|---:|---:|---:|",
    ]
    for value in options.targets:
        lines.append(f"| {_percent(value)} | {_mean_cells(runs, shared, Target('accuracy', value))} |")
    lines += [
        "",
        f"**The routed accuracy an offload budget gives** (mean over the {len(runs)} seeds; threshold for the budget "
        "chosen on validation as `offload calibrate --target-offload` chooses it):",
        "",
        "| budget | offload on test before | after | routed accuracy before | after |",
        "|---:|---:|---:|---:|---:|",
    ]
    for budget in BUDGETS:
        lines.append(f"| {_percent(budget, 0)} | {_mean_cells(runs, shared, Target('offload', budget))} |")
    return "\n".join(lines)


def _mean_cells(runs: list[SeedRun], shared: Shared, target: Target) -> str:
    """Mean offload before, after, routed accuracy before, after, at `target`, as table cells."""
    pairs = [(held_out(run.before, shared, target), held_out(run.after, shared, target)) for run in runs]
    offload = [_percent(_mean([pair[i].offload for pair in pairs])) for i in (0, 1)]
    accuracy = [_percent(_mean([pair[i].accuracy for pair in pairs]), 2) for i in (0, 1)]
    return " | ".join([*offload, *accuracy])


if __name__ == "__main__":
    sys.exit(main())
