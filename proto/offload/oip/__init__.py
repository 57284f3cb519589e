"""The Open Inference Protocol (KServe v2) layer shared by the edge agent and the cloud service.

Generated gRPC code, the tensor codec, the transport-free data-plane types, one
error-to-status mapping, the wire's limits and defaults (`limits`), the cache-key
hasher, what keeps a request's memory down (raw contents read as views of the bytes
received: `wire`; models run over a batch in chunks: `chunks`; the C allocator's arenas
and trim: `memory`), the model repository format (each wing validates its own section)
and its manifest for publishing over HTTP, security (TLS credentials and bearer tokens
from checked files, the token guard), and a generic asyncio gRPC server and client that
take their security from their caller.
"""
