# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the project into it with the exact versions of
# constraints.txt (pyproject.toml holds the package's own, wider ranges). `make test` is the fast lane
# (lint and every test not marked `slow`); `make test-slow` runs the end-to-end runs marked `slow` (DDP,
# CLI, examples in subprocesses); CI runs both. `make bench` runs the performance suite (a few minutes;
# writes benchmarks/results/perf.json and perf.md). `make bench-gpu` runs the CUDA tests and the suite on a
# GPU, three rounds, no scaling or alternatives rows, to fit a short GPU lease (writes
# $(GPU_RESULTS)/perf_cuda*.{json,md}); where a python already holds CUDA torch and the dependencies, skip the
# venv: `make bench-gpu BIN=/its/bin STAMP=`.
#
# .venv is made by $(PYTHON) if given (`make PYTHON=/path/to/python3.12 test`), otherwise by the first of
# $(PYTHON_CANDIDATES) that runs and is Python >= 3.11 with the venv module.
PYTHON ?=
PYTHON_CANDIDATES := python3.13 python3.12 python3.11 python3
# Exit status 0 only for a Python >= 3.11 that can create a virtual environment (venv and ensurepip).
PYTHON_OK := 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))'
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
LINT_PATHS := lightning_den tests examples benchmarks
PYTEST_ARGS ?=
GPU_RESULTS ?= benchmarks/results

.PHONY: demo test test-slow bench bench-gpu lint clean

$(BIN)/python:
	@py="$(PYTHON)"; \
	if [ -n "$$py" ]; then \
	  "$$py" -c $(PYTHON_OK) >/dev/null 2>&1 || { \
	    echo "error: PYTHON=$$py is not a runnable Python >= 3.11 with the venv module." >&2; exit 1; }; \
	else \
	  for candidate in $(PYTHON_CANDIDATES); do \
	    if "$$candidate" -c $(PYTHON_OK) >/dev/null 2>&1; then py=$$candidate; break; fi; \
	  done; \
	  if [ -z "$$py" ]; then \
	    echo "error: this project needs Python >= 3.11 (with its venv module) to create $(VENV)," >&2; \
	    echo "       but none of $(PYTHON_CANDIDATES) on PATH is one." >&2; \
	    echo "       Install Python 3.11 or newer (on Debian/Ubuntu also python3.X-venv), or name one:" >&2; \
	    echo "       make PYTHON=/path/to/python3.11 $(or $(MAKECMDGOALS),demo)" >&2; \
	    exit 1; \
	  fi; \
	fi; \
	echo "creating $(VENV) with $$py ($$("$$py" -c 'import sys; print(sys.version.split()[0])'))"; \
	"$$py" -m venv $(VENV)

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lightning_den.demo

test: $(STAMP)
	$(BIN)/python -m ruff check $(LINT_PATHS)
	$(BIN)/python -m ruff format --check $(LINT_PATHS)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/perf.py

bench-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)
	$(BIN)/python benchmarks/perf.py --accelerator cuda --rounds 3 --skip-scaling --skip-alternatives \
	  --out $(GPU_RESULTS)/perf_cuda
	$(BIN)/python benchmarks/perf.py --accelerator cuda --width-in 4096 --hidden 4096 4096 --batch 1024 \
	  --examples 16384 --rounds 3 --skip-scaling --skip-alternatives --out $(GPU_RESULTS)/perf_cuda_wide

lint: $(STAMP)
	$(BIN)/python -m ruff check $(LINT_PATHS)
	$(BIN)/python -m ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache lightning_logs
