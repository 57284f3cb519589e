"""A cloud model that holds each call until the test opens a gate: a request in flight, on demand.

The test learns that a call arrived from marker files the model writes (`arrived`
for any call, `started-<x>` naming the call by its first input value), and lets
it finish by creating the gate file. No timing is involved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt

MARKER_ENV = "OFFLOAD_TEST_GATE_DIR"


class Gate:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        x = inputs["x"]
        if x.size:
            (self.folder / started_marker(float(x.flat[0]))).touch()
        (self.folder / "arrived").touch()
        deadline = time.monotonic() + 60
        while not (self.folder / "open").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            time.sleep(0.01)
        return {"y": x}


def started_marker(value: float) -> str:
    """The marker file the model writes when it starts a call whose first input value is `value`."""
    return f"started-{value:g}"


def started(folder: Path) -> set[str]:
    """The markers of every call the model started so far."""
    return {path.name for path in folder.glob("started-*")}


def make() -> Gate:
    return Gate(Path(os.environ[MARKER_ENV]))


def write_repository(root: Path, edge: bool = False) -> Path:
    """A repository with model `gate` (cloud side gated); with `edge`, also an edge side (ONNX identity)
    so that the edge agent serves it; `offload_route=cloud` sends its rows to the gate."""
    folder = root / "gate"
    folder.mkdir(parents=True)
    config = (
        'inputs = [{ name = "x", datatype = "FP32", shape = [-1, 1] }]\n'
        'outputs = [{ name = "y", datatype = "FP32", shape = [-1, 1] }]\n'
        '[cloud]\nfactory = "support.gate:make"\nwarmup_rows = 0\n'
    )
    if edge:
        write_identity_onnx(folder / "edge.onnx")
        config += (
            '[edge]\nartifact = "edge.onnx"\n[routing]\noutput = "y"\noutput_kind = "probabilities"\nthreshold = 0.5\n'
        )
    (folder / "model.toml").write_text(config)
    return root


def write_identity_onnx(path: Path) -> None:
    from onnx import TensorProto, checker, helper, save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "gate_edge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    save(model, str(path))
