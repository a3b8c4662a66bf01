# Two entry points: `make repro` (the study) and `make test` (the suite); `make shell` opens a
# shell with the installed environment for commands outside make (dvc, python -m pipeline, wandb).
# The install runs in three steps, each redone only when its input changes: the venv (once), torch
# (when TORCH_SPEC changes) and the project with its dependencies (when pyproject.toml changes).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# No byte-compiling at install (torch alone installs 3x faster): Python compiles what a command
# imports on first use and keeps it in .venv. Make's commands may write that bytecode even where the
# environment sets PYTHONDONTWRITEBYTECODE; otherwise every process would compile torch, transformers
# and the rest again (~5 s a process here).
PIP := $(PY) -m pip install --quiet --no-compile
unexport PYTHONDONTWRITEBYTECODE
# The CPU wheel on these machines; a GPU user sets TORCH_SPEC to their CUDA build once, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# The venv remembers it ($(VENV)/.torch-spec): later make commands keep that torch, and only another
# TORCH_SPEC replaces it (`make install TORCH_SPEC=torch==2.13.0` goes back to the CPU wheel).
TORCH_SPEC_FILE := $(VENV)/.torch-spec
TORCH_SPEC ?= $(or $(strip $(file <$(TORCH_SPEC_FILE))),torch==2.13.0)
SHARED_DATA := $(abspath ../shared/data/cs224n)
export MINBERT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/SHA256SUMS),$(SHARED_DATA),)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= disabled

.PHONY: install shell repro test test-fast bench quality clean exp-show FORCE

install: $(VENV)/.installed

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	touch $@

# $(TORCH_SPEC_FILE) holds the spec torch was installed from; it is rewritten (and torch reinstalled)
# only when TORCH_SPEC differs from it, so `make -n install` shows exactly what would run.
ifneq ($(strip $(TORCH_SPEC)),$(strip $(file <$(TORCH_SPEC_FILE))))
$(TORCH_SPEC_FILE): FORCE
endif
$(TORCH_SPEC_FILE): | $(VENV)/.created
	printf '%s\n' '$(subst ','\'',$(strip $(TORCH_SPEC)))' > $@

# A new spec replaces the installed torch: without the uninstall pip would keep any installed torch
# that satisfies the spec (e.g. the CPU build for a bare `torch --index-url ...`).
$(VENV)/.torch-installed: $(TORCH_SPEC_FILE)
	if [ -e $@ ]; then $(PY) -m pip uninstall --quiet --yes torch; fi
	$(PIP) $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-installed
	$(PIP) -e ".[dev]"
	# W&B's sweep engine, for validating sweeps/*.yaml offline; its top-level package `sweeps`
	# would shadow ours, so it lives in its own folder (tests/test_wandb.py loads it from there).
	$(PIP) --no-deps --target $(VENV)/wandb-sweeps sweeps==0.2.0
	touch $@

# A bash subshell with the venv activated and the environment above (offline Hub, W&B disabled,
# MINBERT_DATA_DIR on ../shared/data/cs224n when present): `exit` leaves it.
shell: install
	@printf '%s\n' '[ -f ~/.bashrc ] && . ~/.bashrc' '. $(abspath $(VENV))/bin/activate' \
		'echo "venv $(VENV) active; MINBERT_DATA_DIR=$${MINBERT_DATA_DIR:-(unset: data.data_dir, else download)}; exit to leave"' \
		> $(VENV)/.shellrc
	@bash --rcfile $(VENV)/.shellrc -i

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
	$(PIP) -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Dev quality on the embedded default: a frozen-backbone probe beside the hand-picked recipe and the
# Optuna study's best, 3 seeds each -> reports/quality.json and .md, which gives the measured times
# (2 CPU cores: ~2.5 min for the probe, ~23 min a seed of the hand-picked recipe, ~1.2 min of the
# sweep's; ~75 min in all; a stopped check keeps the seeds it finished). QUALITY_ARGS passes
# options (`python -m benchmarks.quality --help`), e.g. QUALITY_ARGS="--only NAME" reruns one
# candidate (an unknown NAME lists them).
quality: install
	$(PY) -m benchmarks.quality $(QUALITY_ARGS)

# DVC experiments side by side without a pager: each study experiment's dev avg (reports/metrics.json)
# and the params people change. Plain `dvc exp show` opens the same columns first in its pager, then
# every param and code dependency (~270 columns: DVC has no setting for them), which `--no-pager`
# squeezes into a terminal until nothing is left.
EXP_COLUMNS ?= ^(Experiment|Created|State|profile|seeds|extra_seeds|avg\..*)$$
exp-show: install
	$(VENV)/bin/dvc exp show --no-pager --drop '.*' --keep '$(EXP_COLUMNS)' $(EXP_ARGS)

# Everything built or trained; git-tracked results (runs/study/*/metrics.json, history.json) stay.
clean:
	rm -rf $(VENV) data/prepared data/prefix data/quality models
	git clean -fdXq runs
