"""The learned offload gate (`confidence = "gate"`): `offload calibrate --gate`, the gate on the device, its errors.

Expected answers come from the bare files (support.reference): edge.onnx and gate.onnx under bare
ONNX Runtime sessions, cloud.pt2 under bare torch.export, thresholds read from model.toml with
tomllib, and the routing rule (offload the rows whose confidence is below the threshold) in NumPy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper

from conftest import Processes
from offload.edge.agent import load_edge_models
from offload.models import DEMO_REPOSITORY
from offload.oip.errors import ConfigurationError, Internal
from offload.router.confidence import GATE_OUTPUT, row_confidence
from offload.router.config import OutputKind, RoutingSection
from offload.tools.cli import main
from offload.tools.gate import train_gate
from support import reference

TABULAR = DEMO_REPOSITORY / "tabular"
DIGITS = DEMO_REPOSITORY / "digits"
Floats = npt.NDArray[np.float64]


def _split(folder: Path, name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    with np.load(folder / f"{name}.npz") as data:
        return data["inputs"].astype(np.float32), data["labels"].astype(np.int64)


def _routing(folder: Path) -> dict[str, Any]:
    routing: dict[str, Any] = tomllib.loads((folder / "model.toml").read_text())["routing"]
    return routing


def _bare_gate(folder: Path, rows: npt.NDArray[Any], input_name: str) -> tuple[npt.NDArray[np.float32], Floats]:
    """The bare edge model's scores and the bare gate's score of each row (the gate fed what it declares)."""
    scores = reference.onnx_outputs(folder / "edge.onnx", {input_name: rows})["scores"]
    available = {input_name: rows, "scores": scores}
    session = onnx.load(str(folder / "gate.onnx"))
    feeds = {arg.name: available[arg.name] for arg in session.graph.input}
    (gate,) = reference.onnx_outputs(folder / "gate.onnx", feeds).values()
    return scores, np.asarray(gate, dtype=np.float64)


def _threshold_for(confidence: Floats, budget: float) -> float:
    """The threshold that offloads the largest share of rows not above `budget`, equal confidences together."""
    ordered = np.sort(confidence)
    k = int(budget * ordered.size)
    while k > 0 and ordered[k - 1] == ordered[k]:
        k -= 1
    return float(ordered[k])


def _recovered(offload: npt.NDArray[np.bool_], edge_right: npt.NDArray[Any], cloud_right: npt.NDArray[Any]) -> float:
    routed = np.where(offload, cloud_right, edge_right)
    return float((routed.mean() - edge_right.mean()) / (cloud_right.mean() - edge_right.mean()))


# --- the bundled tabular pair routes by its gate --------------------------------------------------------------------


def test_the_edge_agent_routes_by_the_gate_and_reports_its_score_per_row(demo_processes: Processes) -> None:
    features = _split(TABULAR, "test")[0][:300]
    threshold = _routing(TABULAR)["threshold"]
    with triton.InferenceServerClient(url=demo_processes.edge.address) as client:
        tensor = triton.InferInput("features", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features)
        result = client.infer("tabular", [tensor], parameters={"offload_details": True})
        metadata = client.get_model_metadata("tabular")
    routes = reference.decoded(result.as_numpy("offload_route"))
    confidence = result.as_numpy("offload_confidence")
    scores = result.as_numpy("scores")
    edge_scores, gate = _bare_gate(TABULAR, features, "features")

    # Rows go to the cloud exactly where the bare gate's score is below the model's threshold ...
    from_cloud = np.array([route in reference.FROM_THE_CLOUD for route in routes])
    assert from_cloud.tolist() == (gate < threshold).tolist()
    assert 0 < from_cloud.sum() < len(routes)
    # ... a row on the edge reports the gate's score as its confidence (FP32 on the wire) and the edge's answer ...
    np.testing.assert_allclose(confidence[~from_cloud], gate[~from_cloud].astype(np.float32), rtol=1e-6, atol=0)
    reference.EDGE_TOLERANCE.assert_close(scores[~from_cloud], edge_scores[~from_cloud])
    # ... and a row from the cloud the cloud's answer and its largest softmax probability.
    cloud_scores = reference.export_output(TABULAR / "cloud.pt2", features[from_cloud])
    reference.CLOUD_TOLERANCE.assert_close(scores[from_cloud], cloud_scores)
    reference.CONFIDENCE_TOLERANCE.assert_close(confidence[from_cloud], reference.max_softmax(cloud_scores, 1.0))
    # The gate's score is the router's own: never an output of the answer nor of the model's metadata.
    assert {output.name for output in result.get_response().outputs} == {
        "scores",
        "offload_route",
        "offload_confidence",
        "offload_degraded",
    }
    assert [output.name for output in metadata.outputs] == ["scores"]


def test_the_bundled_gate_recovers_more_than_max_probability_on_held_out_rows() -> None:
    """The benchmark's claim on the bare files: at a 20% budget chosen on validation, the gate recovers at least
    1.5x the edge-to-cloud gap max probability recovers on the test split."""
    budget = 0.2
    val_features = _split(TABULAR, "validation")[0]
    features, labels = _split(TABULAR, "test")
    val_scores = reference.onnx_outputs(TABULAR / "edge.onnx", {"features": val_features})["scores"]
    max_probability_threshold = _threshold_for(reference.max_softmax(val_scores, 1.0), budget)

    edge_scores, gate = _bare_gate(TABULAR, features, "features")
    cloud_scores = reference.export_output(TABULAR / "cloud.pt2", features)
    edge_right, cloud_right = edge_scores.argmax(axis=1) == labels, cloud_scores.argmax(axis=1) == labels
    by_gate = gate < _routing(TABULAR)["threshold"]
    by_max_probability = reference.max_softmax(edge_scores, 1.0) < max_probability_threshold
    assert by_gate.mean() == pytest.approx(budget, abs=0.03)
    assert by_max_probability.mean() == pytest.approx(budget, abs=0.03)
    assert _recovered(by_gate, edge_right, cloud_right) >= 1.5 * _recovered(by_max_probability, edge_right, cloud_right)


# --- offload calibrate --gate -------------------------------------------------------------------------------------


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A copy of the demo repository that calibrate may rewrite."""
    return Path(shutil.copytree(DEMO_REPOSITORY, tmp_path / "repository"))


