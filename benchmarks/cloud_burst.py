"""A burst of large requests against the cloud: the memory it takes, and what the callers get.

    python benchmarks/cloud_burst.py [--clients 24] [--requests 2] [--rows 180000] [--deadline 120]
                                     [--checkout DIR]

One real `offload cloud` process on the CPU serves the demo model with its default settings
(OFFLOAD_CLOUD_* in the environment change them). Once it listens and has warmed up, every
client, each on its own channel, sends `--requests` requests of `--rows` FP32 rows at once,
with a `--deadline`. Reported: the server's resident memory (VmRSS) before the burst, its
peak (VmHWM), and after the burst, when every call has ended and again a few seconds later;
how many calls were answered, refused (RESOURCE_EXHAUSTED, and how soon) or ran out their
deadline, and the wall time. With `--checkout`, the server runs another checkout's code
(say an earlier commit, `git archive COMMIT | tar -x -C DIR`), for a before-and-after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from offload.oip.messages import request_to_pb
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.tools.process import ServerProcess

METHOD = "/inference.GRPCInferenceService/ModelInfer"
SETTLE_SECONDS = 5.0
MESSAGE_BYTES = 64 << 20


async def _burst(address: str, body: bytes, clients: int, requests: int, deadline: float) -> list[tuple[str, float]]:
    """(status name, seconds to the outcome) of every call."""
    options = [("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(clients)]
    started = time.perf_counter()

    async def call(channel: grpc.aio.Channel) -> tuple[str, float]:
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        try:
            await stub(body, timeout=deadline)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        return code, time.perf_counter() - started

    try:
        return await asyncio.gather(*(call(channel) for channel in channels for _ in range(requests)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=24, help="clients, each on its own channel (default 24)")
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends at once (default 2)")
    parser.add_argument("--rows", type=int, default=180_000, help="FP32 rows of 64 values per request (default 180000)")
    parser.add_argument("--deadline", type=float, default=120.0, help="each call's deadline in seconds (default 120)")
    parser.add_argument("--checkout", type=Path, help="run the server from this checkout's code instead")
    options = parser.parse_args()

    pixels = np.random.default_rng(0).integers(0, 17, size=(options.rows, 64)).astype(np.float32)
    body = request_to_pb(InferRequest("digits", [Tensor.of("pixels", pixels)])).SerializeToString()
    del pixels
    args = ["cloud", "--grpc-port", "0", "--device", "cpu", "--log-level", "WARNING"]
    env = {}
    if options.checkout is not None:
        wings = ("proto", "router", "edge", "cloud", "tools", "models")
        env["PYTHONPATH"] = os.pathsep.join(str(options.checkout.resolve() / wing) for wing in wings)
    with ServerProcess(args, env=env) as cloud:
        address = cloud.start()
        before = cloud.memory_kib()["VmRSS"]
        print(f"burst: {options.clients} x {options.requests} x {options.rows} rows ({len(body) / 2**20:.1f} MiB)")
        wall = time.perf_counter()
        outcomes = asyncio.run(_burst(address, body, options.clients, options.requests, options.deadline))
        wall = time.perf_counter() - wall
        ended = cloud.memory_kib()
        time.sleep(SETTLE_SECONDS)
        settled = cloud.memory_kib()
    codes = Counter(code for code, _ in outcomes)
    refused = sorted(seconds for code, seconds in outcomes if code == "RESOURCE_EXHAUSTED")
    print(f"VmRSS before the burst: {before / 1024:.0f} MiB")
    print(f"VmHWM (peak):           {ended['VmHWM'] / 1024:.0f} MiB")
    print(f"VmRSS when calls ended: {ended['VmRSS'] / 1024:.0f} MiB")
    print(f"VmRSS {SETTLE_SECONDS:g} s later:      {settled['VmRSS'] / 1024:.0f} MiB")
    print(f"outcomes: {dict(sorted(codes.items()))} in {wall:.1f} s")
    if refused:
        print(f"refused after (s): median {statistics.median(refused):.2f}, slowest {refused[-1]:.2f}")
    answered = sorted(seconds for code, seconds in outcomes if code == "OK")
    if answered:
        print(f"answered after (s): first {answered[0]:.1f}, last {answered[-1]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
