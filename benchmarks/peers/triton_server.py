"""Triton Inference Server (bundled by NVIDIA PyTriton) serving the demo cloud model with its dynamic batcher.

Runs inside the Triton peer's own virtual environment (benchmarks/peer_servers.py makes it and
starts this script); gRPC only, on loopback. The model "digits" takes "pixels" FP32 [-1, 64] and
answers "scores" FP32 [-1, 10]; the dynamic batcher joins up to 64 rows of queued requests. As in
`offload cloud`, `--instances` (default 2) model instances run batches at once, with the CPU's
cores shared between them.

    python benchmarks/peers/triton_server.py --model cloud.pt2 --grpc-port 8001 [--max-queue-delay-us 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MAX_BATCH_SIZE = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the torch.export program (.pt2)")
    parser.add_argument("--grpc-port", type=int, required=True, help="the gRPC port on 127.0.0.1")
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="longest a request waits for others to batch with (default 0: batch what is queued)",
    )
    parser.add_argument("--instances", type=int, default=2, help="model instances running at once (default 2)")
    options = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # `offload cloud`'s rule: each inference thread its share of the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.instances))
    module: Any = torch.export.load(str(options.model)).module().to(device)

    def instance() -> Any:  # one inference callable per Triton model instance (PyTriton's @batch: untyped)
        @batch
        def infer(pixels: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float32]]:
            with torch.inference_mode():
                return {"scores": module(torch.from_numpy(pixels).to(device)).cpu().numpy()}

        return infer

    config = TritonConfig(
        grpc_address="127.0.0.1", grpc_port=options.grpc_port, allow_http=False, allow_metrics=False, exit_on_error=True
    )
    triton = Triton(config=config)
    triton.bind(
        model_name="digits",
        infer_func=[instance() for _ in range(options.instances)],
        inputs=[Tensor(name="pixels", dtype=np.float32, shape=(64,))],
        outputs=[Tensor(name="scores", dtype=np.float32, shape=(10,))],
        config=ModelConfig(
            max_batch_size=MAX_BATCH_SIZE,
            batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us),
        ),
    )
    triton.serve()  # until SIGINT


if __name__ == "__main__":
    main()
