"""`offload distill`: train the next edge model on the cloud's recorded answers (knowledge distillation).

An edge agent started with `--record-dir` keeps the rows it sent to the cloud and the cloud's answers
(offload.edge.recording). This reads those of one model, builds the edge architecture its `[distill]` section
names (a torch module factory, or `--factory`), from scratch or from given weights, and trains it to answer as
the cloud does: the loss is KL(softmax(cloud / T) || softmax(student / T)) x T^2 (knowledge distillation with
temperature T; the T^2 keeps the gradients' scale as T changes), mixed with the cross-entropy on labelled rows
(`--labelled FILE.npz`) as (1 - alpha) x distillation + alpha x cross-entropy. The trained module is exported to
ONNX (one file, the batch dimension dynamic), checked under ONNX Runtime as the edge runs it, and written as the
model's next version, ready to roll out: a copy of the model's folder with the new artifact, `version` bumped,
and threshold and temperature chosen anew on a validation set by `offload calibrate`'s code (model.toml's other
lines and comments kept); `--manifest` then writes the output repository's manifest.json. A share of the
recorded rows (`--holdout`) is kept out of training to report agreement with the cloud before and after.

    [distill]
    factory = "offload.models.students:digits_mlp"   # returns the untrained nn.Module

The module takes the model's inputs as model.toml declares them, in order, and returns its outputs (one tensor,
or a tuple in the declared order); the routing output's class scores are what is distilled.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as nnf

from offload.cloud.runtime import call_factory, pick_device
from offload.edge.config import EdgeSection
from offload.edge.onnx_model import OnnxModel
from offload.edge.recording import Records, read_records
from offload.oip.datatypes import DATATYPES
from offload.oip.errors import ConfigurationError, one_line
from offload.oip.manifest import Manifest, write_manifest
from offload.oip.repository import ModelEntry, Section, TensorSpec, load_repository
from offload.oip.security import ChannelSecurity
from offload.router.calibration import Calibration, Target, predicted_classes
from offload.router.confidence import scaled_logits
from offload.router.config import OutputKind, RoutedConfig
from offload.tools.calibrate import CalibrateOptions, load_inputs, run_calibrate, write_version
from offload.tools.progress import progress_bar

Arrays = dict[str, npt.NDArray[Any]]

# The opset of the exported graph: ONNX Runtime 1.18 and later run it.
ONNX_OPSET = 17


class DistillSection(Section):
    """The [distill] section of a model.toml (offload.tools owns it)."""

    factory: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]


@dataclass(frozen=True)
class Training:
    """How the student is trained."""

    temperature: float = 4.0  # T of the distillation loss
    alpha: float = 0.5  # weight of the labelled rows' cross-entropy (with labelled rows)
    epochs: int = 100  # passes over the recorded rows (over the labelled rows, without recorded ones)
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4  # AdamW's, decoupled
    seed: int = 0


@dataclass(frozen=True)
class StudentIO:
    """How the student module is called and read: its inputs in declared order, the score output's place
    among its outputs and what kind of scores it holds."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    score_index: int
    output_kind: OutputKind

    @classmethod
    def of(cls, entry: ModelEntry) -> StudentIO:
        config = RoutedConfig.of(entry)
        inputs, outputs = entry.config.inputs, entry.config.outputs
        if not inputs or not outputs:
            raise entry.error("distill needs the model's inputs and outputs declared")
        score = config.routing.output or outputs[0].name
        index = next(i for i, spec in enumerate(outputs) if spec.name == score)
        if config.routing.confidence == "output" or len(outputs[index].shape) != 2:
            raise entry.error(
                f"distill trains classifiers: output {score!r} must be class scores [batch, classes] and "
                "routing.confidence a class measure"
            )
        for spec in inputs:
            if spec.datatype in ("BYTES", "BF16"):
                raise entry.error(f"distill takes numeric inputs; {spec.name!r} is {spec.datatype}")
        return cls(inputs, outputs, index, config.routing.output_kind)

    @property
    def score_output(self) -> str:
        return self.outputs[self.score_index].name

    def cast(self, arrays: Mapping[str, npt.NDArray[Any]], where: str) -> Arrays:
        """The inputs among `arrays`, as the model's declared datatypes."""
        missing = [spec.name for spec in self.inputs if spec.name not in arrays]
        if missing:
            raise ConfigurationError(f"{where}: no input {missing}; it has {sorted(arrays)}")
        return {
            spec.name: np.ascontiguousarray(arrays[spec.name].astype(DATATYPES[spec.datatype].dtype.newbyteorder("=")))
            for spec in self.inputs
        }

    def log_probabilities(self, module: nn.Module, inputs: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
        """log softmax(scores / temperature) of the module's score output (probabilities: of their logs)."""
        produced = module(*inputs)
        outputs = tuple(produced) if isinstance(produced, tuple | list) else (produced,)
        if len(outputs) != len(self.outputs):
            raise ConfigurationError(
                f"the module returns {len(outputs)} outputs; model.toml declares {len(self.outputs)} "
                f"({[spec.name for spec in self.outputs]})"
            )
        scores = outputs[self.score_index].float()
        if self.output_kind is OutputKind.PROBABILITIES:
            scores = torch.log(scores.clamp_min(torch.finfo(scores.dtype).tiny))
        return nnf.log_softmax(scores / temperature, dim=1)


@dataclass(frozen=True)
class Rows:
    """Training rows: inputs by name and, for each row, the cloud's logits or a label."""

    inputs: Arrays
    targets: npt.NDArray[Any]  # float [rows, classes] cloud logits, or int64 [rows] labels

    @property
    def count(self) -> int:
        return int(self.targets.shape[0])

    def take(self, rows: npt.NDArray[np.intp]) -> Rows:
        return Rows({name: array[rows] for name, array in self.inputs.items()}, self.targets[rows])


class _OnDevice:
    """Rows as tensors on the training device, handed out in batches."""

    def __init__(self, rows: Rows, io: StudentIO, device: torch.device) -> None:
        self.inputs = [torch.from_numpy(rows.inputs[spec.name]).to(device) for spec in io.inputs]
        self.targets = torch.from_numpy(rows.targets).to(device)
        self.count = rows.count

    def batch(self, picked: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [tensor[picked] for tensor in self.inputs], self.targets[picked]


class _Cycle:
    """Random batches of the labelled rows, each row once per pass, for as many steps as the recorded rows take."""

    def __init__(self, rows: int, size: int, generator: torch.Generator, device: torch.device) -> None:
        self.rows, self.size, self.generator, self.device = rows, min(size, rows), generator, device
        self.order = torch.randperm(rows, generator=generator)
        self.at = 0

    def next(self) -> torch.Tensor:
        if self.at + self.size > self.rows:
            self.order, self.at = torch.randperm(self.rows, generator=self.generator), 0
        picked = self.order[self.at : self.at + self.size]
        self.at += self.size
        return picked.to(self.device)


def build_student(factory: str, weights: Path | None, seed: int) -> nn.Module:
    """The factory's module, initialised from `seed` (or loaded from `weights`, a state_dict)."""
    torch.manual_seed(seed)  # the factory's initialisation draws from torch's global generator
    module = call_factory(factory)
    if not isinstance(module, nn.Module):
        raise ConfigurationError(f"factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigurationError(f"{weights}: not a state_dict of {factory!r}'s module: {one_line(exc)}") from exc
    return module


def train_student(
    module: nn.Module,
    io: StudentIO,
    soft: Rows | None,
    labelled: Rows | None,
    training: Training,
    device: torch.device,
) -> list[float]:
    """Train `module` in place: on `soft` rows (the cloud's logits) by distillation, on `labelled` rows by
    cross-entropy, on both by (1 - alpha) x distillation + alpha x cross-entropy. Returns the mean loss of
    each epoch. Deterministic for a seed on one device and thread count."""
    if soft is None and labelled is None:
        raise ConfigurationError("nothing to train on: no recorded rows and no labelled rows")
    torch.manual_seed(training.seed)
    generator = torch.Generator().manual_seed(training.seed)
    module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    teacher = _OnDevice(soft, io, device) if soft is not None else None
    truth = _OnDevice(labelled, io, device) if labelled is not None else None
    main = teacher or truth
    assert main is not None
    cycle = _Cycle(truth.count, training.batch_size, generator, device) if truth and teacher else None
    kd_weight = 1.0 - training.alpha if truth else 1.0
    ce_weight = training.alpha if teacher else 1.0
    temperature = training.temperature
    losses: list[float] = []
    with progress_bar(training.epochs, "distilling", "epoch") as bar:
        for _ in range(training.epochs):
            order = torch.randperm(main.count, generator=generator).to(device)
            total, steps = 0.0, 0
            for start in range(0, main.count, training.batch_size):
                picked = order[start : start + training.batch_size]
                loss = torch.zeros((), device=device)
                if teacher is not None:
                    inputs, logits = teacher.batch(picked)
                    student = io.log_probabilities(module, inputs, temperature)
                    target = nnf.log_softmax(logits / temperature, dim=1)
                    distilled = nnf.kl_div(student, target, reduction="batchmean", log_target=True)
                    loss = loss + kd_weight * distilled * temperature**2
                if truth is not None:
                    inputs, labels = truth.batch(cycle.next() if cycle is not None else picked)
                    loss = loss + ce_weight * nnf.nll_loss(io.log_probabilities(module, inputs, 1.0), labels)
                optimizer.zero_grad()
                torch.autograd.backward(loss)
                optimizer.step()
                total, steps = total + float(loss.detach()), steps + 1
            losses.append(total / steps)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
    module.eval()
    return losses


def export_onnx(module: nn.Module, io: StudentIO, example: Mapping[str, npt.NDArray[Any]], path: Path) -> None:
    """The module as one ONNX file (weights inside it) whose batch dimension is dynamic."""
    module = module.cpu().eval()
    arguments = tuple(torch.from_numpy(np.ascontiguousarray(example[spec.name])) for spec in io.inputs)
    names = [spec.name for spec in (*io.inputs, *io.outputs)]
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated for the dynamo one, which needs onnxscript; these
        # small graphs export fine with it (as models/train_digits.py's do).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            arguments,
            str(path),
            dynamo=False,
            external_data=False,
            input_names=[spec.name for spec in io.inputs],
            output_names=[spec.name for spec in io.outputs],
            dynamic_axes={name: {0: "batch"} for name in names},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )


def check_export(module: nn.Module, io: StudentIO, onnx: OnnxModel, example: Mapping[str, npt.NDArray[Any]]) -> None:
    """The exported model answers as the module does (to float tolerance)."""
    with torch.no_grad():
        produced = module(*(torch.from_numpy(example[spec.name]) for spec in io.inputs))
    expected = tuple(produced) if isinstance(produced, tuple | list) else (produced,)
    got = onnx.predict(example)
    for spec, want in zip(io.outputs, expected, strict=True):
        if not np.allclose(got[spec.name], want.numpy(), rtol=1e-3, atol=1e-4):
            raise ConfigurationError(f"the exported ONNX model's {spec.name!r} differs from the trained module's")


# --- the command ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillOptions:
    repository: Path
    model: str
    records: Path
    data: Path  # validation .npz for the new threshold and temperature (as `offload calibrate --data`)
    target: Target
    out: Path  # the repository the new version is written into (its model folder is replaced)
    factory: str | None = None  # default: the model's [distill] factory
    weights: Path | None = None  # a state_dict (torch.save) to start from; default: the factory's initialisation
    save_weights: Path | None = None
    labelled: Path | None = None
    training: Training = Training()
    holdout: float = 0.1
    version: str | None = None  # default: the model's version + 1
    cloud: str | None = None  # for calibration: a running OIP server; default: the [cloud] model run here
    cloud_security: ChannelSecurity | None = None
    fit_temperature: bool = True
    manifest: bool = False
    device: str = "auto"


@dataclass(frozen=True)
class DistillResult:
    folder: Path
    version: str
    trained_rows: int
    held_out_rows: int
    labelled_rows: int
    agreement_before: float | None  # the current edge model's top-class agreement with the cloud, held-out rows
    agreement_after: float | None
    losses: tuple[float, ...]
    calibration: Calibration
    manifest: Manifest | None


def run_distill(options: DistillOptions) -> DistillResult:
    """The whole `offload distill`: read, train, export, check, version, calibrate, put in place."""
    entry = _entry(options.repository, options.model)
    io = StudentIO.of(entry)
    edge = entry.section("edge", EdgeSection)
    if edge is None:
        raise entry.error("distill makes an edge model: the model needs an [edge] section")
    version = options.version or _next_version(entry)
    if version == entry.config.version:
        raise entry.error(f"the new model needs a new version; {version!r} is the current one")
    module = build_student(options.factory or _factory(entry), options.weights, options.training.seed)
    records = read_records(options.records, entry.config.name)
    soft = _recorded_rows(records, io, options.records)
    held_out, train = _split(soft.count, options.holdout, options.training.seed)
    labelled = _labelled_rows(options.labelled, io) if options.labelled is not None else None
    current = OnnxModel(entry.artifact_path(edge.artifact), edge)

    print(
        f"offload distill: model {entry.config.name!r} v{entry.config.version} -> v{version}; {soft.count} "
        f"recorded rows from {options.records} ({records.files} files; cloud versions "
        f"{_counts(records.cloud_versions)}): {train.size} to train on, {held_out.size} held out"
        + (f"; {labelled.count} labelled rows (alpha {options.training.alpha:g})" if labelled else "")
    )
    losses = train_student(module, io, soft.take(train), labelled, options.training, pick_device(options.device))
    print(
        f"  trained {options.training.epochs} epochs at temperature {options.training.temperature:g}: "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
    check = soft.take(held_out[:256] if held_out.size else train[:256])
    options.out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".distill-", dir=options.out))
    try:
        folder = stage / entry.folder.name
        shutil.copytree(entry.folder, folder, ignore=shutil.ignore_patterns(".*"))
        artifact = folder / edge.artifact
        export_onnx(module, io, check.inputs, artifact)
        distilled = OnnxModel(artifact, edge)
        distilled.check_declared(entry.config.inputs, entry.config.outputs)
        check_export(module, io, distilled, check.inputs)
        before = after = None
        if held_out.size:
            kept = soft.take(held_out)
            before, after = _agreement(current, io, kept), _agreement(distilled, io, kept)
            print(
                f"  agreement with the cloud on the {held_out.size} held-out recorded rows: {before:.1%} before "
                f"(v{entry.config.version}), {after:.1%} after"
            )
        write_version(folder, version)
        calibration = run_calibrate(
            CalibrateOptions(
                repository=stage,
                model=entry.config.name,
                data=options.data,
                target=options.target,
                cloud=options.cloud,
                cloud_security=options.cloud_security,
                fit_temperature=options.fit_temperature,
            )
        )
        final = options.out / entry.folder.name
        _put_in_place(folder, final, stage / ".previous")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = (final / edge.artifact).stat().st_size
    print(f"wrote {entry.config.name} v{version} to {final} ({edge.artifact}: {size:,} bytes)")
    if options.save_weights is not None:
        torch.save(module.state_dict(), options.save_weights)
        print(f"saved the trained weights to {options.save_weights}")
    manifest = None
    if options.manifest:
        path, manifest = write_manifest(options.out)
        print(f"wrote {path}: version {manifest.version}")
    return DistillResult(
        folder=final,
        version=version,
        trained_rows=int(train.size),
        held_out_rows=int(held_out.size),
        labelled_rows=labelled.count if labelled else 0,
        agreement_before=before,
        agreement_after=after,
        losses=tuple(losses),
        calibration=calibration,
        manifest=manifest,
    )


def _entry(repository: Path, name: str) -> ModelEntry:
    entries = load_repository(repository)
    if name not in entries:
        raise ConfigurationError(f"no model {name!r} in {repository}; models: {sorted(entries)}")
    return entries[name]


def _next_version(entry: ModelEntry) -> str:
    current = entry.config.version
    if not current.isdigit():
        raise entry.error(f"version {current!r} is not a number to bump; pass --version for the new one")
    return str(int(current) + 1)


def _factory(entry: ModelEntry) -> str:
    section = entry.section("distill", DistillSection)
    if section is None:
        raise entry.error(
            'no [distill] section: name the edge architecture there (factory = "package.module:function") '
            "or pass --factory"
        )
    return section.factory


def _recorded_rows(records: Records, io: StudentIO, where: Path) -> Rows:
    scores = records.outputs.get(io.score_output)
    if scores is None:
        raise ConfigurationError(f"{where}: the recordings hold no output {io.score_output!r}")
    logits = scaled_logits(scores, io.output_kind).astype(np.float32)
    finite = np.isfinite(logits).all(axis=1)  # a row the cloud answered with NaN or inf teaches nothing
    inputs = {name: array[finite] for name, array in records.inputs.items()}
    return Rows(io.cast(inputs, str(where)), logits[finite])


def _labelled_rows(path: Path, io: StudentIO) -> Rows:
    inputs, labels = load_inputs(path, io.inputs)
    if labels is None:
        raise ConfigurationError(f"{path}: --labelled needs 'labels' (class indices, one per row)")
    classes = io.outputs[io.score_index].shape[1]
    if classes > 0 and np.any((labels < 0) | (labels >= classes)):
        raise ConfigurationError(f"{path}: labels must be class indices in [0, {classes})")
    return Rows(inputs, labels)


def _split(rows: int, share: float, seed: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(held out, train) row indices: a seeded random `share` of the rows held out."""
    order = np.random.default_rng(seed).permutation(rows)
    held = math.floor(rows * share)
    return np.sort(order[:held]), np.sort(order[held:])


def _agreement(model: OnnxModel, io: StudentIO, rows: Rows) -> float:
    scores = model.predict(rows.inputs)[io.score_output]
    return float(np.mean(predicted_classes(scores) == predicted_classes(rows.targets)))


def _put_in_place(folder: Path, final: Path, previous: Path) -> None:
    """Replace `final` by `folder` (the old one moved to `previous`, then deleted with the stage)."""
    if final.exists():
        final.rename(previous)
    folder.rename(final)


def _counts(by_version: Mapping[str, int]) -> str:
    return ", ".join(f"{version or '(unnamed)'}: {rows}" for version, rows in sorted(by_version.items()))
