# Two entry points: `make repro` (the study) and `make test` (the suite).
# The venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on these machines; a GPU user sets TORCH_SPEC to their CUDA build, e.g.
#   make repro TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/data/cs224n)
export MINBERT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/SHA256SUMS),$(SHARED_DATA),)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= disabled

.PHONY: install repro test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

repro: install
	@test -d .dvc || (test -d .git || git init -q) && $(VENV)/bin/dvc init -q 2>/dev/null || true
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/dvc repro
	$(PY) -m pipeline summary

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) data/prepared runs models
