# syntax=docker/dockerfile:1
#
# dsv4-nvfp4 serving image: the pinned vLLM release image + DeepGEMM built from
# a pinned commit (NVFP4 mega-MoE) + our package (vLLM plugin, doctor, CLI).
#
# Build it with `make build`: it passes every ARG below from the one pin file,
# src/dsv4_nvfp4/versions.env. The defaults here must equal that file; CI
# checks it (tests/test_deploy_dockerfile.py). To pin the base by digest, pass
#   make build VLLM_IMAGE=vllm/vllm-openai:v0.32.0@sha256:<digest>
#
# Stages: base -> deepgemm (wheel) | wheel (our wheel) -> runtime.
# No secrets are used or stored: the API key reaches the container at run time.

ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ------------------------------------------------------------------------------
# base: the pinned vLLM image plus the two tools the build needs.
FROM ${VLLM_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# git fetches the DeepGEMM commit; patch applies patches/*.diff. Installed only
# when the base image lacks them. DL3008 (pin apt versions) is suppressed on
# purpose: the only versions available are those of the base image's Ubuntu
# archive, an exact Debian revision pin breaks the build as soon as that
# archive moves on, and neither tool affects what runs (DeepGEMM is pinned by
# commit SHA and checked below; patches must apply with --fuzz=0).
# hadolint ignore=DL3008
RUN missing=(); \
    for tool in git patch; do command -v "${tool}" >/dev/null || missing+=("${tool}"); done; \
    if (( ${#missing[@]} )); then \
      apt-get update \
      && apt-get install -y --no-install-recommends "${missing[@]}" \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# ------------------------------------------------------------------------------
# deepgemm: a wheel of DEEPGEMM_REPO at DEEPGEMM_REF, with its submodules
# (third-party/cutlass, third-party/fmt; their headers ship in the wheel for
# the JIT).
#
# JIT facts (shared/research/deepgemm_fp4.md): setup.py compiles only the host
# binding (csrc/python_api.cpp); every kernel is compiled by NVCC at first use
# and cached in DG_JIT_CACHE_DIR (a volume, see runtime). With NVCC >= 12.9,
# DeepGEMM's JIT targets sm_100f on B200, where the block16 PTX spelling
# (`kind::mxf4nvf4...block16`) is required and `.scale_vec::4X` is rejected;
# a kernel with the wrong spelling fails at its first JIT compile on the node
# (warm-up), not here. TORCH_CUDA_ARCH_LIST pins the host extension build to
# sm_100a (there is no GPU at build time to detect).
FROM base AS deepgemm
ARG DEEPGEMM_REPO=https://github.com/deepseek-ai/DeepGEMM.git
ARG DEEPGEMM_REF=0274ad7b911b99b4eb6f8d796403811cf1e18f3d
ENV TORCH_CUDA_ARCH_LIST=10.0a
# (SHELL again after ARG/ENV: hadolint 2.15 otherwise lints the RUN as POSIX sh.)
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /build/deepgemm
RUN if ! [[ "${DEEPGEMM_REF}" =~ ^[0-9a-f]{40}$ ]]; then \
      echo "DEEPGEMM_REF must be a full 40-hex commit SHA, found '${DEEPGEMM_REF}'" >&2; exit 1; \
    fi; \
    command -v nvcc >/dev/null \
      || { echo "nvcc not found in the base image: DeepGEMM needs the CUDA toolkit (>= 12.9)" >&2; exit 1; }; \
    git init -q . \
    && git remote add origin "${DEEPGEMM_REPO}" \
    && git fetch -q --depth 1 origin "${DEEPGEMM_REF}" \
    && git checkout -q FETCH_HEAD \
    && test "$(git rev-parse HEAD)" = "${DEEPGEMM_REF}" \
    && git submodule update -q --init --recursive --depth 1 \
    && python3 setup.py bdist_wheel --dist-dir /wheels \
    && ls /wheels/deep_gemm-*.whl

# ------------------------------------------------------------------------------
# wheel: our package (dsv4_nvfp4 + its vllm.general_plugins entry point).
FROM base AS wheel
WORKDIR /build/dsv4-nvfp4
COPY pyproject.toml README.md ./
COPY src/ ./src/
RUN uv build --wheel --out-dir /wheels . && ls /wheels/dsv4_nvfp4-*.whl

# ------------------------------------------------------------------------------
# runtime: what `docker compose up` runs.
FROM base AS runtime
ARG VLLM_IMAGE
ARG VLLM_VERSION=0.32.0
ARG DEEPGEMM_REPO=https://github.com/deepseek-ai/DeepGEMM.git
ARG DEEPGEMM_REF=0274ad7b911b99b4eb6f8d796403811cf1e18f3d
ARG GIT_REVISION=unknown
LABEL org.opencontainers.image.title="dsv4-nvfp4" \
      org.opencontainers.image.description="DeepSeek V4 Pro, NVFP4 routed experts, 8xB200: vLLM + DeepGEMM NVFP4 mega-MoE + dsv4_nvfp4 plugin" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.base.name="${VLLM_IMAGE}" \
      dsv4-nvfp4.vllm.version="${VLLM_VERSION}" \
      dsv4-nvfp4.deepgemm.repo="${DEEPGEMM_REPO}" \
      dsv4-nvfp4.deepgemm.ref="${DEEPGEMM_REF}"

# Compile and JIT caches on paths compose.yaml mounts as named volumes, so a
# restart reuses them. DeepGEMM 2.8 reads DJ_JIT_* and falls back to DG_JIT_*;
# both are set. (No VOLUME here: compose owns the volumes and their names.)
ENV VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/vllm/inductor \
    TRITON_CACHE_DIR=/cache/triton \
    DG_JIT_CACHE_DIR=/cache/deep_gemm \
    DJ_JIT_CACHE_DIR=/cache/deep_gemm \
    FLASHINFER_WORKSPACE_BASE=/cache/flashinfer
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DeepGEMM first (vLLM prefers an installed `deep_gemm` over the copy vendored
# in its wheel), then our wheel; torch and vLLM come from the base image.
COPY --from=deepgemm /wheels/ /tmp/wheels/
COPY --from=wheel /wheels/ /tmp/wheels/
RUN uv pip install --system --no-deps /tmp/wheels/deep_gemm-*.whl \
    && uv pip install --system /tmp/wheels/dsv4_nvfp4-*.whl \
    && rm -rf /tmp/wheels

# patches/*.diff: unified diffs against vLLM ${VLLM_VERSION} with a/vllm/...
# paths, applied with -p1 in the directory that holds the vllm package, exact
# context only (--fuzz=0). They are read through a bind mount of the build
# context because git does not keep an empty patches/ directory: zero patches
# (or no directory) is a valid state. Copies stay in the image for the doctor.
RUN --mount=type=bind,source=.,target=/context \
    site="$(python3 -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("vllm").origin).parent.parent)')"; \
    mkdir -p /opt/dsv4-nvfp4/patches; \
    shopt -s nullglob; \
    for diff in /context/patches/*.diff; do \
      echo "applying ${diff##*/} in ${site}"; \
      cp "${diff}" /opt/dsv4-nvfp4/patches/ \
      && patch -p1 --fuzz=0 --forward --batch -d "${site}" -i "${diff}" || exit 1; \
    done

# The stdlib-only probe compose.yaml's healthcheck runs.
COPY healthcheck/ /opt/dsv4-nvfp4/healthcheck/

# Fail the build unless vLLM == the pin, our plugin loads, deep_gemm exports
# fp4_fp4_mega_moe and everything vLLM calls on it, and every patch is applied.
RUN dsv4-nvfp4 doctor

EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
