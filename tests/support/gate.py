"""A cloud model that holds each call until the test opens a gate: a request in flight, on demand.

The test learns that the call arrived from a marker file the model writes, and
lets it finish by creating the gate file. No timing is involved.
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
        (self.folder / "arrived").touch()
        deadline = time.monotonic() + 60
        while not (self.folder / "open").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            time.sleep(0.01)
        return {"y": inputs["x"]}


def make() -> Gate:
    return Gate(Path(os.environ[MARKER_ENV]))


def write_repository(root: Path) -> Path:
    folder = root / "gate"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        'inputs = [{ name = "x", datatype = "FP32", shape = [-1, 1] }]\n'
        'outputs = [{ name = "y", datatype = "FP32", shape = [-1, 1] }]\n'
        '[cloud]\nfactory = "support.gate:make"\nwarmup_rows = 0\n'
    )
    return root
