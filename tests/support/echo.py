"""An echo model for the cloud service: every input `in_X` comes back as output `out_X`.

It is a real model the cloud loads through its factory mechanism (an ArrayModel),
so every datatype, BYTES included, crosses the real server path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt


class Echo:
    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        return {"out_" + name.removeprefix("in_"): array for name, array in inputs.items()}


def make() -> Echo:
    return Echo()
