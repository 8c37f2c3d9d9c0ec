# servegrid — the two commands are `make up` and `make test`; everything else is a building block.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv up down status test unit gen check-gen lint fmt models bench smoke sdk docs clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[stack,dev]'
	$(PY) -m pip check
	@touch $@

venv: $(STAMP) ## create the virtualenv and install everything (first use only)

up: $(STAMP) models ## start the local mesh and return when it is healthy
	$(PY) -m services.stack up

down: $(STAMP) ## stop everything `make up` started
	$(PY) -m services.stack down

status: $(STAMP) ## show each part's health, pid, port and log file
	$(PY) -m services.stack status

models: $(STAMP) ## build the model artifacts (skipped when already built)
	$(PY) -m models.build

gen: $(STAMP) ## regenerate gen/ from proto/, the Envoy API stubs and the rendered Envoy configs
	$(PY) scripts/gen_protos.py
	$(PY) -m services.edge.envoy_api.generate
	$(PY) -m services.edge.envoy_config --write-defaults

check-gen: $(STAMP) ## fail when gen/ (or anything else generated) differs from its source
	$(PY) scripts/gen_protos.py --check
	$(PY) -m services.edge.envoy_api.generate --check
	$(PY) -m services.edge.envoy_config --write-defaults --check

lint: $(STAMP) check-gen ## buf lint, ruff and mypy on hand-written code; generated code and docs are fresh
	$(PY) scripts/gen_docs.py --check
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP) ## format hand-written code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

unit: $(STAMP) ## unit tests only (seconds)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test: $(STAMP) lint models ## install what is needed, then run every check and test
	$(PY) -m pytest $(PYTEST_ARGS)

BENCH ?=
smoke: $(STAMP) models ## on the default ports: make up, the README's examples as written, status, make down
	$(PY) -m services.stack up
	$(PY) scripts/smoke.py; rc=$$?; $(PY) -m services.stack status; $(PY) -m services.stack down; exit $$rc

bench: $(STAMP) models ## benchmarks against direct Triton in the same run (BENCH="router edge" for some)
	$(PY) -m bench $(BENCH)

docs: $(STAMP) ## regenerate docs/api.md (proto comments) and docs/configuration.md (settings classes)
	$(PY) scripts/gen_docs.py

sdk: $(STAMP) ## build the Python SDK wheels (servegrid-api stubs, servegrid-sdk client) into dist/
	$(PY) scripts/build_sdk.py --out dist

clean: ## remove build outputs (not the virtualenv)
	rm -rf .build dist .pytest_cache .mypy_cache .ruff_cache
