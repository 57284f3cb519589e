"""Edge start-up holds model.toml's tensors against the ONNX file: names, datatypes and shapes; and the
loaded model answers as its file does under a bare ONNX Runtime session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from offload.edge.agent import load_edge_models
from offload.oip.errors import ConfigurationError
from offload.router.models import RoutedModel
from support import reference

Dims = list[int | str | None]


def _write(root: Path, onnx_in: Dims, onnx_out: Dims, toml_in: list[int], toml_out: list[int]) -> Path:
    """A one-model repository: an ONNX Identity from x to y with the given shapes, and its model.toml."""
    folder = root / "m"
    folder.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, onnx_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, onnx_out)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "edge.onnx"))
    (folder / "model.toml").write_text(
        f'inputs = [{{ name = "x", datatype = "FP32", shape = {toml_in} }}]\n'
        f'outputs = [{{ name = "y", datatype = "FP32", shape = {toml_out} }}]\n'
        '[edge]\nartifact = "edge.onnx"\n[routing]\noutput = "y"\n'
    )
    return root


MATCHING = [
    pytest.param(["batch", 3], ["batch", 3], [-1, 3], [-1, 3], id="fixed-dims-equal"),
    pytest.param(["batch", "width"], ["batch", "width"], [-1, -1], [-1, -1], id="symbolic-is-minus-one"),
    pytest.param([None, 3], [None, 3], [-1, 3], [-1, 3], id="unknown-is-minus-one"),
]

DIFFERING = [
    pytest.param(
        ["batch", 3], ["batch", 3], [-1, 4], [-1, 3],
        "input 'x' has shape ['batch', 3] in the model, [-1, 4] in model.toml",
        id="fixed-dim-differs",
    ),
    pytest.param(
        ["batch", 3], ["batch", 3], [-1, 3], [-1, 3, 1],
        "output 'y' has shape ['batch', 3] in the model, [-1, 3, 1] in model.toml",
        id="rank-differs",
    ),
    pytest.param(
        ["batch", "width"], ["batch", "width"], [-1, 3], [-1, -1],
        "input 'x' has shape ['batch', 'width'] in the model, [-1, 3] in model.toml",
        id="symbolic-declared-fixed",
    ),
    pytest.param(
        [1, 3], [1, 3], [-1, 3], [-1, 3],
        "input 'x' has shape [1, 3] in the model, [-1, 3] in model.toml",
        id="fixed-batch",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("onnx_in", "onnx_out", "toml_in", "toml_out"), MATCHING)
def test_matching_shapes_load(
    tmp_path: Path, onnx_in: Dims, onnx_out: Dims, toml_in: list[int], toml_out: list[int]
) -> None:
    repository = _write(tmp_path, onnx_in, onnx_out, toml_in, toml_out)
    models = load_edge_models(repository)
    assert [spec.shape for spec in models["m"].edge.inputs] == [tuple(toml_in)]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    answer = models["m"].edge.predict({"x": x})
    np.testing.assert_array_equal(answer["y"], reference.onnx_outputs(repository / "m" / "edge.onnx", {"x": x})["y"])
    np.testing.assert_array_equal(answer["y"], x)


def test_the_demo_edge_model_answers_as_its_file_under_a_bare_session(
    demo_edge_models: dict[str, RoutedModel],
) -> None:
    pixels, _ = reference.demo_split("test")
    answer = demo_edge_models["digits"].edge.predict({"pixels": pixels})
    assert list(answer) == ["scores"]
    reference.EDGE_TOLERANCE.assert_close(answer["scores"], reference.edge_scores(pixels))


@pytest.mark.parametrize(("onnx_in", "onnx_out", "toml_in", "toml_out", "named"), DIFFERING)
def test_a_shape_that_differs_from_the_onnx_file_stops_start_up(
    tmp_path: Path, onnx_in: Dims, onnx_out: Dims, toml_in: list[int], toml_out: list[int], named: str
) -> None:
    repository = _write(tmp_path, onnx_in, onnx_out, toml_in, toml_out)
    with pytest.raises(ConfigurationError) as caught:
        load_edge_models(repository)
    message = str(caught.value)
    assert message.startswith(f"{repository.resolve() / 'm' / 'edge.onnx'}: "), message
    assert named in message
    assert "a symbolic dimension in the model must be -1" in message
