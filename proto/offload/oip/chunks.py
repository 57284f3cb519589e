"""Run a row-wise model over a large batch in chunks of bounded size, each chunk's outputs written in place.

A model's working memory grows with its batch (the demo edge model takes about 5 kB a row in
intermediate tensors, twenty times its input), so a batch of 200,000 rows run in one call needs
a gigabyte. Run in chunks, the working set is one chunk's, and the outputs are allocated once
at full size and filled chunk by chunk, never joined from copies.

Every tensor is batched along its first dimension and rows are independent (what routing by
row already assumes), so the chunked answer is the answer of the whole batch. A model whose
rows depend on their neighbours (a dynamically quantized one scales activations by its batch's
range: README, `offload quantize`) answers a row by its chunk rather than its whole request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.oip.datatypes import payload_bytes
from offload.oip.errors import Internal

Arrays = dict[str, npt.NDArray[Any]]
Predict = Callable[[Mapping[str, npt.NDArray[Any]]], Mapping[str, npt.NDArray[Any]]]


def batch_rows(inputs: Mapping[str, npt.NDArray[Any]]) -> int:
    """The batch size: the first dimension every input shares (0 without inputs)."""
    first = next(iter(inputs.values()), None)
    return 0 if first is None or first.ndim == 0 else int(first.shape[0])


def rows_within(inputs: Mapping[str, npt.NDArray[Any]], max_bytes: int) -> int:
    """The most rows whose inputs take at most `max_bytes` (BYTES elements counted), one at least."""
    rows = batch_rows(inputs)
    if rows == 0:
        return 1
    per_row = sum(payload_bytes(array) for array in inputs.values()) / rows
    return max(1, int(max_bytes // per_row)) if per_row else rows


def predict_in_chunks(
    predict: Predict, inputs: Mapping[str, npt.NDArray[Any]], chunk_rows: int, outputs: Sequence[str]
) -> Arrays:
    """`predict` over the batch, at most `chunk_rows` rows a call; the named outputs of the whole batch."""
    rows = batch_rows(inputs)
    if rows <= chunk_rows:
        produced = predict(inputs)
        return {name: produced[name] for name in outputs}
    result: Arrays = {}
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        produced = predict({name: array[start:stop] for name, array in inputs.items()})
        for name in outputs:
            part = produced[name]
            whole = result.get(name)
            if whole is None:
                whole = result[name] = np.empty((rows, *part.shape[1:]), dtype=part.dtype)
            if part.shape != (stop - start, *whole.shape[1:]) or part.dtype != whole.dtype:
                raise Internal(
                    f"output {name!r} is {part.dtype}{list(part.shape)} for rows {start}-{stop - 1}, but "
                    f"{whole.dtype}{list(whole.shape[1:])} a row before: the model's rows are not independent, "
                    "so it cannot run in chunks"
                )
            whole[start:stop] = part
    return result
