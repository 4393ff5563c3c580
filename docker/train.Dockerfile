# syntax=docker/dockerfile:1
# Train service image: CUDA runtime + Python + torch (CUDA build) + transformers + peft.
#   docker build -f docker/train.Dockerfile -t bios-train:dev .
#   docker run --rm --gpus all -p 50052:50052 -p 9091:9091 -v bios-ckpt:/var/lib/bios/checkpoints bios-train:dev
# The image also runs without a GPU (torch falls back to CPU), which is how the dev overlay uses it.
# torch==<pin> from the default index is the Linux CUDA build (its CUDA libraries come as nvidia-* wheels);
# to take a specific CUDA build instead, pass --build-arg TORCH_INDEX_URL=<that wheel index>.
# The host's NVIDIA driver must support the CUDA version of that torch build.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS stubs
WORKDIR /src
COPY requirements.txt ./
RUN grep -E '^(grpcio-tools|protobuf)[=<>!~ ]' requirements.txt > /tmp/tools.txt \
 && pip install --no-cache-dir --disable-pip-version-check -r /tmp/tools.txt
COPY protos ./protos
RUN mkdir -p /out && python -m grpc_tools.protoc -Iprotos --python_out=/out --grpc_python_out=/out protos/bios/v1/*.proto

FROM ${CUDA_IMAGE}
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# The run-time part of requirements.txt: everything above its "# tests" section (same pins as the tests).
COPY requirements.txt /tmp/requirements.txt
RUN sed '/^# tests/,$d' /tmp/requirements.txt > /tmp/requirements-train.txt \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements-train.txt \
 && rm /tmp/requirements*.txt
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/clients/python \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    BIOS_CACHE_DIR=/var/cache/bios \
    BIOS_CHECKPOINT_DIR=/var/lib/bios/checkpoints \
    HOME=/home/bios
# Ubuntu 24.04 images ship a user 1000 (ubuntu); bios gets its own uid, the one the k8s manifests run as.
RUN groupadd --system --gid 10001 bios \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/bios --create-home --shell /usr/sbin/nologin bios \
 && mkdir -p /var/cache/bios /var/lib/bios/checkpoints \
 && chown -R 10001:10001 /var/cache/bios /var/lib/bios
# The train service imports the shared `bios` package, render_service (model registry, tokenizers) and train_service.
COPY clients/python/bios /app/clients/python/bios
COPY clients/python/bios_server /app/clients/python/bios_server
COPY --from=stubs /out/bios/v1/ /app/clients/python/bios/v1/
COPY render_service /app/render_service
COPY train_service /app/train_service
# The Tinker gateway runs from this image too, as a sidecar of each train pod (k8s/base/train-statefulset.yaml).
COPY tinker_gateway /app/tinker_gateway
RUN python -m compileall -q /app
USER 10001:10001
WORKDIR /home/bios
VOLUME ["/var/lib/bios/checkpoints"]
EXPOSE 50052 9091
ENTRYPOINT ["python", "-m", "train_service"]
CMD ["--host", "0.0.0.0", "--port", "50052", "--metrics-port", "9091", "--checkpoint-dir", "/var/lib/bios/checkpoints"]
