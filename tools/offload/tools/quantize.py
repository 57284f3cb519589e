"""`offload quantize`: an 8-bit edge model from ONNX Runtime's quantization tools, written as a new model version.

It quantizes a model's [edge] ONNX file with `onnxruntime.quantization` (dynamic: weights to
8 bits ahead of time, activations at run time; static: activations too, their ranges measured
on calibration rows from an .npz), checks that the result loads in the edge runtime with the
same inputs and outputs, re-chooses the routing threshold for the same offload share (the
quantized model's confidences differ a little from the float model's), and writes the result as
a new version: in place (same repository, same name: the folder gets `edge_int8.onnx`, its
model.toml the new artifact, a bumped `version` and the new threshold, comments kept) or as a
copy of the folder (another repository or another name). It prints both models' file size,
ONNX Runtime latency (a bare `InferenceSession.run`, the [edge] section's threads, p50 at
batch 1 and a larger batch, the two models timed alternately so machine load hits both alike),
and edge accuracy, routed accuracy and offload share before and after: on the validation rows
the threshold is chosen on and, with `--test-data`, on held-out rows, each model run one row at a
time as one-row requests run it (dynamic quantization scales activations by the batch's range, so
in a batch a row's answer depends on its neighbours; the report counts the classes that batching
changes). The cloud's answers
(routed accuracy) come from the model's [cloud] section run here with PyTorch, or from a
running server (`--cloud`), as in `offload calibrate`.
"""

from __future__ import annotations

import re
import shutil
import statistics
import tempfile
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnxruntime import quantization

from offload.edge.agent import load_edge_models
from offload.edge.config import EdgeSection
from offload.edge.onnx_model import OnnxModel
from offload.oip.errors import ConfigurationError, one_line
from offload.oip.repository import CONFIG_FILE, ModelEntry, TensorSpec, load_model, load_repository
from offload.oip.security import ChannelSecurity
from offload.router.calibration import Arrays, Calibration, Ints, Target, calibrate_predictions, predicted_classes
from offload.router.confidence import row_confidence
from offload.router.config import RoutingSection
from offload.router.models import LocalModel, RoutedModel
from offload.tools.calibrate import (
    BATCH_ROWS,
    _batches,
    _concatenate,
    _progress,
    _replace_file,
    edge_predictions,
    load_inputs,
    local_cloud_scores,
    remote_cloud_scores,
    with_table_values,
    write_routing,
)
from offload.tools.progress import progress_bar, with_progress

Mode = Literal["dynamic", "static"]
Format = Literal["qdq", "qoperator"]
EightBits = Literal["int8", "uint8"]
Method = Literal["minmax", "entropy", "percentile"]

MODES: tuple[Mode, ...] = ("dynamic", "static")
FORMATS: dict[Format, Any] = {"qdq": quantization.QuantFormat.QDQ, "qoperator": quantization.QuantFormat.QOperator}
TYPES: dict[EightBits, Any] = {"int8": quantization.QuantType.QInt8, "uint8": quantization.QuantType.QUInt8}
METHODS: dict[Method, Any] = {
    "minmax": quantization.CalibrationMethod.MinMax,
    "entropy": quantization.CalibrationMethod.Entropy,
    "percentile": quantization.CalibrationMethod.Percentile,
}
# Operators of a quantized graph: QDQ pairs, dynamic quantization's integer kernels, QOperator's fused ones.
QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm"}
)
# The quantized file beside (or instead of) the float one: edge.onnx -> edge_int8.onnx.
ARTIFACT_SUFFIX = "_int8"
DEFAULT_LATENCY_RUNS = 200
DEFAULT_LATENCY_BATCH = 64


