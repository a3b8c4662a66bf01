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

.PHONY: install repro test test-fast bench quality clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	# W&B's sweep engine, for validating sweeps/*.yaml offline; its top-level package `sweeps`
	# would shadow ours, so it lives in its own folder (tests/test_wandb.py loads it from there).
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/wandb-sweeps sweeps==0.2.0
	touch $@

# The profile comes from params.yaml (`profile:`), which DVC tracks; an exported MINBERT_PROFILE
# would make the stages run another profile than the one DVC records, so it is cleared here.
# `make repro` times itself into reports/repro_timing.json and .md (wall time by install, prepare,
# cache, MLM, training, evaluation and report): the start is stamped when make reads this file
# (only when `repro` is a goal), the install end when the recipe starts, and
# benchmarks/repro_timing.py runs `dvc repro`, relays its output live, times its stages and passes
# its exit status through. (No $(MAKE) in the recipe: `make -n repro` must not run anything.)
NOW = $(PYTHON) -c 'import time; print(repr(time.time()))'
ifneq ($(filter repro,$(MAKECMDGOALS)),)
REPRO_STARTED := $(shell $(NOW))
endif
repro: install
	@installed=$$($(NOW)) && \
	{ test -d .git || git init -q; } && \
	{ test -d .dvc || $(VENV)/bin/dvc init -q; } && \
	MINBERT_PROFILE= PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m benchmarks.repro_timing \
		$(if $(REPRO_STARTED),--started $(REPRO_STARTED)) --installed $$installed \
		--install-marker $(VENV)/.installed --then "$(PY) -m pipeline summary" -- $(VENV)/bin/dvc repro
	@echo "Report: reports/REPORT.md (tables in reports/tables, figures in reports/figures)"

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Throughput and overhead benchmarks -> reports/benchmarks.json and .md (under 10 min on 2 CPU cores).
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--threads 0" (torch's default threads on an idle machine).
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Dev quality on the embedded default: a frozen-backbone probe beside the fine-tuned candidates of
# benchmarks/quality.yaml -> reports/quality.json and .md (~35 min on 2 CPU cores, prepare included).
# QUALITY_ARGS passes options, e.g. QUALITY_ARGS="--only best".
quality: install
	$(PY) -m benchmarks.quality $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) data/prepared data/prefix runs models
