# The cloud service: large PyTorch models over OIP gRPC, on CUDA when the host has a GPU.
#   docker build -f deploy/docker/cloud.Dockerfile -t offload-cloud .
#   docker run --gpus all -p 8101:8101 offload-cloud
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
RUN pip install --no-cache-dir '.[cloud]' && useradd --system --uid 10001 offload

USER offload
ENV OFFLOAD_CLOUD_HOST=0.0.0.0 OFFLOAD_CLOUD_GRPC_PORT=8101
EXPOSE 8101
STOPSIGNAL SIGTERM
ENTRYPOINT ["offload", "cloud"]
