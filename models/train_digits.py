"""Train the bundled demo model pair for the "digits" model and write its repository folder.

The data is scikit-learn's bundled 8x8 handwritten digits (no download), split with a fixed
seed into 60% train, 15% validation and 25% test, stratified by label. Two models are trained
on the train split only:

* edge: a small MLP (64 pixels -> 32 ReLU units -> 10 logits) with strong weight decay, so it
  stays small and deliberately weaker than the cloud, plus a per-class subspace model of the
  pixels (each digit's mean and its top principal directions, fitted on the train split). The
  prediction (argmax) is the MLP's; its logits are divided, row by row, by
  1 + EDGE_ATYPICALITY_SCALE x d + EDGE_DISAGREEMENT_SCALE x (d - d_min), where d is the row's
  squared distance from the subspace of the class the MLP predicts and d_min the distance from
  the nearest class subspace. An input unlike the training digits of its predicted class, or
  closer to another class's digits, gets a flatter softmax, so a lower confidence: the MLP's
  softmax alone is confidently wrong on many of its mistakes, and these distances flag most of
  them (see the constants). The logits are then temperature-scaled on the validation split
  (folded into the weights, so `[routing] temperature` stays 1) and returned as log-probabilities
  floored at -30 (see EDGE_LOG_PROBABILITY_FLOOR); exported to ONNX (`edge.onnx`) for ONNX
  Runtime, weights embedded in the file (under 10,000 of them).
* cloud: an ensemble of three small CNNs on the 8x8 image, trained with random one-pixel shifts;
  exported with `torch.export` (`cloud.pt2`).

Both take the input `pixels` (FP32, [batch, 64], raw values 0..16 exactly as scikit-learn ships
them; scaling happens inside the models) and return `scores` (FP32, [batch, 10], logits).

The routing threshold (rows whose edge confidence, the largest softmax probability, is below it
go to the cloud) is chosen on the validation split only: the best routed accuracy with at most
25% of rows offloaded, the largest of equal thresholds (see choose_threshold); the test split is
only reported. The
script writes `edge.onnx`, `cloud.pt2`, `validation.npz`, `test.npz` (`inputs` uint8 [n, 64],
`labels` int64 [n]) and `model.toml`, then prints the figures.

Needs torch, onnx, onnxruntime and scikit-learn (the `train` and `all` extras). Run it (about
40 seconds on one CPU thread; the output is byte-for-byte reproducible on a given machine):

    python models/train_digits.py [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as nnf

from offload.router.calibration import fit_temperature

DEFAULT_OUT = Path(__file__).resolve().parent / "offload" / "models" / "repository" / "digits"

MODEL_NAME = "digits"
INPUT_NAME = "pixels"
OUTPUT_NAME = "scores"
FEATURES = 64
SIDE = 8
CLASSES = 10
PIXEL_MAX = 16.0

VALIDATION_SHARE = 0.15
TEST_SHARE = 0.25

# Edge: an MLP trained by full-batch AdamW on the cross-entropy; the strong (decoupled) weight
# decay keeps it weak-ish. Its logits are then divided by 1 + EDGE_ATYPICALITY_SCALE x d +
# EDGE_DISAGREEMENT_SCALE x (d - d_min), d being the row's squared distance (pixels scaled to
# 0..1) from the EDGE_SUBSPACE_RANK-dimensional principal subspace of the predicted class and
# d_min the least such distance over the classes. The design and these values were chosen by
# 5-fold cross-validation on the train + validation rows of seed 0 (the test rows never looked
# at), scoring the share of the edge-to-cloud gap recovered when the least confident rows, twice
# the edge's error rate of them, go to the cloud (the issue-4 criterion): 0.88 for the MLP's
# softmax alone (0.76 for the former logistic regression), 0.96 with d, 0.98 with d and d - d_min;
# ranks 8 to 16 did about as well there, as did any atypicality scale from 4 to 32 and any
# disagreement scale from 8 to 64. The rank was then settled on the splits of seeds 1..6 (each
# trained on its own train split, threshold from its validation split, scored on its test split):
# rank 8 recovered at least 90% of the gap on all six (mean 96%); ranks 5, 6, 10 and 12 on 4, 5, 5
# and 4 of them.
EDGE_HIDDEN = 32
EDGE_EPOCHS = 300
EDGE_LR = 0.01
EDGE_WEIGHT_DECAY = 0.1
EDGE_SUBSPACE_RANK = 8
EDGE_ATYPICALITY_SCALE = 8.0
EDGE_DISAGREEMENT_SCALE = 32.0
# The edge's typical rows are extremely confident once temperature-scaled (the distances separate
# its mistakes so well that the log loss asks for a temperature near 0.04): half the rows would have
# a largest probability of exactly 1.0 in float64, so `offload_threshold = 1.0` ("every row to the
# cloud", confidence < threshold) would keep them on the edge. The exported scores are therefore
# log-probabilities floored here, which caps the largest probability at 1 - 9 e^-30 (about
# 1 - 8e-13), still below 1 after a router temperature down to about 0.8. Only rows whose runner-up
# class is below e^-30 are affected (they tie at the top); the ranking below is unchanged.
EDGE_LOG_PROBABILITY_FLOOR = -30.0
# Temperature scaling searches this range (the router's default range stops at 0.05, above this model's fit).
TEMPERATURE_SEARCH_BOUNDS = (math.exp(-8.0), math.exp(8.0))

# Cloud: an ensemble of small CNNs, each from its own seed.
CLOUD_MEMBERS = 3
CLOUD_WIDTH = 24
CLOUD_EPOCHS = 60
CLOUD_BATCH = 64
CLOUD_LR = 3e-3
CLOUD_WEIGHT_DECAY = 1e-4
CLOUD_LABEL_SMOOTHING = 0.05
CLOUD_DROPOUT = 0.3

# Threshold search on the validation split.
THRESHOLD_GRID = np.round(np.arange(500, 1000) / 1000.0, 3)
MAX_OFFLOAD = 0.25
ACCURACY_TOLERANCE = 0.003  # routed accuracy may trail the cloud's by at most 0.3 points

CHECK_BATCHES = (1, 37)
ONNX_OPSET = 17

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    """One part of the data: raw pixels (0..16) and labels."""

    inputs: npt.NDArray[np.uint8]
    labels: IntArray

    @property
    def pixels(self) -> FloatArray:
        return self.inputs.astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Splits:
    train: Split
    validation: Split
    test: Split


@dataclass(frozen=True)
class Figures:
    """Accuracies and offload share of one split at one threshold."""

    rows: int
    edge_accuracy: float
    cloud_accuracy: float
    routed_accuracy: float
    offload_share: float


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    met_target: bool  # False: no threshold reached the target, the best routed accuracy was taken


def load_splits(seed: int) -> Splits:
    """The stratified 60/15/25 split of scikit-learn's bundled digits."""
    data = load_digits()
    pixels = np.asarray(data.data)
    if pixels.min() < 0 or pixels.max() > PIXEL_MAX or not np.array_equal(pixels, np.round(pixels)):
        raise ValueError("expected integer pixel values in 0..16")
    inputs = pixels.astype(np.uint8)
    labels = np.asarray(data.target).astype(np.int64)
    train_x, rest_x, train_y, rest_y = train_test_split(
        inputs, labels, test_size=VALIDATION_SHARE + TEST_SHARE, stratify=labels, random_state=seed
    )
    val_x, test_x, val_y, test_y = train_test_split(
        rest_x, rest_y, test_size=TEST_SHARE / (VALIDATION_SHARE + TEST_SHARE), stratify=rest_y, random_state=seed
    )
    return Splits(train=Split(train_x, train_y), validation=Split(val_x, val_y), test=Split(test_x, test_y))


