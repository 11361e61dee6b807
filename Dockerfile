# cxr-serve: TorchServe with our archives, built at image build time from the committed models.
# One image for CPU and GPU hosts: the pinned torch wheels are CUDA builds that also run on CPU, and
# TorchServe uses the GPUs the container runtime exposes (docker compose -f docker-compose.yml -f docker-compose.gpu.yml).
#   docker build -t cxr-serve:latest .
FROM python:3.11-slim-bookworm

# Java 17 for TorchServe's frontend. Not pinned to a Debian revision: bookworm replaces it with each security
# update, and a pinned revision would stop building.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin model-server
WORKDIR /home/model-server/app

COPY requirements.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.txt

COPY cxr/ cxr/
COPY handlers/ handlers/
COPY export/ export/
COPY models/ models/
COPY tests/fixtures/xrays/ tests/fixtures/xrays/
COPY docker/config.properties /home/model-server/config.properties
COPY log4j2.xml /home/model-server/log4j2.xml
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && python -m cxr.grpc_stubs

# The archives, exactly as `make archive` builds them. The data set is not inside the image, so the exports are
# checked on the example X-rays and the int8 variant (which needs the training images to calibrate) is left out.
RUN mkdir -p /home/model-server/model-store \
    && for name in pneumonia cxr4; do \
         python -m export --checkpoint "models/$name/model.pt" --data /nonexistent --output-dir "/tmp/export-$name" \
             --formats ts onnx --repeats 1 \
         && python -m export.archive --export-dir "/tmp/export-$name" --model-store /home/model-server/model-store \
             --name "$name" --variants eager ts onnx --default onnx --version 1.0 || exit 1; \
       done \
    && rm -rf /tmp/export-* \
    && chown -R model-server:model-server /home/model-server

USER 10001
WORKDIR /home/model-server
EXPOSE 8080 8081 8082 7070 7071

# /ping needs the inference key that TorchServe writes to key_file.json at start.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-m", "cxr.healthcheck", "--key-file", "/home/model-server/key_file.json"]

CMD ["torchserve", "--start", "--foreground", "--ts-config", "/home/model-server/config.properties", \
     "--log-config", "/home/model-server/log4j2.xml", \
     "--model-store", "/home/model-server/model-store", \
     "--models", "pneumonia=pneumonia.mar", "cxr4=cxr4.mar", "pneumonia_eager=pneumonia_eager.mar"]
