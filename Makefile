# The two commands that do everything on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CXR_DATA ?= ../shared/data/pneumonia
export CXR_DATA

MODEL ?= models/pneumonia/model.pt
CXR4_MODEL := models/cxr4/model.pt
CXR4_DATA ?= ../shared/data/multiclass
VERSION ?= 1.0
DEFAULT_VARIANT ?= auto

.PHONY: setup java browser serve stop test lint train train-candidates evaluate compare ship export archive calibrate gate loadtest bench train-cxr4 ship-cxr4 source-bias clean

setup: $(STAMP) java

# Re-installs only when requirements.txt changes; otherwise a no-op.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m cxr.grpc_stubs
	touch $@

# TorchServe's frontend is Java: install Java 17 when no java is on the PATH.
java:
	@command -v java >/dev/null || { echo "installing Java 17"; apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null; }

# The demo page's browser test drives Debian's Chromium; without it (or without apt) that test skips.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { echo "installing chromium"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
		>/dev/null) || echo "could not install chromium: the browser test will skip"; }

# Starts TorchServe in the background on 127.0.0.1 (8080/8081/8082, gRPC 7070/7071), token auth on, and the
# demo page on http://127.0.0.1:8090/ (it talks to TorchServe server-side).
# The _eager archives answer the page's Grad-CAM requests (/explanations/<model>_eager).
serve: setup model_store/pneumonia.mar model_store/cxr4.mar
	$(PY) -m cxr.server start --workdir logs/serve --models pneumonia=pneumonia.mar cxr4=cxr4.mar \
		pneumonia_eager=pneumonia_eager.mar cxr4_eager=cxr4_eager.mar
	$(PY) -m cxr.demo start --workdir logs/serve --models pneumonia cxr4

stop:
	@test -x $(PY) && $(PY) -m cxr.demo stop --workdir logs/serve || true
	@test -x $(PY) && $(PY) -m cxr.server stop --workdir logs/serve || echo "nothing to stop"

# TorchScript / ONNX / int8 exports of $(MODEL), each checked against eager on the val images.
runs/export/model.onnx: $(MODEL) | $(STAMP)
	$(PY) -m export --checkpoint $(MODEL) --output-dir runs/export

export: setup
	$(PY) -m export --checkpoint $(MODEL) --output-dir runs/export --report docs/export.md

