# syntax=docker/dockerfile:1
# Render service image: slim Python, no torch (tokenizers + chat templates only).
#   docker build -f docker/render.Dockerfile -t bios-render:dev .
#   docker run --rm -p 50051:50051 -p 9090:9090 bios-render:dev
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# gRPC stubs are generated, never committed (Makefile `proto`): generate them here with the pinned tools.
FROM ${PYTHON_IMAGE} AS stubs
WORKDIR /src
COPY requirements.txt ./
RUN grep -E '^(grpcio-tools|protobuf)[=<>!~ ]' requirements.txt > /tmp/tools.txt \
 && pip install --no-cache-dir --disable-pip-version-check -r /tmp/tools.txt
COPY protos ./protos
RUN mkdir -p /out && python -m grpc_tools.protoc -Iprotos --python_out=/out --grpc_python_out=/out protos/bios/v1/*.proto

FROM ${PYTHON_IMAGE} AS deps
RUN python -m venv /opt/venv
COPY docker/requirements-render.txt /tmp/requirements-render.txt
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements-render.txt

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/clients/python \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    BIOS_CACHE_DIR=/var/cache/bios \
    HOME=/home/bios
RUN groupadd --system --gid 10001 bios \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/bios --create-home --shell /usr/sbin/nologin bios \
 && mkdir -p /var/cache/bios && chown 10001:10001 /var/cache/bios
COPY --from=deps /opt/venv /opt/venv
# Only what the render service imports: `bios` (wire types, errors), `bios_server` (server plumbing), render_service.
COPY clients/python/bios /app/clients/python/bios
COPY clients/python/bios_server /app/clients/python/bios_server
COPY --from=stubs /out/bios/v1/ /app/clients/python/bios/v1/
COPY render_service /app/render_service
# Byte-compile once here: at run time the root filesystem is read-only (k8s securityContext).
RUN python -m compileall -q /app
USER 10001:10001
WORKDIR /home/bios
EXPOSE 50051 9090
ENTRYPOINT ["python", "-m", "render_service"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]
