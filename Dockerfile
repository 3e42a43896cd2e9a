# syntax=docker/dockerfile:1
#
# dsv4-nvfp4 serving image: the pinned vLLM release image, unchanged, plus our
# package (vLLM plugin, doctor, CLI). DeepGEMM is the copy vendored inside the
# vLLM wheel (vllm.third_party.deep_gemm); nothing here builds or installs
# another one, because vLLM imports a site-packages `deep_gemm` first and it
# would replace vLLM's for every kernel (see docs/deploy.md, "The image").
#
# Build it with `make build`: it passes every ARG below from the one pin file,
# src/dsv4_nvfp4/versions.env. The defaults here must equal that file; CI
# checks it (tests/test_deploy_dockerfile.py). To pin the base by digest, pass
#   make build VLLM_IMAGE=vllm/vllm-openai:v0.34.0@sha256:<digest>
#
# Stages: base -> wheel (our wheel) -> runtime.
# No secrets are used or stored: the API key reaches the container at run time.

ARG VLLM_IMAGE=vllm/vllm-openai:v0.34.0

# ------------------------------------------------------------------------------
# base: the pinned vLLM image (vLLM, torch, FlashInfer, vendored DeepGEMM, nvcc
# for the JIT) plus `patch` when patches/ holds diffs and the image lacks it.
FROM ${VLLM_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 (pin apt versions) is suppressed on purpose: the only versions
# available are those of the base image's Ubuntu archive, an exact Debian
# revision pin breaks the build as soon as that archive moves on, and `patch`
# does not affect what runs (every diff must apply with --fuzz=0, and the
# doctor checks each one is applied).
# hadolint ignore=DL3008
RUN --mount=type=bind,source=.,target=/context \
    shopt -s nullglob; \
    diffs=(/context/patches/*.diff); \
    if (( ${#diffs[@]} )) && ! command -v patch >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends patch \
      && rm -rf /var/lib/apt/lists/*; \
    fi

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
ARG VLLM_VERSION=0.34.0
ARG VLLM_TORCH_VERSION=2.14.0
ARG FLASHINFER_VERSION=0.7.3
ARG VENDORED_DEEPGEMM_VERSION=2.8.1
ARG GIT_REVISION=unknown
LABEL org.opencontainers.image.title="dsv4-nvfp4" \
      org.opencontainers.image.description="DeepSeek V4 Pro, NVFP4 routed experts, 8xB200: vLLM + its vendored DeepGEMM NVFP4 MegaMoE + dsv4_nvfp4 plugin" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.base.name="${VLLM_IMAGE}" \
      dsv4-nvfp4.vllm.version="${VLLM_VERSION}" \
      dsv4-nvfp4.torch.version="${VLLM_TORCH_VERSION}" \
      dsv4-nvfp4.flashinfer.version="${FLASHINFER_VERSION}" \
      dsv4-nvfp4.deepgemm.version="${VENDORED_DEEPGEMM_VERSION}" \
      dsv4-nvfp4.deepgemm.source="vllm.third_party.deep_gemm"

# Compile and JIT caches on paths compose.yaml mounts as named volumes, so a
# restart reuses them. DG_JIT_CACHE_DIR is the variable vLLM sets for its
# DeepGEMM; DJ_JIT_CACHE_DIR is kept for DeepGEMM builds that read that name.
# (No VOLUME here: compose owns the volumes and their names.)
ENV VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/vllm/inductor \
    TRITON_CACHE_DIR=/cache/triton \
    DG_JIT_CACHE_DIR=/cache/deep_gemm \
    DJ_JIT_CACHE_DIR=/cache/deep_gemm \
    FLASHINFER_WORKSPACE_BASE=/cache/flashinfer
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Our wheel only. The constraints hold vLLM, torch and FlashInfer at the
# base image's versions: the resolver may add a missing pure-Python
# dependency of ours but must fail rather than replace any of the three.
COPY --from=wheel /wheels/ /tmp/wheels/
RUN printf '%s\n' "vllm==${VLLM_VERSION}" "torch==${VLLM_TORCH_VERSION}" \
      "flashinfer-python==${FLASHINFER_VERSION}" > /tmp/wheels/keep.txt \
    && uv pip install --system --constraints /tmp/wheels/keep.txt /tmp/wheels/dsv4_nvfp4-*.whl \
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

# Fail the build unless vLLM, torch and FlashInfer are the pins (and equal the
# build args the labels carry), our plugin loads, no site-packages deep_gemm
# shadows vLLM's vendored one, the vendored one is the pinned version with the
# NVFP4 MegaMoE API, its extension and its JIT headers, nvcc >= 12.9 is there,
# and every patch is applied. Files and metadata only: no GPU at build time
# (`doctor --gpu` on the node runs the kernel).
RUN dsv4-nvfp4 doctor \
      --build-arg "VLLM_VERSION=${VLLM_VERSION}" \
      --build-arg "VLLM_TORCH_VERSION=${VLLM_TORCH_VERSION}" \
      --build-arg "FLASHINFER_VERSION=${FLASHINFER_VERSION}" \
      --build-arg "VENDORED_DEEPGEMM_VERSION=${VENDORED_DEEPGEMM_VERSION}"

EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
