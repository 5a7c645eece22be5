# edgebrain: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EB := $(VENV)/bin/edgebrain
DATA ?= $(abspath ../shared/data/brain-tumor-mri-224)
MODELS ?= artifacts/models
DEMO ?= artifacts/demo
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: help venv demo test test-fast test-all test-zoo fuzz lint bench models clean check-data

help:
	@echo "make demo    - train -> convert -> bench -> gate on the real data (creates $(VENV))"
	@echo "make test    - the test suite CI runs (creates $(VENV)); make test-fast: no training (minutes);"
	@echo "               make test-all: everything, with the zoo and the long training tests"
	@echo "make lint    - ruff"
	@echo "make bench   - benchmarks/ scripts -> BENCHMARKS.md"
	@echo "make models  - (re)build the documented trained models into $(MODELS) (cached)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	@# setuptools' generic "editable installation" notice is dropped; every other line is shown
	$(VENV)/bin/pip install -q -e ".[full,dev]" 2>&1 \
	  | sed -e '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d'; test $${PIPESTATUS[0]} -eq 0
	touch $@

venv: $(VENV)/.installed

check-data:
	@test -d "$(DATA)/Training" || { echo "error: dataset not found at $(DATA) (expected ../shared/data/brain-tumor-mri-224 beside the checkout; set DATA=...)"; exit 2; }

# Lanes (measured wall times in the README). Two xdist workers; a module's tests stay on one worker
# (--dist loadscope) so its fixtures are built once; trained fixtures are cached across workers and runs.
PYTEST := EDGEBRAIN_DATA="$(DATA)" $(VENV)/bin/pytest -q -ra -n 2 --dist loadscope

test: venv check-data
	$(PYTEST) -m "not long and not zoo"

test-fast: venv check-data
	EDGEBRAIN_LANE=fast $(PYTEST) -m "not train and not slow and not long and not zoo"

test-all: venv check-data
	$(PYTEST)

lint: venv
	$(VENV)/bin/ruff check .

# ---------------------------------------------------------------- trained models (cached)
# (a) lightweight variant on CPU, (b) full-depth ResNet50 at a reduced input size,
# (c) fine-tune Xception (full depth) at width 0.25 and a reduced input size.
LITE := $(MODELS)/resnet50-lite-128
FULL := $(MODELS)/resnet50-w05-96
XCEP := $(MODELS)/xception-ft-w025-96

$(LITE)/model.keras: | venv check-data
	$(EB) train resnet50-lite --data "$(DATA)" --out $(LITE) --size 128 --epochs 30 --batch-size 32 \
	  --lr 2e-3 --lr-schedule cosine --patience 30 --seed 42 --overwrite

$(FULL)/model.keras: | venv check-data
	$(EB) train resnet50 --data "$(DATA)" --out $(FULL) --size 96 --width 0.5 --epochs 16 --batch-size 32 \
	  --lr 2e-3 --lr-schedule cosine --patience 16 --flip --seed 42 --overwrite

$(XCEP)/model.keras: | venv check-data
	$(EB) train xception-ft --data "$(DATA)" --out $(XCEP) --size 96 --width 0.25 --epochs 12 --batch-size 32 \
	  --lr 2e-3 --lr-schedule cosine --patience 12 --flip --seed 42 --overwrite

# (d) the demo's model: (c) with a shorter schedule, so that `make demo` (install included) fits 15 minutes
# on 2 CPU cores; edge/demo.py trains exactly this (tests/edge/test_gate_demo.py checks they agree).
XDEMO := $(MODELS)/xception-ft-w025-96-e9

$(XDEMO)/model.keras: | venv check-data
	$(EB) train xception-ft --data "$(DATA)" --out $(XDEMO) --size 96 --width 0.25 --epochs 9 --batch-size 32 \
	  --lr 2e-3 --lr-schedule cosine --patience 9 --flip --seed 42 --overwrite

# (c) retrained for scans from other scanners: per-image percentile normalisation + intensity augmentation.
XCEPR := $(MODELS)/xception-ft-w025-96-robust

$(XCEPR)/model.keras: | venv check-data
	$(EB) train xception-ft --data "$(DATA)" --out $(XCEPR) --size 96 --width 0.25 --epochs 12 --batch-size 32 \
	  --lr 2e-3 --lr-schedule cosine --patience 12 --flip --seed 42 --overwrite --normalize percentile:1,99 \
	  --aug-gamma 0.6,1.6 --aug-contrast 0.6,1.4 --aug-noise 10 --aug-blur 1.5 --aug-jpeg 30,95 --aug-rescale 0.5 \
	  --aug-prob 0.3

models: $(LITE)/model.keras $(FULL)/model.keras $(XCEP)/model.keras $(XDEMO)/model.keras $(XCEPR)/model.keras

demo: venv check-data
	$(PY) -m edgebrain.demo --data "$(DATA)" --out $(DEMO)

bench: venv check-data
	$(MAKE) models
	$(PY) benchmarks/run_all.py --data "$(DATA)"

clean:
	rm -rf artifacts .pytest_cache .ruff_cache

# ---------------------------------------------------------------- more test lanes
test-zoo: venv check-data
	$(PYTEST) -m zoo tests

fuzz: venv
	EDGEBRAIN_FUZZ=long $(PYTEST) -m fuzz tests
