"""Train the bundled "tabular" model pair, where the edge's confidence is not enough, and its gate.

The bundled digits pair was built so that its edge model's largest probability flags its own
mistakes. Most models are not like that, and this pair is a benchmark for them: its edge model is
confidently wrong on a whole region of the inputs, which max-probability routing cannot see.

The data (no download) is scikit-learn's `make_classification`: 4 classes, 10 features (6
informative, 2 redundant, one cluster per class, class_sep CLASS_SEP), plus two "context"
features drawn from a standard normal. In the region where the context features' mean, times
sqrt(2), exceeds REGION_CUT (about 8% of rows) the labels follow another rule: class k becomes
class k + 1 (mod 4), a structured shift like a site or a season whose rows behave differently.
The rows are split into TRAIN_ROWS train, VALIDATION_ROWS validation and TEST_ROWS test rows.

* edge: a logistic regression (scikit-learn, on standardised features, folded into one MatMul and
  Add; ONNX, `edge.onnx`, 52 weights). A linear model cannot learn the region's rule: it keeps the
  common one, and there its answers are wrong with the same confidence as its right ones elsewhere.
* cloud: a 12-64-64-4 ReLU MLP (torch, exported with `torch.export`, `cloud.pt2`), which learns
  both rules.

Both take `features` (FP32, [batch, 12]) and return `scores` (FP32, [batch, 4], logits).
`validation.npz` and `test.npz` hold `inputs` (float32) and `labels` (int64).

Routing: the script then runs `offload calibrate --gate --gate-inputs --target-offload 0.2` on the
validation split (cross-fitted, see offload.tools.gate), which writes `gate.onnx` and sets
`confidence = "gate"` and the threshold in `model.toml`, and prints what it expects on validation.
The comments at the top of `model.toml` give both models' accuracies on both splits;
`benchmarks/quality.py` reports every routing method on the test split, held out.

Needs torch, onnx, onnxruntime and scikit-learn (`pip install -c constraints.txt -e '.[all,train]'`).
Deterministic: fixed seeds, one thread for torch and for NumPy's and scikit-learn's BLAS,
`torch.use_deterministic_algorithms`; with the pinned versions of constraints.txt the artifacts are
the same on every run. Rerun (about 20 seconds):

    python models/train_tabular.py [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn
from torch.nn import functional as nnf

from offload.router.calibration import Target
from offload.tools.calibrate import CalibrateOptions, run_calibrate

DEFAULT_OUT = Path(__file__).resolve().parent / "offload" / "models" / "repository" / "tabular"

MODEL_NAME = "tabular"
INPUT_NAME = "features"
OUTPUT_NAME = "scores"
CLASSES = 4
BASE_FEATURES = 10
CONTEXT_FEATURES = 2
FEATURES = BASE_FEATURES + CONTEXT_FEATURES

TRAIN_ROWS = 8000
VALIDATION_ROWS = 1000
TEST_ROWS = 2000

# The classes' separation: the edge (linear) gets about 97% of the rows outside the region right, the
# cloud about 98% of all rows; with it and REGION_CUT, max-probability routing at a 20% budget recovers
# about 40% of the edge-to-cloud gap where the oracle recovers all of it (chosen on the validation split).
CLASS_SEP = 2.5
REGION_CUT = 1.4  # rows with (c1 + c2) / sqrt(2) above it, a standard normal, are in the region: about 8%

EDGE_C = 1.0  # inverse L2 strength of the logistic regression

CLOUD_HIDDEN = 64
CLOUD_EPOCHS = 80
CLOUD_BATCH = 128
CLOUD_LR = 3e-3
CLOUD_WEIGHT_DECAY = 1e-4

GATE_BUDGET = 0.2  # the offload target the gate's threshold is calibrated for
CHECK_BATCHES = (1, 37)
ONNX_OPSET = 17

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    inputs: FloatArray
    labels: IntArray


@dataclass(frozen=True)
class Splits:
    train: Split
    validation: Split
    test: Split


def make_data(seed: int) -> Splits:
    """The rows, with the region's labels shifted by one class, split in order (the generator shuffles them)."""
    rows = TRAIN_ROWS + VALIDATION_ROWS + TEST_ROWS
    base, labels = make_classification(
        n_samples=rows,
        n_features=BASE_FEATURES,
        n_informative=6,
        n_redundant=2,
        n_repeated=0,
        n_classes=CLASSES,
        n_clusters_per_class=1,
        class_sep=CLASS_SEP,
        flip_y=0.0,
        shuffle=True,
        random_state=seed,
    )
    context = np.random.default_rng(seed).standard_normal((rows, CONTEXT_FEATURES))
    region = context.sum(axis=1) / math.sqrt(CONTEXT_FEATURES) > REGION_CUT
    labels = np.where(region, (labels + 1) % CLASSES, labels).astype(np.int64)
    inputs = np.hstack([base, context]).astype(np.float32)
    cuts = np.cumsum([TRAIN_ROWS, VALIDATION_ROWS])
    parts = [Split(x, y) for x, y in zip(np.split(inputs, cuts), np.split(labels, cuts), strict=True)]
    return Splits(*parts)


