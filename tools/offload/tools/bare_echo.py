"""A bare OIP echo server: the transport floor a benchmark compares servers against.

ModelInfer answers with the request's own bytes. They read as a valid ModelInferResponse (both
messages number name, version, id, parameters and tensors alike; the raw contents land in an
unknown field a parser keeps), so the client receives an answer the size of its request while the
server does no protobuf work at all. ModelStreamInfer answers each request the same way, wrapped
in ModelStreamInferResponse's `infer_response`. ServerLive, ServerReady and ModelReady say true.

    python -m offload.tools.bare_echo [--port 0]   # prints "bare-echo listening on HOST:PORT"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator

import grpc

from offload.oip import event_loop
from offload.oip import grpc_service_pb2 as pb
from offload.oip.limits import channel_options
from offload.tools.bench_transport import STREAM_INFER_RESPONSE_FIELD, encode_field
from offload.tools.process import ServerProcess

SERVICE_NAME = "inference.GRPCInferenceService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _echo_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield encode_field(STREAM_INFER_RESPONSE_FIELD, request)


def _constant(reply: bytes) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return reply

    return grpc.unary_unary_rpc_method_handler(answer)


async def start_bare_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """A started echo server and the port it listens on."""
    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(_echo),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(_echo_stream),
        "ServerLive": _constant(pb.ServerLiveResponse(live=True).SerializeToString()),
        "ServerReady": _constant(pb.ServerReadyResponse(ready=True).SerializeToString()),
        "ModelReady": _constant(pb.ModelReadyResponse(ready=True).SerializeToString()),
    }
    server = grpc.aio.server(options=channel_options(MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


async def _serve(host: str, port: int) -> None:
    server, bound = await start_bare_echo(host, port)
    print(f"bare-echo listening on {host}:{bound}", flush=True)
    await server.wait_for_termination()


class BareEchoProcess(ServerProcess):
    """The echo server as a child process, started and stopped like the Offload servers."""

    def __init__(self) -> None:
        super().__init__([])
        self.args = [sys.executable, "-m", "offload.tools.bare_echo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for any free one (default 0)")
    options = parser.parse_args()
    event_loop.run(_serve(options.host, options.port))  # the loop the servers it is a floor for run on


if __name__ == "__main__":
    main()
