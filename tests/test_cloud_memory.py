"""What a real `offload cloud` process holds under a burst of large requests, from /proc.

The model is the gate (tests/support/gate.py), shut, so the requests it admits stay in
flight: without bounds the whole burst would be held, twice over (192 MiB of messages and
their decoded copies). With a cap of 4 concurrent RPCs and 24 MiB of request inputs admitted
at most, 24 requests of 8 MiB arrive at once; the test checks who is answered or refused and
how, that the peak resident memory (VmHWM, reset after a warm-up request) stays within the
configured budget over the baseline, and that it comes back near the baseline afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from conftest import SUBPROCESS_ENV
from offload.oip.client import OipClient
from offload.oip.errors import UpstreamError
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse
from offload.tools.process import ServerProcess
from support import gate
from support.chaos import eventually

MIB = 1 << 20
CAP = 4  # concurrent RPCs
MESSAGE_BYTES = 32 * MIB
INFLIGHT_BYTES = 24 * MIB
ROWS, WIDTH = 2048, 1024  # 8 MiB of FP32 per request
CLIENTS = 12  # each sends 2 requests at once: 24 requests, 192 MiB
# What the configuration lets the cloud hold above its baseline (README: the cloud under load):
# the bodies of the RPCs it serves, and twice the inputs it admits (message and decoded copy).
BUDGET = CAP * MESSAGE_BYTES + 2 * INFLIGHT_BYTES
NEAR_BASELINE = 32 * MIB


def _request(index: int) -> InferRequest:
    x: npt.NDArray[np.float32] = np.full((ROWS, WIDTH), index, dtype=np.float32)
    return InferRequest("gate", [Tensor.of("x", x)])


async def test_a_burst_of_large_requests_stays_within_the_memory_budget_and_is_given_back(tmp_path: Path) -> None:
    repository = gate.write_repository(tmp_path / "repository", width=-1)
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    env = {
        **SUBPROCESS_ENV,
        gate.MARKER_ENV: str(gate_dir),
        "OFFLOAD_CLOUD_MAX_CONCURRENT_RPCS": str(CAP),
        "OFFLOAD_CLOUD_MAX_MESSAGE_BYTES": str(MESSAGE_BYTES),
        "OFFLOAD_CLOUD_MAX_INFLIGHT_BYTES": str(INFLIGHT_BYTES),
        "OFFLOAD_CLOUD_MAX_BATCH_ROWS": str(ROWS),  # a request is one model call
    }
    args = ["cloud", "--grpc-port", "0", "--model-repository", str(repository), "--inference-threads", "1"]
    with ServerProcess(args, env=env) as cloud:
        address = await asyncio.to_thread(cloud.start)
        clients = [OipClient(address, max_message_bytes=MESSAGE_BYTES) for _ in range(CLIENTS)]
        try:
            # One request through first (the gate lets call 0 pass): the server's steady state.
            (gate_dir / "pass-0").touch()
            await clients[0].infer(_request(0), timeout=60)
            await eventually(lambda: gate.calls(gate_dir) == 1, "the first request was answered")
            baseline = cloud.memory()[0]
            cloud.reset_peak_memory()

            calls = [
                asyncio.ensure_future(client.infer(_request(1 + 2 * index + twin), timeout=60))
                for index, client in enumerate(clients)
                for twin in (0, 1)
            ]
            admitted = INFLIGHT_BYTES // (ROWS * WIDTH * 4)  # 3: one in the (shut) gate, two queued
            # Everything but what was admitted is refused while the gate holds the admitted ones.
            await _until_done(calls, len(calls) - admitted)
            peak = cloud.memory()[1]
            refused = [call.exception() for call in calls if call.done()]
            (gate_dir / "open").touch()
            answers = await asyncio.gather(*(call for call in calls if not call.done()))

            await eventually(
                lambda: cloud.memory()[0] <= baseline + NEAR_BASELINE,
                "the memory of the burst was given back",
            )
        finally:
            (gate_dir / "open").touch()
            await asyncio.gather(*(client.close() for client in clients))

    assert peak - baseline <= BUDGET, f"peak {(peak - baseline) / MIB:.0f} MiB over the baseline"
    assert len(answers) == admitted
    for answer in answers:
        _assert_echoed(answer)
    assert all(isinstance(error, UpstreamError) for error in refused), refused
    errors = [error for error in refused if isinstance(error, UpstreamError)]
    assert {error.status for error in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # Refused by gRPC past the cap (before reading the body, no pushback; how many depends on how fast
    # the server refuses the others), or by admission (with a pushback).
    by_cap = [error for error in errors if "Concurrent RPC limit exceeded" in str(error)]
    by_admission = [error for error in errors if "at capacity" in str(error) or "cannot start" in str(error)]
    assert len(by_cap) + len(by_admission) == len(errors)
    assert all(error.pushback_ms is None for error in by_cap)
    assert all(error.pushback_ms is not None and error.pushback_ms >= 100 for error in by_admission)


async def _until_done(calls: Sequence[asyncio.Future[InferResponse]], count: int) -> None:
    pending = set(calls)
    while len(calls) - len(pending) < count:
        done, pending = await asyncio.wait(pending, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert done, f"only {len(calls) - len(pending)} of the calls past capacity were refused"


def _assert_echoed(answer: InferResponse) -> None:
    y = answer.as_dict()["y"].data
    assert y.shape == (ROWS, WIDTH)
    assert (y == y.flat[0]).all(), "each answer is its own request's rows"