def train_edge(train: Split) -> tuple[FloatArray, FloatArray]:
    """A multinomial logistic regression on standardised features: weights [features, classes] and bias
    [classes] that take the raw features (the standardisation folded in)."""
    x = train.inputs.astype(np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    fitted = LogisticRegression(C=EDGE_C, max_iter=1000).fit((x - mean) / scale, train.labels)
    weights = fitted.coef_.T / scale[:, None]
    bias = fitted.intercept_ - mean @ weights
    return weights.astype(np.float32), bias.astype(np.float32)


def export_edge(weights: FloatArray, bias: FloatArray, path: Path, checks: list[FloatArray]) -> ort.InferenceSession:
    """scores = features @ weights + bias as an ONNX graph (weights in the file), checked under ONNX Runtime."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT_NAME, "weights"], ["linear"]),
            helper.make_node("Add", ["linear", "bias"], [OUTPUT_NAME]),
        ],
        "tabular_edge",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in checks:
        got = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
        np.testing.assert_allclose(got, batch @ weights + bias, rtol=1e-5, atol=1e-5)
    return session


class CloudModel(nn.Module):
    """A ReLU MLP on the standardised features (the standardisation is part of the model)."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean: FloatArray, scale: FloatArray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("scale", torch.from_numpy(scale))
        self.layers = nn.Sequential(
            nn.Linear(FEATURES, CLOUD_HIDDEN),
            nn.ReLU(),
            nn.Linear(CLOUD_HIDDEN, CLOUD_HIDDEN),
            nn.ReLU(),
            nn.Linear(CLOUD_HIDDEN, CLASSES),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers((features - self.mean) / self.scale)
        return logits


def train_cloud(train: Split, seed: int) -> CloudModel:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = CloudModel(train.inputs.mean(axis=0), train.inputs.std(axis=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=CLOUD_LR, weight_decay=CLOUD_WEIGHT_DECAY)
    inputs = torch.from_numpy(train.inputs)
    labels = torch.from_numpy(train.labels)
    model.train()
    for _ in range(CLOUD_EPOCHS):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), CLOUD_BATCH):
            batch = order[start : start + CLOUD_BATCH]
            optimizer.zero_grad()
            torch.autograd.backward(nnf.cross_entropy(model(inputs[batch]), labels[batch]))
            optimizer.step()
    return model.eval()


def export_cloud(model: CloudModel, path: Path, checks: list[FloatArray]) -> nn.Module:
    """torch.export with a dynamic batch dimension; loaded back and compared."""
    batch_dim = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model, (torch.from_numpy(checks[-1]),), dynamic_shapes={INPUT_NAME: {0: batch_dim}})
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        for batch in checks:
            tensor = torch.from_numpy(batch)
            torch.testing.assert_close(loaded(tensor), model(tensor), rtol=1e-5, atol=1e-5)
    return loaded


@dataclass(frozen=True)
class Answers:
    """Both models' scores on one split."""

    labels: IntArray
    edge: FloatArray
    cloud: FloatArray

    def describe(self) -> str:
        edge = np.mean(self.edge.argmax(axis=1) == self.labels)
        cloud = np.mean(self.cloud.argmax(axis=1) == self.labels)
        return f"edge {edge:.2%}, cloud {cloud:.2%} of {len(self.labels)} rows"


def answers(split: Split, edge: ort.InferenceSession, cloud: nn.Module) -> Answers:
    with torch.no_grad():
        cloud_scores = cloud(torch.from_numpy(split.inputs)).numpy()
    edge_scores = np.asarray(edge.run([OUTPUT_NAME], {INPUT_NAME: split.inputs})[0])
    return Answers(split.labels, edge_scores, cloud_scores)


def write_model_toml(path: Path, seed: int, validation: Answers, test: Answers) -> None:
    """The model's config before calibration: max probability, threshold 0.9 (calibrate replaces both)."""
    description = (
        "Tabular 4-class data (scikit-learn's make_classification plus two context features; in a region of the "
        "context, about 8% of rows, each class is labelled as the next). Edge: a logistic regression (ONNX, "
        f"{FEATURES * CLASSES + CLASSES} weights), confidently wrong in the region; cloud: a "
        f"{FEATURES}-{CLOUD_HIDDEN}-{CLOUD_HIDDEN}-{CLASSES} MLP (torch.export). Routed by a learned gate."
    )
    path.write_text(
        f"""\
# Generated by models/train_tabular.py (seed {seed}); do not edit by hand, rerun the script.
# Routing: a learned gate on the edge's scores and the inputs, trained on the validation split and its
# threshold chosen there for {GATE_BUDGET:.0%} offload (offload calibrate --gate --gate-inputs, cross-fitted).
# validation: {validation.describe()}
# test:       {test.describe()}
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
confidence = "max_probability"
threshold = 0.9
cloud_model = "{MODEL_NAME}"
"""
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the training (default: 0)")
    args = parser.parse_args(argv)
    out: Path = args.out
    seed: int = args.seed

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with threadpool_limits(limits=1):
        splits = make_data(seed)
        weights, bias = train_edge(splits.train)
        cloud_model = train_cloud(splits.train, seed)
        print(f"trained both models ({time.perf_counter() - started:.0f} s)")
        checks = [splits.train.inputs[:size] for size in CHECK_BATCHES]
        edge = export_edge(weights, bias, out / "edge.onnx", checks)
        cloud = export_cloud(cloud_model, out / "cloud.pt2", checks)
        for name, split in (("validation", splits.validation), ("test", splits.test)):
            np.savez_compressed(out / f"{name}.npz", inputs=split.inputs, labels=split.labels)
        validation, test = answers(splits.validation, edge, cloud), answers(splits.test, edge, cloud)
        write_model_toml(out / "model.toml", seed, validation, test)
        run_calibrate(
            CalibrateOptions(
                repository=out.parent,
                model=MODEL_NAME,
                data=out / "validation.npz",
                target=Target("offload", GATE_BUDGET),
                gate=True,
                gate_inputs=True,
            )
        )
    print(f"done in {time.perf_counter() - started:.0f} s")
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name:<16} {path.stat().st_size:>9,} bytes")


if __name__ == "__main__":
    main()
