# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# Install the torch build for your hardware first; on CPU-only machines the local CPU wheel is used.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lamm-ds-installed

.PHONY: setup demo test clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lamm-ds demo --data data/demo --run-dir runs/demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf data/demo runs/demo
