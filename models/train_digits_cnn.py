"""Train the "digits_cnn" benchmark model: a CNN edge model on the digits, big enough for quantization to matter.

The demo's edge model (models/train_digits.py) has 8,250 weights: ONNX Runtime runs it in a few
microseconds, so 8-bit weights save little. This script trains a convolutional edge model of about
150,000 weights on the same data and the same split (scikit-learn's bundled 8x8 digits, seed 0:
60% train, 15% validation, 25% test; `train_digits.load_splits`) for `offload quantize` and
benchmarks/quantization.py. It goes into its own model repository,
models/offload/models/benchmarks/, so the bundled demo repository keeps its one model.

* edge: four 3x3 convolutions (48, 48, 96, 96 channels, two 2x2 max-pools: 8 -> 4 -> 2) and a
  linear layer to 10 logits, `train_digits.DigitCNN` at width 48, trained alone on the train split
  without the cloud's pixel shifts, so it stays below the cloud; temperature-scaled on the
  validation split (folded into the last layer, so `[routing] temperature` stays 1); exported to
  ONNX (`edge.onnx`, weights embedded, a dynamic batch dimension).
* cloud: the demo's cloud model, `cloud.pt2` copied from the demo repository's digits folder (the
  same ensemble of three CNNs; no retraining), so this repository is whole on its own: `offload
  cloud --model-repository` serves it and `offload calibrate`/`offload quantize` run it locally.

The threshold is chosen on the validation split by the demo's rule (`train_digits.choose_threshold`:
the best routed accuracy with at most 25% offloaded, the largest of equals). It writes `edge.onnx`,
`cloud.pt2`, `validation.npz`, `test.npz` and `model.toml`, then prints the figures.

Needs torch, onnx, onnxruntime and scikit-learn (the `train` and `all` extras). About a minute on
one CPU thread, deterministic (one thread, deterministic algorithms, fixed seeds):

    python models/train_digits_cnn.py [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as nnf
from train_digits import (
    ACCURACY_TOLERANCE,
    CLASSES,
    FEATURES,
    INPUT_NAME,
    MAX_OFFLOAD,
    OUTPUT_NAME,
    DigitCNN,
    Split,
    ThresholdChoice,
    check_batches,
    describe,
    export_edge,
    load_splits,
    predict,
    print_table,
    save_split,
)
from train_digits import choose_threshold as choose_threshold_on_validation

from offload.models import BENCHMARK_REPOSITORY, DEMO_REPOSITORY
from offload.router.calibration import fit_temperature

MODEL_NAME = "digits_cnn"
DEFAULT_OUT = BENCHMARK_REPOSITORY / MODEL_NAME
CLOUD_SOURCE = DEMO_REPOSITORY / "digits" / "cloud.pt2"
SEED = 0

# A width of 48 gives 149,722 weights: large enough that 8-bit weights shrink the file and the
# integer kernels show at batch 64, small enough to keep the committed file under 600 kB.
EDGE_WIDTH = 48
EDGE_EPOCHS = 30
EDGE_BATCH = 64
EDGE_LR = 3e-3
EDGE_WEIGHT_DECAY = 1e-4


def train_edge(train: Split, seed: int) -> DigitCNN:
    """Mini-batch AdamW with a one-cycle schedule on the plain train images (no augmentation)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitCNN(EDGE_WIDTH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=EDGE_LR, weight_decay=EDGE_WEIGHT_DECAY)
    pixels = torch.from_numpy(train.pixels)
    labels = torch.from_numpy(train.labels)
    steps_per_epoch = math.ceil(len(train) / EDGE_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=EDGE_LR, total_steps=EDGE_EPOCHS * steps_per_epoch)
    model.train()
    for _ in range(EDGE_EPOCHS):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), EDGE_BATCH):
            batch = order[start : start + EDGE_BATCH]
            optimizer.zero_grad()
            torch.autograd.backward(nnf.cross_entropy(model(pixels[batch]), labels[batch]))
            optimizer.step()
            schedule.step()
    return model.eval()


def fold_temperature(model: DigitCNN, validation: Split) -> float:
    """Temperature scaling on the validation split, folded into the last layer (logits / T)."""
    with torch.no_grad():
        logits = model(torch.from_numpy(validation.pixels)).numpy().astype(np.float64)
        temperature = fit_temperature(logits, validation.labels)
        model.head.weight.div_(temperature)
        model.head.bias.div_(temperature)
    return temperature


def weights(model: DigitCNN) -> int:
    return sum(int(parameter.numel()) for parameter in model.parameters())


def write_model_toml(path: Path, choice: ThresholdChoice, figures: dict[str, str], edge_weights: int) -> None:
    met = "met" if choice.met_target else "not met"
    description = (
        "Handwritten digits 0-9 (scikit-learn's bundled 8x8 digits), a benchmark model for offload quantize. "
        f"Edge: a CNN of four 3x3 convolutions ({EDGE_WIDTH}, {EDGE_WIDTH}, {2 * EDGE_WIDTH}, {2 * EDGE_WIDTH} "
        f"channels) and a linear layer, temperature-scaled (ONNX, {edge_weights:,} weights); "
        "cloud: the digits demo's ensemble of 3 small CNNs (torch.export, copied)."
    )
    path.write_text(f"""\
# Generated by models/train_digits_cnn.py (seed {SEED}); do not edit by hand, rerun the script.
# Threshold chosen on the validation split only: the best routed accuracy with at most
# {MAX_OFFLOAD:.0%} of rows offloaded, the largest of equals (routed within {ACCURACY_TOLERANCE:.1%} of cloud: {met}).
# validation: {figures["validation"]}
# test:       {figures["test"]}
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
""")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    out: Path = parser.parse_args(argv).out

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    splits = load_splits(SEED)
    edge_model = train_edge(splits.train, SEED)
    temperature = fold_temperature(edge_model, splits.validation)
    print(
        f"edge trained ({weights(edge_model):,} weights), temperature {temperature:.4f} from validation "
        f"({time.perf_counter() - started:.0f} s)"
    )
    edge = export_edge(edge_model, out / "edge.onnx", check_batches(splits))
    shutil.copyfile(CLOUD_SOURCE, out / "cloud.pt2")
    cloud = torch.export.load(str(out / "cloud.pt2")).module()
    save_split(splits.validation, out / "validation.npz")
    save_split(splits.test, out / "test.npz")

    validation = predict(splits.validation, edge, cloud)
    choice = choose_threshold_on_validation(validation)
    figures = {
        "validation": validation.figures(choice.threshold),
        "test": predict(splits.test, edge, cloud).figures(choice.threshold),
    }
    write_model_toml(
        out / "model.toml", choice, {name: describe(split) for name, split in figures.items()}, weights(edge_model)
    )
    print(f"done in {time.perf_counter() - started:.0f} s")
    print_table(choice, figures, out)


if __name__ == "__main__":
    main()
