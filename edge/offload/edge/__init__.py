"""Everything that runs on the device: the small model under ONNX Runtime, the edge agent, and models
rolled out to it over HTTP (offload.edge.rollout).

Never imports torch or offload.cloud. In-process use, with no server in between:

    from offload.edge import EdgeSettings, build_router
    from offload.router import InferRequest, Tensor

    router = build_router(EdgeSettings(cloud="cloud-host:8101"))
    response = await router.infer(InferRequest("digits", [Tensor.of("pixels", rows)]))
"""

from offload.edge.agent import build_router
from offload.edge.onnx_model import OnnxModel
from offload.edge.settings import EdgeSettings

__all__ = ["EdgeSettings", "OnnxModel", "build_router"]
