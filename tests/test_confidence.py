"""Confidence measures and temperature on known inputs, their configuration, and the router using them."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from conftest import running_stack
from offload.cloud.dataplane import CloudDataPlane
from offload.cloud.settings import CloudSettings
from offload.edge.agent import load_edge_models
from offload.oip.errors import ConfigurationError, Internal
from offload.oip.repository import load_model, load_repository
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.router.confidence import class_confidence, max_probability, output_confidence, row_confidence
from offload.router.config import OutputKind, RoutedConfig, RoutingSection
from offload.router.models import RoutedModel
from support import reference
from support.reference import assert_rows_answered_as_routed, decoded

# Probabilities [0.7, 0.2, 0.1] as logits (any shift of the logits gives the same softmax).
KNOWN_PROBS = np.array([[0.7, 0.2, 0.1]])
KNOWN_LOGITS = np.log(KNOWN_PROBS) + 3.0
# 1 - H(p) / log(3) for p = [0.7, 0.2, 0.1]: H = -(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1) = 0.8018185.
KNOWN_NEGATIVE_ENTROPY = 0.27015330083790257


@pytest.mark.parametrize("kind", [OutputKind.LOGITS, OutputKind.PROBABILITIES])
@pytest.mark.parametrize(
    ("measure", "expected"),
    [("max_probability", 0.7), ("margin", 0.5), ("negative_entropy", KNOWN_NEGATIVE_ENTROPY)],
)
def test_each_measure_on_known_scores(kind: OutputKind, measure: Any, expected: float) -> None:
    scores = KNOWN_LOGITS if kind is OutputKind.LOGITS else KNOWN_PROBS
    result = class_confidence(scores, measure, kind)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, [expected], rtol=1e-12)


@pytest.mark.parametrize(
    ("measure", "uniform", "certain"),
    [("max_probability", 0.25, 1.0), ("margin", 0.0, 1.0), ("negative_entropy", 0.0, 1.0)],
)
def test_every_measure_spans_zero_to_one(measure: Any, uniform: float, certain: float) -> None:
    """A uniform row is the least confident a measure allows, a one-hot row the most: one threshold fits all."""
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [800.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(class_confidence(logits, measure), [uniform, certain], atol=1e-12)
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        class_confidence(probs, measure, OutputKind.PROBABILITIES), [uniform, certain], atol=1e-12
    )


def test_temperature_divides_the_logits() -> None:
    logits = np.array([[2.0, 0.0]])
    # softmax([2, 0]) = 1 / (1 + e^-2); at T = 2 it is softmax([1, 0]) = 1 / (1 + e^-1).
    assert class_confidence(logits, "max_probability")[0] == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-12)
    assert class_confidence(logits, "max_probability", temperature=2.0)[0] == pytest.approx(
        1 / (1 + math.exp(-1)), rel=1e-12
    )
    # Margin at T = 2: 2 * sigmoid(1) - 1 = tanh(1/2).
    assert class_confidence(logits, "margin", temperature=2.0)[0] == pytest.approx(math.tanh(0.5), rel=1e-12)
    # A small temperature sharpens towards certainty, a large one flattens towards uniform.
    assert class_confidence(logits, "max_probability", temperature=0.05)[0] == pytest.approx(1.0, abs=1e-12)
    assert class_confidence(logits, "max_probability", temperature=1e6)[0] == pytest.approx(0.5, abs=1e-6)


def test_temperature_on_probabilities_scales_their_logarithms() -> None:
    probs = np.array([[0.8, 0.2]])
    # softmax(log p / 2) = sqrt(p) / sum(sqrt(p)) = sqrt(.8) / (sqrt(.8) + sqrt(.2)) = 2/3.
    result = class_confidence(probs, "max_probability", OutputKind.PROBABILITIES, temperature=2.0)
    assert result[0] == pytest.approx(2 / 3, rel=1e-12)
    # At T = 1 probabilities are used as given.
    assert class_confidence(probs, "max_probability", OutputKind.PROBABILITIES)[0] == 0.8


def test_a_lower_temperature_sharpens_every_row_and_a_higher_one_flattens_it() -> None:
    logits = np.random.default_rng(0).normal(0, 3, size=(50, 10))
    base = class_confidence(logits, "max_probability")
    assert np.all(class_confidence(logits, "max_probability", temperature=0.5) >= base)
    assert np.all(class_confidence(logits, "max_probability", temperature=2.0) <= base)


def test_model_output_confidence_is_used_as_is_and_clipped() -> None:
    values = np.array([[1.5], [0.3], [-0.2], [np.nan]], dtype=np.float32)
    np.testing.assert_allclose(output_confidence(values, "conf"), [1.0, 0.3, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(output_confidence(np.array([0.25, 0.75]), "conf"), [0.25, 0.75])
    with pytest.raises(Internal, match="one value per row"):
        output_confidence(np.zeros((2, 3)), "conf")


def test_non_finite_scores_are_least_confident() -> None:
    logits = np.array([[np.nan, 0.0], [np.inf, 0.0], [1.0, 0.0]])
    for measure in ("max_probability", "margin", "negative_entropy"):
        result = class_confidence(logits, measure)
        assert result[0] == 0.0
        assert result[1] == 0.0
        assert 0.0 < result[2] < 1.0


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("kind", [OutputKind.LOGITS, OutputKind.PROBABILITIES])
def test_a_signalling_nan_is_least_confident_without_a_warning(kind: OutputKind) -> None:
    # 0x7fa00000 is a signalling NaN in float32, as random bytes sent as FP32 (and echoed back) can hold;
    # widening it raises the "invalid" flag, which NumPy would print as a RuntimeWarning on the server.
    scores = np.array([[0x7FA00000, 0x3F000000], [0x3F000000, 0x3E800000]], dtype="<u4").view("<f4")
    for measure in ("max_probability", "margin", "negative_entropy"):
        result = class_confidence(scores, measure, kind)
        assert result[0] == 0.0
        assert 0.0 < result[1] <= 1.0
    assert np.isnan(max_probability(scores, kind)[0])


def test_row_confidence_follows_the_routing_section() -> None:
    outputs = {"scores": KNOWN_LOGITS, "conf": np.array([[0.42]])}
    assert row_confidence(outputs, RoutingSection(), "scores")[0] == pytest.approx(0.7)
    assert row_confidence(outputs, RoutingSection(confidence="margin"), "scores")[0] == pytest.approx(0.5)
    section = RoutingSection(confidence="output", confidence_output="conf")
    assert row_confidence(outputs, section, "scores")[0] == pytest.approx(0.42)
    with pytest.raises(Internal, match="lacks its confidence output 'conf'"):
        row_confidence({"scores": KNOWN_LOGITS}, section, "scores")
    # An empty batch has no rows to be confident about.
    assert row_confidence({"scores": np.zeros((0, 10), np.float32)}, RoutingSection(), "scores").shape == (0,)


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_the_default_measure_is_the_max_softmax_probability_at_the_models_temperature_on_the_demo_model(
    demo_edge_models: dict[str, RoutedModel], temperature: float
) -> None:
    pixels, _ = reference.demo_split("validation")
    scores = reference.edge_scores(pixels)
    routing = demo_edge_models["digits"].routing.model_copy(update={"temperature": temperature})
    expected = reference.max_softmax(scores, temperature)
    np.testing.assert_allclose(row_confidence({"scores": scores}, routing, "scores"), expected, rtol=1e-12)
    if temperature == 1.0:
        np.testing.assert_allclose(max_probability(scores, OutputKind.LOGITS), expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"confidence": "output"}, "confidence = 'output' needs confidence_output"),
        ({"confidence_output": "conf"}, "only used with confidence = 'output'"),
        ({"confidence": "output", "confidence_output": "conf", "temperature": 2.0}, "cannot apply"),
        ({"temperature": 0.0}, "greater than 0"),
        ({"temperature": float("inf")}, "finite"),
        ({"confidence": "entropy"}, "'max_probability', 'margin', 'negative_entropy', 'output' or 'gate'"),
        ({"confidence": "gate"}, "confidence = 'gate' needs gate, the gate's ONNX file"),
        ({"gate": "gate.onnx"}, "gate is only used with confidence = 'gate'"),
        ({"confidence": "gate", "gate": "gate.onnx", "temperature": 2.0}, "cannot apply to confidence = 'gate'"),
    ],
)
def test_routing_section_rejects_inconsistent_confidence_settings(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RoutingSection.model_validate(fields)


def test_model_toml_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    folder = tmp_path / "scored"
    folder.mkdir()
    outputs = 'outputs = [{ name = "scores", datatype = "FP32", shape = [-1, 3] }]\n'
    (folder / "model.toml").write_text(outputs + '[routing]\nconfidence = "output"\n')
    with pytest.raises(ConfigurationError, match=r"model\.toml: routing: .*needs confidence_output"):
        RoutedConfig.of(load_model(folder))
    (folder / "model.toml").write_text(outputs + '[routing]\nconfidence = "output"\nconfidence_output = "conf"\n')
    with pytest.raises(ConfigurationError, match=r"routing.confidence_output 'conf' is not among the outputs"):
        RoutedConfig.of(load_model(folder))


# --- the router uses the configured measure, on the edge's and on the cloud's answers --------------------------------


def _with_routing(model: RoutedModel, **fields: Any) -> RoutedModel:
    routing = model.routing.model_copy(update=fields)
    return RoutedModel(model.config.model_copy(update={"routing": routing}), model.edge)


@pytest.fixture(scope="module")
def pixels() -> npt.NDArray[np.float32]:
    return reference.demo_split("test")[0][:64]


def _margin(scores: npt.NDArray[np.float32], temperature: float) -> npt.NDArray[np.float64]:
    """The top probability minus the second, in NumPy: the reference for the margin measure."""
    top = np.sort(reference.softmax(scores, temperature), axis=1)
    return np.asarray(top[:, -1] - top[:, -2], dtype=np.float64)


async def test_router_routes_by_margin_with_temperature_on_edge_and_cloud_answers(
    demo_cloud_plane: CloudDataPlane,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    pixels: npt.NDArray[np.float32],
) -> None:
    model = _with_routing(demo_edge_models["digits"], confidence="margin", temperature=1.5, threshold=0.6)
    edge_margin = _margin(reference.edge_scores(pixels), 1.5)
    unsure = edge_margin < 0.6
    assert 0 < unsure.sum() < len(pixels), "the test rows should mix sure and unsure rows"
    cloud_scores = reference.cloud_scores(pixels[unsure])

    async with running_stack(demo_cloud_plane, {"digits": model}, edge_executor) as stack:
        request = InferRequest("digits", [Tensor.of("pixels", pixels)], parameters={"offload_details": True})
        response = await stack.router.infer(request)
    outputs = response.as_dict()
    routes = decoded(outputs["offload_route"].data)
    np.testing.assert_array_equal(np.array(routes) == "cloud", unsure)
    assert_rows_answered_as_routed(outputs["scores"].data, routes, pixels)
    confidence = outputs["offload_confidence"].data
    np.testing.assert_allclose(confidence[~unsure], edge_margin[~unsure], rtol=1e-6)
    np.testing.assert_allclose(confidence[unsure], _margin(cloud_scores, 1.5), rtol=1e-5, atol=1e-6)


def _write_self_scoring_repository(root: Path) -> Path:
    """A model whose edge (ONNX identity) and cloud (echo) return `out_conf`, their own per-row confidence."""
    folder = root / "scored"
    folder.mkdir(parents=True)
    names = [("scores", 3), ("conf", 1)]
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]) for name, _ in names],
        "self_scoring",
        [helper.make_tensor_value_info(f"in_{name}", TensorProto.FLOAT, ["batch", width]) for name, width in names],
        [helper.make_tensor_value_info(f"out_{name}", TensorProto.FLOAT, ["batch", width]) for name, width in names],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "edge.onnx"))
    (folder / "model.toml").write_text(
        "# The model computes its own confidence.\n"
        'inputs = [{ name = "in_scores", datatype = "FP32", shape = [-1, 3] },'
        ' { name = "in_conf", datatype = "FP32", shape = [-1, 1] }]\n'
        'outputs = [{ name = "out_scores", datatype = "FP32", shape = [-1, 3] },'
        ' { name = "out_conf", datatype = "FP32", shape = [-1, 1] }]\n'
        '[edge]\nartifact = "edge.onnx"\n[cloud]\nfactory = "support.echo:make"\nwarmup_rows = 0\n'
        '[routing]\noutput = "out_scores"\nconfidence = "output"\nconfidence_output = "out_conf"\nthreshold = 0.5\n'
    )
    return root


async def test_router_routes_by_the_models_own_confidence_output(
    tmp_path: Path, edge_executor: ThreadPoolExecutor
) -> None:
    import torch

    repository = _write_self_scoring_repository(tmp_path)
    plane = CloudDataPlane.load(
        load_repository(repository), CloudSettings(model_repository=repository), torch.device("cpu")
    )
    # Scores that max_probability would call certain; the model's own confidence says otherwise in rows 1 and 3.
    scores = np.array([[9.0, 0.0, 0.0]] * 4, dtype=np.float32)
    conf = np.array([[0.9], [0.2], [1.7], [-1.0]], dtype=np.float32)
    request = InferRequest(
        "scored",
        [Tensor.of("in_scores", scores), Tensor.of("in_conf", conf)],
        parameters={"offload_details": True},
    )
    try:
        async with running_stack(plane, load_edge_models(repository), edge_executor) as stack:
            response = await stack.router.infer(request)
    finally:
        plane.close()
    outputs = response.as_dict()
    assert decoded(outputs["offload_route"].data) == ["edge", "cloud", "edge", "cloud"]
    # Both sides echo their inputs (an ONNX Identity, the echo model): every row comes back as sent.
    np.testing.assert_array_equal(outputs["out_scores"].data, scores)
    # Clipped to [0, 1]; the cloud's rows carry the cloud's own confidence output (the echo returns the same).
    np.testing.assert_allclose(outputs["offload_confidence"].data, [0.9, 0.2, 1.0, 0.0], rtol=1e-6)
