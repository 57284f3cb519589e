"""Cloud models that hold each call until the test opens a gate: requests in flight, on demand.

The test learns that a call arrived from marker files the model writes (`arrived`
for any call, `call-<k>` for its k-th call, counting from 0, `started-<x>` naming the
call by its first input value), and lets calls finish by creating the gate file `open`
(all of them, from then on) or `pass-<k>` (the k-th call only). No timing is involved.

`gate` echoes its input (y = x) and refuses a batch with a NaN in it (INVALID_ARGUMENT),
so a test can put one bad request into a batch. `gated_digits` is the demo's cloud model
(torch.export) behind the same gate: the real torch path, held on demand.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from offload.models import DEMO_REPOSITORY
from offload.oip.errors import InvalidArgument

MARKER_ENV = "OFFLOAD_TEST_GATE_DIR"


class _Turnstile:
    """Numbers the calls and holds each until its gate opens."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._calls = itertools.count()
        self._lock = threading.Lock()

    def wait(self, first_value: float | None) -> None:
        with self._lock:
            call = next(self._calls)
        if first_value is not None:
            (self.folder / started_marker(first_value)).touch()
        (self.folder / f"call-{call}").touch()
        (self.folder / "arrived").touch()
        deadline = time.monotonic() + 60
        while not ((self.folder / "open").exists() or (self.folder / f"pass-{call}").exists()):
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            time.sleep(0.01)


class Gate:
    def __init__(self, folder: Path) -> None:
        self._turnstile = _Turnstile(folder)

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        x = inputs["x"]
        self._turnstile.wait(float(x.flat[0]) if x.size else None)
        if np.isnan(x).any():
            raise InvalidArgument("x has a NaN in it")
        return {"y": x}


class GatedDigits(torch.nn.Module):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.digits = torch.export.load(str(DEMO_REPOSITORY / "digits" / "cloud.pt2")).module()
        self._turnstile = _Turnstile(folder)

    def train(self, mode: bool = True) -> GatedDigits:
        # An exported program is traced in eval mode and cannot change mode (it raises).
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self._turnstile.wait(None)
        scores: torch.Tensor = self.digits(pixels)
        return scores


def started_marker(value: float) -> str:
    """The marker file the model writes when it starts a call whose first input value is `value`."""
    return f"started-{value:g}"


def started(folder: Path) -> set[str]:
    """The markers of every call the model started so far."""
    return {path.name for path in folder.glob("started-*")}


def calls(folder: Path) -> int:
    """How many calls the model started so far."""
    return len(list(folder.glob("call-*")))


def make() -> Gate:
    return Gate(Path(os.environ[MARKER_ENV]))


def make_digits() -> GatedDigits:
    return GatedDigits(Path(os.environ[MARKER_ENV]))


def write_repository(root: Path, edge: bool = False, width: int = 1) -> Path:
    """A repository with model `gate` (cloud side gated; x and y of shape [-1, width], width -1 for any);
    with `edge`, also an edge side (ONNX identity) so that the edge agent serves it; `offload_route=cloud`
    sends its rows to the gate."""
    folder = root / "gate"
    folder.mkdir(parents=True)
    config = (
        f'inputs = [{{ name = "x", datatype = "FP32", shape = [-1, {width}] }}]\n'
        f'outputs = [{{ name = "y", datatype = "FP32", shape = [-1, {width}] }}]\n'
        '[cloud]\nfactory = "support.gate:make"\nwarmup_rows = 0\n'
    )
    if edge:
        write_identity_onnx(folder / "edge.onnx")
        config += (
            '[edge]\nartifact = "edge.onnx"\n[routing]\noutput = "y"\noutput_kind = "probabilities"\nthreshold = 0.5\n'
        )
    (folder / "model.toml").write_text(config)
    return root


def write_digits_repository(root: Path) -> Path:
    """A repository with model `digits`: the demo's cloud model and tensors, behind the gate."""
    folder = root / "digits"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        'inputs = [{ name = "pixels", datatype = "FP32", shape = [-1, 64] }]\n'
        'outputs = [{ name = "scores", datatype = "FP32", shape = [-1, 10] }]\n'
        '[cloud]\nfactory = "support.gate:make_digits"\nwarmup_rows = 0\n'
    )
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
