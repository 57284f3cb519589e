"""A cloud model that refuses rows it does not like: a cloud failure on demand, chosen by the data.

`picky` echoes x as y, with its edge side an ONNX identity whose output is read as a probability,
so a row's value is its confidence: rows at 0.5 or above stay on the edge, the rest go to the
cloud, and a negative row makes the cloud model raise (the cloud answers INTERNAL, and the edge
agent answers that row from the edge, flagged degraded). No timing is involved.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt

from support import gate


class Picky:
    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        x = inputs["x"]
        if (x < 0).any():
            raise ValueError("picky refuses negative rows")
        return {"y": x}


def make() -> Picky:
    return Picky()


def write_repository(root: Path) -> Path:
    """A repository (or one more model in it) with `picky`, edge and cloud."""
    folder = root / "picky"
    folder.mkdir(parents=True)
    gate.write_identity_onnx(folder / "edge.onnx")
    (folder / "model.toml").write_text(
        'inputs = [{ name = "x", datatype = "FP32", shape = [-1, 1] }]\n'
        'outputs = [{ name = "y", datatype = "FP32", shape = [-1, 1] }]\n'
        '[cloud]\nfactory = "support.picky:make"\nwarmup_rows = 0\n'
        '[edge]\nartifact = "edge.onnx"\n'
        '[routing]\noutput = "y"\noutput_kind = "probabilities"\nthreshold = 0.5\n'
    )
    return root
