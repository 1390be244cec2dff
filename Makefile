# Self-documenting Makefile: `make help` lists the targets.
# Every target installs what it needs into a virtual environment (.venv) on first use.
# torch is installed first, on its own, so a CPU-only machine keeps its CPU build:
# override TORCH (e.g. `make test TORCH=torch`) to pick another build, or create the venv yourself.

VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-full lint bench clean

help:  ## Show this help
	@grep -E '^[.a-zA-Z_-]+:.*?## .*$$' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the package with its dev extras

demo: $(STAMP)  ## Run the whole pipeline (IRNet + CONTA) on the embedded synthetic set, CPU
	$(PY) -m src.run +baseline=irnet +conta=on

test: $(STAMP)  ## Run the test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## Run the tests without the end-to-end runs
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)  ## Lint with ruff
	$(PY) -m ruff check src tests experiments

bench: $(STAMP)  ## Run every stage benchmark on this machine (CPU or GPU)
	$(PY) -m experiments.bench.run_all

clean:  ## Remove caches and outputs (keeps .venv)
	rm -rf outputs multirun .cache .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