def _calibrate(repository: Path, model: str, *extra: str) -> int:
    data = repository / model / "validation.npz"
    return main(["calibrate", "--model-repository", str(repository), "--model", model, "--data", str(data), *extra])


def test_calibrate_gate_writes_the_gate_and_routes_by_it_keeping_model_toml(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = repository / "digits"
    before = (folder / "model.toml").read_text()
    assert not (folder / "gate.onnx").exists()
    assert _calibrate(repository, "digits", "--target-offload", "0.1", "--gate") == 0
    out = capsys.readouterr().out
    assert "confidence           gate" in out
    assert "below: out-of-fold (5-fold cross-fitting)" in out
    assert f"wrote the gate to {folder / 'gate.onnx'}" in out

    # model.toml: confidence and gate added, threshold changed; every comment and other line kept.
    after = (folder / "model.toml").read_text()
    kept = [line for line in before.splitlines() if not line.startswith("threshold =")]
    assert [
        line for line in after.splitlines() if not line.startswith(("threshold =", "confidence =", "gate ="))
    ] == kept
    routing = _routing(folder)
    assert (routing["confidence"], routing["gate"]) == ("gate", "gate.onnx")
    assert 'confidence = "gate"\ngate = "gate.onnx"\n' in after

    # The gate reads the edge's scores only (no --gate-inputs) and gives 1 - P(wrong), in [0, 1].
    assert [arg.name for arg in onnx.load(str(folder / "gate.onnx")).graph.input] == ["scores"]
    pixels, labels = _split(folder, "test")
    edge_scores, gate = _bare_gate(folder, pixels, "pixels")
    assert np.all((gate >= 0.0) & (gate <= 1.0))
    # Held out, the threshold keeps near its budget and recovers no less than max probability's for it.
    offload = gate < routing["threshold"]
    assert offload.mean() == pytest.approx(0.1, abs=0.05)
    val_pixels, _ = _split(folder, "validation")
    max_probability = reference.max_softmax(reference.edge_scores(pixels), 1.0) < _threshold_for(
        reference.max_softmax(reference.edge_scores(val_pixels), 1.0), 0.1
    )
    cloud_right = reference.cloud_scores(pixels).argmax(axis=1) == labels
    edge_right = edge_scores.argmax(axis=1) == labels
    assert _recovered(offload, edge_right, cloud_right) >= _recovered(max_probability, edge_right, cloud_right)

    # The edge loads it: the model's answers carry the gate's score, as the bare gate computes it.
    answer = load_edge_models(repository)["digits"].edge.predict({"pixels": pixels})
    np.testing.assert_allclose(answer[GATE_OUTPUT], gate, rtol=1e-12, atol=0)


def test_calibrate_gate_rewrites_the_bundled_tabular_gate_as_it_is(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """models/train_tabular.py routes its pair with this same command: rerun, it gives the same gate and model.toml."""
    folder = repository / "tabular"
    (folder / "gate.onnx").unlink()
    assert _calibrate(repository, "tabular", "--target-offload", "0.2", "--gate", "--gate-inputs") == 0
    assert "gate trained on      1000 rows (117 with the edge wrong)" in capsys.readouterr().out
    assert (folder / "model.toml").read_text() == (TABULAR / "model.toml").read_text()
    features = _split(TABULAR, "test")[0]
    np.testing.assert_allclose(
        _bare_gate(folder, features, "features")[1], _bare_gate(TABULAR, features, "features")[1], rtol=1e-9, atol=1e-12
    )


def test_calibrate_without_gate_moves_the_threshold_of_the_gate_there_is(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = repository / "tabular"
    gate_bytes = (folder / "gate.onnx").read_bytes()
    assert _calibrate(repository, "tabular", "--target-offload", "0.1") == 0
    out = capsys.readouterr().out
    assert "the model's gate as it is" in out
    assert "confidence is the gate's score" in out
    routing = _routing(folder)
    assert (routing["confidence"], routing["gate"]) == ("gate", "gate.onnx")
    assert "temperature" not in routing  # nothing to fit for a gate
    assert (folder / "gate.onnx").read_bytes() == gate_bytes
    # The threshold now sends a tenth of the validation rows, by the bare gate's scores of them.
    gate = _bare_gate(folder, _split(folder, "validation")[0], "features")[1]
    assert float(np.mean(gate < routing["threshold"])) == pytest.approx(0.1, abs=0.005)


def test_calibrate_gate_without_labels_learns_where_the_edge_and_cloud_differ_and_dry_run_writes_nothing(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = repository / "digits"
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, inputs=_split(folder, "validation")[0])
    before = (folder / "model.toml").read_bytes()
    args = ["calibrate", "--model-repository", str(repository), "--model", "digits", "--data", str(unlabelled)]
    assert main([*args, "--target-offload", "0.1", "--gate", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "labels: the cloud model's answers" in out
    assert "confidence           gate" in out
    assert "dry run" in out
    assert (folder / "model.toml").read_bytes() == before
    assert not (folder / "gate.onnx").exists()
    assert not list(folder.glob(".gate.onnx.*"))


def test_gate_inputs_goes_with_gate(repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        _calibrate(repository, "digits", "--target-offload", "0.1", "--gate-inputs")
    assert caught.value.code == 2
    assert "--gate-inputs goes with --gate" in capsys.readouterr().err


def test_a_gate_reads_probabilities_as_it_reads_their_logits() -> None:
    """The gate's features are of the class probabilities: scores given as probabilities train the same gate."""
    pixels, labels = _split(DIGITS, "validation")
    logits = reference.edge_scores(pixels)
    probabilities = reference.softmax(logits).astype(np.float32)
    models = load_edge_models(DEMO_REPOSITORY)
    score = models["digits"].edge.outputs[0]
    wrong = logits.argmax(axis=1) != labels
    fits = [
        train_gate({"scores": scores}, {"pixels": pixels}, score, kind, models["digits"].edge.inputs, wrong)
        for scores, kind in ((logits, OutputKind.LOGITS), (probabilities, OutputKind.PROBABILITIES))
    ]
    assert fits[0].regularisation == fits[1].regularisation
    # float32 probabilities round the confident rows' complements, so compare the ranking where it matters.
    np.testing.assert_allclose(fits[0].out_of_fold, fits[1].out_of_fold, atol=1e-3)


def test_too_few_mistakes_to_learn_from_is_a_calibration_error() -> None:
    pixels, labels = _split(DIGITS, "validation")
    logits = reference.edge_scores(pixels)
    models = load_edge_models(DEMO_REPOSITORY)
    wrong = np.zeros(labels.size, dtype=bool)
    wrong[:3] = True
    with pytest.raises(ConfigurationError, match="at least 5 of each; these 269 rows have 3 wrong"):
        train_gate(
            {"scores": logits},
            {},
            models["digits"].edge.outputs[0],
            OutputKind.LOGITS,
            models["digits"].edge.inputs,
            wrong,
        )


def test_the_router_refuses_an_edge_answer_without_the_gate_score() -> None:
    routing = RoutingSection(confidence="gate", gate="gate.onnx")
    with pytest.raises(Internal, match="lacks the gate's score 'offload_gate_confidence'"):
        row_confidence({"scores": np.zeros((2, 3), np.float32)}, routing, "scores")
    gated = {"scores": np.zeros((2, 3), np.float32), GATE_OUTPUT: np.array([0.25, 1.5])}
    assert row_confidence(gated, routing, "scores").tolist() == [0.25, 1.0]


# --- a gate that does not fit stops start-up -------------------------------------------------------------------------


def _save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> None:
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))


def _two_outputs(folder: Path) -> None:
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])
    first = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4])
    second = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Identity", ["scores"], ["a"]), helper.make_node("Identity", ["scores"], ["b"])]
    _save(folder / "gate.onnx", nodes, [scores], [first, second])


