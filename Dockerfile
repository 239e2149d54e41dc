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
# Optional extras: `--build-arg EXTRAS=encoder` adds `local-minilm` to the factory (PyTorch from
# TORCH_INDEX_URL first, the CPU build by default, so that pip never pulls the multi-GB CUDA one;
# a CUDA index such as https://download.pytorch.org/whl/cu128 makes a GPU image). Without it the
# image holds the gateway and `local-ngram`, and the factory lists `local-minilm` as unavailable.
ARG EXTRAS=""
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Dependencies first, from pyproject alone, so that a code change does not re-download them.
COPY pyproject.toml README.md ./
# DL3013: `.[extras]` is this project (its pins are in pyproject.toml), not a package from PyPI.
# hadolint ignore=DL3013
RUN mkdir service && touch service/__init__.py \
    && if [ -n "$EXTRAS" ]; then \
         pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
         && pip install --no-cache-dir ".[${EXTRAS}]"; \
       else pip install --no-cache-dir .; fi \
    && pip uninstall --yes classifier-gateway
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
