# Quick start: `make demo` and `make test`. Both bootstrap .venv idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines take the torch 2.13.0 wheel that lies on local disk; a GPU machine takes the
# default (CUDA) build. grpcio-health-checking is pinned or pip backtracks for minutes.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.6" || echo "torch==2.13.0")
PIP_PINS := "grpcio-health-checking==1.81.1"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(PIP_PINS) -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mlip_fed.cli.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check mlip_fed server client tests bench
	$(BIN)/ruff format --check mlip_fed server client tests bench

# Every benchmark at a size this 2-core machine fits in <= 20 min; regenerates docs/performance.md.
# BENCH_ARGS="--only mfu,hardware" runs a subset, "--list" shows the registry.
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache .ruff_cache