def quantized_ops(path: Path) -> set[str]:
    """The operators in an ONNX file that only a quantized graph has."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {node.op_type for node in graph.node if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear")}


# --- quantizing one file --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeSettings:
    """How ONNX Runtime quantizes: what `quantize_dynamic`/`quantize_static` are called with.

    The format, the activation type and the calibration method are the static mode's (dynamic
    quantization computes each activation's range as it runs, in the QOperator form, uint8):
    None means the default, an error where the mode has no such choice.
    """

    mode: Mode = "dynamic"
    per_channel: bool = False
    weight_type: EightBits = "int8"
    quant_format: Format | None = None
    activation_type: EightBits | None = None
    calibrate_method: Method | None = None
    op_types: tuple[str, ...] = ()  # empty: every operator ONNX Runtime can quantize
    preprocess: bool = True  # ONNX Runtime's quant_pre_process (shape inference, graph optimization) first

    def check(self, calibration_data: Path | None) -> None:
        if self.mode not in MODES:
            raise ConfigurationError(f"unknown quantization mode {self.mode!r}; expected one of {list(MODES)}")
        if self.mode == "static" and calibration_data is None:
            raise ConfigurationError(
                "--mode static needs --calibration-data FILE.npz: rows whose activation ranges set the 8-bit scales "
                "(the validation split will do)"
            )
        if self.mode == "dynamic":
            static_only = {
                "--calibration-data": calibration_data,
                "--format": self.quant_format,
                "--activation-type": self.activation_type,
                "--calibrate-method": self.calibrate_method,
            }
            given = [flag for flag, value in static_only.items() if value is not None]
            if given:
                raise ConfigurationError(
                    f"{', '.join(given)}: only --mode static uses {'it' if len(given) == 1 else 'them'} (dynamic "
                    "quantization measures activations as it runs, in the QOperator form)"
                )

    def describe(self) -> str:
        channels = "per channel" if self.per_channel else "per tensor"
        ops = f", ops {','.join(self.op_types)}" if self.op_types else ""
        if self.mode == "dynamic":
            return f"dynamic: {self.weight_type} weights {channels}, uint8 activations at run time{ops}"
        return (
            f"static: {(self.quant_format or 'qdq').upper()}, {self.weight_type} weights {channels}, "
            f"{self.activation_type or 'int8'} activations ({self.calibrate_method or 'minmax'} calibration){ops}"
        )


class _CalibrationRows:
    """ONNX Runtime's CalibrationDataReader (it asks only for get_next) over an .npz's rows, a batch at a time."""

    def __init__(self, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
        rows = next(iter(inputs.values())).shape[0]
        self._inputs = inputs
        self._batches = _progress(_batches(rows), "static calibration")

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {name: array[batch] for name, array in self._inputs.items()}


def quantize_file(
    source: Path, output: Path, settings: QuantizeSettings, calibration: Mapping[str, npt.NDArray[Any]] | None
) -> None:
    """Write the 8-bit version of the ONNX model `source` to `output` (weights embedded)."""
    op_types = list(settings.op_types) or None
    with tempfile.TemporaryDirectory(prefix="offload-quantize-") as work:
        model_input = source
        try:
            if settings.preprocess:
                model_input = Path(work) / "preprocessed.onnx"
                quantization.quant_pre_process(str(source), str(model_input))
            if settings.mode == "dynamic":
                quantization.quantize_dynamic(
                    model_input,
                    output,
                    op_types_to_quantize=op_types,
                    per_channel=settings.per_channel,
                    weight_type=TYPES[settings.weight_type],
                )
            else:
                if calibration is None:
                    raise ConfigurationError("static quantization needs calibration rows")
                quantization.quantize_static(
                    model_input,
                    output,
                    _CalibrationRows(calibration),
                    quant_format=FORMATS[settings.quant_format or "qdq"],
                    op_types_to_quantize=op_types,
                    per_channel=settings.per_channel,
                    activation_type=TYPES[settings.activation_type or "int8"],
                    weight_type=TYPES[settings.weight_type],
                    calibrate_method=METHODS[settings.calibrate_method or "minmax"],
                )
        except ConfigurationError:
            raise
        except Exception as exc:  # ONNX Runtime's and onnx's own exception types
            raise ConfigurationError(
                f"{source}: ONNX Runtime {ort.__version__} could not quantize the model ({one_line(exc)})"
            ) from exc
    if not quantized_ops(output):
        which = f"of the op types {list(settings.op_types)}" if settings.op_types else "it can quantize"
        raise ConfigurationError(
            f"{source}: ONNX Runtime found no operator {which} in the model; nothing was quantized"
        )


# --- latency --------------------------------------------------------------------------------------------------------


def bare_session(path: Path, section: EdgeSection) -> Any:
    """An InferenceSession with the [edge] section's threads and providers, as the edge runtime makes it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = section.intra_op_threads
    options.inter_op_num_threads = section.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = ort.get_available_providers()
    return ort.InferenceSession(str(path), options, providers=[name for name in section.providers if name in available])