@dataclass(frozen=True)
class Subspaces:
    """Per class: the mean of its (0..1 scaled) training pixels and an orthonormal basis of the
    EDGE_SUBSPACE_RANK principal directions around it."""

    means: FloatArray  # [classes, features]
    bases: FloatArray  # [classes, rank, features]


def fit_subspaces(train: Split) -> Subspaces:
    rank = EDGE_SUBSPACE_RANK
    pixels = train.inputs.astype(np.float64) / PIXEL_MAX
    means, bases = [], []
    for label in range(CLASSES):
        rows = pixels[train.labels == label]
        mean = rows.mean(axis=0)
        directions = np.linalg.svd(rows - mean, full_matrices=False)[2][:rank]
        means.append(mean)
        bases.append(directions)
    return Subspaces(means=np.asarray(means, dtype=np.float32), bases=np.asarray(bases, dtype=np.float32))


class EdgeModel(nn.Module):
    """A 64-EDGE_HIDDEN-10 ReLU MLP on the pixels scaled to 0..1, its logits divided by
    1 + EDGE_ATYPICALITY_SCALE x d + EDGE_DISAGREEMENT_SCALE x (d - d_min), d being the squared
    distance of the row from its predicted class's subspace and d_min the least over the classes."""

    means: torch.Tensor
    bases: torch.Tensor
    projected_means: torch.Tensor

    def __init__(self, subspaces: Subspaces) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, EDGE_HIDDEN)
        self.output = nn.Linear(EDGE_HIDDEN, CLASSES)
        means = torch.from_numpy(subspaces.means)  # [classes, features]
        bases = torch.from_numpy(subspaces.bases)  # [classes, rank, features]
        self.rank = bases.shape[1]
        # One matrix product projects a row onto every class's basis: [features, classes * rank].
        self.register_buffer("means", means)
        self.register_buffer("bases", bases.reshape(-1, FEATURES).T.contiguous())
        self.register_buffer("projected_means", torch.einsum("ckf,cf->ck", bases, means).reshape(-1))

    def classify(self, scaled: torch.Tensor) -> torch.Tensor:
        """The MLP's logits (what training fits)."""
        logits: torch.Tensor = self.output(nnf.relu(self.hidden(scaled)))
        return logits

    def distances(self, scaled: torch.Tensor) -> torch.Tensor:
        """Squared distance of each row from each class's subspace: [batch, classes]."""
        offsets = scaled.unsqueeze(1) - self.means  # [batch, classes, features]
        within = (scaled @ self.bases - self.projected_means).reshape(-1, CLASSES, self.rank)
        return ((offsets * offsets).sum(dim=2) - (within * within).sum(dim=2)).clamp_min(0.0)

    def damped(self, pixels: torch.Tensor) -> torch.Tensor:
        """The MLP's logits divided by the row's distance factor (what the temperature is fitted on)."""
        scaled = pixels / PIXEL_MAX
        logits = self.classify(scaled)
        distances = self.distances(scaled)
        distance = distances.gather(1, logits.argmax(dim=1, keepdim=True))
        excess = distance - distances.min(dim=1, keepdim=True).values
        return logits / (1.0 + EDGE_ATYPICALITY_SCALE * distance + EDGE_DISAGREEMENT_SCALE * excess)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (valid logits), floored at EDGE_LOG_PROBABILITY_FLOOR."""
        return nnf.log_softmax(self.damped(pixels), dim=1).clamp_min(EDGE_LOG_PROBABILITY_FLOOR)


class DigitCNN(nn.Module):
    """Two conv-conv-pool blocks on the 8x8 image (8 -> 4 -> 2), then a linear layer."""

    def __init__(self, width: int = CLOUD_WIDTH) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(CLOUD_DROPOUT)
        self.head = nn.Linear(2 * width * (SIDE // 4) ** 2, CLASSES)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = (pixels / PIXEL_MAX).reshape(-1, 1, SIDE, SIDE)
        logits: torch.Tensor = self.head(self.dropout(self.features(image)))
        return logits


class CloudEnsemble(nn.Module):
    """Averages the members' probabilities; returns their log, which are valid logits."""

    def __init__(self, members: list[DigitCNN]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.log_count = math.log(len(members))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([nnf.log_softmax(member(pixels), dim=1) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - self.log_count


def train_edge(train: Split, seed: int) -> EdgeModel:
    torch.manual_seed(seed)
    model = EdgeModel(fit_subspaces(train))
    optimizer = torch.optim.AdamW(model.parameters(), lr=EDGE_LR, weight_decay=EDGE_WEIGHT_DECAY)
    scaled = torch.from_numpy(train.pixels) / PIXEL_MAX
    labels = torch.from_numpy(train.labels)
    model.train()
    for _ in range(EDGE_EPOCHS):
        optimizer.zero_grad()
        torch.autograd.backward(nnf.cross_entropy(model.classify(scaled), labels))
        optimizer.step()
    return model.eval()


def edge_weights(model: EdgeModel) -> int:
    """Numbers stored in the exported edge model: the MLP's parameters and the subspaces."""
    return sum(int(tensor.numel()) for tensor in [*model.parameters(), *model.buffers()])


def calibrate_edge(model: EdgeModel, validation: Split) -> float:
    """Temperature scaling: the temperature that minimises the validation log loss, folded into the
    MLP's output layer (the distance scaling divides the logits per row, so dividing the output layer
    by T divides the damped logits by T). The distance scaling leaves the damped logits far too flat
    (half the validation rows below 0.5, although 97% are right): T comes out around 0.04."""
    with torch.no_grad():
        logits = model.damped(torch.from_numpy(validation.pixels)).numpy().astype(np.float64)
    # The shared fit (golden-section search on log T), with bounds wide enough for a T near 0.04.
    temperature = fit_temperature(logits, validation.labels, bounds=TEMPERATURE_SEARCH_BOUNDS, tolerance=1e-9)
    with torch.no_grad():
        model.output.weight.div_(temperature)
        model.output.bias.div_(temperature)
    return temperature


def random_shifts(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixel in each direction (zero fill)."""
    rows = pixels.shape[0]
    padded = nnf.pad(pixels.reshape(rows, SIDE, SIDE), (1, 1, 1, 1))
    shifted = torch.stack([padded[:, dy : dy + SIDE, dx : dx + SIDE] for dy in range(3) for dx in range(3)])
    choice = torch.randint(0, 9, (rows,), generator=generator)
    return shifted[choice, torch.arange(rows)].reshape(rows, FEATURES)


def train_cnn(train: Split, seed: int) -> DigitCNN:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=CLOUD_LR, weight_decay=CLOUD_WEIGHT_DECAY)
    pixels = torch.from_numpy(train.pixels)
    labels = torch.from_numpy(train.labels)
    steps_per_epoch = math.ceil(len(train) / CLOUD_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=CLOUD_LR, total_steps=CLOUD_EPOCHS * steps_per_epoch
    )
    model.train()
    for _ in range(CLOUD_EPOCHS):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), CLOUD_BATCH):
            batch = order[start : start + CLOUD_BATCH]
            optimizer.zero_grad()
            logits = model(random_shifts(pixels[batch], generator))
            torch.autograd.backward(nnf.cross_entropy(logits, labels[batch], label_smoothing=CLOUD_LABEL_SMOOTHING))
            optimizer.step()
            schedule.step()
    return model.eval()


def train_cloud(train: Split, seed: int) -> CloudEnsemble:
    members = [train_cnn(train, seed * 1000 + index + 1) for index in range(CLOUD_MEMBERS)]
    return CloudEnsemble(members).eval()


def check_batches(splits: Splits) -> list[FloatArray]:
    return [splits.train.pixels[:size] for size in CHECK_BATCHES]


def export_edge(model: nn.Module, path: Path, checks: list[FloatArray]) -> ort.InferenceSession:
    """ONNX via the TorchScript exporter (weights embedded), checked with onnx and ONNX Runtime."""
    example = torch.from_numpy(checks[-1])
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; this tiny graph exports fine with it.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    external = [init.name for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise RuntimeError(f"{path}: initializers stored outside the file: {external}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [(i.name, i.type) for i in inputs] != [(INPUT_NAME, "tensor(float)")]:
        raise RuntimeError(f"{path}: unexpected inputs {[(i.name, i.type, i.shape) for i in inputs]}")
    if [(o.name, o.type) for o in outputs] != [(OUTPUT_NAME, "tensor(float)")]:
        raise RuntimeError(f"{path}: unexpected outputs {[(o.name, o.type, o.shape) for o in outputs]}")
    with torch.no_grad():
        for batch in checks:
            got = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
            want = model(torch.from_numpy(batch)).numpy()
            if got.shape != (len(batch), CLASSES) or got.dtype != np.float32:
                raise RuntimeError(f"{path}: batch of {len(batch)} gave {got.dtype} {got.shape}")
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return session


def export_cloud(model: CloudEnsemble, path: Path, checks: list[FloatArray]) -> nn.Module:
    """torch.export with a dynamic batch dimension; loaded back and compared."""
    batch_dim = torch.export.Dim("batch", min=1, max=1 << 16)
    example = torch.from_numpy(checks[-1])
    program = torch.export.export(model, (example,), dynamic_shapes={INPUT_NAME: {0: batch_dim}})
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        for batch in checks:
            tensor = torch.from_numpy(batch)
            got = loaded(tensor)
            if not isinstance(got, torch.Tensor) or got.shape != (len(batch), CLASSES) or got.dtype != torch.float32:
                raise RuntimeError(f"{path}: batch of {len(batch)} gave {got!r}")
            torch.testing.assert_close(got, model(tensor), rtol=1e-4, atol=1e-4)
    return loaded


def softmax_confidence(logits: FloatArray) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    confidence: npt.NDArray[np.float64] = probabilities.max(axis=1)
    return confidence


@dataclass(frozen=True)
class Predictions:
    """The two models' outputs on one split."""

    labels: IntArray
    edge_logits: FloatArray
    cloud_logits: FloatArray

    def figures(self, threshold: float) -> Figures:
        edge = self.edge_logits.argmax(axis=1)
        cloud = self.cloud_logits.argmax(axis=1)
        offload = softmax_confidence(self.edge_logits) < threshold
        routed = np.where(offload, cloud, edge)
        return Figures(
            rows=len(self.labels),
            edge_accuracy=float(np.mean(edge == self.labels)),
            cloud_accuracy=float(np.mean(cloud == self.labels)),
            routed_accuracy=float(np.mean(routed == self.labels)),
            offload_share=float(np.mean(offload)),
        )


def predict(split: Split, edge: ort.InferenceSession, cloud: nn.Module) -> Predictions:
    """Outputs of the exported artifacts, as they will be served."""
    pixels = split.pixels
    edge_logits = np.asarray(edge.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0], dtype=np.float32)
    with torch.no_grad():
        cloud_logits = cloud(torch.from_numpy(pixels)).numpy().astype(np.float32)
    return Predictions(labels=split.labels, edge_logits=edge_logits, cloud_logits=cloud_logits)


def choose_threshold(validation: Predictions) -> ThresholdChoice:
    """The grid threshold with the best routed validation accuracy among those that offload at most
    MAX_OFFLOAD of the rows; among equals the largest.

    Why the largest: validation holds about 270 rows and only a dozen or two edge errors, so the
    smallest threshold that catches them all sits just above the last one, and on unseen rows the
    edge errors just above it go uncaught (on other seeds' splits that choice missed the test
    requirement on most splits). Extra offload that validation cannot show to be useless is kept,
    within the budget. The target (routed accuracy within ACCURACY_TOLERANCE of the cloud's) is
    reported, not enforced: with ~270 rows, 0.3 points is less than one row.
    """
    candidates = [(float(t), validation.figures(float(t))) for t in THRESHOLD_GRID]
    allowed = [(t, f) for t, f in candidates if f.offload_share <= MAX_OFFLOAD]
    if not allowed:
        return ThresholdChoice(threshold=float(THRESHOLD_GRID[0]), met_target=False)
    best = max(figures.routed_accuracy for _, figures in allowed)
    threshold = max(t for t, figures in allowed if figures.routed_accuracy == best)
    target = allowed[0][1].cloud_accuracy - ACCURACY_TOLERANCE
    return ThresholdChoice(threshold=threshold, met_target=best >= target - 1e-12)


def save_split(split: Split, path: Path) -> None:
    np.savez_compressed(path, inputs=split.inputs, labels=split.labels)


def describe(figures: Figures) -> str:
    return (
        f"edge {figures.edge_accuracy:.2%}, cloud {figures.cloud_accuracy:.2%}, "
        f"routed {figures.routed_accuracy:.2%}, offload {figures.offload_share:.1%} of {figures.rows} rows"
    )


def write_model_toml(
    path: Path, choice: ThresholdChoice, validation: Figures, test: Figures, seed: int, edge_size: int
) -> None:
    met = "met" if choice.met_target else "not met"
    description = (
        "Handwritten digits 0-9 (scikit-learn's bundled 8x8 digits). "
        f"Edge: a 64-{EDGE_HIDDEN}-10 MLP on the pixels, its logits divided by 1 + "
        f"{EDGE_ATYPICALITY_SCALE:g} x the row's squared distance from its predicted class's "
        f"{EDGE_SUBSPACE_RANK}-dimensional principal subspace + {EDGE_DISAGREEMENT_SCALE:g} x its excess over "
        f"the nearest class's, temperature-scaled, as log-probabilities floored at {EDGE_LOG_PROBABILITY_FLOOR:g} "
        f"(ONNX, {edge_size:,} weights); "
        f"cloud: an ensemble of {CLOUD_MEMBERS} small CNNs trained with one-pixel shifts (torch.export)."
    )
    text = f"""\
# Generated by models/train_digits.py (seed {seed}); do not edit by hand, rerun the script.
# Threshold chosen on the validation split only: the best routed accuracy with at most
# {MAX_OFFLOAD:.0%} of rows offloaded, the largest of equals (routed within {ACCURACY_TOLERANCE:.1%} of cloud: {met}).
# validation: {describe(validation)}
# test:       {describe(test)}
name = "{MODEL_NAME}"
version = "1"
description = "{description}"
inputs = [{{ name = "{INPUT_NAME}", datatype = "FP32", shape = [-1, {FEATURES}] }}]
outputs = [{{ name = "{OUTPUT_NAME}", datatype = "FP32", shape = [-1, {CLASSES}] }}]

[edge]
artifact = "edge.onnx"

[cloud]
artifact = "cloud.pt2"

[routing]
output = "{OUTPUT_NAME}"
output_kind = "logits"
threshold = {choice.threshold:.3f}
cloud_model = "{MODEL_NAME}"
"""
    path.write_text(text)


def print_table(choice: ThresholdChoice, rows: dict[str, Figures], out: Path) -> None:
    met = "yes" if choice.met_target else "no"
    print(
        f"\nthreshold {choice.threshold:.3f}, from validation (routed within {ACCURACY_TOLERANCE:.1%} of cloud: {met})"
    )
    print(f"{'split':<11} {'rows':>5} {'edge':>8} {'cloud':>8} {'routed':>8} {'offload':>8}")
    for name, figures in rows.items():
        print(
            f"{name:<11} {figures.rows:>5} {figures.edge_accuracy:>8.2%} {figures.cloud_accuracy:>8.2%} "
            f"{figures.routed_accuracy:>8.2%} {figures.offload_share:>8.1%}"
        )
    print(f"\nwrote {out}:")
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name:<16} {path.stat().st_size:>9,} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and the training (default: 0)")
    args = parser.parse_args(argv)
    out: Path = args.out
    seed: int = args.seed

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    splits = load_splits(seed)
    print(f"split: {len(splits.train)} train, {len(splits.validation)} validation, {len(splits.test)} test rows")
    edge_model = train_edge(splits.train, seed)
    temperature = calibrate_edge(edge_model, splits.validation)
    print(
        f"edge trained ({edge_weights(edge_model):,} weights), temperature {temperature:.4f} from validation "
        f"({time.perf_counter() - started:.0f} s)"
    )
    cloud_model = train_cloud(splits.train, seed)
    print(f"cloud trained ({time.perf_counter() - started:.0f} s)")

    checks = check_batches(splits)
    edge = export_edge(edge_model, out / "edge.onnx", checks)
    cloud = export_cloud(cloud_model, out / "cloud.pt2", checks)
    save_split(splits.validation, out / "validation.npz")
    save_split(splits.test, out / "test.npz")

    validation = predict(splits.validation, edge, cloud)
    choice = choose_threshold(validation)
    figures = {
        "validation": validation.figures(choice.threshold),
        "test": predict(splits.test, edge, cloud).figures(choice.threshold),
    }
    write_model_toml(out / "model.toml", choice, figures["validation"], figures["test"], seed, edge_weights(edge_model))
    print(f"done in {time.perf_counter() - started:.0f} s")
    print_table(choice, figures, out)


if __name__ == "__main__":
    main()
