# dsv4-nvfp4 — every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
include src/dsv4_nvfp4/versions.env

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help setup test lint
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## Create .venv with everything any CPU test needs (pins: src/dsv4_nvfp4/versions.env)
	bash scripts/setup_venv.sh

test: ## Run the CPU test suite (what CI runs)
	$(PY) -m pytest -q tests --ignore=tests/gpu

lint: ## ruff on the whole repository
	$(VENV)/bin/ruff check .
