# FedDyMem — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATASET ?= elpv
ARGS   ?=
# The environment the suite last passed with, used as pip constraints (`make lock` refreshes it;
# `make install LOCK=` installs the newest releases the package's ranges allow).
LOCK   ?= requirements.lock
PIP    := $(BIN)/python -m pip install --quiet $(if $(LOCK),-c $(LOCK))
# faiss-gpu where an NVIDIA GPU answers, faiss-cpu otherwise: never both (they ship the same module).
FAISS_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
FAISS_OTHER := $(if $(filter gpu,$(FAISS_EXTRA)),faiss-cpu,faiss-gpu)

.DEFAULT_GOAL := help
.PHONY: help install lock anomalib-env train test test-fast bench lint format clean flower-demo

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: DATASET=elpv|<name>|path/to.yaml  ARGS='key=value ...'"

$(VENV)/.installed-$(FAISS_EXTRA): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip uninstall --quiet --yes $(FAISS_OTHER) 2>/dev/null || true
	$(PIP) -e ".[$(FAISS_EXTRA),dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(VENV)/.installed-$(FAISS_EXTRA)  ## create .venv and install feddymem (faiss-$(FAISS_EXTRA)), pinned by $(LOCK)

# anomalib's PatchCore, the reference row of make bench: its own environment, never the main install.
# It is layered on .venv (a .pth file adds .venv's site-packages after its own), so torch, timm and
# feddymem are not installed twice (a CUDA build of torch is 5.5 GB): only anomalib and what it needs
# beyond .venv land in .venv-anomalib, and they come first on its path. pip never touches .venv from
# there (it refuses to uninstall outside its environment).
ANOMALIB_VENV := .venv-anomalib
ANOMALIB      := anomalib==2.7.0
$(ANOMALIB_VENV)/.installed: $(VENV)/.installed-$(FAISS_EXTRA)
	rm -rf $(ANOMALIB_VENV)
	$(PYTHON) -m venv --without-pip $(ANOMALIB_VENV)
	$(BIN)/python scripts/layer_venv.py $(ANOMALIB_VENV) $(VENV)
	$(ANOMALIB_VENV)/bin/python -m pip install --quiet $(if $(LOCK),-c $(LOCK)) "$(ANOMALIB)"
	touch $@

anomalib-env: $(ANOMALIB_VENV)/.installed  ## .venv-anomalib: $(ANOMALIB) beside feddymem, for make bench's reference row

lock:  ## rebuild .venv from the newest allowed releases and write requirements.lock from it (then: make test)
	rm -rf $(VENV)
	$(MAKE) install LOCK= FAISS_EXTRA=cpu FAISS_OTHER=faiss-gpu
	$(BIN)/python scripts/write_lock.py $(BIN)/python requirements.lock
	touch $(VENV)/.installed-cpu

train: install  ## run a federated experiment: make train DATASET=elpv ARGS='federation.rounds=3'
	$(BIN)/feddymem train dataset=$(DATASET) $(ARGS)

flower-demo: install  ## the experiment over Flower on loopback: SuperLink + a SuperNode per client, TLS, node auth
	$(BIN)/feddymem train dataset=$(DATASET) federation.engine=flower $(ARGS)

test: install anomalib-env  ## run the test suite
	$(BIN)/python -m pytest -q

test-fast: install  ## the edit loop: the unit tests, without the e2e and slow ones (about a minute on 2 cores)
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

bench: install anomalib-env  ## every method on ELPV + shared mixtures (about 2 h on 2 idle cores; ARGS=--resume goes on): benchmarks/results.md
	$(BIN)/feddymem bench suite --out benchmarks $(ARGS)

lint: install  ## ruff (style, docstrings of public API), format check, mypy on src/
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/mypy

format: install  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

clean:  ## remove caches (keeps .venv and runs/)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
