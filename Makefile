# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the project into it. `make bench` runs the
# performance suite (a few minutes; writes benchmarks/results/perf.json and perf.md).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lightning_den.demo

test: $(STAMP)
	$(BIN)/python -m ruff check lightning_den tests examples benchmarks
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/perf.py

lint: $(STAMP)
	$(BIN)/python -m ruff check lightning_den tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache lightning_logs
