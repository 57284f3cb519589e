# The cloud service: large PyTorch models over OIP gRPC, on CUDA when the host has a GPU.
#   docker build -f deploy/docker/cloud.Dockerfile -t offload-cloud .
#   docker run --gpus all --stop-timeout 20 -p 8101:8101 offload-cloud
# The base image decides the CUDA build: pytorch/pytorch images ship torch with CUDA.
ARG BASE=pytorch/pytorch:2.4.1-cuda12.4-cudnn9-runtime
FROM ${BASE}

WORKDIR /opt/offload
COPY pyproject.toml README.md ./
COPY proto proto
COPY edge edge
COPY cloud cloud
COPY router router
COPY tools tools
COPY models models
# torch comes with the base image; the [cloud] range (torch>=2.4) accepts it as it is.
RUN pip install --no-cache-dir '.[cloud]' \
    && groupadd --system --gid 10001 offload \
    && useradd --system --uid 10001 --gid 10001 offload

# Numeric, so that Kubernetes can check runAsNonRoot against the image itself.
USER 10001:10001
# 8102: grpc.health.v1 alone, in plaintext, for health checks and probes that cannot speak TLS.
ENV OFFLOAD_CLOUD_HOST=0.0.0.0 OFFLOAD_CLOUD_GRPC_PORT=8101 OFFLOAD_CLOUD_HEALTH_PORT=8102
EXPOSE 8101 8102
# SIGTERM drains: NOT_SERVING, new calls refused with UNAVAILABLE, calls in flight finish.
STOPSIGNAL SIGTERM
# SERVING once every model is loaded and warmed up; large models take a while, hence the start period.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:8102')); sys.exit(s.Check(h.HealthCheckRequest(), timeout=2).status != h.HealthCheckResponse.SERVING)"
ENTRYPOINT ["offload", "cloud"]