def _reads_labels(folder: Path) -> None:
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])
    labels = helper.make_tensor_value_info("labels", TensorProto.FLOAT, ["batch", 1])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1])
    _save(folder / "gate.onnx", [helper.make_node("Identity", ["labels"], ["out"])], [scores, labels], [out])


GATE_CASES = [
    pytest.param(
        lambda folder: (folder / "gate.onnx").write_bytes((TABULAR / "gate.onnx").read_bytes()[:1000]),
        "tabular/gate.onnx: ONNX Runtime",
        "cannot load the model",
        id="truncated",
    ),
    pytest.param(lambda folder: (folder / "gate.onnx").unlink(), "artifact 'gate.onnx' not found", "", id="missing"),
    pytest.param(
        lambda folder: shutil.copy(folder / "edge.onnx", folder / "gate.onnx"),
        "tabular/gate.onnx: the gate does not read the edge model's score output 'scores'",
        "offload calibrate --gate",
        id="not-a-gate",
    ),
    pytest.param(
        lambda folder: shutil.copy(DIGITS / "edge.onnx", folder / "gate.onnx"),
        "the gate does not read the edge model's score output 'scores' (its inputs are ['pixels'])",
        "",
        id="another-model",
    ),
    pytest.param(
        _reads_labels,
        "gate input 'labels' is neither the edge model's score output 'scores' nor one of its inputs ['features']",
        "offload calibrate --gate",
        id="unknown-input",
    ),
    pytest.param(_two_outputs, "a gate has one output, a number per row", "[('a', 'FP32', [-1, 4])", id="two-outputs"),
]


@pytest.mark.parametrize(("damage", "named", "advice"), GATE_CASES)
def test_a_gate_that_does_not_fit_is_a_start_up_error(tmp_path: Path, damage: Any, named: str, advice: str) -> None:
    repository = Path(shutil.copytree(DEMO_REPOSITORY, tmp_path / "repository"))
    damage(repository / "tabular")
    with pytest.raises(ConfigurationError) as caught:
        load_edge_models(repository)
    assert named in str(caught.value)
    assert advice in str(caught.value)


def test_a_damaged_gate_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    repository = Path(shutil.copytree(DEMO_REPOSITORY, tmp_path / "repository"))
    gate = repository / "tabular" / "gate.onnx"
    gate.write_bytes(gate.read_bytes()[:1000])
    args = ["edge", "--grpc-port", "0", "--log-level", "WARNING", "--model-repository", str(repository)]
    completed = subprocess.run(
        [sys.executable, "-m", "offload.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"offload edge: {gate.resolve()}: ONNX Runtime")
    assert "export it again" in lines[0]
    assert "listening" not in completed.stdout
