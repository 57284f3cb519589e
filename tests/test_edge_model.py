"""The edge model runtime: start-up holds model.toml's tensors against the ONNX file (names, datatypes, shapes);
the loaded model answers as its file does under a bare ONNX Runtime session; and a large batch runs in chunks
with the answer of the whole."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper

from offload.edge.agent import load_edge_models
from offload.models import DEMO_REPOSITORY
from offload.oip.chunks import predict_in_chunks, rows_within
from offload.oip.errors import ConfigurationError, Internal
from offload.router.models import RoutedModel
from support import reference
from support.repos import SAMPLES, TEXT_BYTES

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


def test_a_large_batch_runs_in_chunks_and_gets_the_answer_of_the_whole_batch() -> None:
    pixels = np.random.default_rng(0).integers(0, 17, size=(1_000, 64)).astype(np.float32)
    whole = load_edge_models(DEMO_REPOSITORY, chunk_bytes=1 << 30)["digits"].edge
    chunked = load_edge_models(DEMO_REPOSITORY, chunk_bytes=3 * 64 * 4)["digits"].edge  # three rows a run
    expected = whole.predict({"pixels": pixels})["scores"]
    np.testing.assert_array_equal(chunked.predict({"pixels": pixels})["scores"], expected)


def test_every_datatype_survives_chunking(echo_repository: Path) -> None:
    echo = load_edge_models(echo_repository, chunk_bytes=16)["echo"].edge
    inputs = {spec.name: np.concatenate([_sample(spec.datatype)] * 4) for spec in echo.inputs}
    outputs = echo.predict(inputs)
    for name, values in inputs.items():
        np.testing.assert_array_equal(outputs["out_" + name.removeprefix("in_")], values)


def _sample(datatype: str) -> npt.NDArray[Any]:
    return TEXT_BYTES if datatype == "BYTES" else SAMPLES[datatype]


def test_chunks_are_bounded_and_the_outputs_written_in_place() -> None:
    calls: list[int] = []

    def double(inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2, "ignored": inputs["x"]}

    x = np.arange(20, dtype=np.int64).reshape(10, 2)
    assert rows_within({"x": x}, 3 * 16) == 3
    result = predict_in_chunks(double, {"x": x}, 3, ["y"])
    assert calls == [3, 3, 3, 1]
    assert list(result) == ["y"]
    np.testing.assert_array_equal(result["y"], x * 2)


def test_a_model_whose_rows_depend_on_the_batch_cannot_run_in_chunks() -> None:
    def widening(inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        rows = len(inputs["x"])
        return {"y": np.zeros((rows, rows))}  # each row as wide as the batch

    with pytest.raises(Internal, match=r"output 'y' is float64\[1, 1\] for rows 2-2, but float64\[2\] a row before"):
        predict_in_chunks(widening, {"x": np.zeros((3, 1))}, 2, ["y"])
