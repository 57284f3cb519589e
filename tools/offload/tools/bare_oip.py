"""Bare OIP servers: the floors between the transport and the edge agent, for benchmarks.

The edge agent's edge route does three things on top of gRPC: the OIP layer (read and check the
request, decode its tensors, encode the answer, count the call), the edge model's run, and the
routing (options, confidence, thresholds, the response's routing parameters, traffic counts). To
say which of them costs what, the throughput benchmark measures, beside the bare grpc.aio echo
(`offload.tools.bare_echo`: transport only) and the agent, two servers made of the agent's own
parts (`OipServer`, `OnnxModel`), each stopping after one more step:

- `--answer constant`: the OIP layer only. Every request is checked against the model's inputs
  and decoded as the agent does, and answered with a fixed output of the model's output's shape
  (zeros), no model run.
- `--answer model`: the OIP layer and the edge model's run (the agent's session options), its
  output returned as it is: no confidence, no routing.

    python -m offload.tools.bare_oip --answer model [--repository DIR] [--port 0]
    # prints "bare-oip listening on HOST:PORT"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.edge.config import EdgeSection
from offload.edge.onnx_model import OnnxModel
from offload.models import DEMO_REPOSITORY
from offload.oip import event_loop
from offload.oip.datatypes import DATATYPES
from offload.oip.errors import NotFound
from offload.oip.repository import BATCH_DIM, TensorSpec, load_repository
from offload.oip.server import OipServer, serve_until_signalled
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from offload.oip.version import SERVER_VERSION
from offload.tools.process import ServerProcess

SERVER_NAME = "offload-bare-oip"


class Answer(StrEnum):
    CONSTANT = "constant"  # the OIP layer only
    MODEL = "model"  # the OIP layer and the edge model's run


class BareDataPlane:
    """Answers ModelInfer for a repository's [edge] models by `answer`; nothing else happens."""

    def __init__(self, models: Mapping[str, OnnxModel], versions: Mapping[str, str], answer: Answer) -> None:
        self._models = dict(models)
        self._versions = dict(versions)
        self._answer = answer

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def model_ready(self, name: str, version: str) -> bool:
        return name in self._models

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, SERVER_VERSION, ())

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        model = self._model(name)
        return ModelMetadata(name, (self._versions[name],), model.platform, model.inputs, model.outputs)

    def health_details(self) -> Mapping[str, str]:
        return {}

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        model = self._model(request.model_name)
        inputs = {tensor.name: tensor.data for tensor in request.inputs}
        if self._answer is Answer.MODEL:
            outputs = model.predict(inputs)
        else:
            rows = int(request.inputs[0].data.shape[0]) if request.inputs else 0
            outputs = {spec.name: _zeros(spec, rows) for spec in model.outputs}
        return InferResponse(
            model_name=request.model_name,
            model_version=self._versions[request.model_name],
            id=request.id,
            outputs=[Tensor(spec.name, spec.datatype, outputs[spec.name]) for spec in model.outputs],
        )

    def _model(self, name: str) -> OnnxModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served here; models: {sorted(self._models)}")
        return model


def _zeros(spec: TensorSpec, rows: int) -> npt.NDArray[Any]:
    shape = tuple(rows if dim == BATCH_DIM else dim for dim in spec.shape)
    if spec.datatype == "BYTES":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=DATATYPES[spec.datatype].dtype)


def load_plane(repository: Path, answer: Answer) -> BareDataPlane:
    """The repository's [edge] models, loaded as the agent loads them, behind a bare data plane."""
    models: dict[str, OnnxModel] = {}
    versions: dict[str, str] = {}
    for name, entry in load_repository(repository).items():
        section = entry.section("edge", EdgeSection)
        if section is None:
            continue
        models[name] = OnnxModel(entry.artifact_path(section.artifact), section)
        versions[name] = entry.config.version
    return BareDataPlane(models, versions, answer)


async def _serve(host: str, port: int, repository: Path, answer: Answer) -> None:
    server = OipServer(load_plane(repository, answer), SERVER_NAME)
    bound = await server.start(host, port)
    await serve_until_signalled(
        server, 0.0, announce=lambda: print(f"bare-oip listening on {host}:{bound} (answer: {answer})", flush=True)
    )


class BareOipProcess(ServerProcess):
    """A bare OIP server as a child process, started and stopped like the Offload servers."""

    def __init__(self, answer: Answer, repository: Path = DEMO_REPOSITORY) -> None:
        super().__init__([])
        self.args = [
            sys.executable,
            "-m",
            "offload.tools.bare_oip",
            "--answer",
            str(answer),
            "--repository",
            str(repository),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answer", type=Answer, choices=list(Answer), default=Answer.MODEL, help="what to answer")
    parser.add_argument(
        "--repository", type=Path, default=DEMO_REPOSITORY, help="model repository (default: the demo's)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for any free one (default 0)")
    options = parser.parse_args()
    event_loop.run(_serve(options.host, options.port, options.repository, options.answer))  # as the agent runs


if __name__ == "__main__":
    main()
