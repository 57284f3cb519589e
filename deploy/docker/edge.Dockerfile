# The edge agent: the router's OIP gRPC API + the small ONNX models. No torch.
#   docker build -f deploy/docker/edge.Dockerfile -t offload-edge .
#   docker run --stop-timeout 20 -p 8001:8001 -e OFFLOAD_EDGE_CLOUD=cloud-host:8101 offload-edge
FROM python:3.11-slim

WORKDIR /opt/offload
COPY pyproject.toml README.md ./
COPY proto proto
COPY edge edge
COPY cloud cloud
COPY router router
COPY tools tools
COPY models models
# The [edge] extra brings onnxruntime and never torch.
RUN pip install --no-cache-dir '.[edge]' \
    && groupadd --system --gid 10001 offload \
    && useradd --system --uid 10001 --gid 10001 offload

# Numeric, so that Kubernetes can check runAsNonRoot against the image itself.
USER 10001:10001
# 8002: grpc.health.v1 alone, in plaintext, for health checks and probes that cannot speak TLS.
ENV OFFLOAD_EDGE_HOST=0.0.0.0 OFFLOAD_EDGE_GRPC_PORT=8001 OFFLOAD_EDGE_HEALTH_PORT=8002
EXPOSE 8001 8002
# SIGTERM drains: NOT_SERVING, new calls refused with UNAVAILABLE, calls in flight finish.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:8002')); sys.exit(s.Check(h.HealthCheckRequest(), timeout=2).status != h.HealthCheckResponse.SERVING)"
ENTRYPOINT ["offload", "edge"]
