"""Memory promises of a real edge agent process, read from /proc/PID/status.

The answer cache stays within its byte bound under a stream of unique rows, one large request costs a small
multiple of its own size and gives it back afterwards, and the edge takes no message a device cannot hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from offload.cloud.settings import CloudSettings
from offload.edge.settings import EdgeSettings
from offload.oip.client import OipClient
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, ParameterValue
from offload.tools.process import ServerProcess

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status (Linux)")

MiB = 1 << 20


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
            before, _ = edge.memory()
            starts = iter(range(20 * per_request, requests * per_request, per_request))

            async def caller() -> None:
                for start in starts:
                    await send(client, start)

            await asyncio.gather(*(caller() for _ in range(callers)))
            after, _ = edge.memory()
            first_rows = await send(client, 0)
            last_rows = await send(client, (requests - 1) * per_request)
    assert last_rows == ["cache"] * per_request, "the latest rows are cached"
    assert first_rows == ["cloud"] * per_request, "the earliest rows were evicted: the bound was reached"
    growth = after - before
    assert growth <= CACHE_BOUND + 8 * MiB, f"resident memory grew {growth / MiB:.1f} MiB for a 4 MiB cache"


async def test_one_large_request_costs_a_small_multiple_of_its_size_and_gives_it_back() -> None:
    # 15.4 MB of pixels, under the edge's 16 MiB message limit. In one piece the edge model alone would take
    # 5 kB a row of intermediate tensors, twenty times the request; the agent took 1.2 GB for 200,000 rows.
    rows = 60_000
    pixels = _unique_pixels(0, rows)
    with ServerProcess(["edge", "--grpc-port", "0", "--log-level", "DEBUG"]) as edge:
        address = edge.start()
        async with OipClient(address) as client:
            await client.infer(InferRequest("digits", [Tensor.of("pixels", pixels[:16])]))  # warm-up
            before, _ = edge.memory()
            edge.reset_peak_memory()
            response = await client.infer(InferRequest("digits", [Tensor.of("pixels", pixels)]))
            edge.wait_for_line("gave the allocator's free memory back to the system")
            after, peak = edge.memory()
    assert response.as_dict()["scores"].shape == (rows, 10)
    size = pixels.nbytes
    # gRPC itself holds three copies while it receives a request (its buffer, a bytearray, the bytes); after
    # that the agent holds one, with one chunk's working set and the outputs, so the receiving is the peak.
    assert peak - before <= 3 * size + 8 * MiB, f"{(peak - before) / size:.2f} times the request's size at the peak"
    assert after - before <= size // 2, f"{(after - before) / MiB:.1f} MiB still resident after the request"


def test_the_edge_takes_messages_a_device_can_hold_and_the_cloud_keeps_64_mib() -> None:
    assert EdgeSettings().max_message_bytes == 16 * MiB
    assert CloudSettings().max_message_bytes == 64 * MiB
