"""`offload calibrate`: run the edge and cloud models over a validation set, choose, report, write.

It runs the edge model and the cloud model over a validation set, fits the
temperature that minimises the edge model's log loss, and picks the threshold that
reaches a target: a share of rows sent to the cloud (`--target-offload`) or a routed
accuracy (`--target-accuracy`). It prints the expected offload rate and routed
accuracy with 95% Wilson intervals, writes `threshold` and `temperature` into the
model's `model.toml` (keeping the rest of the file and its comments) and can save a
plot of the accuracy-vs-offload curve. The statistics are `offload.router.calibration`.

With `--gate` it first trains a learned gate on the set (`offload.tools.gate`: cross-fitted, so
the threshold is chosen on scores of rows the scoring gate did not train on), writes it as
`gate.onnx` beside the edge model and sets `confidence = "gate"` and `gate` in `[routing]`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from offload.oip.datatypes import DATATYPES
from offload.oip.errors import ConfigurationError, OffloadError
from offload.oip.repository import CONFIG_FILE, TensorSpec, load_model, load_repository
from offload.oip.security import ChannelSecurity
from offload.router.calibration import (
    Arrays,
    Calibration,
    CalibrationError,
    Ints,
    Target,
    calibrate_predictions,
    predicted_classes,
    wilson_interval,
)
from offload.router.confidence import GATE_OUTPUT, as_rows
from offload.router.config import RoutedConfig, RoutingSection
from offload.tools.progress import with_progress

if TYPE_CHECKING:  # the gate needs onnx, imported only for --gate
    from offload.tools.gate import GateFit

# Rows per request to the cloud and per edge batch.
BATCH_ROWS = 256


# --- data and models ---------------------------------------------------------------------------------------------


def load_inputs(path: Path, specs: tuple[TensorSpec, ...]) -> tuple[Arrays, Ints | None]:
    """The inputs (cast to the model's datatypes) and the labels, if any, of an .npz validation set.

    The file holds `inputs` (for a model with one input) or one array per input
    name, and optionally `labels` (class indices, one per row).
    """
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: cannot read it as an .npz file: {exc}") from exc
    with data:
        names = set(data.files)
        if all(spec.name in names for spec in specs):
            raw = {spec.name: data[spec.name] for spec in specs}
        elif "inputs" in names and len(specs) == 1:
            raw = {specs[0].name: data["inputs"]}
        else:
            wanted = "'inputs'" if len(specs) == 1 else f"one array per input {[spec.name for spec in specs]}"
            raise CalibrationError(f"{path}: needs {wanted}; it has {sorted(names)}")
        labels = data["labels"] if "labels" in names else None
    inputs: Arrays = {}
    rows = {array.shape[0] if array.ndim else -1 for array in raw.values()}
    if len(rows) != 1 or -1 in rows:
        raise CalibrationError(f"{path}: the input arrays need one shared first (row) dimension")
    (count,) = rows
    if count == 0:
        raise CalibrationError(f"{path}: the data set has no rows")
    for spec in specs:
        if spec.datatype in ("BYTES", "BF16"):
            raise CalibrationError(f"{path}: input {spec.name!r} is {spec.datatype}; calibrate takes numeric inputs")
        dtype = DATATYPES[spec.datatype].dtype.newbyteorder("=")
        array = raw[spec.name]
        if array.dtype.kind not in "biuf" or not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise CalibrationError(
                f"{path}: input {spec.name!r} is {array.dtype}, which does not cast to {spec.datatype}"
            )
        inputs[spec.name] = np.ascontiguousarray(array.astype(dtype))
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != count or not np.issubdtype(labels.dtype, np.integer):
            raise CalibrationError(f"{path}: 'labels' must be {count} integer class indices, one per row")
        return inputs, labels.astype(np.int64)
    return inputs, None


def _batches(rows: int, size: int = BATCH_ROWS) -> list[slice]:
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _progress(batches: list[slice], label: str) -> Iterator[slice]:
    """The batches, with a bar on stderr counting rows done while a model runs."""
    total = batches[-1].stop if batches else 0
    return with_progress(batches, total, label, "row", size=lambda batch: batch.stop - batch.start)


def _concatenate(parts: Iterable[Arrays]) -> Arrays:
    collected: dict[str, list[npt.NDArray[Any]]] = {}
    for part in parts:
        for name, array in part.items():
            collected.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in collected.items()}


def edge_predictions(model: Any, inputs: Mapping[str, npt.NDArray[Any]], label: str = "edge model") -> Arrays:
    """Every output of a local model (an OnnxModel, a CloudModel: anything with predict) over all rows."""
    rows = next(iter(inputs.values())).shape[0]
    try:
        return _concatenate(
            model.predict({name: array[batch] for name, array in inputs.items()})
            for batch in _progress(_batches(rows), label)
        )
    except ConfigurationError:
        raise
    except (OffloadError, RuntimeError, ValueError) as exc:  # ORT's and torch's complaints about the input
        raise CalibrationError(f"the {label} failed on the data: {exc}") from exc


def local_cloud_scores(
    repository: Path, config: RoutedConfig, inputs: Mapping[str, npt.NDArray[Any]], score_output: str
) -> npt.NDArray[Any]:
    """The cloud model's score output, computed here with PyTorch (offload[cloud])."""
    try:
        import torch  # noqa: F401  (checked here to give the right hint)
    except ModuleNotFoundError as exc:
        raise CalibrationError(
            "computing the cloud's answers here needs offload[cloud] (torch): pip install 'offload[cloud]', "
            "or pass --cloud HOST:PORT of a running cloud service"
        ) from exc
    from offload.cloud.runtime import CloudModel, pick_device

    name = config.cloud_model_name
    entry = load_repository(repository).get(name)
    if entry is None or entry.config.cloud is None:
        raise CalibrationError(
            f"the cloud model {name!r} is not a model with a [cloud] section in {repository}; "
            "pass --cloud HOST:PORT of a server that has it"
        )
    model = CloudModel(entry, pick_device("auto"))
    return edge_predictions(model, inputs, "cloud model (local)")[score_output]


def remote_cloud_scores(
    target: str,
    config: RoutedConfig,
    inputs: Mapping[str, npt.NDArray[Any]],
    score_output: str,
    security: ChannelSecurity | None = None,
) -> npt.NDArray[Any]:
    """The cloud model's score output from a running OIP server, BATCH_ROWS rows per request.

    `security`: TLS and the bearer token for the channel, as the edge agent's (default: plaintext, no token).
    """
    return asyncio.run(_remote_cloud_scores(target, config, inputs, score_output, security))


async def _remote_cloud_scores(
    target: str,
    config: RoutedConfig,
    inputs: Mapping[str, npt.NDArray[Any]],
    score_output: str,
    security: ChannelSecurity | None,
) -> npt.NDArray[Any]:
    from offload.oip.client import OipClient
    from offload.oip.errors import UpstreamError
    from offload.oip.tensors import Tensor
    from offload.oip.types import InferRequest

    rows = next(iter(inputs.values())).shape[0]
    parts: list[npt.NDArray[Any]] = []
    try:
        async with OipClient(target, security=security) as client:
            await client.wait_for_ready(timeout=30.0)
            for batch in _progress(_batches(rows), f"cloud model ({target})"):
                request = InferRequest(
                    model_name=config.cloud_model_name,
                    model_version=config.routing.cloud_version,
                    # The inputs are already cast to the edge model's datatypes (load_inputs).
                    inputs=[Tensor.of(name, array[batch]) for name, array in inputs.items()],
                    outputs=[score_output],
                )
                response = await client.infer(request, timeout=60.0)
                tensor = response.output(score_output)
                if tensor is None or tensor.data.shape[0] != batch.stop - batch.start:
                    raise CalibrationError(f"the cloud at {target} did not answer {score_output!r} for every row")
                parts.append(tensor.data)
    except UpstreamError as exc:
        raise CalibrationError(f"the cloud at {target} failed: {exc}") from exc
    except OffloadError as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise CalibrationError(f"the cloud at {target} gave an unusable answer: {exc}") from exc
    return np.concatenate(parts)


# --- model.toml ----------------------------------------------------------------------------------------------------

_TABLE = re.compile(r"^\s*\[")
# A value on one line: a basic or literal string (which may hold spaces and '#'), or anything else without them.
_VALUE = r"""("(?:[^"\\\n]|\\.)*"|'[^'\n]*'|[^\s#]+)"""


def _key_line(key: str) -> re.Pattern[str]:
    # key = value   # comment
    return re.compile(rf"^(\s*{re.escape(key)}\s*=\s*){_VALUE}(.*)$", re.S)


def _toml_value(value: float | str) -> str:
    # A JSON string is a TOML basic string; a float's repr is a TOML float.
    return json.dumps(value) if isinstance(value, str) else repr(value)


RoutingValue = float | str


def with_routing_values(text: str, values: Mapping[str, RoutingValue]) -> str:
    """text with `values` set in its [routing] table: existing lines edited in place, missing ones inserted."""
    return with_table_values(text, "routing", values)


def with_table_values(text: str, table: str | None, values: Mapping[str, float | str]) -> str:
    """text with `values` set in its [table] (None: the top-level keys before the first table), keeping every
    other line and comment: existing lines edited in place, missing ones inserted after the table's last key,
    a missing table appended."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    if table is None:
        header: int | None = -1
    else:
        pattern = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]\s*(#.*)?$")
        header = next((index for index, line in enumerate(lines) if pattern.match(line)), None)
    if header is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += newline
        lines += [newline, f"[{table}]{newline}"]
        lines += [f"{key} = {_toml_value(value)}{newline}" for key, value in values.items()]
        return "".join(lines)
    end = next((index for index in range(header + 1, len(lines)) if _TABLE.match(lines[index])), len(lines))
    last_key = header
    for index in range(header + 1, end):
        if lines[index].strip() and not lines[index].lstrip().startswith("#"):
            last_key = index
    insert_at = last_key + 1
    for key, value in values.items():
        pattern = _key_line(key)
        found = next((index for index in range(header + 1, end) if pattern.match(lines[index])), None)
        if found is not None:
            match = pattern.match(lines[found])
            assert match is not None
            lines[found] = f"{match.group(1)}{_toml_value(value)}{match.group(3)}"
            insert_at = found + 1
        else:
            if insert_at > 0 and not lines[insert_at - 1].endswith("\n"):
                lines[insert_at - 1] += newline
            lines.insert(insert_at, f"{key} = {_toml_value(value)}{newline}")
            end += 1
            insert_at += 1
    return "".join(lines)


def with_version(text: str, version: str) -> str:
    """text with its top-level `version` set (the line edited in place, comment kept; else one inserted
    before the first table)."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    literal = json.dumps(version)  # a TOML basic string
    pattern = re.compile(r"""^(\s*version\s*=\s*)("[^"]*"|'[^']*'|[^\s#]+)(.*)$""", re.S)
    end = next((index for index, line in enumerate(lines) if _TABLE.match(line)), len(lines))
    for index in range(end):
        match = pattern.match(lines[index])
        if match:
            lines[index] = f"{match.group(1)}{literal}{match.group(3)}"
            return "".join(lines)
    if end and not lines[end - 1].endswith("\n"):
        lines[end - 1] += newline
    lines.insert(end, f"version = {literal}{newline}")
    return "".join(lines)


def write_version(folder: Path, version: str) -> None:
    """Set the model's `version` in folder/model.toml, keeping everything else; validated like write_routing."""
    path = folder / CONFIG_FILE
    with path.open(encoding="utf-8", newline="") as stream:
        original = stream.read()
    _replace_file(path, with_version(original, version))
    try:
        if load_model(folder).config.version != version:
            raise CalibrationError(f"{path}: the edited file does not hold version {version!r}; set it by hand")
    except ConfigurationError:
        _replace_file(path, original)
        raise


def _replace_file(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_routing(folder: Path, threshold: float, temperature: float | None) -> None:
    """Set `threshold` (and `temperature`) in folder/model.toml's [routing] table, keeping everything else."""
    values: dict[str, RoutingValue] = {"threshold": threshold}
    if temperature is not None:
        values["temperature"] = temperature
    write_routing_values(folder, values)


def write_routing_values(folder: Path, values: Mapping[str, RoutingValue]) -> None:
    """Set `values` in folder/model.toml's [routing] table, keeping everything else.

    The edited file is validated like at start-up; if it does not load with
    exactly these values, the original is put back and CalibrationError raised.
    """
    path = folder / CONFIG_FILE
    with path.open(encoding="utf-8", newline="") as stream:
        original = stream.read()
    _replace_file(path, with_routing_values(original, values))
    try:
        routing = RoutedConfig.of(load_model(folder)).routing
        if any(getattr(routing, key) != value for key, value in values.items()):
            raise CalibrationError(
                f"{path}: the edited file does not hold the new values (is [routing] written as an inline "
                "table or with dotted keys?); set them by hand"
            )
    except ConfigurationError:
        _replace_file(path, original)
        raise


# --- the command ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrateOptions:
    repository: Path
    model: str
    data: Path
    target: Target
    cloud: str | None = None
    cloud_security: ChannelSecurity | None = None
    plot: Path | None = None
    fit_temperature: bool = True
    dry_run: bool = False
    gate: bool = False  # train a learned gate and route by it (confidence = "gate")
    gate_inputs: bool = False  # ... which also reads the model's inputs


def run_calibrate(options: CalibrateOptions) -> Calibration:
    """The whole `offload calibrate`: predict, choose, report, write model.toml, plot."""
    from offload.edge.agent import load_edge_models

    edge_models = load_edge_models(options.repository, gates=not options.gate)
    routed = edge_models.get(options.model)
    if routed is None:
        raise CalibrationError(
            f"no model {options.model!r} with an [edge] section in {options.repository}; models: {sorted(edge_models)}"
        )
    config = routed.config
    score_output = routed.score_output
    if options.plot is not None:
        _require_matplotlib()
    if options.gate:
        _require_onnx()
    inputs, labels = load_inputs(options.data, routed.edge.inputs)
    edge_outputs = edge_predictions(routed.edge, inputs)
    if options.cloud:
        cloud_scores = remote_cloud_scores(options.cloud, config, inputs, score_output, options.cloud_security)
    else:
        cloud_scores = local_cloud_scores(options.repository, config, inputs, score_output)
    labels_from = "the file" if labels is not None else "the cloud model's answers"
    if labels is None:
        labels = predicted_classes(cloud_scores)
    classes = as_rows(edge_outputs[score_output]).shape[1]
    if np.any((labels < 0) | (labels >= classes)):
        raise CalibrationError(f"{options.data}: labels must be class indices in [0, {classes})")
    routing = config.routing
    gate: GateFit | None = None
    if options.gate:
        gate = _train_gate(routed.edge, edge_outputs, inputs, labels, score_output, routing, options.gate_inputs)
        # The threshold is chosen on the out-of-fold scores, never on scores of the rows a gate trained on.
        edge_outputs = {**edge_outputs, GATE_OUTPUT: gate.out_of_fold}
        from offload.tools.gate import GATE_FILE

        routing = routing.model_copy(
            update={
                "confidence": "gate",
                "gate": routing.gate or GATE_FILE,
                "confidence_output": None,
                "temperature": 1.0,
            }
        )
    result = calibrate_predictions(
        edge_outputs, cloud_scores, labels, routing, score_output, options.target, options.fit_temperature
    )
    print(report(result, config.name, options.data, labels_from, gate))
    folder = _model_folder(options.repository, config.name)
    if options.dry_run:
        print(f"dry run: {folder / CONFIG_FILE} left unchanged")
    elif gate is not None:
        assert routing.gate is not None
        values: dict[str, RoutingValue] = {"confidence": "gate", "gate": routing.gate, "threshold": result.threshold}
        if config.routing.temperature != 1.0:
            values["temperature"] = 1.0
        _write_gate(folder, routing.gate, gate, values)
        print(
            f"wrote the gate to {folder / routing.gate} and confidence, gate and threshold {result.threshold!r} "
            f"to {folder / CONFIG_FILE}"
        )
    else:
        write_routing(folder, result.threshold, result.temperature if result.temperature_fitted else None)
        written = f"threshold {result.threshold!r}" + (
            f" and temperature {result.temperature!r}" if result.temperature_fitted else ""
        )
        print(f"wrote {written} to {folder / CONFIG_FILE}")
    if options.plot is not None:
        save_plot(result, options.plot, config.name)
        print(f"saved the plot to {options.plot}")
    return result


def _train_gate(
    edge: Any,
    edge_outputs: Arrays,
    inputs: Arrays,
    labels: Ints,
    score_output: str,
    routing: RoutingSection,
    read_inputs: bool,
) -> GateFit:
    """A gate for the edge model `edge`, trained (cross-fitted) to flag the rows whose edge answer is not the label."""
    from offload.tools.gate import train_gate

    score = next(spec for spec in edge.outputs if spec.name == score_output)
    wrong = predicted_classes(edge_outputs[score_output]) != labels
    return train_gate(edge_outputs, inputs, score, routing.output_kind, edge.inputs, wrong, read_inputs)


def _write_gate(folder: Path, name: str, gate: GateFit, values: Mapping[str, RoutingValue]) -> None:
    """The gate file and model.toml: the gate is put in place only once the edited model.toml loads."""
    from offload.tools.gate import save_gate

    path = folder / name
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_gate(gate.model, temporary)
        # The permissions of the gate it replaces, else model.toml's (not mkstemp's owner-only ones).
        os.chmod(temporary, (path if path.exists() else folder / CONFIG_FILE).stat().st_mode & 0o777)
        write_routing_values(folder, values)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _model_folder(repository: Path, name: str) -> Path:
    """The model's folder, spelled from the repository path as given (for messages)."""
    return repository / load_repository(repository)[name].folder.name


def report(result: Calibration, model: str, data: Path, labels_from: str, gate: GateFit | None = None) -> str:
    """The human-readable summary `offload calibrate` prints."""

    def interval(successes: int, digits: int) -> str:
        low, high = wilson_interval(successes, result.rows)
        return f"95% CI {low:.{digits}%} to {high:.{digits}%}"

    if result.temperature_fitted:
        temperature = f"{result.temperature:.4g}   (fitted: least log loss on these rows)"
    elif result.measure == "output":
        temperature = "n/a    (confidence is the model's own output)"
    elif result.measure == "gate":
        temperature = "n/a    (confidence is the gate's score)"
    else:
        temperature = f"{result.temperature:.4g}   (as configured; not fitted)"
    lines = [
        f"offload calibrate: model {model!r}, {result.rows} rows from {data} (labels: {labels_from})",
        f"  confidence           {result.measure}",
        *(
            [
                f"  gate                 {gate.describe()}",
                f"  gate trained on      {gate.rows} rows ({gate.wrong} with the edge wrong); threshold and figures "
                f"below: out-of-fold ({gate.folds}-fold cross-fitting)",
            ]
            if gate is not None
            else ["  gate                 the model's gate as it is (--gate trains a new one, cross-fitted)"]
            if result.measure == "gate"
            else []
        ),
        f"  temperature          {temperature}",
        f"  threshold            {result.threshold!r}   (target: {result.target.describe()})",
        f"  expected offload     {result.offload_rate:.1%}   ({interval(result.offloaded, 1)}; "
        f"{result.offloaded} of {result.rows} rows)",
        f"  expected accuracy    {result.routed_accuracy:.2%}  ({interval(result.routed_correct, 2)})",
        f"  edge-only accuracy   {result.edge_accuracy:.2%}",
        f"  cloud-only accuracy  {result.cloud_accuracy:.2%}",
        f"  {f'oracle at {result.offload_rate:.1%}':21}{result.oracle_accuracy:.2%}  (offloads the edge's "
        "mistakes first)",
        f"  {f'random at {result.offload_rate:.1%}':21}{result.random_accuracy:.2%}  (offloads rows at random)",
    ]
    if result.gap_recovered is not None:
        lines.append(f"  edge-to-cloud gap recovered: {result.gap_recovered:.0%}")
    if result.ece_before is not None and result.ece_after is not None:
        lines.append(
            f"  edge calibration error (ECE, 15 bins): {result.ece_before:.4f} at temperature 1, "
            f"{result.ece_after:.4f} at {result.temperature:.4g}"
        )
    return "\n".join(lines)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ModuleNotFoundError as exc:
        raise CalibrationError("--gate needs onnx to write the gate: pip install 'offload[tools]'") from exc


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as exc:
        raise CalibrationError("--plot needs matplotlib: pip install 'offload[tools]'") from exc


def save_plot(result: Calibration, path: Path, model: str) -> None:
    """A PNG of routed accuracy vs offload share with the edge, cloud, oracle and random references."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    curve = result.curve
    figure = Figure(figsize=(7.5, 5.0), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    shares = np.arange(curve.rows + 1) / curve.rows
    axes.plot(shares, result.oracle_curve / curve.rows, color="tab:green", label="oracle (edge mistakes first)")
    axes.plot(
        [0.0, 1.0],
        [result.edge_accuracy, result.cloud_accuracy],
        color="tab:gray",
        linestyle=":",
        label="random routing",
    )
    axes.step(
        curve.offload_share,
        curve.accuracy,
        where="post",
        color="tab:blue",
        label=f"routed by confidence ({result.measure})",
    )
    axes.axhline(
        result.edge_accuracy, color="tab:orange", linestyle="--", label=f"edge only {result.edge_accuracy:.2%}"
    )
    axes.axhline(
        result.cloud_accuracy, color="tab:purple", linestyle="--", label=f"cloud only {result.cloud_accuracy:.2%}"
    )
    axes.plot([result.offload_rate], [result.routed_accuracy], marker="o", markersize=8, color="tab:red", zorder=5)
    axes.annotate(
        f"threshold {result.threshold:g}\n{result.offload_rate:.1%} offloaded, {result.routed_accuracy:.2%}",
        (result.offload_rate, result.routed_accuracy),
        xytext=(25, -35),
        textcoords="offset points",
        arrowprops={"arrowstyle": "->", "color": "tab:red"},
        color="tab:red",
    )
    low = min(result.edge_accuracy, float(curve.accuracy.min()))
    axes.set_ylim(max(0.0, low - 0.2 * (1.0 - low) - 0.005), 1.0 + 0.005)
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("share of rows offloaded to the cloud")
    axes.set_ylabel("routed accuracy")
    axes.set_title(f"{model}: accuracy vs offload ({curve.rows} rows, temperature {result.temperature:.4g})")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
