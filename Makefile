# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# Install the torch build for your hardware first; on CPU-only machines the local CPU wheel is used.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lamm-ds-installed

.PHONY: setup demo test experiment lamm-mini corpus-deps clean-demo ssh-test-tools

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The corpus extra (RDKit, tblite) and molsets' SMILES file, for lamm-ds make-corpus and its tests;
# the hdf5 / sdf / aselmdb extras for the dataset-format readers of lamm-ds ingest and theirs.
CORPUS_STAMP := $(VENV)/.lamm-ds-corpus-installed
corpus-deps: $(CORPUS_STAMP)

$(CORPUS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev,corpus,hdf5,sdf,aselmdb]"
	$(BIN)/pip install --quiet --no-deps molsets
	touch $(CORPUS_STAMP)

# Ranks for the demo (CPU processes here; GPUs on a GPU machine). One OpenMP thread per rank by default.
NPROC ?= 2
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

# The demo run starts afresh in runs/demo each time (the demo data in data/demo is made once).
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/pretrain.py --run-dir runs/demo

# The end-to-end pre-train -> fine-tune experiment (issue 7; docs/results.md): ~45-60 min on 2 CPU cores.
experiment: $(STAMP)
	$(BIN)/python bench/pretrain_finetune.py

# LaMM-mini (issue 13; docs/results.md): the corpus at scale small, then the seeded ablation.
lamm-mini: $(CORPUS_STAMP)
	$(BIN)/python bench/pretrain_finetune.py --config configs/experiments/lamm_mini.yaml

# The multi-node tests start sshd "hosts" on loopback addresses and launch over pdsh (Debian's
# openssh-server, pdsh). Installed when possible (root with apt-get); otherwise they skip, saying why.
SSH_TEST_TOOLS := /usr/sbin/sshd /usr/bin/pdsh
ssh-test-tools:
	@for t in $(SSH_TEST_TOOLS); do test -x $$t || missing=1; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server pdsh >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server pdsh >/dev/null 2>&1; } || \
	  echo "ssh-test-tools: could not install openssh-server/pdsh; the multi-node ssh tests will skip"; \
	fi

test: $(STAMP) $(CORPUS_STAMP) ssh-test-tools
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf data/demo runs/demo