def first_rows(inputs: Mapping[str, npt.NDArray[Any]], rows: int) -> Arrays:
    """The first `rows` rows of every input, repeated from the start when there are fewer."""
    return {
        name: np.ascontiguousarray(np.take(array, np.arange(rows) % array.shape[0], axis=0))
        for name, array in inputs.items()
    }


def time_runs(
    paths: Sequence[Path], section: EdgeSection, inputs: Mapping[str, npt.NDArray[Any]], rows: int, runs: int
) -> list[list[float]]:
    """Each model's seconds per `session.run` on `rows` rows, `runs` times after a warm-up.

    The models take turns, run by run (each round in a rotated order), so a burst of load from
    elsewhere on the machine slows them alike instead of whichever was being timed then.
    """
    sessions = [bare_session(path, section) for path in paths]
    feeds = first_rows(inputs, rows)
    for session in sessions:
        for _ in range(max(5, runs // 10)):
            session.run(None, feeds)
    timings: list[list[float]] = [[] for _ in sessions]
    with progress_bar(runs * len(sessions), f"latency at batch {rows}", "run") as bar:
        for run in range(runs):
            for turn in range(len(sessions)):
                index = (run + turn) % len(sessions)
                started = time.perf_counter()
                sessions[index].run(None, feeds)
                timings[index].append(time.perf_counter() - started)
                bar.update(1)
    return timings


# --- figures --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """A data set's inputs, labels (the cloud's answers where the file has none) and the cloud's scores."""

    path: Path
    inputs: Arrays
    labels: Ints
    labels_from: str
    cloud_scores: npt.NDArray[Any]


@dataclass(frozen=True)
class Figures:
    """One edge model with one routing section on one labelled data set."""

    rows: int
    edge_accuracy: float
    cloud_accuracy: float
    routed_accuracy: float
    offload_share: float
    agreement: float  # share of rows whose edge answer is the float model's
    batch_changed: float  # share of rows whose class changes when run in a batch of BATCH_ROWS rows


@dataclass(frozen=True)
class Answers:
    """A model's outputs on a data set, row by row as one-row requests get them, and the share of rows whose
    class changes in BATCH_ROWS-row batches: dynamic quantization scales each activation by the batch's range,
    so there a row's answer depends on the rows beside it."""

    outputs: Arrays
    batch_changed: float


def answers(model: LocalModel, inputs: Mapping[str, npt.NDArray[Any]], score_output: str, label: str) -> Answers:
    batched = edge_predictions(model, inputs, label)  # first: it turns the model's complaints into messages
    rows = next(iter(inputs.values())).shape[0]
    single = _concatenate(
        model.predict({name: array[row : row + 1] for name, array in inputs.items()})
        for row in with_progress(range(rows), rows, f"{label}, row by row", "row")
    )
    changed = predicted_classes(single[score_output]) != predicted_classes(batched[score_output])
    return Answers(single, float(np.mean(changed)))


def figures(edge: Answers, float_model: Answers, data: Labelled, routing: RoutingSection, score_output: str) -> Figures:
    """An edge model's figures on `data` with `routing`, from its row-by-row answers."""
    edge_classes = predicted_classes(edge.outputs[score_output])
    cloud_classes = predicted_classes(data.cloud_scores)
    # The router's rule: rows whose confidence is below the threshold go to the cloud.
    offload = row_confidence(edge.outputs, routing, score_output) < routing.threshold
    routed = np.where(offload, cloud_classes, edge_classes)
    return Figures(
        rows=int(data.labels.shape[0]),
        edge_accuracy=float(np.mean(edge_classes == data.labels)),
        cloud_accuracy=float(np.mean(cloud_classes == data.labels)),
        routed_accuracy=float(np.mean(routed == data.labels)),
        offload_share=float(np.mean(offload)),
        agreement=float(np.mean(edge_classes == predicted_classes(float_model.outputs[score_output]))),
        batch_changed=edge.batch_changed,
    )


@dataclass(frozen=True)
class SplitFigures:
    """Before (float model, its routing) and after (quantized model, the recalibrated routing) on one data set."""

    path: Path
    labels_from: str
    held_out: bool
    before: Figures
    after: Figures


# --- the new version in the repository -----------------------------------------------------------------------------


def bump_version(version: str) -> str:
    """The version with its last number increased: "1" -> "2", "v1.9" -> "v1.10", "007" -> "008"."""
    match = re.fullmatch(r"(.*?)(\d+)", version)
    if match is None:
        raise ConfigurationError(f"version {version!r} does not end in a number to increase; pass --new-version")
    digits = match.group(2)
    return f"{match.group(1)}{str(int(digits) + 1).zfill(len(digits))}"


@dataclass(frozen=True)
class Destination:
    """Where the new version goes: a folder, its model name and version, its edge artifact."""

    repository: Path
    folder: Path
    name: str
    version: str
    artifact: str
    in_place: bool

    @property
    def artifact_path(self) -> Path:
        return self.folder / self.artifact


def plan_destination(
    entry: ModelEntry,
    section: EdgeSection,
    source_repository: Path,
    repository: Path | None,
    name: str | None,
    version: str | None,
) -> Destination:
    """The new version's place, checked before any work: nothing there is overwritten."""
    target_repository = repository or source_repository
    new_name = name or entry.config.name
    new_version = version or bump_version(entry.config.version)
    if new_name == entry.config.name and new_version == entry.config.version:
        raise ConfigurationError(
            f"--new-version {new_version!r} is the model's current version; a new model version needs a new one"
        )
    if not target_repository.is_dir():
        raise ConfigurationError(f"model repository {target_repository} is not a folder")
    artifact = f"{Path(section.artifact).stem}{ARTIFACT_SUFFIX}.onnx"
    folder = target_repository / new_name
    in_place = folder.resolve() == entry.folder
    if in_place:
        if new_name != entry.config.name:
            raise ConfigurationError(f"{folder} is the model's own folder; a new name needs a new folder")
        if (folder / artifact).exists():
            raise ConfigurationError(
                f"{folder / artifact} exists (an earlier quantization?); remove it, or write the new version "
                "elsewhere with --out-repository or --name"
            )
    elif folder.exists():
        raise ConfigurationError(f"{folder} exists; choose another --name or --out-repository, or remove it")
    return Destination(target_repository, folder, new_name, new_version, artifact, in_place)


def _new_model_toml(text: str, entry: ModelEntry, destination: Destination, note: str) -> str:
    """model.toml for the new version: name (when renamed), version, [edge] artifact; comments on top saying what it
    is. The rest stays: a copy is a whole model folder, its [cloud] section (if any) and [routing] cloud_model too."""
    top: dict[str, float | str] = {"version": destination.version}
    if destination.name != entry.config.name:
        top["name"] = destination.name
    text = with_table_values(text, None, top)
    text = with_table_values(text, "edge", {"artifact": destination.artifact})
    newline = "\r\n" if text.endswith("\r\n") else "\n"
    return "".join(f"# {line}{newline}" for line in textwrap.wrap(note, 110)) + text


def write_version(
    entry: ModelEntry,
    source_artifact: Path,
    destination: Destination,
    quantized: Path,
    calibration: Calibration,
    note: str,
) -> None:
    """Write the new version (the quantized file, model.toml) and check it loads; on failure leave things as before."""
    with entry.config_file.open(encoding="utf-8", newline="") as stream:
        source_text = stream.read()

    def leave_out(directory: str, names: list[str]) -> set[str]:
        # The float model is the old version's; the new folder holds what the new one needs.
        return {source_artifact.name} if Path(directory).resolve() == source_artifact.parent else set()

    try:
        if not destination.in_place:
            shutil.copytree(entry.folder, destination.folder, ignore=leave_out)
        shutil.copyfile(quantized, destination.artifact_path)
        _replace_file(destination.folder / CONFIG_FILE, _new_model_toml(source_text, entry, destination, note))
        write_routing(
            destination.folder,
            calibration.threshold,
            calibration.temperature if calibration.temperature_fitted else None,
        )
        # Every model of the repository must still load (a duplicate name would not), the new one as planned.
        loaded = destination.name in load_edge_models(destination.repository)
        written = load_model(destination.folder)
        section = written.section("edge", EdgeSection)
        if (
            not loaded
            or written.config.version != destination.version
            or section is None
            or section.artifact != destination.artifact
        ):
            raise ConfigurationError(
                f"{destination.folder / CONFIG_FILE}: the edited file does not describe the new version (is a key "
                "written as an inline table or with dotted keys?); edit it by hand"
            )
    except BaseException:
        if destination.in_place:
            _replace_file(destination.folder / CONFIG_FILE, source_text)
            destination.artifact_path.unlink(missing_ok=True)
        else:
            shutil.rmtree(destination.folder, ignore_errors=True)
        raise


# --- the command ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeOptions:
    repository: Path
    model: str
    data: Path  # validation rows: the threshold is chosen on them
    settings: QuantizeSettings = QuantizeSettings()
    calibration_data: Path | None = None  # static mode's rows for the activation ranges
    test_data: Path | None = None  # held-out rows, only reported
    target_offload: float | None = None  # default: the share the current threshold gives on `data`
    fit_temperature: bool = False
    out_repository: Path | None = None
    name: str | None = None
    new_version: str | None = None
    cloud: str | None = None
    cloud_security: ChannelSecurity | None = None
    latency_runs: int = DEFAULT_LATENCY_RUNS  # 0: no latency measurement
    latency_batch: int = DEFAULT_LATENCY_BATCH


@dataclass(frozen=True)
class Latency:
    rows: int
    runs: int
    before_seconds: float
    after_seconds: float


@dataclass(frozen=True)
class QuantizeResult:
    model: str
    version: str
    destination: Destination
    settings: QuantizeSettings
    source_path: Path
    source_bytes: int
    quantized_bytes: int
    routing_before: RoutingSection
    routing_after: RoutingSection
    target_offload: float
    target_from: str
    calibration: Calibration
    splits: list[SplitFigures]
    latencies: list[Latency] = field(default_factory=list)
    threads: tuple[int, int] = (1, 1)
    quantized_ops: frozenset[str] = frozenset()
    calibration_rows: tuple[Path, int] | None = None  # static mode: the file and its row count


def _rows(path: Path, specs: tuple[TensorSpec, ...]) -> tuple[Arrays, Ints | None]:
    """An .npz's inputs and labels (calibrate's load_inputs), each input's row shape checked against the model's."""
    inputs, labels = load_inputs(path, specs)
    for spec in specs:
        shape = inputs[spec.name].shape[1:]
        wanted = spec.shape[1:]
        if len(shape) != len(wanted) or any(want not in (-1, got) for got, want in zip(shape, wanted, strict=True)):
            raise ConfigurationError(
                f"{path}: input {spec.name!r} has rows of shape {list(shape)}; the model takes {list(wanted)} "
                "(-1: any size)"
            )
    return inputs, labels


def _labelled(path: Path, routed: RoutedModel, repository: Path, options: QuantizeOptions) -> Labelled:
    inputs, labels = _rows(path, routed.edge.inputs)
    config = routed.config
    if options.cloud:
        cloud_scores = remote_cloud_scores(options.cloud, config, inputs, routed.score_output, options.cloud_security)
    else:
        cloud_scores = local_cloud_scores(repository, config, inputs, routed.score_output)
    if labels is None:
        return Labelled(path, inputs, predicted_classes(cloud_scores), "the cloud model's answers", cloud_scores)
    return Labelled(path, inputs, labels, "the file", cloud_scores)


def _source(repository: Path, model: str) -> tuple[ModelEntry, RoutedModel, EdgeSection, Path]:
    """The model to quantize: its entry, as the edge runs it, its [edge] section and its float ONNX file."""
    edge_models = load_edge_models(repository)
    routed = edge_models.get(model)
    if routed is None:
        raise ConfigurationError(
            f"no model {model!r} with an [edge] section in {repository}; models: {sorted(edge_models)}"
        )
    entry = load_repository(repository)[model]
    section = entry.section("edge", EdgeSection)
    assert section is not None  # load_edge_models kept only models with one
    path = entry.artifact_path(section.artifact)
    found = quantized_ops(path)
    if found:
        raise ConfigurationError(
            f"{path}: the edge model is quantized already (it has {sorted(found)}); quantize the float model"
        )
    return entry, routed, section, path


def run_quantize(options: QuantizeOptions) -> QuantizeResult:
    """The whole `offload quantize`: quantize, check, measure, recalibrate, report, write the new version."""
    settings = options.settings
    settings.check(options.calibration_data)
    if options.latency_runs < 0 or options.latency_batch < 1:
        raise ConfigurationError("--latency-runs must be 0 or more and --latency-batch 1 or more")
    entry, routed, section, source_path = _source(options.repository, options.model)
    destination = plan_destination(
        entry, section, options.repository, options.out_repository, options.name, options.new_version
    )
    calibration_rows = None
    if options.calibration_data is not None:
        calibration_rows, _ = _rows(options.calibration_data, routed.edge.inputs)
    validation = _labelled(options.data, routed, options.repository, options)
    test = None if options.test_data is None else _labelled(options.test_data, routed, options.repository, options)

    with tempfile.TemporaryDirectory(prefix="offload-quantize-") as work:
        quantized_path = Path(work) / destination.artifact
        quantize_file(source_path, quantized_path, settings, calibration_rows)
        quantized = OnnxModel(quantized_path, section)
        if (quantized.inputs, quantized.outputs) != (routed.edge.inputs, routed.edge.outputs):
            raise ConfigurationError(
                f"the quantized model's tensors {[*quantized.inputs, *quantized.outputs]} differ from the float "
                f"model's {[*routed.edge.inputs, *routed.edge.outputs]}"
            )
        quantized.check_declared(entry.config.inputs, entry.config.outputs)

        score = routed.score_output
        routing = routed.routing
        answered = [
            (
                split,
                answers(routed.edge, split.inputs, routed.score_output, "float edge model"),
                answers(quantized, split.inputs, routed.score_output, "8-bit edge model"),
            )
            for split in (validation, test)
            if split is not None
        ]
        _, float_answers, quantized_answers = answered[0]
        if options.target_offload is None:
            target = float(np.mean(row_confidence(float_answers.outputs, routing, score) < routing.threshold))
            target_from = f"the share threshold {routing.threshold!r} sends with the float model on the validation rows"
        else:
            target, target_from = options.target_offload, "--target-offload"
        calibration = calibrate_predictions(
            quantized_answers.outputs,
            validation.cloud_scores,
            validation.labels,
            routing,
            score,
            Target("offload", target),
            options.fit_temperature,
        )
        routing_after = routing.model_copy(
            update={"threshold": calibration.threshold, "temperature": calibration.temperature}
        )
        splits = [
            SplitFigures(
                path=split.path,
                labels_from=split.labels_from,
                held_out=split is test,
                before=figures(before, before, split, routing, score),
                after=figures(after, before, split, routing_after, score),
            )
            for split, before, after in answered
        ]
        latencies = []
        if options.latency_runs:
            for rows in dict.fromkeys((1, options.latency_batch)):
                timed = time_runs([source_path, quantized_path], section, validation.inputs, rows, options.latency_runs)
                float_p50, quantized_p50 = (statistics.median(seconds) for seconds in timed)
                latencies.append(Latency(rows, options.latency_runs, float_p50, quantized_p50))
        note = (
            f"Version {destination.version}: {destination.artifact} is {options.model} version "
            f"{entry.config.version}'s {source_path.name} quantized by offload quantize ({settings.describe()}); "
            f"threshold recalibrated for offload {target:.1%}."
        )
        write_version(entry, source_path, destination, quantized_path, calibration, note)
    result = QuantizeResult(
        model=options.model,
        version=entry.config.version,
        destination=destination,
        settings=settings,
        source_path=source_path,
        source_bytes=source_path.stat().st_size,
        quantized_bytes=destination.artifact_path.stat().st_size,
        routing_before=routing,
        routing_after=routing_after,
        target_offload=target,
        target_from=target_from,
        calibration=calibration,
        splits=splits,
        latencies=latencies,
        threads=(section.intra_op_threads, section.inter_op_threads),
        quantized_ops=frozenset(quantized_ops(destination.artifact_path)),
        calibration_rows=None
        if calibration_rows is None or options.calibration_data is None
        else (options.calibration_data, next(iter(calibration_rows.values())).shape[0]),
    )
    print(report(result))
    return result


def _milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def report(result: QuantizeResult) -> str:
    """The human-readable before/after table `offload quantize` prints."""
    destination = result.destination
    before, after = f"float v{result.version}", f"8-bit v{destination.version}"
    lines = [
        f"offload quantize: model {result.model!r} version {result.version} -> {destination.name!r} version "
        f"{destination.version} ({result.settings.describe()})",
        *(
            [f"  activation ranges from {result.calibration_rows[1]} rows of {result.calibration_rows[0]}"]
            if result.calibration_rows
            else []
        ),
        f"  {'':32}{before:>14}  {after:>14}  8-bit/float",
        f"  {'file size':32}{result.source_bytes:>12,} B  {result.quantized_bytes:>12,} B  "
        f"x{result.quantized_bytes / result.source_bytes:.2f}",
    ]
    for latency in result.latencies:
        lines.append(
            f"  {f'latency p50, batch {latency.rows}':32}{_milliseconds(latency.before_seconds):>14}  "
            f"{_milliseconds(latency.after_seconds):>14}  x{latency.after_seconds / latency.before_seconds:.2f}"
        )
    lines.append(f"  {'threshold':32}{result.routing_before.threshold!r:>14}  {result.routing_after.threshold!r:>14}")
    if result.calibration.temperature_fitted:
        lines.append(
            f"  {'temperature':32}{result.routing_before.temperature:>14.4g}  {result.routing_after.temperature:>14.4g}"
        )
    for split in result.splits:
        kind = "held out" if split.held_out else "the threshold is chosen on them"
        lines.append(f"  {split.path}: {split.before.rows} rows, {kind} (labels: {split.labels_from})")
        for label, attribute, digits in (
            ("edge accuracy", "edge_accuracy", 2),
            ("routed accuracy", "routed_accuracy", 2),
            ("offload", "offload_share", 1),
            ("agreement with the float model", "agreement", 2),
            (f"class changed in {BATCH_ROWS}-row batches", "batch_changed", 2),
        ):
            old, new = getattr(split.before, attribute), getattr(split.after, attribute)
            lines.append(f"    {label:30}{old:>14.{digits}%}  {new:>14.{digits}%}")
        lines.append(f"    {'cloud alone':30}{split.before.cloud_accuracy:>14.2%}")
    if result.latencies:
        intra, inter = result.threads
        lines.append(
            f"latency: InferenceSession.run, median of {result.latencies[0].runs} runs per model and batch, the models "
            f"taking turns; {intra} intra-op and {inter} inter-op thread(s), as the [edge] section sets"
        )
    if "ConvInteger" in result.quantized_ops:
        lines.append(
            "note: dynamic quantization made the convolutions ConvInteger, which ONNX Runtime's CPU kernels run "
            "slowly; for convolutional models --mode static (QDQ) is the one that runs faster"
        )
    lines.append(f"threshold: recalibrated for offload {result.target_offload:.1%} ({result.target_from})")
    where = "in place" if destination.in_place else "a new folder"
    lines.append(
        f"wrote {destination.folder} ({where}): {destination.artifact}, version {destination.version}, "
        f"threshold {result.routing_after.threshold!r}"
    )
    return "\n".join(lines)
