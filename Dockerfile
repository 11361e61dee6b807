# cxr-serve: TorchServe with our archives, built at image build time from the committed models.
# One image for CPU and GPU hosts: the pinned torch wheels are CUDA builds that also run on CPU, and
# TorchServe uses the GPUs the container runtime exposes (docker compose -f docker-compose.yml -f docker-compose.gpu.yml).
#   docker build -t localhost/cxr-serve:latest .   # or `make image` (podman or docker)
# BASE: any Debian bookworm image with python3 (3.11) and its venv module. `make image` builds one from Debian's
# packages with mmdebstrap where no registry can be reached; elsewhere the default is pulled.
ARG BASE=python:3.11-slim-bookworm
# Local package mirrors and a CA bundle, for machines that install through them (empty: PyPI, system CAs).
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CERT=

FROM ${BASE} AS build
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Build stage: everything `make archive` needs (requirements.lock: every package hash-pinned), to build the
# archives exactly as it does. The data set is not in
# the image, so the exports are checked on the example X-rays and int8 (which needs training images) is left out.
WORKDIR /build
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY cxr/ cxr/
COPY cxr_core/ cxr_core/
COPY handlers/ handlers/
COPY export/ export/
COPY models/ models/
COPY tests/fixtures/xrays/ tests/fixtures/xrays/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && mkdir -p /model-store \
    && for name in pneumonia cxr4; do \
         python -m export --checkpoint "models/$name/model.pt" --data /nonexistent --output-dir "/tmp/export-$name" \
             --formats ts onnx --repeats 1 \
         && python -m export.archive --export-dir "/tmp/export-$name" --model-store /model-store \
             --name "$name" --variants eager ts onnx --default onnx --version 1.0 || exit 1; \
       done

# Runtime stage: Java, TorchServe and the handler's imports only (requirements-runtime.lock), the archives from
# the build stage, a read-only root file system in compose and Kubernetes (writable: run/, logs/, /tmp).
FROM ${BASE}
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT

# Java 17 for TorchServe's frontend. Not pinned to a Debian revision: bookworm replaces it with each security
# update, and a pinned revision would stop building.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless passwd \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin model-server \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements-runtime.lock /tmp/requirements-runtime.lock
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements-runtime.lock \
    && rm /tmp/requirements-runtime.lock

WORKDIR /home/model-server
COPY cxr/ app/cxr/
COPY docker/config.properties config.properties
COPY log4j2.xml log4j2.xml
COPY --from=build /model-store model-store
RUN mkdir -p run logs && chown -R model-server:model-server run logs && chmod 700 run

# TorchServe writes its key file into its working folder (run/, 0700) and its logs to logs/ (log4j2.xml: INFO,
# rolled at 10 MB); nothing else is written outside /tmp.
ENV PYTHONPATH=/home/model-server/app PYTHONDONTWRITEBYTECODE=1 \
    LOG_LOCATION=/home/model-server/logs METRICS_LOCATION=/home/model-server/logs
USER 10001
WORKDIR /home/model-server/run
EXPOSE 8080 8081 8082 7070 7071

# /ping needs the inference key that TorchServe writes to key_file.json at start.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-m", "cxr.healthcheck", "--key-file", "/home/model-server/run/key_file.json"]

CMD ["torchserve", "--start", "--foreground", "--ts-config", "/home/model-server/config.properties", \
     "--log-config", "/home/model-server/log4j2.xml", \
     "--model-store", "/home/model-server/model-store", \
     "--models", "pneumonia=pneumonia.mar", "cxr4=cxr4.mar", "pneumonia_eager=pneumonia_eager.mar"]
