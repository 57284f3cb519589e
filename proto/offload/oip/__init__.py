"""The Open Inference Protocol (KServe v2) layer shared by the edge agent and the cloud service.

Generated gRPC code, the tensor codec, the transport-free data-plane types, one
error-to-status mapping, and a generic asyncio gRPC server and client.
"""
