# The two commands that do everything on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The data root: it holds pneumonia/, multiclass/ and samples/ (see README, Data). Without it everything still
# runs on the example X-rays committed in tests/fixtures/xrays/.
CXR_DATA ?= $(abspath ../shared/data)
export CXR_DATA

# Models `make serve` starts (each with its _eager archive for explanations): MODELS=pneumonia on a laptop.
MODELS ?= pneumonia cxr4 adult
# `make export` / `make archive` work on one model: NAME, its CHECKPOINT and EXPORT_DIR. VERSION 1.0 archives are
# model_store/<name>.mar and <name>_<variant>.mar; any other VERSION adds -<version> to each file name, so it
# never overwrites the running version and `cxr deploy <name>-<version>.mar` takes it as it is.
NAME ?= pneumonia
CHECKPOINT ?= models/$(NAME)/model.pt
EXPORT_DIR ?= runs/export-$(NAME)
VERSION ?= 1.0
DEFAULT_VARIANT ?= auto
THRESHOLD ?=
DATA_pneumonia := $(CXR_DATA)/pneumonia
DATA_cxr4 := $(CXR_DATA)/multiclass
DATA_adult := $(CXR_DATA)/rsna
GATE := models/gate/ood_gate.pt
ARCHIVE_INPUTS := $(GATE) handlers/cxr_handler.py handlers/model-config.yaml $(wildcard cxr_core/*.py)
# Reports of commands that measure go here; `REPORTS=docs` refreshes the committed ones on purpose.
REPORTS ?= runs/reports

.PHONY: setup python java compiler browser image image-up image-down compose-up compose-down test-image serve stop test test-fast lint train train-candidates evaluate compare ship \
	model export archive calibrate gate population narrow-cxr4 population-cost lock dicom-node dicom-drills pacs loadtest bench bench-matrix drills train-cxr4 ship-cxr4 train-adult ship-adult source-bias explain clean

setup: $(STAMP) java

python:
	@scripts/system-deps.sh python $(PYTHON)

# Re-installs only when the lock changes; otherwise a no-op. requirements.lock pins every package, transitive
# ones included, to the sha256 of its file (`make lock` regenerates it from requirements.txt, on purpose only);
# it holds CPython 3.11 wheels, so another Python installs requirements.txt without hashes, and says so.
# No pip cache: a one-time install would keep a second copy of every download (3.5 GB for the CUDA wheels).
$(STAMP): requirements.lock requirements.txt pyproject.toml
	@scripts/system-deps.sh python $(PYTHON)
	@scripts/system-deps.sh disk $(VENV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		$(VENV)/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --require-hashes -r requirements.lock; \
	else \
		echo "requirements.lock is for CPython 3.11: installing requirements.txt without hash checks"; \
		$(VENV)/bin/pip install --quiet --no-cache-dir --disable-pip-version-check -r requirements.txt; \
	fi
	$(VENV)/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m cxr.grpc_stubs
	touch $@

# Regenerate requirements.lock after changing requirements.txt (resolves with pip, hashes the files it picks).
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/lock_requirements.py
	$(PY) scripts/lock_requirements.py --requirements requirements-runtime.txt --output requirements-runtime.lock

# TorchServe's frontend is Java >= 17: installed with apt (sudo when not root) when missing or older.
java:
	@scripts/system-deps.sh java

# AOTInductor compiles exported models to C++: g++ at export time (installed with apt when missing).
compiler:
	@scripts/system-deps.sh compiler

# The container image (Dockerfile) built with podman or docker: `make image-up` serves it on 127.0.0.1:18080-18082
# beside `make serve`, read-only root, non-root, key file in logs/image/; `make test-image` checks it.
image:
	@scripts/system-deps.sh containers
	scripts/image.sh build

image-up: image
	scripts/image.sh up

image-down:
	@scripts/image.sh down

# The image with Prometheus scraping it (docker-compose.host.yml: host network, loopback only; 127.0.0.1:19090).
compose-up: image
	scripts/image.sh compose-up

compose-down:
	@scripts/image.sh compose-down

test-image: setup image
	$(PY) -m pytest -m image tests/test_image.py

# The demo page's browser test drives Debian's Chromium; without it (or without apt) that test skips.
browser:
	@scripts/system-deps.sh browser

# The DICOM node's end-to-end tests send studies through Debian's Orthanc (a real PACS; AGPL, never shipped).
pacs:
	@scripts/system-deps.sh pacs

# Starts TorchServe in the background on 127.0.0.1 (8080/8081/8082, gRPC 7070/7071), token auth on, serving
# $(MODELS) and their _eager archives (Grad-CAM), and the demo page on http://127.0.0.1:8090/.
serve: setup $(foreach m,$(MODELS),model_store/$(m).mar)
	$(PY) -m cxr.server start --workdir logs/serve --models $(foreach m,$(MODELS),$(m)=$(m).mar $(m)_eager=$(m)_eager.mar)
	$(PY) -m cxr.demo start --workdir logs/serve --models $(MODELS)

# The DICOM node (README, "DICOM"): C-STORE SCP on 127.0.0.1:11112, AE title CXR, beside `make serve`; films from
# the AE titles in DICOM_ALLOW are answered by DICOM_MODELS with an SR sent to DICOM_SEND_TO (AET@HOST:PORT) or kept
# in logs/dicom/reports; `cxr audit` lists what it did.
DICOM_ALLOW ?= ORTHANC
DICOM_MODELS ?= pneumonia
DICOM_SEND_TO ?=
dicom-node: setup
	$(PY) -m cxr.dicom.node start --workdir logs/serve --allow $(DICOM_ALLOW) --models $(DICOM_MODELS) \
		$(if $(DICOM_SEND_TO),--send-to $(DICOM_SEND_TO)) $(if $(DICOM_CONFIG),--config $(DICOM_CONFIG))

stop:
	@test -x $(PY) && $(PY) -m cxr.dicom.node stop --workdir logs/serve || true
	@test -x $(PY) && $(PY) -m cxr.demo stop --workdir logs/serve || true
	@test -x $(PY) && $(PY) -m cxr.server stop --workdir logs/serve || echo "nothing to stop"

# The shipped models' exports and version-1.0 archives, built once (make serve depends on them).
# PRECIOUS: make would otherwise delete the exports as intermediate files; `make archive` and `make bench` read them.
.PRECIOUS: runs/export-%/model.onnx
runs/export-%/model.onnx: models/%/model.pt | $(STAMP)
	@scripts/system-deps.sh compiler
	$(PY) -m export --checkpoint $< --data $(DATA_$*) --output-dir runs/export-$*

model_store/%.mar: runs/export-%/model.onnx $(ARCHIVE_INPUTS)
	$(PY) -m export.archive --export-dir runs/export-$* --model-store model_store --name $* --version 1.0

# A model of your own films, from a labelled folder to archives in model_store/ (README, "Your own model"):
# make model NAME=<name> DATA=<folder> [POSITIVE=<class>] [VERSION=1.0] [OTHER="<folder> ..."] [RULE=recall|youden]
# [EXTRA="<CLASS>=<folder> ..."] [EPOCHS=10] [SIZE=<input pixels>] [DETAIL=<pixels>] [INTENDED="<whom the model is for>"]. Resumes where it stopped (runs/models/<name>/).
model: setup
	@test "$(origin NAME)" != file -a -n "$(DATA)" || \
		{ echo "usage: make model NAME=<name> DATA=<folder> [POSITIVE=<class>] (see README, Your own model)"; exit 2; }
	@scripts/system-deps.sh compiler
	$(PY) -m training.make_model --name $(NAME) --data $(DATA) --version $(VERSION) \
		$(if $(POSITIVE),--positive $(POSITIVE)) $(if $(RULE),--rule $(RULE)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
		$(if $(SIZE),--image-size $(SIZE)) $(if $(DETAIL),--detail $(DETAIL)) $(foreach o,$(OTHER),--other $(o)) $(foreach e,$(EXTRA),--extra $(e)) \
		$(if $(INTENDED),--intended-population "$(INTENDED)")

# The population check (docs/trust.md): fitted on the frozen model's feature statistics against the other
# sources' training films, written into runs/population-$(NAME)/model.pt (copy it over $(CHECKPOINT) to ship it).
population: setup
	$(PY) -m training.fit_population --checkpoint $(CHECKPOINT) --name $(NAME) \
		--output runs/population-$(NAME)/model.pt --report-dir $(REPORTS)/population

# cxr4's NORMAL answered for children only (training/narrow_class.py, docs/trust.md), after `make population
# NAME=cxr4`: runs/narrow-cxr4/model.pt (copy it over models/cxr4/model.pt to ship it).
narrow-cxr4: setup
	$(PY) -m training.narrow_class --checkpoint models/cxr4/model.pt --output runs/narrow-cxr4/model.pt \
		--report $(REPORTS)/population/cxr4_normal_children.md

# What the population check costs (docs/trust.md): the checkpoint exported with and without it, timed side by side,
# the model alone and through TorchServe -> $(REPORTS)/population/cost.json.
population-cost: setup
	$(PY) -m loadtest.check_cost --checkpoint $(CHECKPOINT) --end-to-end --rounds 7 --seconds 8 \
		--output $(REPORTS)/population/cost.json

# Export any checkpoint (TorchScript / ONNX / int8 / AOTInductor, each checked against eager); THRESHOLD=0.5
# embeds another operating point in every exported file without touching the checkpoint.
export: setup
	@scripts/system-deps.sh compiler
	$(PY) -m export --checkpoint $(CHECKPOINT) --data $(or $(DATA),$(DATA_$(NAME)),$(DATA_pneumonia)) \
		--output-dir $(EXPORT_DIR) --report $(REPORTS)/export.md $(if $(THRESHOLD),--threshold $(THRESHOLD))

# Archives of $(EXPORT_DIR) for $(NAME) at $(VERSION); always rebuilt.
archive: setup
	$(PY) -m export.archive --export-dir $(EXPORT_DIR) --model-store model_store --name $(NAME) \
		--version $(VERSION) --default $(DEFAULT_VARIANT)

lint: setup
	$(VENV)/bin/ruff check .

test: setup compiler browser pacs lint
	$(PY) -m pytest

# Unit and handler tests only: no TorchServe, no browser, no real-data evaluations (about a minute).
test-fast: setup
	$(PY) -m pytest -m "not slow and not integration"

# The shipped default model, exactly as it was trained (see docs/pneumonia/README.md).
train: setup
	$(PY) -m training.train --data $(DATA_pneumonia) --arch $(or $(ARCH),resnet18) --image-size 128 --epochs 12 \
		--batch-size 32 --lr 2e-3 --weight-decay 0.05 --channels-last --half-checkpoint --threads 2 --workers 1 \
		--seed 0 --output-dir runs/$(or $(ARCH),resnet18)

# Locust, headless, against the server of `make serve` (loopback only). Override DURATION, USERS, SPAWN,
# PROTOCOL (rest|grpc), NAME (model). Reports go to logs/loadtest/<run>/.
loadtest: setup
	$(PY) -m loadtest.run --duration $(or $(DURATION),60) --users $(or $(USERS),8) --spawn-rate $(or $(SPAWN),8) \
		--protocol $(or $(PROTOCOL),rest) --model $(NAME)

# The shipped configuration measured against the model-only limit and the naive FastAPI and LitServe baselines
# -> $(REPORTS)/benchmarks.md (+ .json, plots); on a CUDA host also the GPU model-only rows -> $(REPORTS)/gpu_bench.md.
bench: setup model_store/pneumonia.mar
	$(PY) -m loadtest.bench --export-dir runs/export-pneumonia --output $(REPORTS)/benchmarks.md $(BENCH_ARGS)
	@if $(PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		$(PY) -m loadtest.gpu_bench --output $(REPORTS)/gpu_bench.md; \
	else echo "no CUDA GPU: the GPU rows (loadtest.gpu_bench) are left out"; fi

# The whole matrix: every variant, batch size, delay and worker split beside the shipped one -> $(REPORTS)/
# benchmarks_matrix.md (+ .json).
bench-matrix: setup model_store/pneumonia.mar
	$(PY) -m loadtest.bench --matrix --export-dir runs/export-pneumonia --output $(REPORTS)/benchmarks_matrix.md \
		$(BENCH_ARGS)

# Reliability drills (soak, worker crash, overload, malformed storm) -> $(REPORTS)/reliability.md. About 15 min.
drills: setup model_store/pneumonia.mar
	$(PY) -m loadtest.drills --export-dir runs/export-pneumonia --output $(REPORTS)/reliability.md $(DRILL_ARGS)

# The DICOM node's drills (docs/dicom_drills.md): TorchServe stopped mid-stream, the node killed, its throughput,
# with Orthanc and TorchServe on free loopback ports.
dicom-drills: setup pacs model_store/pneumonia.mar
	$(PY) -m loadtest.dicom_drill --output $(REPORTS)/dicom_drills.md $(DICOM_DRILL_ARGS)

# The 4-class model (NORMAL / PNEUMONIA / TUBERCULOSIS / COVID19) exactly as shipped, then its reports.
train-cxr4: setup
	$(PY) -m training.train --data $(DATA_cxr4) --arch resnet18 --image-size 128 --epochs 14 --batch-size 32 \
		--lr 2e-3 --weight-decay 0.05 --channels-last --half-checkpoint --threads 2 --workers 1 --seed 0 \
		--output-dir runs/cxr4-resnet18

ship-cxr4:
	test -f runs/cxr4-resnet18/model.pt
	mkdir -p models/cxr4 docs/cxr4
	cp runs/cxr4-resnet18/model.pt runs/cxr4-resnet18/metrics.json runs/cxr4-resnet18/metrics.csv models/cxr4/
	cp runs/cxr4-resnet18/curves.png runs/cxr4-resnet18/reports/*.md runs/cxr4-resnet18/reports/*.png docs/cxr4/

# The adult model exactly as shipped (docs/model_cards/adult.md): made by `make model` on rsna/, then shipped.
ADULT_INTENDED := Adult frontal chest X-rays (PA and AP, aged 18-92) like the NIH ChestX-ray8 films of the RSNA \
	Pneumonia Detection Challenge; not children
train-adult: setup
	@scripts/system-deps.sh compiler
	$(PY) -m training.adult_normals --multiclass $(CXR_DATA)/multiclass --out runs/extra_adult_normals
	$(PY) -m training.make_model --shipped --name adult --data $(DATA_adult) --positive OPACITY --epochs 6 \
		--image-size 224 --extra NO_OPACITY=runs/extra_adult_normals \
		--intended-population "$(ADULT_INTENDED)" --model-card docs/model_cards/adult.md

ship-adult:
	test -f runs/models/adult/population/model.pt
	mkdir -p models/adult docs/adult
	cp runs/models/adult/population/model.pt models/adult/model.pt
	cp runs/models/adult/model_card.md docs/model_cards/adult.md
	cp runs/models/adult/report/*.md runs/models/adult/report/*.png runs/models/adult/report/*.json \
		runs/models/adult/population/*.md runs/models/adult/population/*.png runs/models/adult/calibrate/*.md \
		runs/models/adult/calibrate/*.png docs/adult/

# How much of the 4-class model's skill is the source (cross-source probe, statistics-only model).
source-bias: setup
	$(PY) -m training.source_bias --checkpoint models/cxr4/model.pt --data $(DATA_cxr4) \
		--probe $(DATA_pneumonia)/test --output $(REPORTS)/cxr4/source_bias.md

# The architecture comparison: every candidate with the same budget, into runs/<arch>/.
train-candidates: setup
	PYTHON=$(PY) training/train_candidates.sh

# Temperature scaling on val + the threshold re-chosen on calibrated probabilities, into a new checkpoint
# runs/calibrate/model.pt (training does this itself; `make ship` would make it the default).
calibrate: setup
	$(PY) -m training.calibrate --checkpoint $(CHECKPOINT) --data $(DATA_pneumonia) \
		--output runs/calibrate/model.pt --report-dir runs/calibrate

# The out-of-distribution gate, fitted on the train X-rays of both datasets, into runs/gate/ood_gate.pt (copy it
# to models/gate/ to ship it); its report -> $(REPORTS)/gate.md.
gate: setup
	$(PY) -m training.fit_gate --data $(DATA_pneumonia) --data $(DATA_cxr4) --output runs/gate/ood_gate.pt \
		--report $(REPORTS)/gate.md

# Grad-CAM overlays of the sample X-rays -> $(REPORTS)/explanations/.
explain: setup
	$(PY) -m cxr.explain $(wildcard $(CXR_DATA)/samples/*/*.jpeg) --out-dir $(REPORTS)/explanations

evaluate: setup
	$(PY) -m training.evaluate --checkpoint $(CHECKPOINT) --data $(DATA_pneumonia) --split test \
		--output-dir $(or $(OUT),runs/evaluate)

compare: setup
	$(PY) -m training.compare $(wildcard runs/*/model.pt) --output $(REPORTS)/model_comparison.md

# Make runs/$(ARCH) the shipped default: its model.pt, and its curves and reports under docs/pneumonia/.
ship:
	test -n "$(ARCH)" && test -f runs/$(ARCH)/model.pt
	mkdir -p models/pneumonia docs/pneumonia
	cp runs/$(ARCH)/model.pt runs/$(ARCH)/metrics.json runs/$(ARCH)/metrics.csv models/pneumonia/
	cp runs/$(ARCH)/curves.png runs/$(ARCH)/reports/*.md runs/$(ARCH)/reports/*.png docs/pneumonia/

clean:
	rm -rf runs .pytest_cache .ruff_cache