# pneumonia.mar (the default variant) and pneumonia_{eager,ts,onnx,int8}.mar in model_store/.
model_store/pneumonia.mar: runs/export/model.onnx models/gate/ood_gate.pt handlers/cxr_handler.py handlers/model-config.yaml \
		$(wildcard cxr/*.py)
	$(PY) -m export.archive --export-dir runs/export --model-store model_store --version $(VERSION) \
		--default $(DEFAULT_VARIANT)

# The same for the 4-class model: cxr4.mar and cxr4_{eager,ts,onnx,int8}.mar.
runs/export-cxr4/model.onnx: $(CXR4_MODEL) | $(STAMP)
	$(PY) -m export --checkpoint $(CXR4_MODEL) --data $(CXR4_DATA) --output-dir runs/export-cxr4

model_store/cxr4.mar: runs/export-cxr4/model.onnx models/gate/ood_gate.pt handlers/cxr_handler.py \
		handlers/model-config.yaml $(wildcard cxr/*.py)
	$(PY) -m export.archive --export-dir runs/export-cxr4 --model-store model_store --name cxr4 --version $(VERSION) \
		--default $(DEFAULT_VARIANT)

archive: setup model_store/pneumonia.mar model_store/cxr4.mar

lint: setup
	$(VENV)/bin/ruff check .

test: setup browser lint
	$(PY) -m pytest

# The shipped default model, exactly as it was trained (see README "Training").
train: setup
	$(PY) -m training.train --arch $(or $(ARCH),resnet18) --image-size 128 --epochs 12 --batch-size 32 \
		--lr 2e-3 --weight-decay 0.05 --channels-last --half-checkpoint --threads 2 --workers 1 --seed 0 \
		--output-dir runs/$(or $(ARCH),resnet18)

# Locust, headless, against the server of `make serve` (loopback only). Override DURATION, USERS, SPAWN,
# PROTOCOL (rest|grpc), NAME (model). Reports go to logs/loadtest/<run>/.
loadtest: setup
	$(PY) -m loadtest.run --duration $(or $(DURATION),60) --users $(or $(USERS),8) --spawn-rate $(or $(SPAWN),8) \
		--protocol $(or $(PROTOCOL),rest) --model $(or $(NAME),pneumonia)

# The benchmark matrix (model-only, TorchServe end to end, naive FastAPI baseline) -> docs/benchmarks.md.
bench: setup model_store/pneumonia.mar
	$(PY) -m loadtest.bench --export-dir runs/export --model-store model_store --output docs/benchmarks.md \
		$(BENCH_ARGS)

# The 4-class model (NORMAL / PNEUMONIA / TUBERCULOSIS / COVID19) exactly as shipped, then its reports.
train-cxr4: setup
	$(PY) -m training.train --data $(CXR4_DATA) --arch resnet18 --image-size 128 --epochs 14 --batch-size 32 \
		--lr 2e-3 --weight-decay 0.05 --channels-last --half-checkpoint --threads 2 --workers 1 --seed 0 \
		--output-dir runs/cxr4-resnet18

ship-cxr4:
	test -f runs/cxr4-resnet18/model.pt
	mkdir -p models/cxr4 docs/cxr4
	cp runs/cxr4-resnet18/model.pt runs/cxr4-resnet18/metrics.json runs/cxr4-resnet18/metrics.csv models/cxr4/
	cp runs/cxr4-resnet18/curves.png runs/cxr4-resnet18/reports/*.md runs/cxr4-resnet18/reports/*.png docs/cxr4/

# How much of the 4-class model's skill is the source (cross-source probe, statistics-only model).
source-bias: setup
	$(PY) -m training.source_bias --checkpoint $(CXR4_MODEL) --data $(CXR4_DATA) \
		--probe ../shared/data/pneumonia/test --output docs/cxr4/source_bias.md

# Reliability drills (soak, worker crash, overload, malformed storm) -> docs/reliability.md. About 15 min.
drills: setup model_store/pneumonia.mar
	$(PY) -m loadtest.drills --export-dir runs/export --output docs/reliability.md $(DRILL_ARGS)

# The architecture comparison: every candidate with the same budget, into runs/<arch>/.
train-candidates: setup
	PYTHON=$(PY) training/train_candidates.sh

# Temperature scaling on val + the threshold re-chosen on calibrated probabilities (training does this itself).
calibrate: setup
	$(PY) -m training.calibrate --checkpoint $(MODEL) --report-dir $(or $(OUT),docs/pneumonia)

# The out-of-distribution gate packed into every archive, fitted on the train X-rays of both datasets.
gate: setup
	$(PY) -m training.fit_gate --data ../shared/data/pneumonia --data ../shared/data/multiclass

evaluate: setup
	$(PY) -m training.evaluate --checkpoint $(or $(CHECKPOINT),models/pneumonia/model.pt) --split test \
		--output-dir $(or $(OUT),runs/evaluate)

compare: setup
	$(PY) -m training.compare $(wildcard runs/*/model.pt) --output docs/model_comparison.md

# Make runs/$(ARCH) the shipped default: its model.pt, and its curves and reports under docs/pneumonia/.
ship:
	test -n "$(ARCH)" && test -f runs/$(ARCH)/model.pt
	mkdir -p models/pneumonia docs/pneumonia
	cp runs/$(ARCH)/model.pt runs/$(ARCH)/metrics.json runs/$(ARCH)/metrics.csv models/pneumonia/
	cp runs/$(ARCH)/curves.png runs/$(ARCH)/reports/*.md runs/$(ARCH)/reports/*.png docs/pneumonia/

clean:
	rm -rf runs .pytest_cache .ruff_cache
