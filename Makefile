# The two commands a new user needs: `make run` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# The uv that installs the lock; pyproject.toml's [tool.uv] required-version is the one place it is set.
UV_VERSION := $(shell sed -n 's/^required-version = "==\(.*\)"/\1/p' pyproject.toml)
UV     := UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv
GET_UV := test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -qq uv==$(UV_VERSION); }
STAMP  := $(VENV)/.lock-stamp

# $(call debian,COMMAND,PACKAGE,WHY): install a Debian package when its command is missing
# (as root, with apt-get), or say what to install and stop.
debian = command -v $(1) >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	  else \
	    echo "$(3): sudo apt-get install $(2)"; exit 1; \
	  fi; }

.PHONY: setup run test lint openapi bench bench-setup lock clean

# .venv is built from scratch from uv.lock (runtime + dev groups) whenever the lock or
# pyproject.toml changes; --locked refuses a lock that no longer matches pyproject.toml.
# --compile-bytecode: every Ray worker imports Ray, Serve, FastAPI and SQLAlchemy; without
# .pyc files (uv writes none by default, and PYTHONDONTWRITEBYTECODE stops Python writing
# them) each process compiles them again: 9 s per replica instead of 3.5 here.
SYNC   := $(UV) sync --locked --inexact --quiet --compile-bytecode --group dev
$(STAMP): uv.lock pyproject.toml
	rm -rf $(VENV)
	$(GET_UV)
	$(SYNC)
	touch $(STAMP)

setup: $(STAMP)

# checkov (tests/unit/test_terraform.py lints k8s/terraform with it) gets a venv of its own: its
# exact pins (boto3, networkx, ...) would fight Ray's in .venv. Built once per CHECKOV_VERSION.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV    := .venv-checkov
CHECKOV_STAMP   := $(CHECKOV_VENV)/.stamp-$(CHECKOV_VERSION)
$(CHECKOV_STAMP):
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -qq checkov==$(CHECKOV_VERSION)
	touch $@

.PHONY: checkov-setup
checkov-setup: $(CHECKOV_STAMP)

## Start embedded PostgreSQL/Redis (unless DATABASE_URL/REDIS_URL are set), migrate, seed, serve on :8000.
## `make run SIMULATE=1` also runs demo traffic (partners, customers, staff) once it is up.
run: setup
	$(BIN)/vurksha run $(if $(SIMULATE),--simulate)

## The whole test suite against real PostgreSQL, Redis and a local Ray Serve (and headless
## Chromium for the dispatcher's map).
test: setup checkov-setup
	@$(call debian,chromium,chromium,the map test needs a headless browser)
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

## Regenerate the merged OpenAPI document (a test fails when it is stale).
openapi: setup
	$(BIN)/vurksha openapi

## Refresh uv.lock to the newest versions pyproject.toml allows (the next make rebuilds .venv).
lock:
	$(GET_UV)
	$(UV) lock --upgrade

# pyproject.toml's version names the image; k8s/ runs vurksha/backend:<it> (tests/unit/test_image.py).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE   := vurksha/backend:$(VERSION)

.PHONY: image
## Build the image the Ray pods in k8s/ run (Docker with BuildKit; push it to your registry).
image:
	docker build -f k8s/Dockerfile -t $(IMAGE) .

bench-setup: setup
	$(SYNC) --group bench
	@$(call debian,wrk,wrk,make bench needs wrk (a compiled HTTP load generator))

## Benchmarks (not tests): each starts the backend, prints its figures and a baseline ratio.
## Ray runs its workers at nice 15; every load generator and floor runs at nice 15 too.
bench: bench-setup
	$(BIN)/python -m tests.bench.hot_paths
	$(BIN)/python -m tests.bench.users_me
	$(BIN)/python -m tests.bench.carts
	$(BIN)/python -m tests.bench.search
	$(BIN)/python -m tests.bench.search_quality
	$(BIN)/python -m tests.bench.seed
	$(BIN)/python -m tests.bench.checkout
	$(BIN)/python -m tests.bench.tracking
	$(BIN)/python -m tests.bench.route_service
	$(BIN)/python -m tests.bench.routes --portfolio
	$(BIN)/python -m tests.bench.recommender --serve
	$(BIN)/python -m tests.bench.notifications

.PHONY: load
USERS    ?= 50
DURATION ?= 60s
## Load test (locust) of real journeys against a running backend (outside production):
## `make load USERS=50 DURATION=5m [HOST=http://127.0.0.1:8000]`. Prints p50/p95/p99 and
## failures per step and the verdict against k8s/slo.yaml; fails when an objective is missed.
# HOST only counts when it is a URL: zsh exports HOST as the machine's name.
load: setup
	$(BIN)/python -m tests.load.run --users $(USERS) --duration $(DURATION) $(if $(findstring ://,$(HOST)),--host $(HOST))

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .vurksha .pytest_cache .mypy_cache .ruff_cache .hypothesis
