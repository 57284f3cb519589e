"""The least a Python batching server can do: the floor under `offload cloud` in the throughput benchmark.

The issue that asked for dynamic batching measured this design against Triton: a grpc.aio server
that queues each 1-row request and lets model threads run whatever has queued (up to 64 rows) as
one torch call. It answers ModelInfer for one [1, 64] FP32 input with raw contents, and
ServerReady / ModelReady (for the benchmark's start-up check), nothing more: no checks of the
request, no deadlines, no admission, no metrics, so its requests per second bound what a Python
front end with torch batching reaches on the machine. It runs the same cloud.pt2 as the others,
with `offload cloud`'s defaults: 2 model threads, each with cores / 2 torch threads.

    python benchmarks/peers/minimal_batching_server.py --grpc-port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import threading
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import torch

from offload.models import DEMO_REPOSITORY
from offload.oip import event_loop
from offload.oip import grpc_service_pb2 as pb

MAX_BATCH_ROWS = 64
INSTANCES = 2
Work = tuple[npt.NDArray[np.float32], "asyncio.Future[npt.NDArray[np.float32]]"]


def _run_batches(module: Any, work: queue.Queue[Work], loop: asyncio.AbstractEventLoop) -> None:
    while True:
        items = [work.get()]
        while len(items) < MAX_BATCH_ROWS:
            try:
                items.append(work.get_nowait())
            except queue.Empty:
                break
        with torch.inference_mode():
            scores = module(torch.from_numpy(np.concatenate([rows for rows, _ in items]))).numpy()
        for index, (_, answer) in enumerate(items):
            loop.call_soon_threadsafe(answer.set_result, scores[index : index + 1])


async def _serve(port: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // INSTANCES))
    module = torch.export.load(str(DEMO_REPOSITORY / "digits" / "cloud.pt2")).module()
    loop = asyncio.get_running_loop()
    work: queue.Queue[Work] = queue.Queue()
    for _ in range(INSTANCES):
        threading.Thread(target=_run_batches, args=(module, work, loop), daemon=True).start()

    async def infer(data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        request = pb.ModelInferRequest.FromString(data)
        rows = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(1, 64)
        answer = loop.create_future()
        work.put((rows, answer))
        scores = await answer
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="scores", datatype="FP32", shape=[1, 10])
        response.raw_output_contents.append(scores.tobytes())
        return response.SerializeToString()

    async def ready(data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    async def model_ready(data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return pb.ModelReadyResponse(ready=True).SerializeToString()

    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ServerReady": grpc.unary_unary_rpc_method_handler(ready),
        "ModelReady": grpc.unary_unary_rpc_method_handler(model_ready),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-port", type=int, required=True, help="the gRPC port on 127.0.0.1")
    event_loop.run(_serve(parser.parse_args().grpc_port))  # the loop `offload cloud` runs on


if __name__ == "__main__":
    main()
