"""A cloud model that counts its calls in a file: how many requests reached the model itself.

Run by a real `offload cloud` process (a factory model), it appends one line per call to the
file named by OFFLOAD_TEST_COUNT_FILE, so a test can tell an answer the model computed from
one served before it (a cache). It doubles its input: y = 2x.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt

COUNT_ENV = "OFFLOAD_TEST_COUNT_FILE"


class Counting:
    def __init__(self, path: Path) -> None:
        self.path = path

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        with self.path.open("a") as calls:
            calls.write("call\n")
        return {"y": inputs["x"] * 2}


def make() -> Counting:
    return Counting(Path(os.environ[COUNT_ENV]))


def calls(path: Path) -> int:
    """How many calls the model has had."""
    return len(path.read_text().splitlines()) if path.exists() else 0


def write_repository(root: Path) -> Path:
    """A repository with the cloud model `counted` (FP32 [-1, 2] in and out), no warm-up call."""
    folder = root / "counted"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        'inputs = [{ name = "x", datatype = "FP32", shape = [-1, 2] }]\n'
        'outputs = [{ name = "y", datatype = "FP32", shape = [-1, 2] }]\n'
        '[cloud]\nfactory = "support.counting:make"\nwarmup_rows = 0\n'
    )
    return root
