"""The demo cloud model (cloud.pt2) as a custom MLServer runtime, for the side-by-side benchmarks.

Runs inside the MLServer peer's own virtual environment (benchmarks/peer_servers.py makes it);
model-settings.json in benchmarks/peers/mlserver/ names this class and turns on adaptive batching,
so `predict` gets the rows of up to 64 requests at once and MLServer splits the answer again.
MLServer runs batches concurrently; here, as in `offload cloud`, at most `inference_threads`
(parameters.extra, default 2) run the model at once, with the CPU's cores shared between them.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class DigitsModel(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        threads = int(extra.get("inference_threads", 2))
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="digits")
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self._device.type == "cpu":  # `offload cloud`'s rule: each inference thread its share of the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // threads))
        self._module: Any = torch.export.load(path).module().to(self._device)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        pixels = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        # Off the event loop (parallel workers are off), so MLServer gathers the next batch meanwhile.
        scores = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._scores, np.asarray(pixels, dtype=np.float32)
        )
        return InferenceResponse(
            model_name=self.name, model_version=self.version, outputs=[NumpyCodec.encode_output("scores", scores)]
        )

    def _scores(self, pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with torch.inference_mode():
            result: npt.NDArray[np.float32] = self._module(torch.from_numpy(pixels).to(self._device)).cpu().numpy()
        return result
