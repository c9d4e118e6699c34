# The two commands a new user needs: `make run` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint openapi bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Start embedded PostgreSQL/Redis (unless DATABASE_URL/REDIS_URL are set), migrate, seed, serve on :8000.
run: setup
	$(BIN)/vurksha run

## The whole test suite against real PostgreSQL, Redis and a local Ray Serve.
test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

## Regenerate the merged OpenAPI document (a test fails when it is stale).
openapi: setup
	$(BIN)/vurksha openapi

## Benchmarks (not tests): each starts the backend, prints its figures and a baseline ratio.
bench: setup
	$(BIN)/python -m tests.bench.users_me
	$(BIN)/python -m tests.bench.carts
	$(BIN)/python -m tests.bench.search
	$(BIN)/python -m tests.bench.seed
	$(BIN)/python -m tests.bench.checkout

clean:
	rm -rf $(VENV) .vurksha .pytest_cache .mypy_cache .ruff_cache .hypothesis
