# servegrid — the two commands are `make up` and `make test`; everything else is a building block.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# `make test` runs the suite in this many pytest-xdist workers, a module per worker at a time (--dist
# loadscope keeps each module's stack in one process); 1 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: help venv up down status test unit gen check-gen lint fmt models bench smoke sdk docs clean prometheus-tools

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[stack,dev]'
	@# xds-protos ships an older copy of opentelemetry-proto's modules over the same paths; put the real
	@# package's files back (Envoy's protos that import them work with the newer ones).
	$(PY) -m pip install --quiet --force-reinstall --no-deps "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	$(PY) -m pip check
	@touch $@

venv: $(STAMP) ## create the virtualenv and install everything (first use only)

# The TypeScript SDK's npm dependencies (ts-proto generates its sources). Skipped, with a note, where
# Node.js/npm are missing: then gen/check-gen leave the TypeScript sources alone.
TS_STAMP := sdk/typescript/node_modules/.installed
$(TS_STAMP): sdk/typescript/package-lock.json
	@if command -v npm >/dev/null; then \
		cd sdk/typescript && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "note: npm not found; the TypeScript SDK is skipped"; fi

# promtool and the Prometheus server, for the alert-rule tests and the Prometheus integration test: Debian's
# `prometheus` package, installed where promtool is missing (a fresh CI machine).
PROMETHEUS_STAMP := .build/prometheus.installed
$(PROMETHEUS_STAMP):
	@command -v promtool >/dev/null || { SUDO=$$(command -v sudo || true); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }
	@mkdir -p $(@D) && touch $@

prometheus-tools: $(PROMETHEUS_STAMP) ## install promtool and Prometheus (Debian package) when missing

up: $(STAMP) models ## start the local mesh and return when it is healthy
	$(PY) -m services.stack up

down: $(STAMP) ## stop everything `make up` started
	$(PY) -m services.stack down

status: $(STAMP) ## show each part's health, pid, port and log file
	$(PY) -m services.stack status

models: $(STAMP) ## build the model artifacts (skipped when already built)
	$(PY) -m models.build

gen: $(STAMP) $(TS_STAMP) ## regenerate gen/ from proto/ and the rendered Envoy configs
	$(PY) scripts/gen_protos.py
	$(PY) -m services.mesh.bootstrap --write-defaults
	$(PY) scripts/gen_observability.py

check-gen: $(STAMP) $(TS_STAMP) ## fail when gen/ (or anything else generated) differs from its source
	$(PY) scripts/gen_protos.py --check
	$(PY) -m services.mesh.bootstrap --write-defaults --check
	$(PY) scripts/gen_chart_readme.py --check
	$(PY) scripts/gen_observability.py --check

lint: $(STAMP) check-gen ## buf lint, ruff, mypy and bandit on hand-written code; generated code and docs are fresh
	$(PY) scripts/gen_docs.py --check
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf breaking proto --against buf.baseline.binpb
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/bandit -q -c pyproject.toml -r services sdk/python scripts bench models

baseline: $(STAMP) ## record today's contracts as the release that `buf breaking` compares against (at a release)
	$(VENV)/bin/buf build proto --exclude-source-info -o buf.baseline.binpb

fmt: $(STAMP) ## format hand-written code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

unit: $(STAMP) ## unit tests only (seconds)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test: $(STAMP) $(TS_STAMP) prometheus-tools lint models ## install what is needed, then run every check and test (with line coverage)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --durations=20 --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

BENCH ?=
smoke: $(STAMP) models ## on the default ports: make up, the README's examples as written, status, make down
	$(PY) -m services.stack up
	$(PY) scripts/smoke.py; rc=$$?; $(PY) -m services.stack status; $(PY) -m services.stack down; exit $$rc

bench: $(STAMP) models ## benchmarks against direct Triton in the same run (BENCH="mesh batch" for some)
	$(PY) -m bench $(BENCH)

docs: $(STAMP) ## regenerate docs/api.md (proto comments) and docs/configuration.md (settings classes)
	$(PY) scripts/gen_docs.py

sdk: $(STAMP) $(TS_STAMP) ## build the SDKs: Python wheels into dist/, the TypeScript package into sdk/typescript/dist
	$(PY) scripts/build_sdk.py --out dist
	cd sdk/typescript && npm run --silent build

clean: ## remove build outputs (not the virtualenv)
	rm -rf .build dist .pytest_cache .mypy_cache .ruff_cache
