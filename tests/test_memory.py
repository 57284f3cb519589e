"""Memory promises of a real edge agent process, read from /proc/PID/status.

The answer cache stays within its byte bound under a stream of unique rows, and one large request costs a
small multiple of its own size and gives it back afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from offload.oip.client import OipClient
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, ParameterValue
from offload.tools.process import ServerProcess

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status (Linux)")

MiB = 1 << 20


def _memory(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (the most it was resident) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024  # kB
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def _unique_pixels(start: int, rows: int) -> npt.NDArray[np.float32]:
    """Rows no other call of this function gives: the first pixel counts them."""
    pixels = np.random.default_rng(start).integers(0, 17, size=(rows, 64)).astype(np.float32)
    pixels[:, 0] = np.arange(start, start + rows, dtype=np.float32) + 0.5
    return pixels


@pytest.fixture(scope="module")
def cloud_address() -> Iterator[str]:
    with ServerProcess(["cloud", "--grpc-port", "0"]) as cloud:
        yield cloud.start()


CACHE_BOUND = 4 * MiB


async def test_the_answer_cache_stays_within_its_bound_under_a_stream_of_unique_rows(cloud_address: str) -> None:
    # Every row goes to the cloud and is cached. 48,000 rows of the demo model's answer take about 42 MB
    # (880 bytes a row); a cache that charged only their payload would hold them all.
    per_request, requests, callers = 128, 375, 6
    settings = {"OFFLOAD_EDGE_CACHE_MAX_BYTES": str(CACHE_BOUND), "OFFLOAD_EDGE_STATUS_LOG_SECONDS": "0"}
    with ServerProcess(["edge", "--grpc-port", "0", "--cloud", cloud_address], env=settings) as edge:
        address = edge.start()
        parameters: dict[str, ParameterValue] = {"offload_route": "cloud", "offload_details": True}

        async def send(client: OipClient, start: int) -> list[str]:
            pixels = Tensor.of("pixels", _unique_pixels(start, per_request))
            request = InferRequest("digits", [pixels], parameters=parameters)
            response = await client.infer(request)
            return [route.decode() for route in response.as_dict()["offload_route"].data.tolist()]

        async with OipClient(address) as client:
            # Warm-up: the agent's own buffers and pools reach their working size.
            for start in range(0, 20 * per_request, per_request):
                await send(client, start)
            before = _memory(edge.pid, "VmRSS")
            starts = iter(range(20 * per_request, requests * per_request, per_request))

            async def caller() -> None:
                for start in starts:
                    await send(client, start)

            await asyncio.gather(*(caller() for _ in range(callers)))
            after = _memory(edge.pid, "VmRSS")
            first_rows = await send(client, 0)
            last_rows = await send(client, (requests - 1) * per_request)
    assert last_rows == ["cache"] * per_request, "the latest rows are cached"
    assert first_rows == ["cloud"] * per_request, "the earliest rows were evicted: the bound was reached"
    growth = after - before
    assert growth <= CACHE_BOUND + 8 * MiB, f"resident memory grew {growth / MiB:.1f} MiB for a 4 MiB cache"
