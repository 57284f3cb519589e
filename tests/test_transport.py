"""The generic server and client over plaintext: what they do when the caller gives them no security."""

from __future__ import annotations

import numpy as np

from offload.cloud.dataplane import CloudDataPlane
from offload.oip.client import OipClient
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest


async def test_without_security_the_server_and_the_client_speak_plaintext(demo_cloud_plane: CloudDataPlane) -> None:
    server = OipServer(demo_cloud_plane, "plaintext-cloud")
    port = await server.start()
    try:
        async with OipClient(f"127.0.0.1:{port}", security=None) as client:
            await client.wait_for_ready(timeout=10.0)
            request = InferRequest("digits", [Tensor.of("pixels", np.zeros((3, 64), dtype=np.float32))])
            answer = await client.infer(request, timeout=10.0)
        assert answer.model_name == "digits"
        assert answer.outputs[0].shape == (3, 10)
    finally:
        await server.stop(0)
