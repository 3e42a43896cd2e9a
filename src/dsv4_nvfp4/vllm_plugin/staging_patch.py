"""Route vLLM 0.34.0's NVFP4 MegaMoE input staging to our byte-identical, faster kernel.

``DeepGemmMegaMoEExperts.forward`` (``vllm/model_executor/layers/fused_moe/
deep_gemm_mega_moe.py``) calls ``prepare_megamoe_nvfp4_inputs`` by its module-global
name once per NVFP4 MegaMoE layer and step. The patch replaces that one global of that
one module with a wrapper: calls that :func:`dsv4_nvfp4.kernels.megamoe_staging_unsupported`
accepts go to :func:`dsv4_nvfp4.kernels.stage_megamoe_nvfp4_inputs`, which writes the same
bytes into the same buffers (proven against vLLM's kernel on the GPU:
``tests/gpu/test_megamoe_staging_gpu.py``); every other call — an active EPLB state, a
fused shared expert's input, any input the kernel does not take — goes to vLLM's own
function unchanged, and the first such call of each kind is logged in one line.

CUDA only (vLLM's MegaMoE exists only there). ``DSV4_NVFP4_VLLM_STAGING=1`` keeps vLLM's
own kernel: the patch is then not applied at all.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

from dsv4_nvfp4.vllm_plugin.runtime_patch import Patch, mark

logger = logging.getLogger("vllm.dsv4_nvfp4.staging")

ENV_SWITCH = "DSV4_NVFP4_VLLM_STAGING"
PATCH_NAME = "megamoe_nvfp4_staging"


def vllm_staging_requested() -> bool:
    """True when ``DSV4_NVFP4_VLLM_STAGING`` asks for vLLM's own staging kernel."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


def _active() -> bool:
    if vllm_staging_requested():
        logger.info("dsv4_nvfp4: %s=1: NVFP4 MegaMoE inputs staged by vLLM's own kernel",
                    ENV_SWITCH)
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def make_wrapper(original):  # type: ignore[no-untyped-def]
    """The stand-in for ``prepare_megamoe_nvfp4_inputs``: ours where it applies, else
    ``original``; one log line for the first call of each path (per reason's first words)."""
    from dsv4_nvfp4.kernels import megamoe_staging as ours

    logged: set[str] = set()

    def prepare_megamoe_nvfp4_inputs(*args, **kwargs):  # type: ignore[no-untyped-def]
        reason = ours.megamoe_staging_unsupported(*args, **kwargs)
        if reason is None:
            if "ours" not in logged:
                logged.add("ours")
                logger.info("dsv4_nvfp4: NVFP4 MegaMoE inputs staged by "
                            "dsv4_nvfp4.kernels.stage_megamoe_nvfp4_inputs (byte-identical to "
                            "vLLM's kernel; %s=1 restores vLLM's)", ENV_SWITCH)
            return ours.stage_megamoe_nvfp4_inputs(*args, **kwargs)
        kind = " ".join(reason.split()[:2])  # no shapes: one line per kind of call
        if kind not in logged:
            logged.add(kind)
            logger.info("dsv4_nvfp4: NVFP4 MegaMoE staging falls back to vLLM's kernel for "
                        "%s", reason)
        return original(*args, **kwargs)

    return mark(prepare_megamoe_nvfp4_inputs, original, PATCH_NAME)


def _apply(module: ModuleType) -> None:
    module.prepare_megamoe_nvfp4_inputs = make_wrapper(module.prepare_megamoe_nvfp4_inputs)


MEGAMOE_STAGING_PATCH = Patch(
    name=PATCH_NAME,
    module="vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe",
    symbol="prepare_megamoe_nvfp4_inputs",
    why=(
        "vLLM's NVFP4 MegaMoE staging kernel (_prepare_megamoe_nvfp4_inputs_kernel) reaches "
        "about a quarter of copy bandwidth on an H200 from 2048 tokens; ours writes the "
        "same bytes 1.1-2.8x faster at every batch size (docs/kernels.md)"
    ),
    upstream="not filed from here; vLLM 0.34.0 vllm/model_executor/layers/fused_moe/"
             "prepare_megamoe.py",
    remove_when=(
        "the pinned vLLM's staging kernel is within a few percent of ours "
        "(benchmarks/vllm_staging_bench.py), or its arithmetic changes "
        "(tests/gpu/test_megamoe_staging_gpu.py then fails and the patch must go)"
    ),
    active=_active,
    apply=_apply,
)
